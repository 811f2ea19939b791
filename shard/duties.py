"""A shard's background duties, each a loop on the event loop beside the pipeline.

They run on the loop on purpose: a blocked loop stops the heartbeat and lets the liveness
key expire, which is how the supervisor and the other instances notice a hung shard.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from common.keys import rehydrate_channel
from common.retry import attempt, retry
from common.timing import HEARTBEAT_INTERVAL_S
from shard.claim import Claimer
from shard.geofences import GeofenceSource
from shard.reporting import Report
from shard.stream import ConsumerStream
from shard.writer import PositionWriter

log = logging.getLogger("processor.shard")

SUMMARY_INTERVAL_S = 15.0
GEOFENCE_POLL_S = 2.0
REHYDRATE_POLL_S = 1.0


class Duties:
    def __init__(
        self,
        stream_key: str,
        report: Report,
        stream: ConsumerStream,
        claimer: Claimer,
        geofences: GeofenceSource,
        writer: PositionWriter,
        on_orphaned: Callable[[], None],
    ) -> None:
        self.channel = rehydrate_channel(stream_key)
        self.report = report
        self.stream = stream
        self.claimer = claimer
        self.geofences = geofences
        self.writer = writer
        self.on_orphaned = on_orphaned
        self.parent_pid = os.getppid()

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self.beat(), self.keep_alive(), self.watch_geofences(), self.listen_rehydrate()]

    async def beat(self) -> None:
        """Heartbeat into the status board; notice a vanished supervisor; a summary now and then."""
        ticks_per_summary = round(SUMMARY_INTERVAL_S / HEARTBEAT_INTERVAL_S)
        tick = 0
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self.report.publish()
            if os.getppid() != self.parent_pid:
                self.on_orphaned()
            tick += 1
            if tick % ticks_per_summary == 0:
                self.report.log_summary()

    async def keep_alive(self) -> None:
        """Refresh the liveness key, so that claimers know this consumer is not dead."""
        while True:
            await attempt("redis", self.report.reach, self.claimer.keep_alive)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def watch_geofences(self) -> None:
        """Pick up inserted, changed and deactivated geofences without a restart: a warm-up.

        Every batch checks the revision itself, inside its transaction, and loads the
        geofences there when they changed (shard/geofences.py); this poll only loads changes
        ahead of the next batch, mostly for an idle shard. An idle shard learns of a Postgres outage here
        first; the write path logs it.
        """
        while True:
            await asyncio.sleep(GEOFENCE_POLL_S)
            await attempt("postgres", self.report.reach, self.geofences.refresh)

    async def listen_rehydrate(self) -> None:
        """Drop a device's cached state when `processor rehydrate` asks (it bumps the row version too)."""
        await retry("redis", self.report.reach, self._listen)

    async def _listen(self) -> None:
        pubsub = self.stream.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            while True:
                message = await pubsub.get_message(timeout=REHYDRATE_POLL_S)
                if message is not None:
                    device_id = message["data"].decode(errors="replace")
                    self.writer.cache.drop([device_id])
                    log.info("device state dropped on request", extra={"device_id": device_id})
        finally:
            await pubsub.aclose()
