"""``influence index build|info|verify`` and ``influence query`` (registered into service.cli).

Progress bars (tqdm) live here, at the CLI edge; the library reports progress through a
callback. Project errors propagate to the dispatcher, which prints them and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from api.errors import ConfigError
from encoder.config import FingerprintConfig
from indexer.build_config import BuildConfig, batch_size_flag
from indexer.options import add_flags, from_flags
from indexer.summary import print_summary, summary


def _tqdm_progress(enabled: bool):
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    labels = {
        "basis": "basis (projection)",
        "statistics": "pass 1 (statistics)",
        "encode": "pass 2 (encode)",
    }

    def progress(stage: str, n: int, total: int) -> None:
        if not enabled:
            return
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(
                total=total,
                desc=labels.get(stage, stage),
                unit="seq",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        bar.update(n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def cmd_build(args: argparse.Namespace) -> int:
    from indexer.build import run_build
    from indexer.distributed import exit_after_success, init_distributed, shutdown

    cfg = from_flags(BuildConfig, args)
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


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from indexer.plan import build_plan, parse_size, plan_lines

    fp = from_flags(FingerprintConfig, args)
    if min(args.seq_len, args.sequences) < 1:
        raise ConfigError("--seq-len and --sequences must be >= 1")
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    memory = parse_size(args.memory) if args.memory else None
    sizes = {"seq_len": args.seq_len, "batch_size": args.batch_size, "sequences": args.sequences}
    plan = build_plan(Path(args.model), fp, dtype=dtype, device=args.device, memory=memory, **sizes)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
    else:
        print("\n".join(plan_lines(plan)))
    return 0


def _add_plan(isub) -> None:
    p = isub.add_parser(
        "plan",
        help="the memory a build and a server will take, term by term, from a model's config",
    )
    p.add_argument(
        "--model", required=True, help="a model directory or its config.json (no weights needed)"
    )
    add_flags(p, FingerprintConfig)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda: where the build and the server run (default cpu)",
    )
    p.add_argument(
        "--memory",
        default=None,
        metavar="SIZE",
        help="the device's memory, e.g. 80GB: say whether it fits",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="the weights' dtype (default bfloat16 on cuda, else float32)",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument(
        "--batch-size",
        type=batch_size_flag,
        default=8,
        help="sequences per backward pass of the build, or auto: the largest that fits --memory",
    )
    p.add_argument(
        "--sequences", type=int, default=1_000_000, help="sequences in the index (default 1000000)"
    )
    p.add_argument("--json", action="store_true", help="print every term as JSON")
    p.set_defaults(func=cmd_plan)


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
        report = push(
            Path(args.index_dir),
            MilvusTarget(args.milvus, args.collection),
            index_type=args.index_type,
            index_params=params,
            batch_size=args.batch_size,
            progress=lambda n, total: progress("push", n, total),
        )
    finally:
        close()
    print(
        f"pushed to {args.milvus} collection {report['collection']}: {report['inserted']} inserted, "
        f"{report['present']} already there ({report['vector_type']})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from indexer.verify import verify_index

    for line in verify_index(
        Path(args.index_dir), model_dir=Path(args.model) if args.model else None
    ):
        print(line)
    print("OK")
    return 0


BUILD_EXAMPLES = """examples:
  the default (sketch):  influence index build --model CKPT --corpus train.jsonl --out ix
  the paper's TrackStar: influence index build --model CKPT --corpus train.jsonl --out ix \\
                           --projection gaussian --correction --hessian mixed --queries q.jsonl
  many GPUs:             torchrun --nproc-per-node 8 -m indexer build --model CKPT ...
"""


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build an index from a corpus",
        epilog=BUILD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, BuildConfig)  # every BuildConfig / FingerprintConfig field
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)


def register(subparsers) -> None:
    """Add ``index`` (build/plan/info/push/verify) to the influence CLI."""
    index = subparsers.add_parser("index", help="build and inspect influence indexes")
    isub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    _add_build(isub)
    _add_plan(isub)
    info = isub.add_parser("info", help="manifest summary")
    info.add_argument("index_dir", help="a published index directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)
    push = isub.add_parser(
        "push", help="upload a published index into a Milvus collection (resumable)"
    )
    push.add_argument("index_dir", help="a published index directory")
    push.add_argument(
        "--milvus",
        required=True,
        metavar="URI",
        help="pymilvus URI: http://host:19530 for a server",
    )
    push.add_argument(
        "--collection", default=None, help="collection name (default influence_<index version>)"
    )
    push.add_argument(
        "--index-type",
        default="FLAT",
        help="Milvus vector index: FLAT (exact, default), IVF_FLAT, IVF_PQ, HNSW, GPU_CAGRA, GPU_IVF_PQ",
    )
    push.add_argument(
        "--index-params",
        default="{}",
        help="the vector index's parameters as JSON, e.g. '{\"nlist\": 1024}'",
    )
    push.add_argument("--batch-size", type=int, default=1024, help="rows per insert (default 1024)")
    push.add_argument("--no-progress", action="store_true", help="no progress bar")
    push.set_defaults(func=cmd_push)
    ver = isub.add_parser("verify", help="checksums, counts, model hash")
    ver.add_argument("index_dir", help="a published index directory")
    ver.add_argument("--model", default=None, help="model directory (default: the manifest's)")
    ver.set_defaults(func=cmd_verify)
