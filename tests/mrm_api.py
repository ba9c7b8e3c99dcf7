"""A stand-in for mrm_api's side of the cut-over: its GraphQL endpoint (`/mrm`, no auth) with
the shape of its schema, and its celery tasks that call the legacy routes with `requests`.

The schema keeps only what mrm-push uses, with mrm_api's types as graphene makes them:
`allRooms { rooms { calendarId firebaseToken } }` and the mutation
`mrmNotification(calendarId: String)` returning `MrmNotification { message }`. Every query is
validated against it, as mrm_api's server would; a query that does not fit is answered with
GraphQL errors and recorded, so a test can see exactly what mrm-push sent.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import requests
from graphql import build_schema, graphql_sync
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


@dataclass
class GraphQLCall:
    query: str
    variables: dict[str, Any] | None
    headers: dict[str, str]
    errors: list[str]


@dataclass
class MrmApi:
    """mrm_api's GraphQL endpoint: its rooms, and every call made to it."""

    rooms: list[dict[str, Any]] = field(default_factory=list)
    calls: list[GraphQLCall] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)  # calendarIds resynced
    url: str = ""
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    def execute(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        query = body.get("query")
        variables = body.get("variables")
        root = {
            "allRooms": lambda info, **args: {"rooms": self.rooms},
            "mrmNotification": lambda info, calendarId=None: self._notify(calendarId),
        }
        result = graphql_sync(SCHEMA, str(query), root_value=root, variable_values=variables)
        errors = [error.message for error in result.errors or ()]
        self.calls.append(GraphQLCall(str(query), variables, headers, errors))
        answer: dict[str, Any] = {"data": result.data}
        if errors:
            answer["errors"] = [{"message": message} for message in errors]
        self._wake()
        return answer

    def _notify(self, calendar_id: str | None) -> dict[str, str]:
        self.notified.append(str(calendar_id))
        return {"message": "success"}

    async def wait_for_calls(self, count: int, within: float = 10) -> list[GraphQLCall]:
        """Until `count` calls have come (the future is set by the handler, no polling)."""
        if len(self.calls) < count:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((count, future))
            await asyncio.wait_for(future, within)
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

    def post(self) -> None:
        body = json.loads(self.request.body or b"{}")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.api.execute(body, dict(self.request.headers))))


def start_mrm_api() -> tuple[MrmApi, HTTPServer]:
    """mrm_api's /mrm on a free port of 127.0.0.1 (call on the running loop)."""
    api = MrmApi()
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([(r"/mrm", _GraphQLHandler, {"api": api})]))
    server.add_sockets(sockets)
    api.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/mrm"
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
