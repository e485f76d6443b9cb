"""Messages between the planes: Redis pub/sub, or an in-process bus when embedded.

Messages only wake readers up; the records (:mod:`app.handoff.board`) stay the truth, so
a message lost while a subscriber reconnects is found again by its next sweep.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Protocol

log = logging.getLogger("app.handoff")
LOAD_CHANNEL = "realign:serve:load"  # job id: a model is ready to load
REPORT_CHANNEL = "realign:serve:reported"  # job id: a replica reported on its load


class Subscription(Protocol):
    def get(self, timeout: float) -> str | None:
        """The next message, or None after ``timeout`` s; raises when the link is lost."""
        ...

    def close(self) -> None: ...


class Bus(Protocol):
    def publish(self, channel: str, message: str) -> None: ...
    def subscribe(self, channel: str) -> Subscription: ...


class _LocalSubscription:
    def __init__(self, bus: LocalBus, channel: str) -> None:
        self.bus, self.channel = bus, channel
        self.queue: queue.Queue[str] = queue.Queue()

    def get(self, timeout: float) -> str | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.bus._drop(self)


class LocalBus:
    """Publish/subscribe inside one process (the embedded mode)."""

    def __init__(self) -> None:
        self._subs: list[_LocalSubscription] = []
        self._lock = threading.Lock()

    def publish(self, channel: str, message: str) -> None:
        with self._lock:
            subs = [s for s in self._subs if s.channel == channel]
        for sub in subs:
            sub.queue.put(message)

    def subscribe(self, channel: str) -> Subscription:
        sub = _LocalSubscription(self, channel)
        with self._lock:
            self._subs.append(sub)
        return sub

    def _drop(self, sub: _LocalSubscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)


class _RedisSubscription:
    def __init__(self, client: Any, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)

    def get(self, timeout: float) -> str | None:
        message = self.pubsub.get_message(timeout=timeout)
        return None if message is None else str(message["data"])

    def close(self) -> None:
        try:
            self.pubsub.close()
        except Exception as exc:  # the link is already gone
            log.debug("closing a subscription: %s", exc)


class RedisBus:
    """Redis pub/sub. Publishing never raises: a lost message is found by a sweep."""

    def __init__(self, url: str) -> None:
        import redis

        # No read timeout: a subscriber waits for messages; health checks find dead links.
        self.client: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, health_check_interval=10
        )

    def publish(self, channel: str, message: str) -> None:
        try:
            self.client.publish(channel, message)
        except Exception as exc:
            log.warning(
                "publish on %s failed (%s); readers find it on their next sweep", channel, exc
            )

    def subscribe(self, channel: str) -> Subscription:
        return _RedisSubscription(self.client, channel)


_local = LocalBus()


def make_bus(redis_url: str | None) -> Bus:
    """Redis pub/sub on ``redis_url``; without one, the process's own in-process bus (the
    embedded job plane and serving plane share it)."""
    return RedisBus(redis_url) if redis_url else _local
