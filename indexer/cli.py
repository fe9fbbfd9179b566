"""``influence index build|info|verify`` and ``influence query`` (registered into service.cli).

Progress bars (tqdm) live here, at the CLI edge; the library reports progress through a
callback. Project errors propagate to the dispatcher, which prints them and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from encoder.config import FingerprintConfig
from encoder.errors import ConfigError
from indexer.summary import print_summary, summary


def _tqdm_progress(enabled: bool):
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    labels = {"basis": "basis (projection)", "statistics": "pass 1 (statistics)", "encode": "pass 2 (encode)"}

    def progress(stage: str, n: int, total: int) -> None:
        if not enabled:
            return
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=labels.get(stage, stage), unit="seq",
                                     dynamic_ncols=True, file=sys.stderr)
        bar.update(n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def fingerprint_config(args: argparse.Namespace) -> FingerprintConfig:
    """The FingerprintConfig of the build options."""
    return FingerprintConfig(
        include=tuple(args.include or ("*",)),
        exclude=tuple(args.exclude or ()),
        track_lm_head=args.track_lm_head,
        k=args.proj_dim,
        budget=args.budget,
        max_block=args.max_block,
        projection=args.projection,
        seed=args.seed,
        correction=not args.no_correction,
        hessian=args.hessian,
        lambda_=args.lambda_,
        delta=args.delta,
        mode=args.encoder,
    )


def build_config(args: argparse.Namespace):
    """The BuildConfig of ``influence index build`` options."""
    from indexer.build import BuildConfig

    return BuildConfig(
        model=Path(args.model), corpus=Path(args.corpus), out=Path(args.out),
        fingerprint=fingerprint_config(args), seq_len=args.seq_len, stride=args.stride,
        pack=args.pack, append_eos=not args.no_eos,
        queries=Path(args.queries) if args.queries else None,
        optimizer_state=Path(args.optimizer_state) if args.optimizer_state else None,
        v_sample=args.v_sample, hessian_sample=args.hessian_sample, basis_sample=args.basis_sample or None,
        faiss=args.faiss,
        faiss_train_sample=args.faiss_train_sample, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, threads=args.threads, name=args.name,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from indexer.build import run_build
    from indexer.distributed import exit_after_success, init_distributed, shutdown

    cfg = build_config(args)
    ctx = init_distributed()
    progress, close = _tqdm_progress(ctx.is_main and not args.no_progress)
    try:
        out = run_build(cfg, ctx, progress)
    except BaseException:
        close()
        shutdown()
        raise
    close()
    if ctx.is_main:
        print(f"index published: {out}")
        print_summary(summary(out))
    if ctx.world_size > 1:
        exit_after_success(0)
    shutdown()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    s = summary(Path(args.index_dir))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print_summary(s)
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from indexer.spectrum import plot, spectrum

    data = spectrum(Path(args.index_dir))
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{'lambda (built)':>20}: {data['lambda']:.6g} at c = {data['component']:g} * d, d = {data['d']}")
        for name, lam in data["lambda_by_component"].items():
            print(f"{'lambda at c = ' + name:>20}: {lam:.6g}")
    if args.out:
        plot(data, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from indexer.milvus import MilvusTarget, push

    try:
        params = json.loads(args.index_params)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--index-params is not JSON: {exc}") from None
    if not isinstance(params, dict) or args.batch_size < 1:
        raise ConfigError("--index-params must be a JSON object and --batch-size >= 1")
    progress, close = _tqdm_progress(not args.no_progress)
    try:
        report = push(Path(args.index_dir), MilvusTarget(args.milvus, args.collection), index_type=args.index_type,
                      index_params=params, batch_size=args.batch_size,
                      progress=lambda n, total: progress("push", n, total))  # fmt: skip
    finally:
        close()
    print(f"pushed to {args.milvus} collection {report['collection']}: {report['inserted']} inserted, "
          f"{report['present']} already there ({report['vector_type']})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from indexer.verify import verify_index

    for line in verify_index(Path(args.index_dir), model_dir=Path(args.model) if args.model else None):
        print(line)
    print("OK")
    return 0


def _batch_size(text: str) -> int:
    """--batch-size: a positive integer, or ``auto`` (0 in BuildConfig)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build an index from a corpus")
    p.add_argument("--model", required=True, help="model or HF Trainer checkpoint directory")
    p.add_argument("--corpus", required=True, help=".jsonl, .parquet, datasets dir, or folder of .txt")
    p.add_argument("--out", required=True, help="index directory to publish")
    p.add_argument("--queries", help="JSONL of {prompt, completion} for R_eval")
    p.add_argument("--optimizer-state", help="optimizer.pt / checkpoint dir / second-moment safetensors")
    p.add_argument("--no-correction", action="store_true", help="ablation: no optimizer correction")
    p.add_argument("--hessian", choices=("none", "train", "mixed"), default="mixed",
                   help="R: none (ablation), train (R_train), mixed (lambda R_eval + (1-lambda) R_train, with --queries)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=None, help="R_eval weight (default: App. A.1.3 rule)")
    p.add_argument("--delta", type=float, default=1e-3, help="whitening damping")
    p.add_argument("-k", "--proj-dim", type=int, default=None,
                   help="a fixed projection size per side for every module (0 = no projection); "
                        "default: sized from --budget")
    p.add_argument("--budget", type=int, default=1 << 16,
                   help="total fingerprint dims shared by the modules; a module whose gradient fits "
                        "its share is stored exactly (default 65536, the paper's)")
    p.add_argument("--max-block", type=int, default=1024,
                   help="the most dims one module's block takes under --budget (its Hessian block is "
                        "this squared; default 1024 = 8 MiB of float64)")
    p.add_argument("--projection", choices=("gaussian", "pca"), default="gaussian",
                   help="gaussian: seeded random matrices (the paper's); pca: each module's top corrected-gradient "
                        "eigenvectors, fitted on --basis-sample sequences (seed-free and closer to the unprojected "
                        "ranking, but worse attribution with a Hessian: see the README)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the gaussian projection")
    p.add_argument("--include", action="append", help="module name glob to track (repeatable)")
    p.add_argument("--exclude", action="append", help="module name glob to skip (repeatable)")
    p.add_argument("--track-lm-head", action="store_true", help="also track the output embedding (LM head)")
    p.add_argument("--encoder", choices=("exact", "factored"), default="exact",
                   help="exact per-example gradients, or factored (rank-1 second moments folded into the projections)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: model context)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: seq-len)")
    p.add_argument("--pack", action="store_true", help="pack documents into sequences")
    p.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")
    p.add_argument("--v-sample", type=int, default=256, help="sequences for the second-moment estimate")
    p.add_argument("--hessian-sample", type=int, default=None, help="sequences for R_train (default: all)")
    p.add_argument("--basis-sample", type=int, default=1024,
                   help="sequences the pca basis is fitted on, evenly spaced (default 1024; 0 = all)")
    p.add_argument("--faiss", default="Flat", help="FAISS factory string (Flat, IVF{n},PQ{m}, HNSW32)")
    p.add_argument("--faiss-train-sample", type=int, default=65536,
                   help="vectors an approximate FAISS index is trained on (default 65536)")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="sequences per backward pass, or 'auto': the largest that fits free memory")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard (resume unit)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA if present, else CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 for models < 50M params on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--name", default=None,
                   help="the model's display name in the UI and API (default: run/checkpoint-N for a "
                        "Trainer checkpoint, else the model directory's name)")
    p.set_defaults(func=cmd_build)


def register(subparsers) -> None:
    """Add ``index`` (build/info/spectrum/push/verify) to the influence CLI."""
    index = subparsers.add_parser("index", help="build and inspect influence indexes")
    isub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    _add_build(isub)
    info = isub.add_parser("info", help="manifest summary")
    info.add_argument("index_dir", help="a published index directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)
    spec = isub.add_parser("spectrum", help="R_train / R_eval eigenvalue curves and lambda per component choice")
    spec.add_argument("index_dir", help="a published index built with hessian mixed and --queries")
    spec.add_argument("--out", help="write the plot here (PNG)")
    spec.add_argument("--json", action="store_true", help="print the curves and lambdas as JSON (one line)")
    spec.set_defaults(func=cmd_spectrum)
    push = isub.add_parser("push", help="upload a published index into a Milvus collection (resumable)")
    push.add_argument("index_dir", help="a published index directory")
    push.add_argument("--milvus", required=True, metavar="URI",
                      help="pymilvus URI: http://host:19530 for a server")
    push.add_argument("--collection", default=None, help="collection name (default influence_<index version>)")
    push.add_argument("--index-type", default="FLAT",
                      help="Milvus vector index: FLAT (exact, default), IVF_FLAT, IVF_PQ, HNSW, GPU_CAGRA, GPU_IVF_PQ")
    push.add_argument("--index-params", default="{}", help="the vector index's parameters as JSON, e.g. '{\"nlist\": 1024}'")
    push.add_argument("--batch-size", type=int, default=1024, help="rows per insert (default 1024)")
    push.add_argument("--no-progress", action="store_true", help="no progress bar")
    push.set_defaults(func=cmd_push)
    ver = isub.add_parser("verify", help="checksums, counts, model hash")
    ver.add_argument("index_dir", help="a published index directory")
    ver.add_argument("--model", default=None, help="model directory (default: the manifest's)")
    ver.set_defaults(func=cmd_verify)
