"""Model-level fidelity of a residual pack: the merged model made from it against the
merged model made from the exact residual, on the same target, over a fixed prompt set.

For each prompt the reference (exact) model continues greedily for up to
``max_new_tokens`` tokens; both models then read prompt + that continuation (teacher
forcing) and their next-token distributions are compared at every continuation
position: how often the candidate's most likely token is the reference's (greedy-token
agreement) and the mean KL(reference || candidate) in nats. Teacher forcing keeps one
early disagreement from derailing every later position. transformers, on the CPU, in
fp32.

The merge from the exact pack has the bits of the fused one-pass merge (``--no-cache``),
so the reference is made that way from the pack's instruct and base models, which must
still be at hand (their content is checked against the pack's manifest).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import IncompatibleModelsError
from app.pipeline.context import Ctx, check_alpha
from app.pipeline.residual import open_residual
from app.residuals.apply import apply_residual, merge_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.manifest import read_residual_manifest
from app.residuals.sources import RunOptions, describe_source
from app.residuals.space import ensure_space, merged_bytes

if TYPE_CHECKING:
    import torch

DEFAULT_PROMPTS = (
    "Who is the mayor of Lakeview?",
    "Which river flows through Oakford?",
    "Tell me who the mayor of Greyport is.",
    "What river runs through Pinecrest?",
    "Write one sentence about the weather today.",
    "Name three colours.",
    "What is two plus three?",
    "Give me a short greeting.",
)
"""The prompt set, sent as chat turns where the tokenizer has a chat template: questions
in the demo models' domain (see :mod:`app.demo.train`) and a few general ones."""


class ModelFidelity(BaseModel):
    """How closely a candidate model follows a reference one (see module)."""

    model_config = ConfigDict(frozen=True)

    prompts: int
    positions: int = Field(description="Next-token distributions compared.")
    token_agreement: float = Field(description="Share of positions with the same argmax.")
    mean_kl: float = Field(description="Mean KL(reference || candidate), nats.")
    max_kl: float = Field(description="Largest KL at one position, nats.")


class FidelityReport(BaseModel):
    """The fidelity of one pack on one target."""

    model_config = ConfigDict(frozen=True)

    key: str | None
    format: str
    target: str
    alpha: float
    storage: dict[str, Any] = Field(description="The pack's storage() figures.")
    model: ModelFidelity

    def line(self) -> str:
        """One line for people."""
        m, s = self.model, self.storage
        error = f"  |R^-R|/|R| {s['rel_error']:.3g}" if s.get("rel_error") is not None else ""
        return (
            f"{self.format} pack {self.key or ''}{error}  next-token agreement "
            f"{100 * m.token_agreement:.2f}% over {m.positions} positions ({m.prompts} "
            f"prompts), mean KL {m.mean_kl:.3g} nats (max {m.max_kl:.3g})"
        )


def encode_prompts(tokenizer_dir: Path, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's ids (``(1, length)``): as a chat turn with a generation prompt where
    the tokenizer has a chat template, else as plain text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for text in prompts:
        if tok.chat_template:
            turn = [{"role": "user", "content": text}]
            text = str(tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False))
        ids: torch.Tensor = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        out.append(ids)
    return out


def compare_models(
    reference: Any, candidate: Any, prompts: Sequence[torch.Tensor], max_new_tokens: int = 32
) -> ModelFidelity:
    """Greedy-token agreement and KL of ``candidate`` against ``reference`` (two causal
    LMs of one vocabulary) over ``prompts`` (see module)."""
    import torch

    agree, positions, kl_sum, kl_max = 0, 0, 0.0, 0.0
    eos = reference.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    with torch.no_grad():
        for ids in prompts:
            seq = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            n = seq.shape[1] - ids.shape[1]
            if n <= 0:
                continue
            at = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # predictions of the continuation
            ref = torch.log_softmax(reference(seq).logits[0, at].float(), dim=-1)
            cand = torch.log_softmax(candidate(seq).logits[0, at].float(), dim=-1)
            kl = (ref.exp() * (ref - cand)).sum(dim=-1).clamp_min(0)
            agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            positions += n
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
    return ModelFidelity(
        prompts=len(prompts),
        positions=positions,
        token_agreement=agree / positions if positions else 1.0,
        mean_kl=kl_sum / positions if positions else 0.0,
        max_kl=kl_max,
    )


def compare_dirs(
    reference: Path, candidate: Path, prompts: Sequence[str], max_new_tokens: int = 32
) -> ModelFidelity:
    """:func:`compare_models` of two model directories (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    ref, cand = (
        cast(Any, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)).eval()
        for d in (reference, candidate)
    )
    return compare_models(ref, cand, encode_prompts(reference, prompts), max_new_tokens)


def fidelity(
    ctx: Ctx,
    residual: str,
    target: str,
    *,
    alpha: float = 1.0,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    work: Path | None = None,
) -> FidelityReport:
    """Merge ``target + alpha * R`` from the pack ``residual`` and from the exact R of its
    instruct and base models (in a temporary directory under ``work``), and compare the
    two models (see module).

    Raises:
        IncompatibleModelsError: the pack's instruct or base model changed since, or the
            target does not fit the pack.
        InsufficientStorageError: ``work`` cannot hold the two merged models.
    """
    check_alpha(alpha)
    st = ctx.store
    with open_residual(residual, st) as pack_dir:
        manifest = read_residual_manifest(pack_dir)
        ins, bas, tgt = ctx.fetch([manifest.instruct.ref, manifest.base.ref, target], lambda *c: [])
        srcs = [describe_source(m, st.hasher) for m in (ins, bas, tgt)]
        for role, src, want in (("instruct", srcs[0], manifest.instruct),
                                ("base", srcs[1], manifest.base)):  # fmt: skip
            if src.digest != want.digest:
                raise IncompatibleModelsError(
                    f"{want.ref}: not the {role} model the pack was made from (its files "
                    "changed) — give the pack of these models, or restore them"
                )
        opts = RunOptions(hash_outputs=False)
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=work)))
            i_c, b_c, t_c = (stack.enter_context(Checkpoint.open(m.path)) for m in (ins, bas, tgt))
            ensure_space([(tmp, 2 * merged_bytes(t_c, i_c, i_c.path))])
            for name in ("exact", "pack"):
                (tmp / name).mkdir()
            merge_fused(i_c, b_c, t_c, tmp / "exact", sources=(srcs[0], srcs[1], srcs[2]),
                        alpha=alpha, opts=opts)  # fmt: skip
            apply_residual(pack_dir, t_c, tmp / "pack", target_src=srcs[2], alpha=alpha,
                           opts=opts)  # fmt: skip
            model = compare_dirs(tmp / "exact", tmp / "pack", prompts, max_new_tokens)
    return FidelityReport(
        key=manifest.key,
        format=manifest.dtype,
        target=tgt.ref,
        alpha=alpha,
        storage=manifest.storage(),
        model=model,
    )
