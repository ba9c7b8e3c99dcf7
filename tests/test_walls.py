"""The walls of the house, read from the source with ast: imports, builders, module sizes.

- storage/ imports nothing from daemon/ or handlers/ (it knows nothing of HTTP or the service);
- handlers/ never import a gateway (daemon.google_calendar, daemon.fcm*) nor a client library:
  they call the objects daemon/app.py hands them;
- the emulator (daemon/emulator/) shares no code with the gateways it stands in for, nor with
  their libraries: a stand-in built on them would agree with the service's mistakes;
- daemon/app.py is the one place that builds the shared objects (the CLI may build a Service;
  the factories make_store and make_sender build what they choose between);
- every module of daemon/, handlers/ and storage/ has at most 400 lines and opens with a
  one-line summary (at most 100 characters), then a blank line before any detail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "handlers", "storage")
MAX_LINES = 400
MAX_SUMMARY = 100

# What talks to Google and FCM: the gateways and the libraries under them.
GATEWAYS = ("daemon.google_calendar", "daemon.fcm")  # "daemon.fcm": every daemon/fcm*.py
CLIENT_LIBRARIES = (
    "googleapiclient",
    "google.auth",
    "google.oauth2",
    "google_auth_httplib2",
    "httplib2",
    "firebase_admin",
    "pyfcm",
    "requests",
    "motor",
    "pymongo",
    "aiosqlite",
)
EMULATED = (*GATEWAYS, "googleapiclient", "firebase_admin", "pyfcm")

# The shared objects, and where besides daemon/app.py each may be built.
SHARED = {
    "GoogleCalendar": (),
    "make_sender": (),
    "FirebaseAdminSender": ("daemon/fcm.py",),  # make_sender's choice
    "PyFcmSender": ("daemon/fcm.py",),
    "make_store": (),
    "SqliteStore": ("storage/__init__.py",),  # make_store's choice
    "MongoStore": ("storage/__init__.py",),
    "Metrics": (),
    "FanoutHub": (),
    "DeliveryWorker": (),
    "Syncer": (),
    "ChannelManager": (),
    "Refresher": (),
    "Rooms": (),
    "InstanceLease": (),
    "StoreGauges": (),
    # The CLI runs it; the bench's WebSocket server runs it in its own child process beside a
    # publishing driver (mrm-push bench --only ws).
    "Service": ("daemon/cli.py", "daemon/bench/ws_server.py"),
}
BUILDER = "daemon/app.py"


def modules(*packages: str) -> list[Path]:
    found = sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))
    assert len(found) > 10, packages
    return found


def name_of(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    """Every module an import statement of `path` names (relative ones resolved), and for
    `from m import x` also "m.x" (x may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module:
                yield module
            yield from (".".join(filter(None, (module, alias.name))) for alias in node.names)


def matches(name: str, banned: tuple[str, ...]) -> bool:
    return any(
        name == b or name.startswith(b + ".") or (b == "daemon.fcm" and name.startswith(b + "_"))
        for b in banned
    )


def violations(packages: tuple[str, ...], banned: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        name_of(path): sorted({n for n in imported(path) if matches(n, banned)})
        for path in modules(*packages)
    }
    return {path: names for path, names in found.items() if names}


# -- imports -----------------------------------------------------------------------------------


def test_storage_imports_nothing_from_the_service_above_it():
    assert violations(("storage",), ("daemon", "handlers")) == {}


def test_handlers_import_no_gateway_and_no_client_library():
    assert violations(("handlers",), (*GATEWAYS, *CLIENT_LIBRARIES)) == {}


def test_no_emulator_module_imports_a_gateway_or_its_library():
    assert violations(("daemon/emulator",), EMULATED) == {}


def test_importing_the_whole_emulator_loads_no_gateway():
    # Not only its own imports: nothing it imports may bring a gateway in either.
    names = [module_name(path) for path in modules("daemon/emulator")]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert [name for name in loaded if matches(name, EMULATED)] == []


# -- who builds the shared objects ---------------------------------------------------------


def constructions(path: Path) -> Iterator[tuple[str, int]]:
    """(shared name, line) for each call of a shared object's constructor or factory, under
    any name it was imported as; calls under `if TYPE_CHECKING:` never run and do not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {name: name for name in SHARED}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in SHARED and alias.asname:
                    aliases[alias.asname] = alias.name
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            skipped |= {id(inner) for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in skipped:
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if called in aliases:
            yield aliases[called], node.lineno


def test_daemon_app_is_the_one_place_that_builds_the_shared_objects():
    found = [
        f"{name_of(path)}:{line} builds {name}"
        for path in modules(*PACKAGES)
        if name_of(path) != BUILDER
        for name, line in constructions(path)
        if name_of(path) not in SHARED[name]
    ]
    assert found == []


def test_daemon_app_does_build_them():
    # The check above must be looking at real calls: the builder's are all found.
    built = {name for name, _ in constructions(ROOT / BUILDER)}
    assert built >= {name for name, elsewhere in SHARED.items() if not elsewhere}


# -- module size and summary ---------------------------------------------------------------


@pytest.mark.parametrize("path", modules(*PACKAGES), ids=name_of)
def test_modules_are_small_and_say_what_they_are_for_in_one_line(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES
    docstring = ast.get_docstring(ast.parse(text), clean=False)
    assert docstring, "no module docstring"
    first, _, rest = docstring.partition("\n")
    assert first.strip() == first and first, "the summary is its first line"
    assert len(first) <= MAX_SUMMARY
    assert not rest or rest.startswith("\n"), "the summary wraps onto a second line"
