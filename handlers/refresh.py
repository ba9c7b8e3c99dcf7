"""POST /v1/refresh: reconcile the rooms with the backend's list."""

from __future__ import annotations

from typing import Any

from daemon.refresh import BackendError
from handlers.base import ApiError, BaseHandler


class RefreshHandler(BaseHandler):
    """POST /v1/refresh (?dry_run=1, ?allow_prune=1)"""

    auth = "api_key"

    async def post(self) -> None:
        self.write_json(await self.run_refresh())

    async def run_refresh(self) -> dict[str, Any]:
        try:
            summary = await self.service.refresher.refresh(
                dry_run=self.flag_arg("dry_run"), allow_prune=self.flag_arg("allow_prune")
            )
        except BackendError as error:
            raise ApiError(502, "backend_error", str(error)) from None
        return summary.as_json()


routes = [(r"/v1/refresh", RefreshHandler)]
