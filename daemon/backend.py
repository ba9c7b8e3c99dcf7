"""The GraphQL call to mrm_api, shared by refresh and notify: request, answer, errors."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from daemon.backoff import retry_after_seconds
from daemon.clock import Clock
from daemon.config import Backend


class BackendError(Exception):
    """The backend could not be asked (unreachable, HTTP error, bad answer).

    `retry_after` is its Retry-After in seconds from now, when an HTTP error carried one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendNotConfigured(BackendError):
    """backend.url is not set: there is nobody to ask."""


def graphql_request(backend: Backend, token: str | None, payload: dict[str, Any]) -> HTTPRequest:
    """A POST of `payload` to backend.url with the Bearer token, bounded by backend.timeout."""
    assert backend.url is not None  # callers check: an unset url is their own error to report
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return HTTPRequest(
        backend.url,
        method="POST",
        headers=headers,
        body=json.dumps(payload),
        request_timeout=backend.timeout,
        connect_timeout=backend.timeout,
    )


async def post_graphql(
    backend: Backend, token: str | None, payload: dict[str, Any], clock: Clock
) -> dict[str, Any]:
    """Post `payload`; the GraphQL response (an object with `data` or `errors`, or both).

    Raises BackendError saying why there is none; GraphQL errors are the caller's to read.
    """
    if not backend.url:
        raise BackendNotConfigured("backend.url is not set")
    try:
        response = await AsyncHTTPClient().fetch(graphql_request(backend, token, payload))
    except HTTPClientError as error:
        if error.code == 599:  # Tornado's code for "no HTTP answer" (timeout, reset)
            raise BackendError(f"the backend did not answer: {error.message}") from None
        wait = None
        if error.response is not None:
            wait = retry_after_seconds(error.response.headers.get("Retry-After"), clock.now())
        raise BackendError(f"the backend answered HTTP {error.code}", wait) from None
    except OSError as error:
        raise BackendError(f"the backend cannot be reached: {error}") from None
    try:
        answer = json.loads(response.body)
    except ValueError:
        raise BackendError("the backend's answer is not JSON") from None
    if not isinstance(answer, dict) or not ("data" in answer or "errors" in answer):
        raise BackendError("the backend's answer is not a GraphQL response")
    return answer


def graphql_errors(answer: dict[str, Any]) -> list[str]:
    """The messages of a GraphQL `errors` entry, whatever shape the backend gave it."""
    errors = answer.get("errors")
    if not errors:
        return []
    if not isinstance(errors, list):
        return [str(errors)]
    return [
        str((problem.get("message") if isinstance(problem, dict) else None) or problem)
        for problem in errors
    ]
