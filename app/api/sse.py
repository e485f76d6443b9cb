"""Server-sent events of a job: poll the service, send new events, end when terminal.

After the first byte the status line is gone, so an error becomes an ``error``
event carrying the OpenAI error body (from the API's one error mapper, so an
unexpected failure says only that it was logged, with its request id), and the
stream ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio.to_thread

from app.api.errors import map_exception
from app.api.schemas.jobs import EventPublic
from app.jobs.models import Caller, JobEvent
from app.jobs.service import JobService

POLL_INTERVAL_S = 0.3
HEARTBEAT_S = 15.0


def format_event(event: JobEvent) -> str:
    data = EventPublic.from_event(event).model_dump_json()
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"


async def job_event_stream(
    service: JobService, job_id: str, caller: Caller, after: int, first: list[JobEvent]
) -> AsyncIterator[str]:
    """SSE frames of ``job_id``'s events with ``seq > after``, live until the job ends.

    ``first`` is the batch the route already fetched (it raised 404 before any byte).
    """
    batch, last_sent = first, time.monotonic()
    try:
        while True:
            for event in batch:
                yield format_event(event)
                after, last_sent = event.seq, time.monotonic()
            if batch and batch[-1].status.terminal:
                return
            job = await anyio.to_thread.run_sync(service.get, job_id, caller)
            if job.status.terminal:
                for event in await anyio.to_thread.run_sync(service.events, job_id, caller, after):
                    yield format_event(event)
                return
            if time.monotonic() - last_sent > HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await anyio.sleep(POLL_INTERVAL_S)
            batch = await anyio.to_thread.run_sync(service.events, job_id, caller, after)
    except Exception as exc:
        body = map_exception(exc, where=f"event stream of job {job_id}").body
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
