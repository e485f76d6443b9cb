"""When a ``serve: true`` job ends: a pure decision over the notice, the replicas'
reports and the replicas alive now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.handoff.board import LoadNotice, LoadReport


@dataclass(frozen=True)
class Verdict:
    """How the job ends: ``succeeded``, or ``failed`` / ``cancelled`` with a code."""

    status: Literal["succeeded", "failed", "cancelled"]
    message: str
    code: str | None = None


def judge(
    notice: LoadNotice,
    reports: dict[str, LoadReport],
    live: set[str],
    need: int | None,
    timeout_s: float,
    now: float,
    hint: str | None = None,
) -> Verdict | None:
    """The job's end, or None while it should keep waiting.

    Args:
        notice: the model waiting to be loaded.
        reports: the latest report of each replica that took the notice.
        live: ids of the replicas alive now (heartbeats).
        need: replicas that must have it loaded; None = every live replica (and one at least).
        timeout_s: how long after the notice the job may wait.
        now: the current time (epoch seconds).
        hint: what to do after a timeout (default: how a job's model still gets loaded).
    """
    ready = sorted(r for r, rep in reports.items() if rep.state == "ready")
    failed = {r: rep for r, rep in reports.items() if rep.state == "failed"}
    done = f"model {notice.model_id!r} ready on {', '.join(ready)}"
    if need is None:
        failed_live = {r: rep for r, rep in failed.items() if r in live}
        if failed_live:
            return _failed(failed_live)
        if ready and live <= set(ready):
            return Verdict("succeeded", done)
    else:
        if len(ready) >= need:
            return Verdict("succeeded", done)
        waiting = {r for r in live if r not in ready and r not in failed}
        if failed and len(ready) + len(waiting) < need:
            return _failed(failed)
    if now - notice.announced_at >= timeout_s:
        return _timed_out(notice, reports, live, need, timeout_s, hint)
    return None


def _failed(failed: dict[str, LoadReport]) -> Verdict:
    first = min(failed.values(), key=lambda rep: rep.at)
    more = (
        f" (on {first.replica}; {len(failed) - 1} more replicas failed)" if len(failed) > 1 else ""
    )
    return Verdict("failed", first.reason + more, "load_failed")


def _timed_out(
    notice: LoadNotice,
    reports: dict[str, LoadReport],
    live: set[str],
    need: int | None,
    timeout_s: float,
    hint: str | None,
) -> Verdict:
    ready = [r for r, rep in reports.items() if rep.state == "ready"]
    wanted = "every live replica" if need is None else f"{need} replica(s)"
    lost = sorted(r for r, rep in reports.items() if rep.state == "loading" and r not in live)
    loading = sorted(r for r, rep in reports.items() if rep.state == "loading" and r in live)
    if lost:
        why = f"replica(s) {', '.join(lost)} stopped while loading it (heartbeat lost)"
    elif loading:
        why = f"still loading on {', '.join(loading)}"
    elif not live:
        why = "no serving replica is running (start `realign serve`, role all or serving)"
    else:
        why = f"{len(live)} replica(s) running, none took it"
    if hint is None:
        hint = (
            "The merged model is published and registered: a replica loads it on its "
            f"first request, or with POST /admin/models/{notice.model_id}/load"
        )
    done = "loaded" if notice.action == "load" else "unloaded"
    return Verdict(
        "failed",
        f"model {notice.model_id!r} was not {done} on {wanted} within {timeout_s:g} s "
        f"(REALIGN_SERVE_LOAD_TIMEOUT_S): ready on {len(ready)}; {why}. {hint}",
        "load_timeout",
    )
