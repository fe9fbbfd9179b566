"""The README's option tables against the options themselves: every ``index build`` flag
and every service setting is documented, and nothing documented is gone."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.index("\n\n", README.index("|---|", start))
    return README[start:end]


def _subparser(*path: str) -> argparse.ArgumentParser:
    from service.cli import build_parser

    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_every_build_flag_is_in_the_readme_table_and_back():
    table = _section("Index build (`influence index build --help`):")
    cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    documented = {
        flag
        for cell in cells
        for flag in re.findall(r"`(--?[\w-]+)", cell) + re.findall(r"/(--?[\w-]+)", cell)
    }
    parser = _subparser("index", "build")
    flags = {
        s
        for a in parser._actions
        for s in a.option_strings
        if s not in ("-h", "--help", "-v", "--verbose")
    }
    required = {s for a in parser._actions if a.required for s in a.option_strings}
    assert flags - required - documented == set(), "build flags missing from the README table"
    assert documented - flags == set(), "README documents build flags that do not exist"


def test_every_setting_is_in_the_readme_table_and_back():
    from service.commands import SERVE_FLAGS
    from service.settings import Settings

    table = _section("Service (`influence serve`, env vars `INFLUENCE_*`")
    documented = set(re.findall(r"INFLUENCE_([A-Z0-9_]+)", table))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from the README table"
    assert documented - fields == set(), "README documents settings that do not exist"
    assert {field for _, field, _ in SERVE_FLAGS} <= set(Settings.model_fields)
