"""Storage: the `Store` protocol and its two backends, chosen by URL."""

from __future__ import annotations

from storage.base import StoreConfigError
from storage.protocols import Store


def sqlite_path(url: str) -> str:
    """`sqlite:///var/db` → `var/db` (relative); `sqlite:////srv/db` → `/srv/db`."""
    path = url[len("sqlite:///") :]
    if not url.startswith("sqlite:///") or not path.strip("/"):
        raise StoreConfigError(f"storage.url: no file path in {url!r}")
    return path


def make_store(url: str, mongo_driver: str = "motor") -> Store:
    """The store for a URL: `sqlite:///...` or `mongodb://...` / `mongodb+srv://...`."""
    if url.startswith("sqlite:"):
        from storage.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from storage.mongo import MongoStore

        return MongoStore(url, driver=mongo_driver)
    raise StoreConfigError("storage.url: must start with sqlite:/// or mongodb://")
