"""The instruct side's non-weight files: tokenizer, chat template, generation config.

A merged model must speak like the instruct model (e.g. Llama 3 instruct stops
on ``<|eot_id|>``), so these files travel with the residual pack and into every
merged directory — without ``auto_map``: an output never asks to run code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from app.residuals.remote_code import AUTO_MAP, CONFIG_NAMES, strip_auto_map

ASSET_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
INSTRUCT_CONFIG = "instruct_config.json"


def asset_files(model_dir: Path) -> list[Path]:
    """The tokenizer/template/generation files present in ``model_dir``."""
    found = [model_dir / n for n in ASSET_NAMES if (model_dir / n).is_file()]
    found += sorted(model_dir.glob("*.tiktoken"))
    return found


def copy_assets(src: Path, dest: Path) -> list[str]:
    """Copy the asset files of ``src`` into ``dest`` (JSON ones without ``auto_map``);
    return their names."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for f in asset_files(src):
        if not _copy_without_auto_map(f, dest / f.name):
            shutil.copyfile(f, dest / f.name)  # byte for byte: most files carry no code
        names.append(f.name)
    return names


def _copy_without_auto_map(src: Path, dest: Path) -> bool:
    """Write ``src`` minus its ``auto_map`` to ``dest``; False when it has none."""
    if src.name not in CONFIG_NAMES or AUTO_MAP.encode() not in src.read_bytes():
        return False
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if not isinstance(data, dict) or AUTO_MAP not in data:
        return False
    dest.write_text(json.dumps(strip_auto_map(data), indent=2, ensure_ascii=False) + "\n")
    return True


def special_tokens(instruct_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Token ids the merged model must use: instruct config, overridden by its
    generation config (which is what generate() and vLLM read for stopping)."""
    tokens = {k: config[k] for k in TOKEN_KEYS if config.get(k) is not None}
    gen = instruct_dir / "generation_config.json"
    if gen.is_file():
        data = json.loads(gen.read_text())
        tokens.update({k: data[k] for k in TOKEN_KEYS if data.get(k) is not None})
    return tokens


def merged_config(
    target: dict[str, Any], instruct_tokens: dict[str, Any], vocab_rows: int | None
) -> dict[str, Any]:
    """The merged model's config: the target's, with the instruct side's token ids
    and, when the instruct side added tokens, its vocabulary size; never ``auto_map``."""
    config = strip_auto_map(target)
    config.update(instruct_tokens)
    if vocab_rows is not None:
        config["vocab_size"] = vocab_rows
    return config
