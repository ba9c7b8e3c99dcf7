"""The `store` fixture: every contract test runs once per backend (SQLite, mongomock, MongoDB)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.protocols import Store

MONGO_ENV = "MRM_PUSH_TEST_MONGODB_URI"
BACKENDS = ["sqlite", "mongomock", "mongo-motor", "mongo-pymongo"]


def _mongo_store_class() -> Any:
    try:
        from storage.mongo import MongoStore
    except ImportError as exc:
        pytest.skip(f"storage.mongo cannot be imported yet: {exc}")
    return MongoStore


class Backend:
    """One database of one backend; `make()` gives a new, unopened handle on it (a "restart")."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        # mongomock answers every call without yielding to the loop, so races cannot happen there.
        self.concurrent = name != "mongomock"
        self._cleanup: Callable[[], None] = lambda: None
        if name == "sqlite":
            from storage.sqlite import SqliteStore

            path = str(tmp_path / "store" / "mrm-push.sqlite3")
            self.make: Callable[[], Store] = lambda: SqliteStore(path)
        elif name == "mongomock":
            from mongomock_motor import AsyncMongoMockClient

            mongo_store = _mongo_store_class()
            client = AsyncMongoMockClient()
            url = "mongodb://127.0.0.1:27017/mrm_push_test"
            self.make = lambda: mongo_store(url, client=client, database="mrm_push_test")
        else:
            url = os.environ.get(MONGO_ENV)
            if not url:
                pytest.skip(f"set {MONGO_ENV}")
            mongo_store = _mongo_store_class()
            driver = name.removeprefix("mongo-")
            database = f"mrm_push_test_{uuid.uuid4().hex[:12]}"
            self.make = lambda: mongo_store(url, driver=driver, database=database)
            self._cleanup = lambda: _drop_database(url, database)

    def cleanup(self) -> None:
        self._cleanup()


def _drop_database(url: str, database: str) -> None:
    import pymongo

    client: Any = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(database)
    finally:
        client.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made = Backend(request.param, tmp_path)
    yield made
    made.cleanup()


@pytest.fixture
def open_store(io_loop: Any, backend: Backend) -> Iterator[Callable[[], Store]]:
    """Open another handle on the backend's database (closed after the test)."""
    opened: list[Store] = []

    def open_one() -> Store:
        store = backend.make()
        io_loop.run_sync(store.open)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        io_loop.run_sync(store.close)


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    return open_store()
