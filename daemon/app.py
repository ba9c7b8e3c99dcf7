"""The one place the service is built: every shared object made once, handed to handlers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from daemon.access_log import AccessLog
from daemon.channels import ChannelManager
from daemon.clock import Clock, SystemClock
from daemon.config import Config
from daemon.configcheck import fcm_project_id, store_config_error
from daemon.configfile import ConfigError, LoadedConfig, Secrets, local_url, public_url
from daemon.delivery import DeliveryWorker
from daemon.fanout import FanoutHub
from daemon.fcm import FcmSender, make_sender
from daemon.google_calendar import GoogleCalendar
from daemon.lease import InstanceLease, InstanceRunning, LeaseLost
from daemon.logs import protect
from daemon.metrics import Metrics
from daemon.periodic import PeriodicTasks
from daemon.readiness import run_checks
from daemon.redact import configured_secrets
from daemon.refresh import Refresher
from daemon.rooms import Rooms
from daemon.service_checks import google_check, storage_check
from daemon.store_gauges import Counted, StoreGauges
from daemon.sync import Syncer
from handlers import all_routes, check_auth_decisions
from handlers.base import NotFoundHandler
from handlers.edge import EdgeApplication, RefusedHandler, TrustedProxies
from storage import make_store
from storage.base import Notification, StoreConfigError, StoreError
from storage.protocols import Store

log = logging.getLogger(__name__)

CHANNEL_UPKEEP_INTERVAL = 15.0  # seconds between background channel retries and stop attempts
FCM_THREADS = 8  # pyfcm sends and credential refreshes at once (firebase-admin sends are async)
DELIVERY_DRAIN = 2.0  # seconds at shutdown for FCM attempts in flight, when stop() has no limit
STOP_RESERVE = 1.0  # seconds of a stop's limit kept for what follows the delivery drain
PURGE_INTERVAL = 3600.0  # seconds between retention purges
STORE_MAINTENANCE_INTERVAL = 60.0  # seconds between store housekeeping runs (SQLite: the WAL)
METRICS_INTERVAL = 10.0  # seconds between readiness checks and store counts for /metrics
# Run from the start, lease held or not (the rest waits for the lease).
ALWAYS_PERIODIC = ("lease", "metrics")


class Service:
    """mrm-push as one object: config, clock, store, metrics, the Tornado app and its server."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
    ) -> None:
        # A reload (daemon/reload.py) replaces these three: auth.* and logging.level only.
        self.loaded = loaded
        self.config: Config = loaded.config
        self.secrets: Secrets = loaded.secrets
        protect(configured_secrets(loaded))  # before anything can log one of them
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self.store: Store = store or _make_store(self.config)
        # Each part gets the repositories it uses, never the whole store.
        rooms, channels = self.store.rooms, self.store.channels
        notifications, outbox = self.store.notifications, self.store.outbox
        # Wall time, whatever the service's clock: other processes read the lease too.
        self.instance_lease = InstanceLease(
            self.store.meta, self.config.storage.lease_seconds, SystemClock()
        )
        self.lease_lost = asyncio.Event()  # `serve` stops and exits 1 when it is set
        self.google = self._make_google()
        self.channels = ChannelManager(channels, rooms, self.google, self.clock, self.config)
        self.rooms = Rooms(rooms, self.channels, self.clock)
        self.refresher = Refresher(
            rooms, channels, self.rooms, self.config, self.secrets.backend_token
        )
        # Blocking FCM work (credential refresh; pyfcm's requests) runs here, never on the loop.
        self.fcm_executor = ThreadPoolExecutor(FCM_THREADS, thread_name_prefix="fcm")
        self.fcm_sender = self._make_fcm_sender()
        self.syncer = Syncer(
            notifications,
            rooms,
            channels,
            self.google,
            self.clock,
            self.config,
            on_published=self._published,
            fcm=self.fcm_sender is not None,
        )
        self.delivery = DeliveryWorker(
            outbox,
            notifications,
            rooms,
            self.fcm_sender,
            self.clock,
            self.config,
            self.secrets.backend_token,
        )
        self._delivery_task: asyncio.Task[None] | None = None
        # WebSocket fan-out (/ws): fed by publication, pings from one timer.
        self.fanout = FanoutHub(notifications, self.store.meta, self.config.websocket)
        self.metrics.watch_deliveries(self.delivery)
        self.metrics.watch_fanout(self.fanout)
        self.store_gauges = StoreGauges(Counted(rooms, channels, notifications, outbox), self.clock)
        self.metrics.watch(self.store_gauges)
        # Every publication wakes the delivery worker, is counted, and goes out on /ws.
        self.publication_listeners: list[Callable[[Notification], None]] = [
            lambda _notification: self.delivery.wake(),
            lambda notification: self.metrics.published.labels(notification.source).inc(),
            self.fanout.publish,
        ]
        # name → coroutine raising with the reason when not ready; later parts add theirs.
        self.readiness_checks: dict[str, Callable[[], Awaitable[None]]] = {
            "storage": storage_check(self.store, self.instance_lease, self.lease_lost),
            "google": google_check(self.google),
            "fcm": self.delivery.check,
        }
        self.stopping = False
        # Periodic work stops with the service, and when another instance took the lease.
        self.tasks = PeriodicTasks(
            lambda: not self.stopping and not self.lease_lost.is_set(), self.channels.spawn
        )
        add = self.tasks.add
        add("lease", self.keep_lease, self.instance_lease.renew_interval)
        add("metrics", self.refresh_metrics, METRICS_INTERVAL)
        add("store_maintenance", self.store.maintain, STORE_MAINTENANCE_INTERVAL)
        add("renew", self.channels.renew_due, self.config.google.renew_check_interval)
        add("channel_retries", self._channel_upkeep, CHANNEL_UPKEEP_INTERVAL)
        add("websocket_ping", self.fanout.ping, self.config.websocket.ping_interval)
        add("purge", self.purge, PURGE_INTERVAL)
        if self.config.sync.poll_interval:
            add("poll", self.syncer.poll_all, self.config.sync.poll_interval)
        if self.config.backend.refresh_interval and self.config.backend.url:
            add("refresh", self.refresher.refresh, self.config.backend.refresh_interval)
        self.app = self._make_app()
        self.server: HTTPServer | None = None
        self.sockets: list[socket.socket] = []
        self._recovered = False

    def _make_google(self) -> GoogleCalendar | None:
        google = self.config.google
        if not google.service_account_file:
            return None  # serve logs it (configcheck.warnings); /readyz says so
        try:
            return GoogleCalendar(
                service_account_file=google.service_account_file,
                subject=google.subject,
                calendar_endpoint=google.calendar_endpoint,
                request_timeout=google.request_timeout,
                max_concurrency=google.max_concurrency,
                observe=self.metrics.observe_google,
            )
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(
                f"cannot use {google.service_account_file} ({error})",
                key="google.service_account_file",
            ) from None

    def _make_fcm_sender(self) -> FcmSender | None:
        fcm = self.config.fcm
        if not fcm.service_account_file:
            log.warning(
                "fcm_not_configured",
                extra={
                    "reason": "fcm.service_account_file is not set: no FCM deliveries are made "
                    "and tablets get nothing (the WebSocket feed and the backend still work)"
                },
            )
            return None
        project_id = fcm.project_id or fcm_project_id(fcm.service_account_file)
        sender = make_sender(
            fcm.backend,
            service_account_file=fcm.service_account_file,
            project_id=project_id,
            endpoint=fcm.endpoint,
            attempt_timeout=fcm.attempt_timeout,
            executor=self.fcm_executor,
            threads=FCM_THREADS,
            clock=self.clock,
            notification_body=fcm.notification_body,
        )
        return self.metrics.timed_sender(sender)

    @property
    def periodic(self) -> dict[str, PeriodicCallback]:
        """The periodic tasks' timers, by name."""
        return self.tasks.callbacks

    def run_periodic_now(self, name: str) -> None:
        """Start one periodic task's work now (unless it is running already)."""
        self.tasks.run_now(name)

    async def purge(self) -> int:
        """Retention: deliveries still not final storage.retention_days after they were made
        become `expired`; published notifications older than that go once their deliveries are
        final and none of them changed since the cutoff (so an expired one stays visible for
        another retention period), and unpublished ones too; the store remembers
        the highest seq dropped, so a replay from before it says `complete: false`."""
        cutoff = self.clock.now() - self.config.storage.retention_days * 86400
        await self.delivery.expire(cutoff)
        dropped = await self.store.notifications.purge(cutoff, cutoff)
        if dropped:
            log.info("notifications_purged", extra={"count": dropped})
        return dropped

    async def _channel_upkeep(self) -> None:
        await self._recover()
        await self.channels.retry_pending()
        await self.channels.process_stops()

    def notification_stored(self, notification: Notification) -> None:
        """A webhook notification is stored (and answered): sync its calendar."""
        self.syncer.kick(notification.calendar_id)

    def _published(self, notification: Notification) -> None:
        for listener in self.publication_listeners:
            listener(notification)

    def _make_app(self) -> web.Application:
        routes = all_routes(self.config.google.webhook_path)
        check_auth_decisions(routes)
        access = AccessLog(self.metrics, (*(h for _, h in routes), NotFoundHandler, RefusedHandler))
        self.route_names = access.route_names
        return EdgeApplication(
            routes,
            trusted_proxies=TrustedProxies(self.config.server.trusted_proxies),
            max_body_size=self.config.server.max_body_size,
            default_handler_class=NotFoundHandler,
            service=self,
            log_function=access,
            compress_response=False,
        )

    # -- life --------------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Open the store (a store that cannot work is a ConfigError on storage.url), take
        the instance lease (a live holder's raises InstanceRunning), listen on `sockets` (bound
        here when not given), then pick up work."""
        try:
            await self.store.open()
        except StoreConfigError as error:
            raise store_config_error(error) from None
        try:
            # Before any recovery: release_claims would take back a live instance's claims.
            await self.instance_lease.acquire()
        except StoreError as error:
            # The database is down: listen (and say unready); the lease task keeps trying.
            log.warning("instance_lease_postponed", extra={"reason": str(error)})
        await self.fanout.start()
        server = self.config.server
        self.sockets = sockets or bind_sockets(server.port, server.host)
        # With server.port 0 and no server.public_url, channels name the port actually bound.
        self.channels.public_url = public_url(server, self.port)
        self.server = HTTPServer(
            self.app,
            xheaders=False,  # forwarded headers count only from server.trusted_proxies (edge.py)
            max_body_size=server.max_body_size,
            idle_connection_timeout=60,
        )
        self.server.add_sockets(self.sockets)
        self.tasks.start(ALWAYS_PERIODIC)
        if self.instance_lease.held is not None:
            await self._begin_work()
        log.info("listening", extra={"host": server.host, "port": self.port})

    async def _begin_work(self) -> None:
        """The lease is ours: pick up the previous run's work, start the delivery worker and
        the periodic tasks."""
        await self._recover()
        self._delivery_task = asyncio.get_running_loop().create_task(self.delivery.run())
        self.tasks.start(name for name in self.periodic if name not in ALWAYS_PERIODIC)

    async def keep_lease(self) -> None:
        """Periodic: renew the lease, or take it when the start could not (database down)."""
        lease = self.instance_lease
        try:
            if lease.held is not None:
                await lease.renew()
            elif await lease.try_acquire():
                await self._begin_work()
        except (InstanceRunning, LeaseLost) as error:
            self._lost_lease(str(error))
        except StoreError as error:
            log.warning("instance_lease_renewal_failed", extra={"reason": str(error)})

    def _lost_lease(self, reason: str) -> None:
        """Another instance works on this store now: no periodic task runs from here on, and
        `serve` stops the service at once and exits 1 (systemd starts it again, and the new
        run waits for the lease like any start)."""
        log.error("instance_lease_lost", extra={"reason": reason})
        self.lease_lost.set()

    async def _recover(self) -> None:
        """Pick up what a previous run left (claims, channels in flight, unsynced
        notifications). With the database down this waits: the upkeep task tries again."""
        if self._recovered:
            return
        try:
            # Claims of a previous run (it crashed, or stopped mid-attempt) go back to pending.
            released = await self.store.outbox.release_claims()
            await self.channels.recover_after_restart()
            await self.syncer.resume()
        except StoreError as error:
            log.warning("recovery_postponed", extra={"reason": str(error)})
            return
        self._recovered = True
        log.info("recovered", extra={"released_claims": released})

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1]) if self.sockets else 0

    @property
    def base_url(self) -> str:
        """Where this machine reaches the service (127.0.0.1 for a wildcard host)."""
        return local_url(self.config.server.host, self.port)

    async def stop(self, limit: float | None = None) -> None:
        """Stop accepting, stop periodic work, close connections and the store, within `limit`
        seconds (`serve`: server.shutdown_timeout) when given."""
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        self.stopping = True
        self.fanout.close_all()  # 1001 first: companion apps reconnect elsewhere or later
        if self.server is not None:
            self.server.stop()
        self.tasks.stop()
        await self.channels.drain(_within(1.0, deadline, loop))
        await self.syncer.drain(_within(1.0, deadline, loop))
        self.syncer.close()
        await self.syncer.committed()  # a publication under way stores its sync token
        # Attempts in flight finish: FCM may have taken one whose answer is not in yet, and one
        # abandoned would be sent again after the restart. They get what the limit leaves
        # beyond STOP_RESERVE (without a limit, DELIVERY_DRAIN); what is still left then stays
        # claimed and is released (sent again) at the next start: at least once.
        drain = DELIVERY_DRAIN if deadline is None else deadline - STOP_RESERVE - loop.time()
        await self.delivery.stop(max(0.0, drain))
        if self._delivery_task is not None:
            await asyncio.gather(self._delivery_task, return_exceptions=True)
        if self.fcm_sender is not None:
            await self.fcm_sender.close()
        self.fcm_executor.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            await self.server.close_all_connections()
        if self.google is not None:
            self.google.close()
        try:
            await self.instance_lease.release()
        except StoreError as error:
            log.warning("instance_lease_not_released", extra={"reason": str(error)})
        await self.store.close()
        log.info("stopped")

    # -- readiness ---------------------------------------------------------------------------
    async def readiness(self) -> dict[str, str]:
        """Run every check at once; "ok" or the reason it failed, by name."""
        checks = await run_checks(self.readiness_checks)
        self.metrics.ready.set(1 if all(r == "ok" for r in checks.values()) else 0)
        return checks

    async def refresh_metrics(self) -> None:
        """Periodic: mrm_push_ready from the readiness checks, /readyz asked or not, and the
        store gauges; counts that fail keep their last figures and make mrm_push_ready 0."""
        _, counted = await asyncio.gather(self.readiness(), self.store_gauges.refresh())
        if not counted:
            self.metrics.ready.set(0)


def _within(seconds: float, deadline: float | None, loop: asyncio.AbstractEventLoop) -> float:
    """`seconds`, or less when the deadline comes first."""
    return seconds if deadline is None else max(0.0, min(seconds, deadline - loop.time()))


def _make_store(config: Config) -> Store:
    try:
        return make_store(config.storage.url, config.storage.mongo_driver)
    except StoreConfigError as error:
        raise store_config_error(error) from None
