"""The emulator shares no code with the gateways it stands in for, nor with their libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import daemon.emulator

EMULATOR = Path(daemon.emulator.__file__).parent
# What the service uses to talk to Google and FCM: a stand-in built on them would agree with
# the service's mistakes instead of showing them.
BANNED = ("daemon.google_calendar", "daemon.fcm", "googleapiclient", "firebase_admin", "pyfcm")


def banned(name: str) -> bool:
    return name.startswith(BANNED)  # "daemon.fcm": every daemon/fcm*.py module


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_emulator_module_imports_a_gateway_or_its_library():
    modules = sorted(EMULATOR.rglob("*.py"))
    assert len(modules) > 10
    found = {
        str(path.relative_to(EMULATOR)): [n for n in imported_names(path) if banned(n)]
        for path in modules
    }
    assert {path: names for path, names in found.items() if names} == {}


def test_importing_the_whole_emulator_loads_no_gateway():
    modules = [
        "daemon.emulator." + ".".join(path.relative_to(EMULATOR).with_suffix("").parts)
        for path in sorted(EMULATOR.rglob("*.py"))
        if path.name != "__init__.py"
    ]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [name for name in loaded if banned(name)] == []
