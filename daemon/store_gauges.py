"""The metrics read from the store (outbox, backlog, channels, stops): counted by a periodic task.

A Prometheus collector runs synchronously inside the scrape, so it cannot query the store; the
service's `metrics` task calls `refresh()` every few seconds and each scrape shows the last
figures. A store that fails keeps the last figures (the service then says not ready).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, get_args

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.clock import Clock
from storage.base import CHANNEL_STATES, ChannelState, DeliveryState, StoreError, TargetKind

log = logging.getLogger(__name__)

COUNT_TIMEOUT = 5.0  # seconds the counts may take; past that the last figures stay


@dataclass(frozen=True)
class StoreFigures:
    deliveries: dict[tuple[DeliveryState, TargetKind], int]
    unsynced: int
    channels: dict[ChannelState, int]
    rooms_without_channel: int
    soonest_expiry: float | None
    stops: int


class RoomCounts(Protocol):
    async def count_without_channel(self, now: float) -> int: ...


class ChannelCounts(Protocol):
    async def count_by_state(self) -> dict[ChannelState, int]: ...

    async def soonest_expiry(self) -> float | None: ...

    async def count_stops(self) -> int: ...


class BacklogCount(Protocol):
    async def count_unsynced(self) -> int: ...


class OutboxCounts(Protocol):
    async def counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]: ...


@dataclass(frozen=True)
class Counted:
    """Where the figures come from: the count methods of four of the store's repositories."""

    rooms: RoomCounts
    channels: ChannelCounts
    notifications: BacklogCount
    outbox: OutboxCounts


async def read_figures(counted: Counted, now: float) -> StoreFigures:
    """One small set of counts, all grouped or indexed in the database."""
    deliveries, unsynced, channels, without, soonest, stops = await asyncio.gather(
        counted.outbox.counts(),
        counted.notifications.count_unsynced(),
        counted.channels.count_by_state(),
        counted.rooms.count_without_channel(now),
        counted.channels.soonest_expiry(),
        counted.channels.count_stops(),
    )
    return StoreFigures(deliveries, unsynced, channels, without, soonest, stops)


class StoreGauges(Collector):
    """The store's figures as gauges; none before the first successful count."""

    def __init__(self, counted: Counted, clock: Clock) -> None:
        self.counted = counted
        self.clock = clock
        self.figures: StoreFigures | None = None
        self._failing = False

    async def refresh(self) -> bool:
        """Count again; False (the last figures kept, one log line per outage) when the store
        fails or takes longer than COUNT_TIMEOUT."""
        try:
            async with asyncio.timeout(COUNT_TIMEOUT):
                self.figures = await read_figures(self.counted, self.clock.now())
        except (StoreError, TimeoutError) as error:
            if not self._failing:
                reason = str(error) or f"no answer within {COUNT_TIMEOUT:g} s"
                log.warning("metrics_store_counts_failed", extra={"reason": reason})
            self._failing = True
            return False
        if self._failing:
            log.info("metrics_store_counts_back")
        self._failing = False
        return True

    def collect(self) -> Iterator[Metric]:
        figures = self.figures
        deliveries = GaugeMetricFamily(
            "mrm_push_deliveries",
            "Deliveries in the outbox now, by state and target (every pair, 0 included).",
            labels=["state", "target"],
        )
        unsynced = GaugeMetricFamily(
            "mrm_push_unsynced_notifications",
            "Notifications stored and not yet synced (their events.list has not run).",
        )
        channels = GaugeMetricFamily(
            "mrm_push_channels",
            "Watch channels by state (every state, 0 included).",
            labels=["state"],
        )
        without = GaugeMetricFamily(
            "mrm_push_rooms_without_channel",
            "Rooms with no live confirmed channel (active or retiring, confirmed, not expired): "
            "Google tells nothing about them.",
        )
        expiry = GaugeMetricFamily(
            "mrm_push_channel_expiry_seconds",
            "Seconds until the soonest active channel expires (negative once it has); no "
            "sample while no active channel has an expiration.",
        )
        stops = GaugeMetricFamily(
            "mrm_push_stop_queue", "channels.stop calls queued (retried until Google answers)."
        )
        if figures is not None:
            for state in get_args(DeliveryState):
                for kind in get_args(TargetKind):
                    deliveries.add_metric([state, kind], figures.deliveries.get((state, kind), 0))
            unsynced.add_metric([], figures.unsynced)
            for channel_state in CHANNEL_STATES:
                channels.add_metric([channel_state], figures.channels.get(channel_state, 0))
            without.add_metric([], figures.rooms_without_channel)
            if figures.soonest_expiry is not None:
                # From the time of the scrape, not of the count: it keeps moving between counts.
                expiry.add_metric([], figures.soonest_expiry - self.clock.now())
            stops.add_metric([], figures.stops)
        yield from (deliveries, unsynced, channels, without, expiry, stops)
