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
        faiss_train_sample=args.faiss_train_sample, bm25=not args.no_bm25, batch_size=args.batch_size,
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
        print_summary(_summary(out))
    if ctx.world_size > 1:
        exit_after_success(0)
    shutdown()
    return 0


def _summary(index_dir: Path) -> dict:
    from indexer import manifest as mf
    from indexer.manifest import display_name

    m = mf.read_manifest(index_dir)
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    n = m["counts"]["sequences"]
    b = m["build"]
    seconds = (b.get("statistics_seconds") or 0) + (b.get("encode_seconds") or 0)
    return {
        "index": str(index_dir), "version": mf.manifest_version(index_dir),
        "name": m["model"].get("name") or display_name(Path(m["model"]["path"])), "model": m["model"]["path"],
        "sequences": n, "documents": m["counts"]["documents"], "tokens": m["counts"].get("tokens"),
        "tokens_per_s": round(m["counts"]["tokens"] / seconds, 1) if seconds and m["counts"].get("tokens") else None,
        "modules": m["fingerprint"]["modules"], "dim": m["counts"]["dim"],
        "faiss": m["faiss"]["factory"], "recall": m["faiss"].get("recall"),
        "k": m["fingerprint"]["config"]["k"], "budget": m["fingerprint"]["config"].get("budget"),
        "projection": _projection_text(m["fingerprint"]), "hessian": m["fingerprint"]["config"]["hessian"],
        "lambda": m["fingerprint"]["lambda"], "second_moments": m["fingerprint"]["second_moments"],
        "seq_len": m["corpus"]["seq_len"], "stride": m["corpus"]["stride"], "packing": m["corpus"]["packing"],
        "bytes": size, "bytes_per_sequence": round(size / max(n, 1), 1),
        "build": b, "created_at": m["created_at"],
    }


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary_lines(s: dict) -> list[str]:
    """The summary a build ends with and ``index info`` prints: what was indexed, how
    fast, with what fingerprint, and how large the index is."""
    b = s["build"]
    modules = s["modules"]
    shown = ", ".join(modules[:6]) + (f", ... ({len(modules) - 6} more)" if len(modules) > 6 else "")
    rows = [("index", s["index"]), ("version", s["version"]), ("name", s["name"]), ("model", s["model"]),
            ("sequences", s["sequences"]), ("documents", s["documents"]), ("tokens", s["tokens"]),
            ("tokens/s", f"{s['tokens_per_s']} (both passes)" if s["tokens_per_s"] else None),
            ("modules", f"{len(modules)}: {shown}"), ("dim", s["dim"]), ("faiss", s["faiss"]),
            ("projection", s["projection"]), ("hessian", s["hessian"]), ("lambda", s["lambda"]),
            ("second_moments", s["second_moments"]), ("seq_len", s["seq_len"]), ("stride", s["stride"]),
            ("packing", s["packing"]),
            ("pass 1 (statistics)", f"{b.get('statistics_seconds')} s, {b.get('statistics_seq_per_s')} seq/s"),
            ("pass 2 (encode)", f"{b.get('encode_seconds')} s, {b.get('encode_seq_per_s')} seq/s"),
            ("size", f"{_size_text(s['bytes'])} ({s['bytes']} bytes, {s['bytes_per_sequence']} per sequence)"),
            ("created_at", s["created_at"])]  # fmt: skip
    lines = [f"{key:>20}: {value}" for key, value in rows]
    if s["recall"]:
        r = s["recall"]
        lines.append(f"{'recall@10':>20}: {r['recall_at_k']:.4f} (re-ranked {r['recall_at_k_reranked']:.4f}, "
                     f"{int(r['n_queries'])} probes)")  # fmt: skip
    return lines


def print_summary(s: dict) -> None:
    print("\n".join(summary_lines(s)))


def _projection_text(fp: dict) -> str:
    """How the fingerprint is sized, in one line: fixed k, or the budget's plan."""
    cfg = FingerprintConfig.from_dict(fp["config"])  # reads manifests from before the budget rule
    family = "fitted basis (pca)" if cfg.projection == "pca" else f"gaussian, seed {cfg.seed}"
    if cfg.k is not None:
        return "none (exact)" if cfg.k == 0 else f"k = {cfg.k} per side, {cfg.k * cfg.k} dims per module; {family}"
    plan = fp.get("plan") or {}
    exact = sum(v is None for v in plan.values())
    return (f"budget {cfg.budget}, blocks <= {cfg.max_block} dims: {len(plan) - exact} modules projected, "
            f"{exact} stored exactly; {family}")  # fmt: skip


def cmd_info(args: argparse.Namespace) -> int:
    s = _summary(Path(args.index_dir))
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


def cmd_query(args: argparse.Namespace) -> int:
    from indexer.artifacts import InfluenceIndex

    if args.k < 1:
        raise ConfigError(f"-k must be >= 1, got {args.k}")
    from indexer.faiss_index import SearchParams

    for flag, value, least in (("--nprobe", args.nprobe, 1), ("--ef-search", args.ef_search, 1),
                               ("--rerank-candidates", args.rerank_candidates, 0),
                               ("--rescore", args.rescore, 0), ("--generate", args.generate, 1),
                               ("--temperature", args.temperature, 0)):  # fmt: skip
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    defaults = SearchParams()
    params = SearchParams(nprobe=args.nprobe or defaults.nprobe, ef_search=args.ef_search or defaults.ef_search,
                          candidates=args.rerank_candidates)  # fmt: skip
    if (args.completion is None) == (args.generate is None):
        raise ConfigError("give --completion (the output to explain) or --generate N (let the model write it)")
    from encoder.generation import Generation
    from service.search import Limits, Query, generated_completion, traced_fields, validate

    generate = None if args.generate is None else Generation(args.generate, args.temperature, args.gen_seed)
    query = Query(args.prompt, args.completion, args.k, generate=generate, span=args.span)
    idx = InfluenceIndex.open(args.index, device=args.device, model_dir=args.model, search_params=params,
                              placement=args.search_placement)  # fmt: skip
    try:
        limits = Limits(idx.max_tokens or 1 << 30, idx.max_tokens or 1 << 30, args.generate or 1)
        generated = generated_completion(idx, query, limits, idx.max_tokens) if generate is not None else None
        traced = validate(idx.tokenizer, query, limits, idx.max_tokens, generated)
        vec = idx.encode_examples([traced.example])
        scores, ids = idx.search(vec, max(args.k, args.rescore), rerank=not args.no_rerank)
        hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        if args.rescore:
            exact = idx.rescore(traced.example, [i for _, i in hits])
            hits = sorted(((float(s), i) for s, (_, i) in zip(exact, hits, strict=True)), key=lambda h: -h[0])
        hits = hits[: args.k]
        records = idx.examples([i for _, i in hits])
    finally:
        idx.close()
    rows = [
        {"rank": r + 1, "id": rec.id, "score": s, "text": rec.text, "source": rec.source,
         "document_id": rec.document_id}
        for r, ((s, _), rec) in enumerate(zip(hits, records, strict=True))
    ]
    g = traced.generated
    if args.json:
        print(json.dumps({**traced_fields(traced), "results": rows}, indent=2))
        return 0
    if g is not None:
        print(f"generated ({len(g.ids)} tokens, {g.finish_reason}): {json.dumps(traced.completion)}")
    if args.span is not None:
        print(f"traced: {json.dumps(traced.text)}")
    for row in rows:
        text = row["text"].replace("\n", " ")
        print(f"{row['rank']:>3}  id={row['id']:<8} score={row['score']:+.5f}  {text[:120]}")
    return 0


def _span(text: str) -> tuple[int, int]:
    """--span START:END, a non-empty character range of the completion."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (characters), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


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
    p.add_argument("--no-bm25", action="store_true",
                   help="skip the BM25 index (bm25/); the service then builds it on first bm25/hybrid query")
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
    """Add ``index`` (build/info/verify) and ``query`` to the influence CLI."""
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

    q = subparsers.add_parser("query", help="query an index locally (no server)")
    q.add_argument("--index", required=True, help="a published index directory")
    q.add_argument("--prompt", required=True, help="context given to the model (its tokens are not attributed)")
    q.add_argument("--completion", default=None,
                   help="the model output to explain (its tokens carry the loss); or --generate")
    q.add_argument("--generate", type=int, default=None, metavar="N",
                   help="generate and trace: the model continues the prompt (at most N tokens, greedy "
                        "unless --temperature) and its own tokens are traced")
    q.add_argument("--temperature", type=float, default=0.0,
                   help="--generate: sample at this temperature (default 0: greedy)")
    q.add_argument("--gen-seed", type=int, default=None, help="--generate: the sampling seed (default: fresh)")
    q.add_argument("--span", type=_span, default=None, metavar="START:END",
                   help="trace only the completion tokens overlapping these characters of the completion")
    q.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    q.add_argument("--json", action="store_true",
                   help="print {completion, span, generation, results} as JSON (the REST response's fields)")
    q.add_argument("--model", default=None, help="model directory (default: the manifest's)")
    q.add_argument("--device", default=None, help="torch device (default: CUDA if present, else CPU)")
    q.add_argument("--rescore", type=int, default=0, metavar="C",
                   help="exact second stage: re-score the top max(C, k) candidates by their unprojected "
                        "corrected gradients (one backward pass each; 0 = off)")
    q.add_argument("--no-rerank", action="store_true",
                   help="approximate indexes: the index's own scores, no exact re-rank")
    q.add_argument("--search-placement", default="auto", choices=("auto", "cpu", "gpu", "shards", "torch"),
                   help="where search runs (torch: exact brute force on the GPUs, else the CPU)")
    q.add_argument("--nprobe", type=int, default=None, help="IVF indexes: lists visited (default 16)")
    q.add_argument("--ef-search", type=int, default=None, help="HNSW indexes: beam width (default 128)")
    q.add_argument("--rerank-candidates", type=int, default=None,
                   help="approximate indexes: hits re-ranked exactly (default 10 x k)")
    q.set_defaults(func=cmd_query)
