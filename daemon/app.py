"""The one place the service is built: every shared object made once, handed to handlers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from daemon.clock import Clock, SystemClock
from daemon.config import Config
from daemon.configfile import LoadedConfig, Secrets
from daemon.metrics import Metrics
from handlers import all_routes, check_auth_decisions
from handlers.base import NotFoundHandler
from storage import make_store
from storage.base import Store, StoreError

log = logging.getLogger(__name__)
access_log = logging.getLogger("mrm_push.access")

READINESS_TIMEOUT = 5.0


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
        # name → coroutine raising with the reason when not ready; later parts add theirs.
        self.readiness_checks: dict[str, Callable[[], Awaitable[None]]] = {
            "storage": self.store.ping
        }
        self.periodic: dict[str, PeriodicCallback] = {}
        self.app = self._make_app()
        self.server: HTTPServer | None = None
        self.sockets: list[socket.socket] = []
        self.stopping = False

    def _make_app(self) -> web.Application:
        routes = all_routes()
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
        """Open the store (StoreConfigError stops the start) and listen."""
        await self.store.open()
        server = self.config.server
        self.sockets = sockets or bind_sockets(server.port, server.host)
        self.server = HTTPServer(
            self.app,
            xheaders=server.xheaders,
            max_body_size=server.max_body_size,
            idle_connection_timeout=60,
        )
        self.server.add_sockets(self.sockets)
        for callback in self.periodic.values():
            callback.start()
        log.info("listening", extra={"host": server.host, "port": self.port})

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1]) if self.sockets else 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, stop periodic work, close connections and the store."""
        self.stopping = True
        if self.server is not None:
            self.server.stop()
        for callback in self.periodic.values():
            callback.stop()
        if self.server is not None:
            await self.server.close_all_connections()
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
