"""The CLI explains itself: every option has help, -v works after any subcommand, default
logs are quiet, a Trainer checkpoint without optimizer state is warned about."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys

import pytest

from service.cli import build_parser, main


def _actions(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, [*path, name])
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_option_has_help():
    missing = [
        f"{path} {a.option_strings or a.dest}"
        for path, a in _actions(build_parser(), ["influence"])
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert not missing, missing


def test_demo_help_has_no_raw_rst(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "``" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["-v", "index", "info", "X"], ["index", "info", "X", "-v"], ["index", "-v", "info", "X"]],
)
def test_verbose_anywhere(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["index", "info", "X"]).verbose is False


def test_default_logs_are_quiet(tiny_index):
    """No FAISS loader, bm25s or transformers lines at the default level; they are there
    with -v."""
    code = f"from service.cli import main; main(['query', '--index', {str(tiny_index)!r}, '--prompt', 'a', '--completion', ' b'])"
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    ).stderr
    for noise in ("faiss.loader", "bm25s", "Loading weights"):
        assert noise not in quiet, quiet[-2000:]
    loud = subprocess.run(
        [sys.executable, "-c", code.replace("'query'", "'-v', 'query'")],
        capture_output=True,
        text=True,
        timeout=300,
    ).stderr
    assert "faiss.loader" in loud or "Loading weights" in loud, loud[-2000:]


def test_trainer_checkpoint_without_optimizer_state_warns(
    trained_checkpoint, fact_corpus_files, tmp_path, caplog
):
    ckpt = tmp_path / "checkpoint-7"
    shutil.copytree(trained_checkpoint.checkpoint_dir, ckpt)
    (ckpt / "optimizer.pt").unlink()
    assert (ckpt / "trainer_state.json").is_file()
    with caplog.at_level(logging.WARNING, logger="indexer.build"):
        assert (
            main(
                [
                    "index",
                    "build",
                    "--model",
                    str(ckpt),
                    "--corpus",
                    str(fact_corpus_files[0]),
                    "--out",
                    str(tmp_path / "ix"),
                    "-k",
                    "4",
                    "--hessian",
                    "none",
                    "--correction",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert any(
        "without optimizer.pt" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
