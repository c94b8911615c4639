"""The recipe-key reference (docs/recipe-keys.md), generated from the pydantic models of config/:
every key with its type, default and the comment written beside it in the source, so the reference
cannot drift from what the validator accepts (tests/test_docs.py regenerates it and compares).

    python -m lmforge.recipe_reference > docs/recipe-keys.md
"""

from __future__ import annotations

import inspect
import re
import typing

from pydantic import BaseModel

from lmforge import config

_FIELD = re.compile(r"^    (\w+): [^=]+(?:=.*)?$")


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment: the comment lines just above it, and any comment at the end of its line."""
    notes: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(model).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").rstrip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in model.model_fields:
            tail = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            notes[match.group(1)] = " ".join([*pending, tail]).strip()
        pending = []
    return notes


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"Annotated\[(\w+), FieldInfo\([^\]]*\]\)\]", r"\1", text)  # a constrained int: its type
    text = re.sub(r"^Union\[(.*)\]$", lambda m: m.group(1).replace(", ", " | "), text)
    return re.sub(r"lmforge\.config\.(?:\w+\.)*(\w+)", r"\1", text)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "{}" if isinstance(value, BaseModel) else repr(value)
    return repr(field.default)


def _section(name: str, model: type[BaseModel], out: list[str]) -> None:
    notes = _comments(model)
    nested = []
    out += [f"## `{name}`" if name else "## top level", ""]
    doc = inspect.getdoc(model)
    if doc and model.__doc__:
        out += [doc.splitlines()[0], ""]
    out += ["| key | type | default | note |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        annotation = field.annotation
        inner = typing.get_args(annotation)
        sub = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        section_in = sub is None and inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel)
        listed = section_in and typing.get_origin(annotation) is list
        if section_in:  # a list of sections (data.mixture: each item's keys), or an optional one
            sub = inner[0]
        if sub is not None:
            nested.append(((f"{name}.{key}" if name else key) + ("[]" if listed else ""), sub))
            continue
        note = notes.get(key, "").replace("|", "\\|")
        kind = _type_name(annotation).replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | `{_default(field)}` | {note} |")
    out.append("")
    for child, sub in nested:
        _section(child, sub, out)


def reference() -> str:
    out = ["# Recipe keys", "",
           "Generated from `src/lmforge/config/` by `python -m lmforge.recipe_reference`; a test fails when it",
           "is stale. Every key may be set in a recipe's YAML or on the command line (`section.key=value`).", ""]
    _section("", config.Recipe, out)
    out += ["# Evaluation suites (`eval:` of an eval stage, `lmforge eval --config`)", ""]
    _section("eval", config.EvalConfig, out)
    _section("eval.tasks.NAME", config.EvalTaskConfig, out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
