"""Preflight: decide from configs, tokenizers and safetensors headers alone whether
two checkpoints can be combined, before any tensor byte is read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import IncompatibleModelsError
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.manifest import FamilyInfo, VocabInfo

STRUCTURE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts",
)
TIED_HEAD = "lm_head.weight"
_LINEAGE = "a residual only transfers within one model lineage (e.g. Llama 3 -> 3.1)"


def family_of(config: dict[str, Any]) -> FamilyInfo:
    """The architecture identity of a config: type, classes and structural sizes."""
    structure = {k: config[k] for k in STRUCTURE_KEYS if k in config}
    return FamilyInfo(
        model_type=str(config.get("model_type", "")),
        architectures=list(config.get("architectures") or []),
        structure=structure,
    )


def check_family(a: FamilyInfo, b: FamilyInfo, a_name: str, b_name: str) -> None:
    """Refuse two configs of different families, naming the mismatching fields.

    Raises:
        IncompatibleModelsError: model type, architecture or a structural size differs.
    """
    diffs = []
    if a.model_type != b.model_type:
        diffs.append(f"model_type {a.model_type!r} vs {b.model_type!r}")
    if a.architectures != b.architectures:
        diffs.append(f"architectures {a.architectures} vs {b.architectures}")
    for key in STRUCTURE_KEYS:
        if key in a.structure and key in b.structure and a.structure[key] != b.structure[key]:
            diffs.append(f"{key} {a.structure[key]!r} vs {b.structure[key]!r}")
    if diffs:
        raise IncompatibleModelsError(
            f"{a_name} and {b_name} are not the same architecture: {'; '.join(diffs[:3])} — "
            f"{_LINEAGE}"
        )


@dataclass
class Pairing:
    """How the tensors of an instruct/base pair line up."""

    combine: dict[str, tuple[TensorInfo, TensorInfo]] = field(default_factory=dict)
    common_rows: dict[str, int] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    vocab_tensors: list[str] = field(default_factory=list)
    base_rows: int | None = None
    instruct_rows: int | None = None

    def vocab_info(self) -> VocabInfo | None:
        """The vocabulary policy applied, for manifests (None: same vocabulary)."""
        if not self.vocab_tensors or self.base_rows is None or self.instruct_rows is None:
            return None
        return VocabInfo(
            base_rows=self.base_rows, instruct_rows=self.instruct_rows, tensors=self.vocab_tensors
        )


def weight_tensors(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    tensors = dict(ckpt.tensors)
    if ckpt.config.get("tie_word_embeddings"):
        tensors.pop(TIED_HEAD, None)  # a tied head is a copy of the embedding
    return tensors


def _name_diff(a: set[str], b: set[str], a_name: str, b_name: str) -> str:
    parts = []
    for only, who, other in ((a - b, a_name, b_name), (b - a, b_name, a_name)):
        if only:
            first = sorted(only)[0]
            more = f" (and {len(only) - 1} more)" if len(only) > 1 else ""
            parts.append(f"{who} has {first}{more} that {other} lacks")
    return "; ".join(parts)


def pair_tensors(instruct: Checkpoint, base: Checkpoint) -> Pairing:
    """Match the tensors of instruct and base, applying the vocabulary policy.

    Raises:
        IncompatibleModelsError: names, shapes or kinds differ in a way no policy covers.
    """
    ins, bas = weight_tensors(instruct), weight_tensors(base)
    if set(ins) != set(bas):
        raise IncompatibleModelsError(
            f"tensor names differ: {_name_diff(set(ins), set(bas), 'instruct', 'base')} — "
            f"not the same architecture; {_LINEAGE}"
        )
    pairing = Pairing()
    for name, b in bas.items():
        i = ins[name]
        if i.is_float != b.is_float:
            raise IncompatibleModelsError(
                f"{name}: instruct is {i.dtype} but base is {b.dtype} — not the same kind of tensor"
            )
        if not i.is_float:
            if i.shape != b.shape:
                raise IncompatibleModelsError(f"{name}: base {b.shape} vs instruct {i.shape}")
            pairing.copied.append(name)
            continue
        pairing.combine[name] = (i, b)
        pairing.common_rows[name] = _common_rows(name, i, b, instruct.config, base.config)
        if pairing.common_rows[name] != i.rows:
            pairing.vocab_tensors.append(name)
            pairing.base_rows, pairing.instruct_rows = b.rows, i.rows
    return pairing


def _common_rows(
    name: str, i: TensorInfo, b: TensorInfo, icfg: dict[str, Any], bcfg: dict[str, Any]
) -> int:
    if i.shape == b.shape:
        return i.rows
    shapes = f"{name}: base {b.shape} vs instruct {i.shape}"
    vocab_like = (
        len(i.shape) == 2
        and i.shape[1:] == b.shape[1:]
        and b.rows == bcfg.get("vocab_size")
        and i.rows == icfg.get("vocab_size")
    )
    if not vocab_like:
        raise IncompatibleModelsError(f"{shapes} — not the same architecture; {_LINEAGE}")
    if i.rows < b.rows:
        raise IncompatibleModelsError(
            f"{shapes}: the instruct model has fewer vocabulary rows than its base; Realign "
            "never truncates a vocabulary — check that these two models belong together"
        )
    return b.rows


def _vocab(directory: Path) -> dict[int, str] | None:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab: dict[int, str] = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update({int(v): str(k) for k, v in model_vocab.items()})
    for tok in data.get("added_tokens") or []:
        vocab[int(tok["id"])] = str(tok["content"])
    return vocab


def check_tokenizers(instruct_dir: Path, base_dir: Path) -> None:
    """Refuse a pair whose tokenizers disagree on a shared token id.

    Raises:
        IncompatibleModelsError: some id maps to different tokens.
    """
    iv, bv = _vocab(instruct_dir), _vocab(base_dir)
    if iv is None or bv is None:
        return
    for idx in sorted(set(iv) & set(bv)):
        if iv[idx] != bv[idx] and not (_reserved(iv[idx]) and _reserved(bv[idx])):
            raise IncompatibleModelsError(
                f"tokenizers differ: token id {idx} is {bv[idx]!r} in base but {iv[idx]!r} in "
                f"instruct — the residual would mix up embeddings; {_LINEAGE}"
            )


def _reserved(token: str) -> bool:
    # Instruct releases rename reserved special tokens (Llama 3: <|reserved_special_token_4|>
    # becomes <|eot_id|>); the embedding row is still the same slot.
    return token.startswith("<|") and token.endswith("|>")
