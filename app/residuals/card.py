"""Model card (README.md) recording where a merged model comes from."""

from __future__ import annotations

from app.residuals.manifest import LineageInfo, MergeManifest, SourceInfo


def _row(role: str, s: SourceInfo) -> str:
    return f"| {role} | `{s.ref}` | {s.commit or '—'} | `{s.digest[:16]}` |"


def _lineage(info: LineageInfo | None) -> str:
    if info is None:
        return ""
    figures = ", ".join(
        f"{pair.replace('-', ' vs ')} {d.median:.3g} (max {d.max:.3g}, {len(d.tensors)} tensors)"
        for pair, d in info.distances.items()
    )
    text = (
        f"\nLineage check (relative weight distance |x - y| / |y| over {info.rows_per_tensor} "
        f"sampled rows per tensor, median; limit {info.max_distance:g}): "
        f"{figures or 'not measured'}."
    )
    if info.skipped:
        text += f" Not measured: {'; '.join(info.skipped)}."
    if not info.passed:
        text += (
            " **Merged with --force although a model is past the limit: task arithmetic "
            "needs models of one lineage, so this model may be noise.**"
        )
    return text + "\n"


def _lossy(m: MergeManifest) -> str:
    """What a merge from lossy packs computed exactly: R as its pack rounded it (an exact
    pack, or the fused pass, gives the exact result of instruct - base itself)."""
    kept = {m.residual_dtype, *(r.dtype for r in m.residuals)} - {None, "exact"}
    if not kept:
        return ""
    names = "/".join(sorted(str(d) for d in kept))
    return f", from R as its {names} pack stores it (rounded: lossy)"


def render_card(m: MergeManifest) -> str:
    """Markdown with YAML front matter, as the Hub expects."""
    residual = f"`{m.residual_key}` ({m.residual_dtype})" if m.residual_key else "not stored"
    vocab = ""
    if m.vocab is not None:
        vocab = (
            f"\nVocabulary: the instruct model added {m.vocab.instruct_rows - m.vocab.base_rows} "
            f"token rows ({m.vocab.base_rows} -> {m.vocab.instruct_rows}); they are taken "
            "verbatim from the instruct model.\n"
        )
    method = ""
    if m.params:
        method += "\nMethod parameters: " + ", ".join(f"{k}={v}" for k, v in m.params.items())
    if m.residuals:
        rows = "\n".join(
            f"| `{r.key or '(pack directory)'}` | `{r.instruct}` | `{r.base}` | {r.weight} |"
            for r in m.residuals
        )
        method += (
            "\n\nResiduals merged in one pass (tokenizer files from the first):\n\n"
            f"| residual | instruct | base | weight |\n| --- | --- | --- | --- |\n{rows}\n"
        )
    return f"""---
base_model: {m.target.ref}
tags:
- realign
- merge
- {m.method}
---
# Merged with Realign

`new = target + alpha * (instruct - base)` with alpha = {m.alpha}, method `{m.method}`,
each element the exact result rounded once to the target's dtype{_lossy(m)}. Tokenizer, chat
template and generation config come from the instruct model.

| role | reference | commit | content digest |
| --- | --- | --- | --- |
{_row("target (new base)", m.target)}
{_row("instruct", m.instruct)}
{_row("base", m.base)}

Residual: {residual}; computed in one fused pass: {"yes" if m.fused else "no"}.{method}
{vocab}{_lineage(m.lineage)}
Made by Realign {m.tool_version} on {m.created_at:%Y-%m-%d %H:%M UTC}. Full provenance
is in `realign.json`.
"""
