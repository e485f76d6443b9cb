"""Convert a stored residual pack to another storage format (``exact``, ``bfloat16``,
``float16``, ``float32``), by computing the pack of the same (instruct, base, method) in
that format from the sources its manifest records. No new math: the compute pipeline
makes it, and its key must be the content key the recorded digests give.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import (
    ArtifactCorruptError,
    ArtifactInUseError,
    ModelNotFoundError,
    RealignError,
)
from app.core.errors import SourcesUnavailableError as Unavailable
from app.pipeline import residual as residuals
from app.pipeline.context import Ctx, dtype_of
from app.residuals.manifest import RESIDUAL_MANIFEST, LineageInfo, ResidualManifest, SourceInfo
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.refs import ModelRef
from app.residuals.sources import describe_source
from app.store.keys import residual_key
from app.store.recovery import Notice, notify


@dataclass(frozen=True)
class ConvertResult:
    """A conversion: the pack in the requested format and the one it was made for."""

    key: str
    path: Path
    manifest: ResidualManifest
    old_key: str
    created: bool  # computed now (False: already stored, or the same format)
    removed_old: bool  # the old pack was removed (``remove_old``)
    lineage: LineageInfo | None = None


def convert(
    ctx: Ctx,
    key: str,
    dtype: str,
    *,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    notice: Notice | None = None,
    remove_old: bool = False,
) -> ConvertResult:
    """The pack of stored residual ``key`` in format ``dtype`` (see ``app.merge.convert``)."""
    dtype_of(dtype)  # an unknown format is refused before anything is read
    st = ctx.store
    old = st.resolve(key)
    m = _manifest(ctx, old)
    if m.dtype == dtype:
        return ConvertResult(old, st.path(old), m, old, created=False, removed_old=False)
    want = residual_key(m.instruct.digest, m.base.digest, method=m.method, dtype=dtype)
    base, instruct = _sources(ctx, old, m, dtype)
    try:
        # The lineage of these very models (digests checked) was judged when the pack
        # was first computed; a change of storage format does not judge it again.
        res = residuals.compute(
            ctx, base, instruct, dtype=dtype, method=m.method, device=device,
            progress=progress, cancel=cancel, notice=notice, force=True,
        )  # fmt: skip
    except ModelNotFoundError as exc:  # a Hub or s3 source, found gone by the download
        raise Unavailable(_unavailable(old, m, dtype, [str(exc)])) from None
    if res.key != want:  # changed between the check and the compute, or a remote source
        changed = f"they now give the pack {res.key}, not {want}: their files changed"
        raise Unavailable(_unavailable(old, m, dtype, [changed]))
    removed = remove_old and _remove(ctx, old, res.key, notice)
    return ConvertResult(res.key, res.path, res.manifest, old, res.created, removed, res.lineage)


def _manifest(ctx: Ctx, key: str) -> ResidualManifest:
    """The manifest of stored pack ``key``, read alone (an object store's pack is not
    downloaded for it), and checked against the key: the sources it records give it.

    Raises:
        ArtifactCorruptError: they do not (the manifest changed).
    """
    text = ctx.store.read_text(key, RESIDUAL_MANIFEST)
    try:
        m = ResidualManifest.model_validate_json(text)
    except ValueError:
        m = None
    if (
        m is None
        or residual_key(m.instruct.digest, m.base.digest, method=m.method, dtype=m.dtype) != key
    ):
        raise ArtifactCorruptError(
            f"residual {key}: its {RESIDUAL_MANIFEST} does not record the sources of its key "
            f"(the file changed); `realign verify {key}` checks the pack",
            file=RESIDUAL_MANIFEST,
        )
    return m


def _sources(ctx: Ctx, key: str, m: ResidualManifest, dtype: str) -> tuple[str, str]:
    """The refs of the pack's base and instruct models as they are now, checked against
    the recorded digests before any work (a local directory moved or edited is found
    here; Hub and s3 refs are pinned, and the key of the result checks them).

    Raises:
        SourcesUnavailableError: a source is gone or changed; the message names each.
    """
    found: dict[str, str] = {}
    problems: list[str] = []
    for role, src in (("base", m.base), ("instruct", m.instruct)):
        ref, problem = _locate(ctx, src)
        if problem:
            problems.append(f"{role} {problem}")
        else:
            found[role] = ref
    if problems:
        raise Unavailable(_unavailable(key, m, dtype, problems))
    return found["base"], found["instruct"]


def _locate(ctx: Ctx, src: SourceInfo) -> tuple[str, str | None]:
    """``(ref, None)``: a ref that gives ``src``'s content; else ``("", why not)``.

    A local source is looked for at its recorded ref, then at the absolute path it
    resolved to (a relative ref given from another directory)."""
    try:
        if ModelRef.parse(src.ref).kind != "local":
            return src.ref, None
    except RealignError as exc:
        return "", f"{src.ref}: {exc}"
    why = f"{src.ref}: no such directory (moved or deleted)"
    for ref in dict.fromkeys([src.ref, src.path]):
        try:
            digest = describe_source(ctx.resolve(ref), ctx.store.hasher).digest
        except ModelNotFoundError:
            continue
        except (RealignError, OSError) as exc:
            why = f"{ref}: {exc}"
            continue
        if digest == src.digest:
            return ref, None
        why = (
            f"{ref}: its files changed since the pack was computed (digest {digest[:12]}, "
            f"recorded {src.digest[:12]})"
        )
    return "", why


def _unavailable(key: str, m: ResidualManifest, dtype: str, problems: list[str]) -> str:
    return (
        f"residual {key} cannot be converted to {dtype}: its sources are not available — "
        f"{'; '.join(problems)}. Compute the {dtype} pack from the same models where they "
        f"are now: `realign compute --base {m.base.ref} --instruct {m.instruct.ref} "
        f"--pack {dtype}`"
    )


def _remove(ctx: Ctx, old: str, new: str, notice: Notice | None) -> bool:
    """Remove the converted pack (merged models made from it are kept: they are whole
    models); False, and ``notice`` is told, while a job reads it."""
    with contextlib.suppress(ArtifactInUseError):
        ctx.store.remove(old)
        return True
    notify(
        notice,
        f"residual {old} was kept: a job is reading it; remove it once that is done "
        f"(`realign rm {old}`); its conversion is {new}",
    )
    return False
