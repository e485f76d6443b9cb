"""Models that ship code: refused as inputs, never produced as outputs.

A Hugging Face model can name its own Python classes in ``auto_map`` (config.json,
tokenizer_config.json, ...) and ship them as ``*.py`` files; loading it with
``trust_remote_code`` runs that code. Realign never runs it, and a merged model
that kept ``auto_map`` would ask whoever loads it next to run it. So such inputs
are refused before any heavy work, unless an administrator allowed that exact code
by its content hash (``REALIGN_TRUSTED_CODE_SHA256``), and outputs never carry
``auto_map`` nor ``*.py`` files.

The code hash (:func:`code_digest`) is the sha256 of these UTF-8 lines, sorted
and each ending in ``\\n``:

* ``auto_map <file> <json>`` for every config file of :data:`CONFIG_NAMES` with a
  top-level ``auto_map``; ``<json>`` is that value as
  ``json.dumps(value, sort_keys=True, separators=(",", ":"))``;
* ``file <path> <sha256>`` for every ``*.py`` file anywhere under the model
  directory; ``<path>`` is relative, with ``/`` separators, ``<sha256>`` the hex
  digest of the file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import RemoteCodeError

CONFIG_NAMES = (
    "config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
)
CODE_SUFFIX = ".py"
AUTO_MAP = "auto_map"


@dataclass(frozen=True)
class ShippedCode:
    """What code a model directory carries, and its content hash."""

    auto_maps: dict[str, Any]  # config file name -> its auto_map
    files: list[str]  # relative paths of the *.py files
    digest: str

    def describe(self) -> str:
        parts = [f"auto_map in {name}" for name in sorted(self.auto_maps)]
        if self.files:
            more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
            parts.append(f"Python files {', '.join(self.files[:3])}{more}")
        return "; ".join(parts)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: the checkpoint reader reports it if it matters
    return data if isinstance(data, dict) else None


def _auto_maps(model_dir: Path) -> dict[str, Any]:
    found = {}
    for name in CONFIG_NAMES:
        data = _read_json(model_dir / name)
        if data is not None and data.get(AUTO_MAP):
            found[name] = data[AUTO_MAP]
    return found


def _code_files(model_dir: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(model_dir):
        dirnames.sort()
        for name in filenames:
            if name.endswith(CODE_SUFFIX):
                found.append((Path(dirpath) / name).relative_to(model_dir).as_posix())
    return sorted(found)


def code_digest(model_dir: Path, auto_maps: dict[str, Any], files: list[str]) -> str:
    """The content hash of a model's code (definition in the module docstring)."""
    lines = [
        f"{AUTO_MAP} {name} {json.dumps(value, sort_keys=True, separators=(',', ':'))}\n"
        for name, value in auto_maps.items()
    ]
    for rel in files:
        try:
            digest = hashlib.sha256((model_dir / rel).read_bytes()).hexdigest()
        except OSError:  # a dangling link or unreadable file is still refused as code
            digest = "unreadable"
        lines.append(f"file {rel} {digest}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def find_code(model_dir: Path) -> ShippedCode | None:
    """The code a model directory ships (``auto_map`` entries, ``*.py`` files), or None."""
    auto_maps, files = _auto_maps(model_dir), _code_files(model_dir)
    if not auto_maps and not files:
        return None
    return ShippedCode(auto_maps, files, code_digest(model_dir, auto_maps, files))


def check_remote_code(model_dir: Path, where: str, trusted: Collection[str] = ()) -> None:
    """Refuse a model that ships code, unless its code hash is in ``trusted``.

    Args:
        model_dir: the model's local directory.
        where: how the user named the model (for the message).
        trusted: allowed code hashes (sha256 hex, case-insensitive).

    Raises:
        RemoteCodeError: the model ships code that is not allowed.
    """
    if not (model_dir / "config.json").is_file():
        return  # not a model directory (never walk a stray path); the reader says so
    code = find_code(model_dir)
    if code is None or code.digest in {t.strip().lower() for t in trusted}:
        return
    raise RemoteCodeError(
        f"{where} ships its own code ({code.describe()}): loading it would run arbitrary "
        "Python, and Realign never runs model code — use a revision of the model without "
        "auto_map and *.py files (its architecture must be one transformers knows), or "
        "have an administrator allow exactly this code by adding its hash "
        f"{code.digest} to REALIGN_TRUSTED_CODE_SHA256 (outputs never carry the code)"
    )


def strip_auto_map(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` without ``auto_map`` (outputs never point at code)."""
    return {k: v for k, v in config.items() if k != AUTO_MAP}
