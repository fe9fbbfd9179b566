"""``influence query``: one query against an index, locally (no server), through the same
engine the service runs (``engine.batch.run_batch``). Registered into ``service.cli``;
torch, FAISS and the model are imported only when the command runs."""

from __future__ import annotations

import argparse
import json
from typing import Any, get_args

from pydantic import ValidationError

from api.errors import ConfigError
from api.models import COMPLETION_OR_GENERATE, InfluenceQuery, Mode
from engine.choices import SEARCH_PLACEMENTS

FLAGS = {
    "prompt": "--prompt",
    "completion": "--completion",
    "generate": "--generate",
    "generate.max_new_tokens": "--generate",
    "generate.temperature": "--temperature",
    "generate.seed": "--gen-seed",
    "span": "--span",
    "mode": "--mode",
    "k": "-k",
    "rescore": "--rescore",
    "confidence": "--confidence",
}
"""Wire fields of ``InfluenceQuery`` and the flags that set them."""


def wire_query(args: argparse.Namespace) -> InfluenceQuery:
    """The request ``POST /v1/influence`` would get for these flags, validated by the same
    model (one validation for the CLI and the API).

    Raises:
        ConfigError: naming the flag, for whatever the API would answer 422.
    """
    if args.generate is None and (args.temperature is not None or args.gen_seed is not None):
        raise ConfigError("--temperature and --gen-seed apply to --generate N only")
    body: dict[str, Any] = {"prompt": args.prompt, "k": args.k}
    if args.completion is not None:
        body["completion"] = args.completion
    if args.generate is not None:
        options = {
            "max_new_tokens": args.generate,
            "temperature": args.temperature,
            "seed": args.gen_seed,
        }
        body["generate"] = {key: value for key, value in options.items() if value is not None}
    if args.span is not None:
        body["span"] = {"start": args.span[0], "end": args.span[1]}
    if args.mode is not None:
        body["mode"] = args.mode
    if args.rescore is not None:
        body["rescore"] = args.rescore
    if args.confidence is not None:
        body["confidence"] = args.confidence
    try:
        return InfluenceQuery.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        flag = FLAGS.get(
            where, "--completion / --generate" if error["type"] == COMPLETION_OR_GENERATE else where
        )
        raise ConfigError(f"{flag}: {error['msg']}", field=where or "query") from None


def cmd_query(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--nprobe", args.nprobe, 1),
        ("--ef-search", args.ef_search, 1),
        ("--rerank-candidates", args.rerank_candidates, 0),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    wire = wire_query(args)
    from engine.batch import run_batch
    from engine.index import InfluenceIndex, OpenOptions
    from engine.query import Limits, Query, certificate_fields, traced_fields
    from engine.retrieval import method_of
    from indexer.faiss_index import SearchParams

    query = Query.from_wire(wire)

    defaults = SearchParams()
    params = SearchParams(
        nprobe=args.nprobe or defaults.nprobe,
        ef_search=args.ef_search or defaults.ef_search,
        candidates=0 if args.no_rerank else args.rerank_candidates,
    )
    idx = InfluenceIndex.open(
        args.index,
        OpenOptions(
            device=args.device,
            model_dir=args.model,
            search_params=params,
            placement=args.search_placement,
        ),
    )
    try:
        context = idx.max_tokens or 1 << 30
        (outcome,) = run_batch(idx, [query], Limits(context, context, args.generate or 1))
    finally:
        idx.close()
    if outcome.error is not None:
        raise outcome.error
    rows: list[dict[str, Any]] = [
        {
            "rank": r + 1,
            "id": h.id,
            "score": h.score,
            "text": h.record.text,
            "source": h.record.source,
            "document_id": h.record.document_id,
        }
        for r, h in enumerate(outcome.hits)
    ]
    traced = outcome.traced
    assert traced is not None  # a query without error was traced
    c = outcome.certificate
    method = method_of(wire.mode)
    if args.json:
        fields = {**traced_fields(traced), "rescore": certificate_fields(c), "method": method}
        print(json.dumps({**fields, "results": rows}, indent=2))
        return 0
    if wire.mode == "attribution":
        print(f"attribution (the passages that state it), answered by {method}")
    if c is not None:
        verdict = (
            f"top-{args.k} certified at {c.confidence:g}"
            if c.certified
            else "not certified (the cap was reached)"
        )
        print(f"second stage: {c.rescored} candidates re-scored exactly, {verdict}")
    if traced.generated is not None:
        g = traced.generated
        print(
            f"generated ({len(g.ids)} tokens, {g.finish_reason}): {json.dumps(traced.completion)}"
        )
    if args.span is not None:
        print(f"traced: {json.dumps(traced.text)}")
    for row in rows:
        text = row["text"].replace("\n", " ")
        print(f"{row['rank']:>3}  id={row['id']:<8} score={row['score']:+.5f}  {text[:120]}")
    return 0


def _span(text: str) -> tuple[int, int]:
    """--span START:END, two character offsets (their range is checked with the query)."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (characters), got {text!r}") from None
    return start, end


def register(subparsers: Any) -> None:
    q = subparsers.add_parser("query", help="query an index locally (no server)")
    q.add_argument("--index", required=True, help="a published index directory")
    _add_query_flags(q)
    q.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    q.add_argument(
        "--json",
        action="store_true",
        help="print {completion, span, generation, rescore, method, results} as JSON (REST fields)",
    )
    q.add_argument("--model", default=None, help="model directory (default: the manifest's)")
    q.add_argument(
        "--device", default=None, help="torch device (default: CUDA if present, else CPU)"
    )
    _add_search_flags(q)
    q.set_defaults(func=cmd_query)


def _add_query_flags(q: argparse.ArgumentParser) -> None:
    """What is asked and traced: the question, the prompt, and the completion or a generation."""
    q.add_argument(
        "--mode",
        default=None,
        choices=get_args(Mode),
        help="influence (default): examples that moved the model; attribution: passages stating it",
    )
    q.add_argument(
        "--prompt", required=True, help="context given to the model (its tokens are not attributed)"
    )
    q.add_argument(
        "--completion",
        default=None,
        help="the model output to explain (its tokens carry the loss); or --generate",
    )
    q.add_argument(
        "--generate",
        type=int,
        default=None,
        metavar="N",
        help="the model continues the prompt (at most N tokens) and its own tokens are traced",
    )
    q.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="with --generate: sample at temperature T, 0 to 10 (default 0: greedy)",
    )
    q.add_argument(
        "--gen-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="with --generate and --temperature: the sampling seed, 0 to 2^32-1 (default: fresh)",
    )
    q.add_argument(
        "--span",
        type=_span,
        default=None,
        metavar="START:END",
        help="trace only the completion tokens overlapping these characters of the completion",
    )


def _add_search_flags(q: argparse.ArgumentParser) -> None:
    """How the index is searched: the exact second stage and approximate-index knobs."""
    q.add_argument(
        "--rescore",
        type=int,
        default=None,
        metavar="C",
        help="candidates the exact second stage re-scores at most (0: off; default: the index's)",
    )
    q.add_argument(
        "--confidence",
        type=float,
        default=None,
        metavar="P",
        help="the second stage stops once its top-k is certified at P (default 0.95)",
    )
    q.add_argument(
        "--no-rerank",
        action="store_true",
        help="approximate indexes: the index's own scores, no exact re-rank",
    )
    q.add_argument(
        "--search-placement",
        default="auto",
        choices=SEARCH_PLACEMENTS,
        help="where search runs (torch: exact brute force on the GPUs, else the CPU)",
    )
    q.add_argument(
        "--nprobe", type=int, default=None, help="IVF indexes: lists visited (default 16)"
    )
    q.add_argument(
        "--ef-search", type=int, default=None, help="HNSW indexes: beam width (default 128)"
    )
    q.add_argument(
        "--rerank-candidates",
        type=int,
        default=None,
        help="approximate indexes: hits re-ranked exactly (default 10 x k)",
    )
