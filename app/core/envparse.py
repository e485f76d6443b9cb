"""How ``Settings`` reads the environment: list values in the form people write them,
and one-line messages for values that do not parse.

List-valued settings accept a JSON list (``["/a", "/b"]``) or the ``PATH`` form
(``/a:/b`` — ``os.pathsep`` — or ``/a,/b``). A bad value becomes one line naming
the variable, what is wrong and an example, instead of a pydantic traceback.
"""

from __future__ import annotations

import json
import os
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

PREFIX = "REALIGN_"
_SEQUENCES = (list, tuple, set, frozenset)
_SPLIT = re.compile(f"[,{re.escape(os.pathsep)}]")


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def is_list_field(field: FieldInfo) -> bool:
    """Whether a settings field holds a list (``list[Path]``, ``list[str] | None``...)."""
    annotation = _unwrap(field.annotation)
    return annotation in _SEQUENCES or get_origin(annotation) in _SEQUENCES


def split_list(value: str) -> Any:
    """A list setting's text: a JSON list, or items separated by ``os.pathsep`` or commas.

    Returns the decoded JSON when the text starts with ``[``, so that a malformed JSON
    list is reported as such rather than taken for one odd path.
    """
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in _SPLIT.split(text) if part.strip()]


class _ListFriendly:
    """Mixin for pydantic-settings sources: list fields split instead of JSON-only."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and is_list_field(field):
            return split_list(value)
        return super().decode_complex_value(field_name, field, value)  # type: ignore[misc]


class ListFriendlyEnvSource(_ListFriendly, EnvSettingsSource):
    """Environment variables, with the list forms above."""


class ListFriendlyDotEnvSource(_ListFriendly, DotEnvSettingsSource):
    """A ``.env`` file, with the list forms above."""


# -- messages -------------------------------------------------------------------------------
def variable(name: str) -> str:
    """The environment variable of a settings field."""
    return f"{PREFIX}{name.upper()}"


def example(field: FieldInfo) -> str:
    """A value that parses, to show next to an error."""
    if field.examples:
        return str(field.examples[0])
    annotation = _unwrap(field.annotation)
    if get_origin(annotation) is Literal:
        return str(get_args(annotation)[0])
    if is_list_field(field):
        return f"/data/models{os.pathsep}/srv/models"
    if annotation is bool:
        return "true"
    default = field.get_default(call_default_factory=True)
    if default is not None and annotation in (int, float, str):
        return str(default)
    return {int: "8", float: "0.5"}.get(annotation, "…")


def _what(error: Any) -> str:
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    ctx = error.get("ctx") or {}
    if error.get("type") == "json_invalid":
        return f"not valid JSON ({ctx.get('error', msg)})"
    return msg[0].lower() + msg[1:] if msg else "invalid value"


def explain(model: type[BaseModel], exc: Exception) -> str:
    """One line for a settings error: which variable, what is wrong, an example.

    Args:
        model: the settings class (for field examples).
        exc: a pydantic ``ValidationError`` or a pydantic-settings ``SettingsError``.
    """
    fields = model.model_fields
    if not isinstance(exc, ValidationError):
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1) if found else ""
        cause = exc.__cause__ or exc
        if name in fields:
            var = variable(name)
            what = "not a valid JSON list" if is_list_field(fields[name]) else "not valid JSON"
            return f"{var}: {what} ({cause}); e.g. {var}={example(fields[name])}"
        return f"invalid settings: {cause}"
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error.get("loc") else ""
        if name not in fields:
            parts.append(_what(error))
            continue
        var = variable(name)
        given = error.get("input")
        shown = f"={given!s}" if isinstance(given, str | int | float) else ""
        parts.append(f"{var}{shown}: {_what(error)}; e.g. {var}={example(fields[name])}")
    return "invalid settings: " + "; ".join(parts)


# -- the README table -----------------------------------------------------------------------
def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if isinstance(default, list | tuple) and not default:
        return "empty"
    if isinstance(default, list | tuple):
        return "`" + ",".join(map(str, default)) + "`"
    return f"`{default}`"


def markdown_table(model: type[BaseModel]) -> str:
    """The settings as a Markdown table: variable, default, what it does."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{variable(name)}` | {_default_text(field)} | {text} |")
    return "\n".join(rows) + "\n"


__all__ = [
    "ListFriendlyDotEnvSource",
    "ListFriendlyEnvSource",
    "explain",
    "is_list_field",
    "markdown_table",
    "split_list",
]
