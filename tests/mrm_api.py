"""The one stand-in for mrm_api: its GraphQL endpoint (no auth) with the shape of its schema, and
its celery tasks that call the legacy routes with `requests`.

The schema keeps only what mrm-push uses, with mrm_api's types as graphene makes them:
`allRooms { rooms { calendarId firebaseToken } }` and the mutation
`mrmNotification(calendarId: String)` returning `MrmNotification { message }`. Every query is
validated against it, as mrm_api's server would, and recorded with its errors, so a test can
see exactly what mrm-push sent. By default a query is answered by executing it (allRooms gives
`rooms`, mrmNotification adds to `notified`); a test can script the next answers (`answer`:
failures, Retry-After), answer everything alike (`answer_always`: other query shapes, HTTP
errors, bodies that are not JSON), or hold every answer while `gate` is set.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from graphql import GraphQLError, build_schema, graphql_sync, parse, validate
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

SCHEMA = build_schema(
    """
    type Query { allRooms(page: Int, perPage: Int): PaginatedRooms }
    type PaginatedRooms { rooms: [Room] }
    type Room { calendarId: String, firebaseToken: String, name: String }
    type Mutation { mrmNotification(calendarId: String): MrmNotification }
    type MrmNotification { message: String }
    """
)
PATH = "/mrm"  # where mrm_api serves it

Answer = tuple[int, Any, dict[str, str]]  # status, body (JSON value, or bytes as they are), headers


@dataclass
class GraphQLCall:
    """One request: its JSON body, query, variables and headers, and the schema's errors."""

    body: Any
    query: str
    variables: dict[str, Any] | None
    headers: dict[str, str]
    errors: list[str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")


def query_errors(query: str) -> list[str]:
    """What mrm_api's server would refuse in the query before running it."""
    try:
        document = parse(query)
    except GraphQLError as error:
        return [error.message]
    return [error.message for error in validate(SCHEMA, document)]


@dataclass
class MrmApi:
    """mrm_api's GraphQL endpoint: its rooms, and every call made to it."""

    rooms: list[dict[str, Any]] = field(default_factory=list)
    calls: list[GraphQLCall] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)  # calendarIds resynced
    url: str = ""
    gate: asyncio.Event | None = None  # while set, answers wait for it
    _script: deque[Answer] = field(default_factory=deque)
    _always: Answer | None = None
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    # -- what it answers ---------------------------------------------------------------------
    def answer(self, status: int, body: Any, count: int = 1, **headers: str) -> None:
        """The next `count` requests get this answer (header names: `_` for `-`)."""
        self._script.extend([(status, body, headers)] * count)

    def answer_always(self, body: Any, status: int = 200) -> None:
        """Every request from now on gets this answer, whatever it asks."""
        self._always = (status, body, {})

    def serve_rooms(
        self, *entries: tuple[str | None, str | None], errors: Sequence[str] = ()
    ) -> None:
        """allRooms lists these (calendarId, firebaseToken) rows, one per tablet; with `errors`,
        every answer is those rows with a GraphQL `errors` list beside them."""
        self.rooms = [{"calendarId": c, "firebaseToken": t} for c, t in entries]
        self._always = None
        if errors:
            self.answer_always(
                {
                    "data": {"allRooms": {"rooms": self.rooms}},
                    "errors": [{"message": m, "path": ["allRooms"]} for m in errors],
                }
            )

    def execute(self, body: Any) -> dict[str, Any]:
        """The schema's answer to a request body, as mrm_api's server gives it."""
        body = body if isinstance(body, dict) else {}
        root = {
            "allRooms": lambda info, **args: {"rooms": self.rooms},
            "mrmNotification": lambda info, calendarId=None: self._notify(calendarId),
        }
        result = graphql_sync(
            SCHEMA, str(body.get("query")), root_value=root, variable_values=body.get("variables")
        )
        answer: dict[str, Any] = {"data": result.data}
        if result.errors:
            answer["errors"] = [{"message": error.message} for error in result.errors]
        return answer

    def _notify(self, calendar_id: str | None) -> dict[str, str]:
        self.notified.append(str(calendar_id))
        return {"message": "success"}

    async def respond(self, body: Any, headers: dict[str, str]) -> Answer:
        """Record the request (before any hold), then answer it."""
        request = body if isinstance(body, dict) else {}
        query = str(request.get("query"))
        made = GraphQLCall(body, query, request.get("variables"), headers, query_errors(query))
        self.calls.append(made)
        self._wake()
        if self.gate is not None:
            await self.gate.wait()
        if self._script:
            return self._script.popleft()
        if self._always is not None:
            return self._always
        answer = self.execute(body)
        made.errors = [error["message"] for error in answer.get("errors", [])]
        return 200, answer, {}

    def release(self) -> None:
        """Let held answers go (a test that failed half-way leaves none held)."""
        if self.gate is not None:
            self.gate.set()

    # -- waiting for calls -------------------------------------------------------------------
    async def wait_for(self, count: int, timeout: float = 10.0) -> list[GraphQLCall]:  # noqa: ASYNC109
        """Until `count` calls have come (the future is set by the handler, no polling)."""
        if len(self.calls) < count:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((count, future))
            await asyncio.wait_for(future, timeout)
        return self.calls

    def _wake(self) -> None:
        for count, future in list(self._waiters):
            if len(self.calls) >= count and not future.done():
                future.set_result(None)
                self._waiters.remove((count, future))


class _GraphQLHandler(RequestHandler):
    def initialize(self, api: MrmApi) -> None:
        self.api = api

    def check_xsrf_cookie(self) -> None:
        pass

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            body = None
        status, answer, headers = await self.api.respond(body, dict(self.request.headers))
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name.replace("_", "-"), value)
        self.set_header("Content-Type", "application/json")
        self.finish(answer if isinstance(answer, bytes) else json.dumps(answer))


def start_mrm_api() -> tuple[MrmApi, HTTPServer]:
    """mrm_api's endpoint on a free port of 127.0.0.1 (call on the running loop)."""
    api = MrmApi()
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([(PATH, _GraphQLHandler, {"api": api})]))
    server.add_sockets(sockets)
    api.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}{PATH}"
    return api, server


# -- mrm_api's celery tasks (api/.../tasks: the calls as mrm_api makes them, unchanged) ------


def add_room(mrm_push_url: str, calendar_id: str, firebase_token: str | None) -> None:
    requests.get(
        url=mrm_push_url + "/add_room",
        params={"calendar_id": calendar_id, "firebase_token": firebase_token},
    )


def remove_room(mrm_push_url: str, calendar_id: str) -> None:
    requests.delete(url=mrm_push_url + "/delete_room", params={"calendar_id": calendar_id})


def update_room_token(mrm_push_url: str, calendar_id: str, firebase_token: str) -> None:
    requests.get(
        url=mrm_push_url + "/token",
        params={"calendar_id": calendar_id, "firebase_token": firebase_token},
    )
