"""One command per real-text evaluation set: build it from its Debian package, train, evaluate.

    python -m evaluation.real_sets --set vera [--workdir .eval] [--out benchmarks/results]

1. ``evaluation.dictionary.build`` writes WORKDIR/NAME/{corpus,queries}.jsonl from the
   installed dictionary (deterministic given the package and the seed);
2. ``influence train`` trains the demo-size GPT-2 on the corpus into WORKDIR/NAME/model,
   skipped when a model trained on a corpus with the same content hash is there;
3. ``influence eval`` compares every method over ``SEEDS`` projection seeds and writes
   OUT/eval_NAME.{md,json,png}, which name the corpus, queries and model by content hash.

Nothing is read from outside the project but the Debian package (``make system-deps``
installs the dictionaries), so a fresh machine rebuilds a committed result with this one
command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from api.errors import InputError
from encoder.hashing import sha256_file
from evaluation.dictionary import SETS

SEEDS = ("0", "1", "2")
EVAL_FLAGS = (
    "--projection",
    "gaussian",
    "--batch-size",
    "16",
    "--tailpatch-lr",
    "0.0001",
    "--tailpatch-optimizer",
    "adam",
)
"""The paper's configuration for the TrackStar rows (Gaussian projection, its d) and the
tail-patch step, as every committed eval uses: one Adam step from the checkpoint's second
moments at a fixed small rate (the training's cosine schedule ends near 0, so its final
rate would move nothing; tail-patch is first order in the rate, and
``benchmarks/results/eval_vera_lr*`` repeat one set at a tenth and ten times it)."""


def _trained(model_dir: Path, corpus: Path) -> Path | None:
    """The checkpoint of a model trained on ``corpus``'s exact content, if there is one."""
    stamp = model_dir / "corpus.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != sha256_file(corpus):
        return None
    info = json.loads((model_dir / "train.json").read_text())
    return Path(info["checkpoint"])


def run(name: str, workdir: Path, out: Path, epochs: int | None) -> int:
    """Build, train and evaluate set ``name``; the exit code of the first failing step."""
    from evaluation.dictionary import build
    from service.cli import main as influence

    root = workdir / name
    corpus, queries = build(root, spec=SETS[name])
    model_dir = root / "model"
    checkpoint = _trained(model_dir, corpus)
    if checkpoint is None:
        flags = ["--epochs", str(epochs)] if epochs is not None else []
        argv = ["train", "--corpus", str(corpus), "--queries", str(queries)]
        rc = influence([*argv, "--out", str(model_dir), "--no-progress", *flags])
        if rc != 0:
            return rc
        (model_dir / "corpus.sha256").write_text(sha256_file(corpus) + "\n")
        checkpoint = _trained(model_dir, corpus)
        assert checkpoint is not None
    return influence(
        [
            "eval",
            "--model",
            str(checkpoint),
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--out",
            str(out),
            "--stem",
            f"eval_{name}",
            "--seeds",
            *SEEDS,
            *EVAL_FLAGS,
            "--no-progress",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build, train and evaluate one real-text set.")
    p.add_argument("--set", required=True, choices=sorted(SETS), help="the dictionary set")
    p.add_argument("--workdir", type=Path, default=Path(".eval"), help="sets and models go here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results dir")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: demo's)")
    args = p.parse_args(argv)
    try:
        return run(args.set, args.workdir, args.out, args.epochs)
    except InputError as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
