"""The one place the service is built: every shared object made once, handed to handlers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from daemon.channels import ChannelManager
from daemon.clock import Clock, SystemClock
from daemon.config import Config
from daemon.configfile import ConfigError, LoadedConfig, Secrets
from daemon.delivery import DeliveryWorker
from daemon.fanout import FanoutHub
from daemon.fcm import FcmSender, make_sender
from daemon.google_calendar import GoogleCalendar
from daemon.lease import InstanceLease, InstanceRunning, LeaseLost
from daemon.metrics import Metrics
from daemon.refresh import Refresher
from daemon.rooms import Rooms
from daemon.sync import Syncer
from handlers import all_routes, check_auth_decisions
from handlers.base import NotFoundHandler
from storage import make_store
from storage.base import Notification, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)
access_log = logging.getLogger("mrm_push.access")

READINESS_TIMEOUT = 5.0
CHANNEL_UPKEEP_INTERVAL = 15.0  # seconds between background channel retries and stop attempts
FCM_THREADS = 8  # pyfcm sends and credential refreshes at once (firebase-admin sends are async)
DELIVERY_DRAIN = 2.0  # seconds at shutdown for FCM attempts in flight
PURGE_INTERVAL = 3600.0  # seconds between retention purges
STORE_MAINTENANCE_INTERVAL = 60.0  # seconds between store housekeeping runs (SQLite: the WAL)


class Service:
    """mrm-push as one object: config, clock, store, metrics, the Tornado app and its server."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
    ) -> None:
        self.config: Config = loaded.config
        self.secrets: Secrets = loaded.secrets
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self.store: Store = store or make_store(
            self.config.storage.url, self.config.storage.mongo_driver
        )
        # Wall time, whatever the service's clock: other processes read the lease too.
        self.instance_lease = InstanceLease(
            self.store, self.config.storage.lease_seconds, SystemClock()
        )
        self.lease_lost = asyncio.Event()  # `serve` stops and exits 1 when it is set
        self.google = self._make_google()
        self.channels = ChannelManager(self.store, self.google, self.clock, self.config)
        self.rooms = Rooms(self.store, self.channels, self.clock)
        self.refresher = Refresher(self.store, self.rooms, self.config, self.secrets.backend_token)
        self.syncer = Syncer(
            self.store, self.google, self.clock, self.config, on_published=self._published
        )
        # Blocking FCM work (credential refresh; pyfcm's requests) runs here, never on the loop.
        self.fcm_executor = ThreadPoolExecutor(FCM_THREADS, thread_name_prefix="fcm")
        self.fcm_sender = self._make_fcm_sender()
        self.delivery = DeliveryWorker(
            self.store, self.fcm_sender, self.clock, self.config, self.secrets.backend_token
        )
        self._delivery_task: asyncio.Task[None] | None = None
        # WebSocket fan-out (/ws): fed by publication, pings from one timer.
        self.fanout = FanoutHub(self.store, self.config.websocket)
        self.metrics.watch_deliveries(self.delivery)
        self.metrics.watch_fanout(self.fanout)
        # Every publication wakes the delivery worker, is counted, and goes out on /ws.
        self.publication_listeners: list[Callable[[Notification], None]] = [
            lambda _notification: self.delivery.wake(),
            lambda notification: self.metrics.published.labels(notification.source).inc(),
            self.fanout.publish,
        ]
        # name → coroutine raising with the reason when not ready; later parts add theirs.
        self.readiness_checks: dict[str, Callable[[], Awaitable[None]]] = {
            "storage": self._storage_ready,
            "google": self._google_ready,
            "fcm": self.delivery.check,
        }
        self.periodic: dict[str, PeriodicCallback] = {}
        self._periodic_work: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._add_periodic("lease", self.keep_lease, self.instance_lease.renew_interval)
        self._add_periodic("store_maintenance", self.store.maintain, STORE_MAINTENANCE_INTERVAL)
        self._add_periodic(
            "renew", self.channels.renew_due, self.config.google.renew_check_interval
        )
        self._add_periodic("channel_retries", self._channel_upkeep, CHANNEL_UPKEEP_INTERVAL)
        self._add_periodic("websocket_ping", self.fanout.ping, self.config.websocket.ping_interval)
        self._add_periodic("purge", self.purge, PURGE_INTERVAL)
        if self.config.sync.poll_interval:
            self._add_periodic("poll", self.syncer.poll_all, self.config.sync.poll_interval)
        if self.config.backend.refresh_interval and self.config.backend.url:
            self._add_periodic(
                "refresh", self.refresher.refresh, self.config.backend.refresh_interval
            )
        self.app = self._make_app()
        self.server: HTTPServer | None = None
        self.sockets: list[socket.socket] = []
        self.stopping = False
        self._recovered = False

    def _make_google(self) -> GoogleCalendar | None:
        google = self.config.google
        if not google.service_account_file:
            log.warning(
                "google_not_configured",
                extra={"reason": "google.service_account_file is not set; no channel can be made"},
            )
            return None
        try:
            return GoogleCalendar(
                service_account_file=google.service_account_file,
                subject=google.subject,
                calendar_endpoint=google.calendar_endpoint,
                request_timeout=google.request_timeout,
                max_concurrency=google.max_concurrency,
            )
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(
                f"google.service_account_file: cannot use {google.service_account_file} ({error})"
            ) from None

    def _make_fcm_sender(self) -> FcmSender | None:
        fcm = self.config.fcm
        if not fcm.service_account_file:
            log.warning(
                "fcm_not_configured",
                extra={"reason": "fcm.service_account_file is not set; tablets get nothing"},
            )
            return None
        project_id = fcm.project_id or _key_project_id(fcm.service_account_file)
        return make_sender(
            fcm.backend,
            service_account_file=fcm.service_account_file,
            project_id=project_id,
            endpoint=fcm.endpoint,
            attempt_timeout=fcm.attempt_timeout,
            executor=self.fcm_executor,
            clock=self.clock,
        )

    async def _storage_ready(self) -> None:
        await self.store.ping()
        if self.lease_lost.is_set():
            raise StoreUnavailable("the instance lease was taken by another instance: stopping")
        if self.instance_lease.held is None:
            raise StoreUnavailable("the instance lease is not held yet: no work is done")

    async def _google_ready(self) -> None:
        if self.google is None:
            raise RuntimeError("not configured: google.service_account_file is not set")
        await self.google.check()

    def _add_periodic(self, name: str, work: Callable[[], Awaitable[Any]], interval: float) -> None:
        """Run `work` every `interval` seconds; a run still going when the next is due is not
        doubled, and a failure is logged, never fatal."""
        running: set[str] = set()

        async def run() -> None:
            if name in running or self.stopping or self.lease_lost.is_set():
                return
            running.add(name)
            try:
                await work()
            except Exception:
                log.exception("periodic_failed", extra={"task": name})
            finally:
                running.discard(name)

        self.periodic[name] = PeriodicCallback(run, interval * 1000, jitter=0.1)
        self._periodic_work[name] = run

    def run_periodic_now(self, name: str) -> None:
        """Start one periodic task's work now (unless it is running already)."""
        if name in self._periodic_work and not self.stopping:
            self.channels.spawn(self._periodic_work[name]())

    async def purge(self) -> int:
        """Retention: published notifications older than storage.retention_days go (once their
        deliveries are final), and unpublished ones too; the store remembers the highest seq
        dropped, so a replay from before it says `complete: false`."""
        cutoff = self.clock.now() - self.config.storage.retention_days * 86400
        dropped = await self.store.purge_notifications(cutoff, cutoff)
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
        return web.Application(
            routes,
            default_handler_class=NotFoundHandler,
            service=self,
            log_function=self._log_request,
            compress_response=False,
        )

    # -- life --------------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Open the store (StoreConfigError stops the start), take the instance lease (a live
        holder's raises InstanceRunning), listen, then pick up work."""
        await self.store.open()
        try:
            # Before any recovery: release_claims would take back a live instance's claims.
            await self.instance_lease.acquire()
        except StoreError as error:
            # The database is down: listen (and say unready); the lease task keeps trying.
            log.warning("instance_lease_postponed", extra={"reason": str(error)})
        await self.fanout.start()
        server = self.config.server
        self.sockets = sockets or bind_sockets(server.port, server.host)
        self.server = HTTPServer(
            self.app,
            xheaders=server.xheaders,
            max_body_size=server.max_body_size,
            idle_connection_timeout=60,
        )
        self.server.add_sockets(self.sockets)
        self.periodic["lease"].start()
        if self.instance_lease.held is not None:
            await self._begin_work()
        log.info("listening", extra={"host": server.host, "port": self.port})

    async def _begin_work(self) -> None:
        """The lease is ours: pick up the previous run's work, start the delivery worker and
        the periodic tasks."""
        await self._recover()
        self._delivery_task = asyncio.get_running_loop().create_task(self.delivery.run())
        for name, callback in self.periodic.items():
            if name != "lease":
                callback.start()

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
            released = await self.store.release_claims()
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
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, stop periodic work, close connections and the store."""
        self.stopping = True
        self.fanout.close_all()  # 1001 first: companion apps reconnect elsewhere or later
        if self.server is not None:
            self.server.stop()
        for callback in self.periodic.values():
            callback.stop()
        await self.channels.drain(1.0)
        await self.syncer.drain(1.0)
        self.syncer.close()
        # Attempts in flight get a moment to finish; what is left stays claimed and is released
        # (sent again) at the next start: at least once.
        await self.delivery.stop(DELIVERY_DRAIN)
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

        async def run(check: Callable[[], Awaitable[None]]) -> str:
            try:
                await asyncio.wait_for(check(), READINESS_TIMEOUT)
            except TimeoutError:
                return f"no answer within {READINESS_TIMEOUT:g} s"
            except StoreError as error:
                return str(error) or type(error).__name__
            except Exception as error:  # a check's failure is its answer, whatever it is
                return f"{type(error).__name__}: {error}"
            return "ok"

        names = list(self.readiness_checks)
        results = await asyncio.gather(*(run(self.readiness_checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        self.metrics.ready.set(1 if all(r == "ok" for r in results) else 0)
        return checks

    # -- access log and request metrics ------------------------------------------------------
    def _log_request(self, handler: web.RequestHandler) -> None:
        request = handler.request
        status = handler.get_status()
        seconds = request.request_time()
        route = type(handler).__name__
        self.metrics.requests.labels(route, request.method or "", str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        level = logging.INFO if status < 500 else logging.ERROR
        extra: dict[str, Any] = {
            "method": request.method,
            "path": request.path,  # never the query string: it may hold tokens
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "remote": request.remote_ip,
        }
        access_log.log(level, "request", extra=extra)


def _key_project_id(key_file: str) -> str:
    """The Firebase project of a service-account key, when fcm.project_id does not say."""
    try:
        with open(key_file, encoding="utf-8") as stream:
            project_id = json.load(stream).get("project_id")
    except (OSError, ValueError) as error:
        raise ConfigError(f"fcm.service_account_file: cannot use {key_file} ({error})") from None
    if not isinstance(project_id, str) or not project_id:
        raise ConfigError("fcm.project_id: not set, and the key file names no project_id")
    return project_id
