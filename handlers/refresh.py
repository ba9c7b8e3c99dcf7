"""POST /v1/refresh: reconcile the rooms with the backend's list."""

from __future__ import annotations

from typing import Any

from daemon.backend import BackendError, BackendNotConfigured
from handlers.base import ApiError, BaseHandler


class RefreshHandler(BaseHandler):
    """POST /v1/refresh (?dry_run=1, ?allow_prune=1)"""

    auth = "api_key"

    async def post(self) -> None:
        summary = await self.run_refresh(self.flag_arg("dry_run"), self.flag_arg("allow_prune"))
        self.write_json(summary)

    async def run_refresh(self, dry_run: bool, allow_prune: bool) -> dict[str, Any]:
        try:
            summary = await self.service.refresher.refresh(dry_run=dry_run, allow_prune=allow_prune)
        except BackendNotConfigured as error:
            # Not the backend's fault (502 would say so) but this service's set-up: it cannot
            # refresh until backend.url is set.
            raise ApiError(503, "backend_not_configured", str(error)) from None
        except BackendError as error:
            raise ApiError(502, "backend_error", str(error)) from None
        return summary.as_json()


routes = [(r"/v1/refresh", RefreshHandler)]
