"""Every CLI option's help is one short line for people at a shell: no Python literals, no
module paths, no reST markup (the docstrings keep those for people reading the code)."""

from __future__ import annotations

import argparse
import re

import pytest

MODULE_PATH = re.compile(r"\b(encoder|indexer|engine|service|api|evaluation)\.[a-z_]+")
MAX_HELP_CHARS = 110


def _commands() -> dict[str, argparse.ArgumentParser]:
    from service.cli import build_parser

    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[path] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{path} {name}".strip())

    walk(build_parser(), "")
    return out


@pytest.mark.parametrize("command", sorted(_commands()))
def test_each_option_has_one_short_plain_line(command):
    parser = _commands()[command]
    for action in parser._actions:
        text = action.help or ""
        flag = "/".join(action.option_strings) or action.dest
        assert text, f"{command} {flag}: no help"
        assert len(text) <= MAX_HELP_CHARS, f"{command} {flag}: {len(text)} characters"
        assert "None" not in text and "``" not in text and "`" not in text, (
            f"{command} {flag}: {text}"
        )
        assert not MODULE_PATH.search(text), f"{command} {flag}: names a module: {text}"
