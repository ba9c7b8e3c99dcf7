"""storage/ stands alone: it imports nothing from daemon/ or handlers/, and its modules stay
small, each opening with a one-line docstring."""

from __future__ import annotations

import ast
from pathlib import Path

STORAGE = Path(__file__).resolve().parents[2] / "storage"
MODULES = sorted(STORAGE.rglob("*.py"))


def test_storage_imports_nothing_from_the_service_above_it():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"daemon", "handlers"}, (path, name)


def test_storage_modules_are_small_and_say_what_they_are_for():
    assert len(MODULES) > 10
    for path in MODULES:
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, path
        docstring = ast.get_docstring(ast.parse(text), clean=False)
        assert docstring, path
        first, _, rest = docstring.partition("\n")
        assert first.strip() and (not rest or rest.startswith("\n")), path  # one line, then more
