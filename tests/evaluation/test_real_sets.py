"""One command per real-text set: it builds the set, trains once per corpus content and
evaluates with every method into eval_NAME (the steps' commands recorded, not run here)."""

from __future__ import annotations

import json

import pytest

from evaluation import dictionary, real_sets

INSTALLED = (dictionary.DICTD_DIR / "vera.index").is_file()


@pytest.mark.skipif(not INSTALLED, reason="dict-vera is not installed (make system-deps)")
def test_trains_once_per_corpus_content_then_evaluates(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def influence(argv):
        calls.append(argv)
        if argv[0] == "train":
            out = tmp_path / "w" / "vera" / "model"
            (out / "checkpoint-7").mkdir(parents=True, exist_ok=True)
            info = {"checkpoint": str(out / "checkpoint-7")}
            (out / "train.json").write_text(json.dumps(info))
        return 0

    monkeypatch.setattr("service.cli.main", influence)
    out = tmp_path / "results"
    assert real_sets.run("vera", tmp_path / "w", out, epochs=None) == 0
    assert real_sets.run("vera", tmp_path / "w", out, epochs=None) == 0
    assert [c[0] for c in calls] == ["train", "eval", "eval"]  # the second run reuses the model
    train, first_eval, _ = calls
    corpus = str(tmp_path / "w" / "vera" / "corpus.jsonl")
    assert train[train.index("--corpus") + 1] == corpus
    assert first_eval[first_eval.index("--model") + 1].endswith("checkpoint-7")
    assert first_eval[first_eval.index("--stem") + 1] == "eval_vera"
    assert "--methods" not in first_eval  # every method
    seeds = first_eval.index("--seeds")
    assert first_eval[seeds + 1 : seeds + 4] == list(real_sets.SEEDS)
    # A corpus of other content (another seed would give one) is trained on again.
    (tmp_path / "w" / "vera" / "model" / "corpus.sha256").write_text("0" * 64 + "\n")
    assert real_sets.run("vera", tmp_path / "w", out, epochs=3) == 0
    assert calls[-2][0] == "train" and calls[-2][-2:] == ["--epochs", "3"]


def test_an_unknown_set_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        real_sets.main(["--set", "no-such-dictionary"])
    assert exc.value.code == 2
