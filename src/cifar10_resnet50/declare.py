"""Declared once: a settings field carries its default, command-line flag, help text, choices
and range (:func:`setting`); :func:`flags` turns a dataclass of them into what ``argparse``
needs. The CLI's parsers, the API's defaults and the README's tables all derive from these.
No torch here (``--help`` is instant)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def setting(default: Any, flag: str | None = None, help: str = "", **argparse: Any) -> Any:
    """A settings field and its command-line flag, declared once: the CLI's parsers, their
    help texts and the README's defaults all derive from these (:func:`flags`). ``argparse``:
    its keywords (``choices``, ``metavar``, ``required``), or a range the CLI checks
    (``low``/``high``: value ≥ low, ≤ high; ``above``: value > above)."""
    return field(default=default, metadata={"flag": flag, "help": help, **argparse})


def _show(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flags(kind: type, prefix: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    """(flag, key, argparse keywords) of each field of ``kind`` declared with a flag; the
    key is ``prefix`` + the field's name."""
    defaults, flags = kind(), []
    for f in dataclasses.fields(kind):
        extra = dict(f.metadata)
        flag, text = extra.pop("flag", None), extra.pop("help", "")
        if not flag:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            kwargs = {"action": "store_false" if default else "store_true", "help": text}
        else:
            if default is not None and "default" not in text:
                text += f" (default {_show(default)})"
            kwargs = {"help": text, **extra}
            if "choices" not in extra:
                annotation = str(f.type)
                kwargs["type"] = (
                    int if "int" in annotation else (float if "float" in annotation else str)
                )
        flags.append((flag, f"{prefix}{f.name}", kwargs))
    return flags


def markdown_table(declared: list[tuple[str, str, dict[str, Any]]]) -> str:
    """A README table of :func:`flags`' output: flag (with its choices), key, help text."""
    lines = ["| flag | key | meaning |", "|---|---|---|"]
    for flag, key, kwargs in declared:
        text = kwargs["help"].replace("|", "\\|")
        if "choices" in kwargs:
            flag += " " + "\\|".join(kwargs["choices"])
        lines.append(f"| `{flag}` | `{key}` | {text} |")
    return "\n".join(lines)
