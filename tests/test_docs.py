"""The documentation in the repository stays true: links resolve, nothing points outside the
repository, and docs/protocol.md names every route the application serves and every error
code the handlers can answer."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado import web

from handlers import all_routes
from tests.fixtures import call, make_service  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
PROTOCOL = ROOT / "docs" / "protocol.md"
# Where the service's own error codes come from: not the emulator's or the bench's, nor the operator
# commands' (daemon/client.py and daemon/op*.py run on the operator's side, not in the service).
CLIENT_SIDE = ("client.py", "opcli.py", "opcommands.py", "optables.py", "optail.py")
CODE_SOURCES = [
    path
    for folder in ("handlers", "daemon")
    for path in sorted((ROOT / folder).rglob("*.py"))
    if not {"emulator", "bench"} & set(path.relative_to(ROOT).parts)
    and path.name not in CLIENT_SIDE
]
HTTP_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")
# Text that sends a reader outside the repository (the project's shared folder, its contract).
OUTSIDE = re.compile(r"shared/|shared folder|CONTRACT\.md|/work/|file://", re.IGNORECASE)
CODE = re.compile(r"[a-z]+(?:_[a-z0-9]+)*")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+).+?\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)


# -- markdown -----------------------------------------------------------------------------------
def prose(text: str) -> str:
    """The text outside fenced blocks and inline code (where brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> Iterator[str]:
    text = prose(path.read_text(encoding="utf-8"))
    yield from LINK.findall(text)
    yield from REFERENCE.findall(text)


def link_problem(source: Path, target: str) -> str | None:
    """Why a link from `source` does not lead into the repository (None when it does)."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
        scheme = target.split(":", 1)[0].lower()
        return None if scheme in ("http", "https", "mailto") else f"{target}: not a web link"
    where, _, anchor = target.partition("#")
    if where.startswith("/"):
        file = (ROOT / where.lstrip("/")).resolve()
    else:
        file = (source.parent / where).resolve() if where else source
    if not file.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if not file.exists():
        return f"{target}: no such file"
    if anchor and (file.suffix != ".md" or anchor not in anchors(file)):
        return f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}"
    return None


def test_the_docs_exist():
    names = {path.relative_to(ROOT).as_posix() for path in DOCS}
    assert {"README.md", "docs/protocol.md", "docs/migrating.md", "docs/emulator.md"} <= names
    assert "docs/operations.md" in names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve_inside_the_repository(doc):
    problems = [p for target in links(doc) if (p := link_problem(doc, target)) is not None]
    assert problems == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nothing_points_outside_the_repository(doc):
    lines = doc.read_text(encoding="utf-8").splitlines()
    found = [f"{n}: {line.strip()}" for n, line in enumerate(lines, 1) if OUTSIDE.search(line)]
    assert found == []


def test_the_link_checker_bites(tmp_path):
    page = ROOT / "docs" / "protocol.md"
    assert link_problem(page, "emulator.md#the-clock") is None
    assert link_problem(page, "#the-webhook") is None
    assert link_problem(page, "emulator.md#no-such-heading") is not None
    assert link_problem(page, "nowhere.md") is not None
    assert link_problem(page, "../../outside.md") is not None
    assert link_problem(page, "file:///etc/passwd") is not None
    assert slug("`POST /v1/rooms/{calendar_id}/tokens/{token}`") == (
        "post-v1roomscalendar_idtokenstoken"
    )
    assert list(links_of(tmp_path, "see [a](x.md) and `[b](not-a-link)`")) == ["x.md"]


def links_of(directory: Path, text: str) -> Iterator[str]:
    page = directory / "page.md"
    page.write_text(text)
    return links(page)


# -- routes -------------------------------------------------------------------------------------
def served_methods(handler: type[web.RequestHandler]) -> list[str]:
    """The HTTP methods a handler implements (not Tornado's default 405s)."""
    return [
        method
        for method in HTTP_METHODS
        if getattr(handler, method.lower()) is not getattr(web.RequestHandler, method.lower())
    ]


def readable_path(pattern: str, handler: type[web.RequestHandler]) -> str:
    """A route's regex as a path: each group named after the handler's argument for it
    (`/v1/rooms/([^/]*)` with `get(self, calendar_id)` is `/v1/rooms/{calendar_id}`)."""
    method = getattr(handler, served_methods(handler)[0].lower())
    names = [p for p in inspect.signature(method).parameters if p != "self"]
    names = [n for n in names if n not in ("args", "kwargs")]
    path = re.sub(
        r"\((?:[^()\\]|\\.)*\)",
        lambda _group: "{" + (names.pop(0) if names else "param") + "}",
        pattern,
    )
    path = re.sub(r"\\(.)", r"\1", path)  # re.escape's escapes (the webhook path)
    assert not re.search(r"[\^$*+?\[\]()|]", path), f"route {pattern}: not a plain path"
    return path


def served_routes() -> list[str]:
    """`METHOD /path` for every route of the application (the default webhook path)."""
    return [
        f"{method} {readable_path(pattern, handler)}"
        for pattern, handler in all_routes()
        for method in served_methods(handler)
    ]


def test_route_names_are_readable():
    routes = served_routes()
    assert "PUT /v1/rooms/{calendar_id}" in routes
    assert "DELETE /v1/rooms/{calendar_id}/tokens/{token}" in routes
    assert "POST /notifications" in routes and "GET /ws" in routes
    assert "GET /add_room" in routes and "POST /add_room" in routes


def test_protocol_names_every_route():
    text = PROTOCOL.read_text(encoding="utf-8")
    missing = [route for route in served_routes() if route not in text]
    assert missing == []


# -- error codes --------------------------------------------------------------------------------
def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_logging(node: ast.Call) -> bool:
    func = node.func
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id in ("log", "logger", "logging", "access_log")
    )


def _first_text(node: ast.Call) -> ast.expr | None:
    """The first positional argument that is a string (a constant or an f-string)."""
    for arg in node.args:
        if isinstance(arg, ast.JoinedStr) or (
            isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        ):
            return arg
    return None


def _template(value: ast.JoinedStr) -> tuple[str, str, str] | None:
    """(prefix, parameter, suffix) of an f-string like f"invalid_{name}"."""
    pieces = value.values
    names = [p for p in pieces if isinstance(p, ast.FormattedValue)]
    if len(names) != 1 or not isinstance(names[0].value, ast.Name):
        return None
    index = pieces.index(names[0])
    text = [p.value if isinstance(p, ast.Constant) else "" for p in pieces]
    return "".join(text[:index]), names[0].value.id, "".join(text[index + 1 :])


def error_codes() -> set[str]:
    """Every error code the service's source can answer: the code argument of an error
    (ApiError, BadMessage, an `_error` helper), a `code=` keyword, a `"code": ...` entry, and
    codes made from a parameter (f"invalid_{name}") expanded over the names the callers pass,
    through helpers that hand their own parameter on (param → str_arg)."""
    codes: set[str] = set()
    params: dict[str, list[str]] = {}  # function name → its parameters, self left out
    templates: dict[str, set[tuple[str, str, str]]] = {}  # function → (param, prefix, suffix)
    calls: list[tuple[str, list[str], ast.Call]] = []  # (caller, its params, call)
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in CODE_SOURCES]
    for tree in trees:
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            names = [a.arg for a in function.args.args if a.arg not in ("self", "cls")]
            params.setdefault(function.name, names)
            for node in ast.walk(function):
                if isinstance(node, ast.Call):
                    calls.append((function.name, names, node))
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "code"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        codes.add(value.value)
            if not isinstance(node, ast.Call) or _is_logging(node):
                continue
            for keyword in node.keywords:
                if (
                    keyword.arg == "code"
                    and isinstance(keyword.value, ast.Constant)
                    and isinstance(keyword.value.value, str)
                ):
                    codes.add(keyword.value.value)
            if not _callee(node).lower().endswith(("error", "message")):
                continue
            text = _first_text(node)
            if isinstance(text, ast.Constant) and CODE.fullmatch(text.value):
                codes.add(text.value)
    # f"invalid_{name}" in a function whose parameter is `name`: a template of that function.
    for caller, names, node in calls:
        text = _first_text(node) if _callee(node).lower().endswith("error") else None
        if isinstance(text, ast.JoinedStr):
            found = _template(text)
            if found is not None and found[1] in names:
                prefix, param, suffix = found
                templates.setdefault(caller, set()).add((param, prefix, suffix))
    changed = True
    while changed:  # helpers that pass their own parameter on take the template too
        changed = False
        for caller, names, node in calls:
            for param, prefix, suffix in list(templates.get(_callee(node), ())):
                position = params.get(_callee(node), []).index(param)
                if position >= len(node.args):
                    continue
                arg = node.args[position]
                if isinstance(arg, ast.Name) and arg.id in names:
                    entry = (arg.id, prefix, suffix)
                    if entry not in templates.setdefault(caller, set()):
                        templates[caller].add(entry)
                        changed = True
    for _caller, _names, node in calls:
        for param, prefix, suffix in templates.get(_callee(node), ()):
            position = params[_callee(node)].index(param)
            if position < len(node.args):
                arg = node.args[position]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    codes.add(prefix + arg.value + suffix)
    return codes


def test_the_code_scan_finds_every_kind():
    codes = error_codes()
    # One of each way a code is written: ApiError, send_error(code=), BadMessage, a helper,
    # a "code" entry, and f"invalid_{name}" through int_arg, str_arg, param and flag_param.
    expected = {
        "unauthorized",
        "body_too_large",
        "unknown_type",
        "forbidden_calendar",
        "replay_failed",
        "invalid_after",
        "invalid_limit",
        "invalid_calendar_id",
        "invalid_query",
    }
    assert expected <= codes
    assert all(CODE.fullmatch(code) for code in codes)


def test_protocol_names_every_error_code():
    text = PROTOCOL.read_text(encoding="utf-8")
    missing = sorted(code for code in error_codes() if f"`{code}`" not in text)
    assert missing == []


@pytest.mark.gen_test(timeout=10)
async def test_protocol_names_the_codes_tornado_makes(make_service):
    """Codes no source line spells: Tornado's own errors in our shape (the status's name)."""
    service = await make_service()
    made = []
    for method, path in (("GET", "/notifications"), ("GET", "/ws?access_token=%FF")):
        status, body = await call(service, method, path, key=None)
        assert 400 <= status < 500
        made.append(body["error"]["code"])
    assert made == ["method_not_allowed", "bad_request"]
    text = PROTOCOL.read_text(encoding="utf-8")
    assert [code for code in made if f"`{code}`" not in text] == []
