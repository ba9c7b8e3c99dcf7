"""The request's edge, before routing: whether the request's framing can be read
(Content-Length), once for every route."""

from __future__ import annotations

from typing import Any

from tornado import httputil, web

from handlers.base import ApiError, BaseHandler, content_length_refusal


class RefusedHandler(BaseHandler):
    """A request refused at the edge, before routing (its error given by the application)."""

    auth = "public"

    def initialize(self, error: ApiError) -> None:
        self.error = error

    async def prepare(self) -> None:
        raise self.error


class EdgeApplication(web.Application):
    """The Tornado application with the edge rules applied before any handler is chosen, the
    WebSocket and the webhook included."""

    def __init__(
        self,
        handlers: Any,
        *,
        max_body_size: int,
        **settings: Any,
    ) -> None:
        super().__init__(handlers, **settings)
        self.max_body_size = max_body_size

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        # Before Tornado reads the body (it would answer a bare 400 for a length it cannot
        # parse, and our prepare() would meet int()'s digit limit): an answer in our shape.
        refusal = content_length_refusal(request.headers, self.max_body_size)
        if refusal is not None:
            return self.get_handler_delegate(request, RefusedHandler, {"error": refusal})
        return super().find_handler(request, **kwargs)
