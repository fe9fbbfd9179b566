"""How much of a top-10 is decided by the random projection, per configuration (issue 15).

For each model (trained here: the demo GPT-2, 2 x 128 on the demo fact corpus, and a deeper
6 x 256 on a 120-fact corpus) and each candidate configuration, with projection seeds 0
and 1, over the queries of the corpus:

- ``none_vs_exact``: top-10 overlap of ``--hessian none`` with the unprojected ranking
  (k = 0, hessian none: every gradient dim, no projection noise), mean over seeds;
- ``none_seed`` / ``mixed_seed``: top-10 overlap between seeds 0 and 1, hessian none and
  the full default (mixed R); Spearman of all scores likewise;
- ``none_vs_own``: the same against the config's own unprojected ranking, which for the
  ``sketch`` is its plain or K-FAC-whitened gradient (k = 0; for ``gaussian`` it is
  ``exact``);
- ``rescoreC``: the exact second stage (``encoder.rescoring``, by the own unprojected
  scores) on the hessian-none first stage's top C: overlap of the re-ranked top-10 with the
  own unprojected one; ``rescoreC_seed`` between seeds; ``mixed_rescoreC_seed``: seed-to-seed
  overlap of the re-ranked top-10 when the first stage whitens with the projected mixed R;
- cost: seconds of the build's passes in-process (the whitening fit of a sketch; statistics
  pass, R, lambda and R^-1/2 where the config's hessian is not none; the encode pass), bytes
  per stored vector (float16),
  memory of the R statistics (float64 sums of R_train and R_eval, and R^-1/2), and the
  exact second stage's time per query for C = 100.

The re-scored scores are the unprojected scores of the candidates (tested equal in
tests/encoder/test_projection_plan.py and tests/service/test_rescore.py), so they are
read from the reference matrix here. Results: benchmarks/results/bench_fidelity.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import RESULTS_DIR, machine, md_table, write_results  # noqa: E402

RESCORE_C = (20, 50, 100)
SEEDS = (0, 1)


@dataclass(frozen=True)
class ModelSpec:
    """A model the benchmark trains (cached in the work directory)."""

    name: str
    corpus: str  # evaluation.corpus size
    n_facts: int | None
    size: str  # evaluation.train size


MODELS = {
    "demo": ModelSpec("demo", "demo", None, "demo"),
    "deep": ModelSpec("deep", "demo", 120, "deep"),
    "quick": ModelSpec("quick", "test", None, "test"),
}
PAPER = {"projection": "gaussian", "correction": True, "build_hessian": "mixed"}
"""The paper's projection and optimizer correction; its build whitens by mixed R
(``build_hessian``: what the build time counts; every config is scored both ways)."""
CONFIGS: dict[str, dict[str, Any]] = {
    "k=16 gaussian (first)": {"k": 16, **PAPER},
    "budget 2^16, block 1024, gaussian (paper)": {**PAPER},
    "budget 2^16, block 2048, gaussian": {"max_block": 2048, **PAPER},
    "budget 2^16, block 1024, sketch, whitened": {
        "max_block": 1024,
        "projection": "sketch",
        "whiten": True,
    },
    "budget 2^16, block 4096, sketch, whitened (previous default)": {
        "projection": "sketch",
        "whiten": True,
    },
    "budget 2^16, block 4096, sketch (default)": {"projection": "sketch"},
}
QUICK_CONFIGS: dict[str, dict[str, Any]] = {
    "k=8 gaussian": {"k": 8, **PAPER},
    "budget 2^16, block 256, sketch": {"max_block": 256, "projection": "sketch"},
}
BASIS_SAMPLE = 1024
"""Sequences the sketch's whitening is fitted on (the build's default ``basis_sample``)."""


def basis_ids(n: int) -> list[int]:
    """Training positions the whitening is fitted on: evenly spaced, as the build does."""
    return np.unique(np.linspace(0, n - 1, min(n, BASIS_SAMPLE)).round().astype(int)).tolist()


def prepare(spec: ModelSpec, workdir: Path) -> tuple[Path, Path]:
    """(checkpoint, corpus dir): train once, reuse when the stamp is there."""
    from evaluation.corpus import generate_fact_corpus
    from evaluation.train import train_fact_model

    root = workdir / spec.name
    stamp = root / "stamp.json"
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        return Path(data["checkpoint"]), root / "corpus"
    corpus = generate_fact_corpus(spec.corpus, seed=0, n_facts=spec.n_facts)
    corpus.write(root / "corpus")
    result = train_fact_model(corpus, root / "model", size=spec.size, seed=0, progress=True)
    stamp.write_text(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint_dir),
                "fact_accuracy": result.fact_accuracy,
                "train_seconds": result.train_seconds,
                "passages": len(corpus.passages),
            }
        )
    )
    return result.checkpoint_dir, root / "corpus"


class Harness:
    """A trained model, its training sequences and queries, and the scores of a config."""

    def __init__(self, checkpoint: Path, corpus_dir: Path, n_queries: int) -> None:
        from encoder.batching import sequence_example, tokenize_query
        from encoder.model_loading import load_model, load_tokenizer
        from encoder.optimizer_state import load_second_moments
        from evaluation.corpus import load_queries
        from evaluation.inputs import read_corpus, training_sequences
        from evaluation.methods import fold_of

        self.model = load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
        self.tokenizer = load_tokenizer(checkpoint)
        self.pad = int(self.tokenizer.pad_token_id or 0)
        _, texts = read_corpus(corpus_dir / "corpus.jsonl")
        queries = load_queries(corpus_dir / "queries.jsonl")[:n_queries]
        max_len = int(self.model.config.n_positions)
        self.train = [
            sequence_example(s) for s in training_sequences(self.tokenizer, texts, max_len)
        ]
        self.queries = [tokenize_query(self.tokenizer, q.prompt, q.completion) for q in queries]
        self.second_moments = load_second_moments(checkpoint, self.model)
        self.folds = fold_of(len(self.queries), 0)
        self.basis_s = 0.0  # seconds of the last phi's basis fit

    def fitted(self, config) -> Any:
        """The config's encoder with its whitening fitted (``basis_s``: seconds)."""
        from encoder.fingerprint import TrackStarEncoder
        from evaluation.methods import fit_basis

        enc = TrackStarEncoder(
            self.model, config, second_moments=self.second_moments if config.correction else None
        )
        t0 = time.perf_counter()
        fit_basis(
            enc, [self.train[i] for i in basis_ids(len(self.train))], pad_id=self.pad, batch_size=16
        )
        self.basis_s = time.perf_counter() - t0
        return enc

    def phi(self, config) -> tuple[Any, torch.Tensor, torch.Tensor, float]:
        """(encoder, phi train, phi queries, seconds)."""
        from evaluation.methods import project_all

        enc = self.fitted(config)
        t0 = time.perf_counter()
        a = project_all(enc, self.train, pad_id=self.pad, batch_size=16)
        b = project_all(enc, self.queries, pad_id=self.pad, batch_size=16)
        return enc, a, b, time.perf_counter() - t0

    def scores(
        self, config, train: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """([Q, N] scores, seconds of one whitening), as the evaluation scores
        (``evaluation.methods.gradient_scores``: mixed R_eval from the other fold)."""
        from evaluation.methods import N_FOLDS, GradientInputs, gradient_scores

        t0 = time.perf_counter()
        scores, _ = gradient_scores(
            config, self.model, self.second_moments, GradientInputs(train, queries), self.folds
        )
        # One fold's whitening is what a build does; the second is the evaluation's split.
        seconds = (time.perf_counter() - t0) / N_FOLDS if config.hessian == "mixed" else 0.0
        return scores.float(), seconds

    def rescore_ms(self, config, candidates: int, whitening=None) -> float:
        """Milliseconds of the exact second stage for one query and ``candidates`` sequences."""
        from encoder.rescoring import ExactRescorer

        rescorer = ExactRescorer(self.model, config, self.second_moments, whitening)
        cands = self.train[:candidates]
        rescorer.scores(self.queries[0], cands[:2], self.pad)  # warm-up
        t0 = time.perf_counter()
        rescorer.scores(self.queries[0], cands, self.pad)
        return (time.perf_counter() - t0) * 1e3


def unprojected(
    h: Harness, projection: str, correction: bool, whiten: bool = False
) -> tuple[torch.Tensor, Any, float]:
    """([Q, N] unit-norm scores, encoder, seconds) of the unprojected configuration
    (k = 0, hessian none): the plain (corrected) gradients, or the sketch's whitened ones."""
    from encoder.config import FingerprintConfig

    config = FingerprintConfig(
        k=0, hessian="none", projection=projection, correction=correction, whiten=whiten
    )
    enc, a, b, seconds = h.phi(config)
    # Unit-normalize in place: the unprojected phi of the deep model is ~10 GB already.
    for m in (a, b):
        m.div_(m.norm(dim=1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny))
    return b @ a.T, enc, seconds


def top(scores: torch.Tensor, k: int) -> list[set[int]]:
    return [set(row.tolist()) for row in torch.topk(scores, min(k, scores.shape[1]), dim=1).indices]


def overlap(a: list[set[int]], b: list[set[int]], k: int = 10) -> float:
    return float(np.mean([len(x & y) / k for x, y in zip(a, b, strict=True)]))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(
        np.mean([spearmanr(a, b).statistic for a, b in zip(x.numpy(), y.numpy(), strict=True)])
    )


def rescored(first: torch.Tensor, exact: torch.Tensor, c: int) -> list[set[int]]:
    """Top-10 after re-scoring the first stage's top c by the exact scores."""
    cand = torch.topk(first, min(c, first.shape[1]), dim=1).indices
    return [set(row[torch.topk(exact[q, row], 10).indices].tolist()) for q, row in enumerate(cand)]


def r_bytes(block_dims: list[int]) -> int:
    """float64 sums of R_train and R_eval plus the float64 R^-1/2 blocks."""
    return 3 * sum(8 * d * d for d in block_dims)


def measure_model(
    spec: ModelSpec, configs: dict[str, dict[str, Any]], workdir: Path, n_queries: int
) -> dict:
    from encoder.config import FingerprintConfig

    checkpoint, corpus_dir = prepare(spec, workdir)
    h = Harness(checkpoint, corpus_dir, n_queries)
    exact, enc, exact_s = unprojected(h, "gaussian", True)
    exact_top = top(exact, 10)
    # The sketch configs' own unprojected rankings (plain, or K-FAC-whitened), each once.
    sketch_own = {
        w: unprojected(h, "sketch", False, w)[0]
        for w in {
            bool(c.get("whiten")) for c in configs.values() if c.get("projection") == "sketch"
        }
    }
    info = {
        "model": spec.name,
        "layers": int(h.model.config.n_layer),
        "width": int(h.model.config.n_embd),
        "sequences": len(h.train),
        "queries": len(h.queries),
        "unprojected_dim": enc.dim,
        "unprojected_phi_s": round(exact_s, 1),
    }
    rows = []
    for label, entry in configs.items():
        print(f"[{spec.name}] {label}", flush=True)
        sizing = {key: v for key, v in entry.items() if key != "build_hessian"}
        whitens = entry.get("build_hessian", "none") != "none"
        s_none, s_mixed, cost = {}, {}, []
        for seed in SEEDS:
            enc, a, b, phi_s = h.phi(FingerprintConfig(seed=seed, hessian="none", **sizing))
            s_none[seed], _ = h.scores(enc.config, a, b)
            # The same blocks with R (a config's block cap defaults by its hessian).
            mixed = FingerprintConfig(
                seed=seed, hessian="mixed", **{"max_block": enc.config.block_cap, **sizing}
            )
            s_mixed[seed], whiten_s = h.scores(mixed, a, b)
            # A build's passes: the whitening fit (sketch), pass 1 and R^-1/2 only where the config
            # whitens by R (hessian none builds skip them), and the encode pass.
            cost.append(h.basis_s + phi_s + (phi_s + whiten_s if whitens else 0.0))
            del a, b
        # A config's own unprojected ranking: the sketch's is its plain or K-FAC-whitened
        # gradient (k = 0), and its exact second stage re-scores by it (encoder.rescoring).
        own = sketch_own[enc.config.whiten] if enc.config.projection == "sketch" else exact
        own_top = top(own, 10)
        n0, n1 = top(s_none[0], 10), top(s_none[1], 10)
        m0, m1 = top(s_mixed[0], 10), top(s_mixed[1], 10)
        row: dict[str, Any] = {
            "config": label,
            "projection": enc.config.projection,
            "d": enc.dim,
            "max_block_dims": max(enc.block_dims),
            "exact_modules": sum(
                d == m.out_features * m.in_features
                for m, d in zip(enc.modules, enc.block_dims, strict=True)
            ),
            "modules": len(enc.plan),
            "none_vs_exact": (overlap(n0, exact_top) + overlap(n1, exact_top)) / 2,
            "none_seed": overlap(n0, n1),
            "mixed_seed": overlap(m0, m1),
            "spearman_none_vs_exact": spearman(s_none[0], exact),
            "spearman_mixed_seed": spearman(s_mixed[0], s_mixed[1]),
            "mixed_vs_exact": overlap(m0, exact_top),
            "none_vs_own": (overlap(n0, own_top) + overlap(n1, own_top)) / 2,
            "mixed_vs_own": (overlap(m0, own_top) + overlap(m1, own_top)) / 2,
            "build_passes_s": float(np.mean(cost)),
            "bytes_per_vector": 2 * enc.dim,
            "r_memory_mib": r_bytes(enc.block_dims) / 2**20,
            "projection_mib": sum(4 * t.numel() for t in enc.family.tensors().values()) / 2**20,
        }
        for c in RESCORE_C:
            row[f"rescore{c}"] = overlap(rescored(s_none[0], own, c), own_top)
            row[f"rescore{c}_seed"] = overlap(
                rescored(s_none[0], own, c), rescored(s_none[1], own, c)
            )
            r0, r1 = rescored(s_mixed[0], own, c), rescored(s_mixed[1], own, c)
            row[f"mixed_rescore{c}_seed"] = overlap(r0, r1)
            row[f"mixed_rescore{c}_vs_exact"] = overlap(r0, own_top)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["build_passes_s"]
    for row in rows:
        row["build_vs_first"] = row["build_passes_s"] / base
    whitening = h.fitted(
        FingerprintConfig()
    ).family.whitening()  # the default's, for its exact stage
    info["rescore100_ms_per_query"] = h.rescore_ms(FingerprintConfig(), 100, whitening)
    t0 = time.perf_counter()
    h.phi(
        FingerprintConfig(hessian="none", projection="gaussian")
    )  # one first-stage encode per sequence
    per_seq = (time.perf_counter() - t0) / (len(h.train) + len(h.queries))
    info["first_stage_encode_ms_per_query"] = per_seq * 1e3
    return {"info": info, "rows": rows}


FAMILIES = ("gaussian kronecker", "rademacher kronecker", "dense gaussian")
DENSE_MAX_FLOATS = 1 << 27
"""A dense projection whose d_W x out*in matrix exceeds this (512 MiB) is not measured."""


def _project_block(
    g: torch.Tensor, m, sizes: tuple[int, int], family: str, seed: int
) -> torch.Tensor | None:
    """One module's exact block g [N, out*in] projected to k1*k2 dims by a family."""
    from encoder.projection import module_seed, projection_pair

    k1, k2 = sizes
    if family == "gaussian kronecker":  # the encoder's own matrices
        a, b = projection_pair(seed, m, k1, k2)
    elif family == "rademacher kronecker":
        gen = torch.Generator().manual_seed(module_seed(seed, m.name))
        a = (torch.randint(0, 2, (k1, m.out_features), generator=gen).float() * 2 - 1) / k1**0.5
        b = (torch.randint(0, 2, (k2, m.in_features), generator=gen).float() * 2 - 1) / k2**0.5
    else:
        if k1 * k2 * g.shape[1] > DENSE_MAX_FLOATS:
            return None
        gen = torch.Generator().manual_seed(module_seed(seed, m.name))
        dense = torch.randn(k1 * k2, g.shape[1], generator=gen) / (k1 * k2) ** 0.5
        return g @ dense.T
    return (a @ g.view(-1, m.out_features, m.in_features) @ b.T).flatten(1)


def measure_families(spec: ModelSpec, workdir: Path, n_queries: int) -> dict:
    """Projection families at the default plan's block sizes (equal d), hessian none."""
    from encoder.config import FingerprintConfig
    from encoder.fingerprint import TrackStarEncoder

    checkpoint, corpus_dir = prepare(spec, workdir)
    h = Harness(checkpoint, corpus_dir, n_queries)
    enc, a, b, _ = h.phi(
        FingerprintConfig(k=0, hessian="none", projection="gaussian", correction=True)
    )
    plan = TrackStarEncoder(
        h.model,
        FingerprintConfig(hessian="none", projection="gaussian", correction=True),
        second_moments=h.second_moments,
    ).plan
    unit = [m / m.norm(dim=1, keepdim=True) for m in (a, b)]
    exact = unit[1] @ unit[0].T
    del unit
    exact_top = top(exact, 10)
    rows = []
    for family in FAMILIES:
        scores, skipped, t0, mem = {}, [], time.perf_counter(), 0
        for seed in SEEDS:
            parts_a, parts_b, start = [], [], 0
            for m, dim in zip(enc.modules, enc.block_dims, strict=True):
                sizes = plan[m.name]
                sl = slice(start, start + dim)
                start += dim
                if sizes is None:
                    parts_a.append(a[:, sl]), parts_b.append(b[:, sl])
                    continue
                pa = _project_block(a[:, sl], m, sizes, family, seed)
                if pa is None:
                    skipped.append(m.name)
                    break
                parts_a.append(pa), parts_b.append(_project_block(b[:, sl], m, sizes, family, seed))
                if seed == SEEDS[0]:
                    mem += 4 * (
                        sizes[0] * sizes[1] * dim
                        if family == "dense gaussian"
                        else sizes[0] * m.out_features + sizes[1] * m.in_features
                    )
            if skipped:
                break
            ta, tb = torch.cat(parts_a, 1), torch.cat(parts_b, 1)
            scores[seed] = (tb / tb.norm(dim=1, keepdim=True)) @ (
                ta / ta.norm(dim=1, keepdim=True)
            ).T
        if skipped:
            rows.append(
                {
                    "family": family,
                    "note": f"skipped: {skipped[0]}'s dense matrix exceeds "
                    f"{DENSE_MAX_FLOATS * 4 >> 20} MiB",
                }
            )
            continue
        s0, s1 = scores[SEEDS[0]], scores[SEEDS[1]]
        rows.append(
            {
                "family": family,
                "d": int(ta.shape[1]),
                "none_vs_exact": (overlap(top(s0, 10), exact_top) + overlap(top(s1, 10), exact_top))
                / 2,
                "none_seed": overlap(top(s0, 10), top(s1, 10)),
                "spearman_none_vs_exact": spearman(s0, exact),
                "projection_mib": mem / 2**20,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"model": spec.name, "rows": rows}


COLUMNS = [
    "config",
    "projection",
    "d",
    "exact_modules",
    "none_vs_exact",
    "none_vs_own",
    "none_seed",
    "mixed_seed",
    "spearman_none_vs_exact",
    "spearman_mixed_seed",
    "rescore20",
    "rescore50",
    "rescore100",
    "rescore100_seed",
    "mixed_rescore100_seed",
    "mixed_rescore100_vs_exact",
    "build_passes_s",
    "build_vs_first",
    "bytes_per_vector",
    "r_memory_mib",
]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for row in res["rows"]:
            xs = [10, *RESCORE_C]
            ys = [row["none_vs_exact"], *(row[f"rescore{c}"] for c in RESCORE_C)]
            ax.plot(xs, ys, marker="o", label=f"{row['config']} (d={row['d']})")
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
        info = res["info"]
        ax.set(
            title=f"{info['model']}: {info['layers']} x {info['width']}, {info['sequences']} sequences",
            xlabel="candidates re-scored exactly (10 = first stage only)",
            ylabel="top-10 overlap with the unprojected ranking",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _families_main(args: argparse.Namespace) -> int:
    names = ["quick"] if args.quick else [n.strip() for n in args.models.split(",")]
    results = [measure_families(MODELS[n], args.workdir, args.queries) for n in names]
    md = [
        "# Projection families at equal d (hessian none)\n",
        "Each module's exact corrected gradient projected to the default plan's k1 x k2 dims by: the "
        "encoder's Gaussian Kronecker pair, a Rademacher (+-1/sqrt(k)) Kronecker pair, or one dense "
        f"Gaussian matrix (d_W x out*in). Top-10 overlaps as in bench_fidelity; seeds {SEEDS}.\n",
    ]
    for res in results:
        md.append(f"\n## {res['model']}\n")
        md.append(
            md_table(
                res["rows"],
                [
                    "family",
                    "d",
                    "none_vs_exact",
                    "none_seed",
                    "spearman_none_vs_exact",
                    "projection_mib",
                    "seconds",
                    "note",
                ],
            )
        )
    payload = {
        "machine": machine(),
        "settings": {**vars(args), "workdir": str(args.workdir), "out": str(args.out)},
        "results": results,
    }
    write_results(
        "fidelity_families_quick" if args.quick else "fidelity_families",
        payload,
        "".join(md),
        args.out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--models", default="demo,deep", help="comma-separated: demo, deep (quick with --quick)"
    )
    p.add_argument("--queries", type=int, default=100, help="queries per model (default 100)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench/fidelity"),
        help="trained models are cached here",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument(
        "--quick", action="store_true", help="smoke size: the test model, k=8 vs the default"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated substrings: only the configs whose label holds one",
    )
    p.add_argument(
        "--stem",
        default="fidelity",
        help="results name: bench_STEM.{json,md,png} (default fidelity)",
    )
    p.add_argument(
        "--families",
        action="store_true",
        help="compare projection families (Gaussian / Rademacher Kronecker, dense Gaussian) at "
        "the default's block sizes instead; writes bench_fidelity_families.*",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.families:
        return _families_main(args)
    names = ["quick"] if args.quick else [n.strip() for n in args.models.split(",")]
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs:
        configs = {
            label: c
            for label, c in configs.items()
            if any(p in label for p in args.configs.split(","))
        }
    results = [measure_model(MODELS[n], configs, args.workdir, args.queries) for n in names]
    name = "fidelity_quick" if args.quick else args.stem
    md = [
        "# Fidelity benchmark: how much of the top-10 the projection decides\n",
        "Overlaps are top-10 set overlaps averaged over queries; `exact` = the unprojected ranking "
        "(k = 0, hessian none, corrected); `own` = the config's own unprojected ranking (a sketch: its plain or "
        "K-FAC-whitened gradient, uncorrected); `rescoreC` = the exact second stage (by the own unprojected scores) over the first stage's top C. "
        f"Seeds {SEEDS[0]} and {SEEDS[1]}; a pca basis has no seed, so its two runs fit the basis on disjoint "
        "halves of the corpus (even / odd sequences) and `*_seed` is the overlap between those. "
        "`build_passes_s`: basis (pca) + statistics + encode passes and whitening, in-process, one thread.\n",
    ]
    for res in results:
        i = res["info"]
        md.append(
            f"\n## {i['model']}: GPT-2 {i['layers']} x {i['width']}, {i['sequences']} sequences, "
            f"{i['queries']} queries (unprojected d = {i['unprojected_dim']:,})\n"
        )
        md.append(md_table(res["rows"], COLUMNS))
        md.append(
            f"\nExact second stage, C = 100: {i['rescore100_ms_per_query']:.0f} ms per query; "
            f"first-stage encode: {i['first_stage_encode_ms_per_query']:.1f} ms per query.\n"
        )
    payload = {
        "machine": machine(),
        "settings": {**vars(args), "workdir": str(args.workdir), "out": str(args.out)},
        "models": {n: asdict(MODELS[n]) for n in names},
        "results": results,
    }
    write_results(name, payload, "".join(md), args.out)
    plot(results, args.out / f"bench_{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
