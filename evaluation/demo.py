"""`influence demo`: from a fresh clone to a serving influence index, with no downloads.

Steps (each skipped when its output already exists for the same inputs, keyed by a
content hash recorded in the step's ``stamp.json``):
1. generate the synthetic fact corpus (``evaluation.corpus``),
2. train a GPT-2 on it with HF Trainer + AdamW (``evaluation.train``),
3. build the index with the default configuration: the K-FAC whitening fitted on the
   corpus, a CountSketch of the whitened gradients, unit norm; queries are re-scored
   exactly over at most the top 150 (``influence index build``; ``engine.index.DEFAULT_RESCORE``),
4. serve it as ``influence serve`` does on 127.0.0.1:8000 (``--port``), and once the port
   is bound print what to try: a curl line and the example's answer, as the server gives it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from encoder.config import FingerprintConfig
from encoder.hashing import sha256_file
from indexer.manifest import FORMAT_VERSION

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DemoSize:
    """Sizes of one demo flavour."""

    corpus: str  # evaluation.corpus size
    model: str  # evaluation.train size
    projection: tuple[str, ...]  # build options sizing the projection (() = the defaults)


SIZES = {"full": DemoSize("demo", "demo", ()), "quick": DemoSize("test", "test", ("-k", "8"))}


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cached(step_dir: Path, key: str) -> dict | None:
    stamp = step_dir / "stamp.json"
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        if data.get("key") == key:
            return data
    return None


def _stamp(step_dir: Path, key: str, **info: object) -> dict:
    data = {"key": key, **info}
    (step_dir / "stamp.json").write_text(json.dumps(data, indent=2, default=str))
    return data


def prepare(workdir: Path, size: DemoSize, seed: int = 0) -> dict:
    """Run steps 1-3 (cached) and return paths and measurements.

    Returns:
        dict with corpus, queries, checkpoint, index (paths) and fact_accuracy.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_file, queries_file = _corpus_step(workdir, size, seed)
    trained = _model_step(workdir, size, seed, corpus_file)
    checkpoint = Path(trained["checkpoint"])
    index_dir = _index_step(workdir, size, checkpoint, corpus_file, queries_file)
    return {
        "corpus": corpus_file,
        "queries": queries_file,
        "checkpoint": checkpoint,
        "index": index_dir,
        "fact_accuracy": trained["fact_accuracy"],
    }


def _corpus_step(workdir: Path, size: DemoSize, seed: int) -> tuple[Path, Path]:
    """Step 1: the fact corpus (corpus.jsonl, queries.jsonl)."""
    from evaluation.corpus import generate_fact_corpus

    corpus_dir = workdir / "corpus"
    key = _sha("corpus", size.corpus, str(seed), (HERE / "corpus.py").read_bytes())
    if not _cached(corpus_dir, key):
        log.info("[1/3] generating the %s fact corpus", size.corpus)
        shutil.rmtree(corpus_dir, ignore_errors=True)
        corpus = generate_fact_corpus(size.corpus, seed=seed)
        corpus.write(corpus_dir)
        _stamp(corpus_dir, key, passages=len(corpus.passages), queries=len(corpus.queries))
    else:
        log.info("[1/3] fact corpus: cached")
    return corpus_dir / "corpus.jsonl", corpus_dir / "queries.jsonl"


def _model_step(workdir: Path, size: DemoSize, seed: int, corpus_file: Path) -> dict:
    """Step 2: the trained model; its stamp (checkpoint, fact accuracy, ...)."""
    model_dir = workdir / "model"
    key = _sha(
        "model", size.model, str(seed), sha256_file(corpus_file), (HERE / "train.py").read_bytes()
    )
    trained = _cached(model_dir, key)
    if trained:
        log.info("[2/3] model: cached (%s)", trained["checkpoint"])
        return trained
    from evaluation.corpus import generate_fact_corpus
    from evaluation.train import train_fact_model

    log.info("[2/3] training the %s GPT-2 with HF Trainer + AdamW", size.model)
    shutil.rmtree(model_dir, ignore_errors=True)
    corpus = generate_fact_corpus(size.corpus, seed=seed)
    result = train_fact_model(corpus, model_dir, size=size.model, seed=seed, progress=True)
    return _stamp(
        model_dir,
        key,
        checkpoint=str(result.checkpoint_dir),
        fact_accuracy=result.fact_accuracy,
        train_seconds=round(result.train_seconds, 1),
        n_queries=result.n_queries,
    )


def _index_step(
    workdir: Path, size: DemoSize, checkpoint: Path, corpus_file: Path, queries_file: Path
) -> Path:
    """Step 3: the influence index, rebuilt when the model, corpus, default or format changes."""
    from service.cli import main as cli

    index_dir = workdir / "index"
    key = _sha(
        "index",
        _sha(*(p.read_bytes() for p in sorted(checkpoint.glob("*.safetensors")))),
        sha256_file(corpus_file),
        sha256_file(queries_file),
        " ".join(size.projection),
        json.dumps(FingerprintConfig().to_dict(), sort_keys=True),  # a new default rebuilds
        str(FORMAT_VERSION),  # and a new format
    )
    stamp_dir = workdir / "index-stamp"
    if _cached(stamp_dir, key) and (index_dir / "manifest.json").is_file():
        log.info("[3/3] index: cached (%s)", index_dir)
        return index_dir
    log.info("[3/3] building the influence index")
    shutil.rmtree(index_dir, ignore_errors=True)
    argv = ["index", "build", "--model", str(checkpoint), "--corpus", str(corpus_file)]
    rc = cli([*argv, "--out", str(index_dir), *size.projection])
    if rc != 0:
        raise SystemExit(rc)
    stamp_dir.mkdir(exist_ok=True)
    _stamp(stamp_dir, key, index=str(index_dir))
    return index_dir


def example_lines(index_dir: Path, queries_file: Path) -> list[str]:
    """The demo's example and its top 5, as the server answers it (the engine's
    ``run_batch`` at the index's defaults, the exact second stage included): the API's
    example query when the corpus asks it (the full demo), else the corpus's first query."""
    from api.models import EXAMPLE_QUERY
    from engine.batch import run_batch
    from engine.index import InfluenceIndex
    from engine.query import Limits, Query
    from evaluation.corpus import load_queries

    queries = load_queries(queries_file)
    q = next((q for q in queries if q.prompt == EXAMPLE_QUERY["prompt"]), queries[0])
    completion = (
        str(EXAMPLE_QUERY["completion"]) if q.prompt == EXAMPLE_QUERY["prompt"] else q.completion
    )
    index = InfluenceIndex.open(index_dir)
    try:
        context = index.max_tokens or 1 << 30
        (outcome,) = run_batch(index, [Query(q.prompt, completion, 5)], Limits(context, context))
    finally:
        index.close()
    if outcome.error is not None:
        raise outcome.error
    lines = [
        f"Example: which training sequences made the model say {q.prompt!r} -> {completion!r}?"
    ]
    relevant = set(q.relevant_ids)
    for rank, hit in enumerate(outcome.hits, start=1):
        mark = "*" if str(hit.record.document_id) in relevant else " "
        lines.append(
            f"  {rank}. {mark} {hit.score:+.3f}  [{hit.record.document_id}] {hit.record.text[:90]!r}"
        )
    lines.append("  (* = a passage that states the fact)")
    body = json.dumps({"prompt": q.prompt, "completion": completion, "k": 5})
    return [body, *lines]


def banner(url: str, index_dir: Path, example: list[str]) -> str:
    """What the demo prints once it listens on ``url``: where, a curl line, the example."""
    body, *lines = example
    head = [
        "",
        f"Influence search is serving {index_dir} on {url}",
        f"  web UI:   {url}/",
        f"  API docs: {url}/docs",
        "  try:",
        f"    curl -s {url}/v1/influence -H 'Content-Type: application/json' \\",
        f"      -d '{body}'",
        "",
    ]
    return "\n".join([*head, *lines, ""])


def run(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else "full"]
    start = time.perf_counter()
    info = prepare(Path(args.workdir), size, seed=args.seed)
    log.info(
        "ready in %.1fs (model fact accuracy %.3f)",
        time.perf_counter() - start,
        info["fact_accuracy"],
    )
    example = example_lines(info["index"], info["queries"])
    if args.no_serve:
        print(
            banner(f"http://{args.host}:{args.port}", info["index"], example).replace(
                "is serving", "would serve"
            )
        )
        return 0
    from service.commands import check_servable, serve
    from service.settings import Settings

    settings = Settings(index_dir=info["index"], host=args.host, port=args.port)
    check_servable(settings)
    return serve(
        settings, announce=lambda url: print(banner(url, info["index"], example), flush=True)
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="generate a fact corpus, train a tiny GPT-2, index it, and serve it",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), used by tests")
    p.add_argument("--workdir", default=".demo", help="where the corpus, model and index go")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--seed", type=int, default=0, help="corpus, training and projection seed (default 0)"
    )
    p.add_argument("--no-serve", action="store_true", help="prepare and print, do not serve")
    p.set_defaults(func=run)
