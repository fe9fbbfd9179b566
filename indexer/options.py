"""Command-line flags generated from a config dataclass: one source for each option's name,
type, default and help.

A field's flag is ``--field-name`` (a trailing ``_`` dropped), its type and default the
field's, its help the field's entry in the class docstring's ``Args:`` (or
``Attributes:``) section. A boolean
that defaults to True gets ``--no-field-name``; a ``tuple[str, ...]`` is a repeatable flag;
a ``Literal`` offers its choices; a nested config dataclass adds its own fields. A field's
``metadata`` may rename the flag (``{"cli": ("-k", "--proj-dim")}``), hide it (``{"cli":
None}``), parse its text (``{"parse": function}``), add argparse options
(``{"argparse": {"nargs": "+"}}``) or give its one-line help (``{"help": "..."}``, for
people at a shell: the docstring entry is for people reading the code). Only light modules may define such a
class: the CLI imports it to print ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


def field_docs(cls: type) -> dict[str, str]:
    """{field: its ``Args:`` entry of the class docstring, on one line, without markup}."""
    doc = inspect.getdoc(cls) or ""
    heading = next((h for h in ("Args:", "Attributes:") if h in doc), None)
    section = doc.split(heading, 1)[1] if heading else ""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in section.splitlines():
        entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            current = entry.group(1).split(", ")
            for name in current:
                out[name] = [entry.group(2)]
        elif line.startswith("        ") and current:
            for name in current:
                out[name].append(line.strip())
        elif line.strip():
            break
    return {k: " ".join(v).replace("``", "`") for k, v in out.items()}


def _base(hint: Any) -> Any:
    """``X | None`` -> X."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _flag_names(f: dataclasses.Field[Any]) -> tuple[str, ...] | None:
    if "cli" in f.metadata:
        cli = f.metadata["cli"]
        return None if cli is None else (cli,) if isinstance(cli, str) else tuple(cli)
    name = "--" + f.name.rstrip("_").replace("_", "-")
    return (f"--no-{name[2:]}",) if f.default is True else (name,)


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for every field of the config dataclass ``cls`` (and of nested ones)."""
    hints, docs = get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = _base(hints[f.name])
        if dataclasses.is_dataclass(hint):
            add_flags(parser, typing.cast(type, hint))
            continue
        names = _flag_names(f)
        if names is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help") or docs.get(f.name, f.name)
        options: dict[str, Any] = {"dest": f.name, "default": None}
        extra = dict(f.metadata.get("argparse", {}))
        if hint is not bool and get_origin(hint) is not Literal and "choices" not in extra:
            options["metavar"] = names[-1].lstrip("-").upper().replace("-", "_")
        if hint is bool:
            options["action"] = "store_false" if default is True else "store_true"
            options["default"] = default
            text = f"turn off: {text}" if default is True and "help" not in f.metadata else text
        elif get_origin(hint) is tuple:
            options["action"] = "append"
        elif get_origin(hint) is Literal:
            options["choices"] = get_args(hint)
        else:
            options["type"] = f.metadata.get("parse", hint if hint in (int, float, Path) else str)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            options["required"] = True
        elif hint is not bool and default is not None and "default" not in text:
            text += f" (default {_default_text(default)})"
        if "nargs" in extra:
            options.pop("action", None)
        parser.add_argument(*names, help=text.replace("%", "%%"), **{**options, **extra})


def from_flags(cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass ``cls`` of parsed flags: a flag not given keeps the field's default."""
    hints, values = get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        hint = _base(hints[f.name])
        if dataclasses.is_dataclass(hint):
            values[f.name] = from_flags(typing.cast(type, hint), args)
        elif _flag_names(f) is not None and getattr(args, f.name, None) is not None:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if get_origin(hint) is tuple else value
    return cls(**values)
