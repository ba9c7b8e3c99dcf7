"""The bench's table: one row per measurement, with the reference and the ratio where one exists."""

from __future__ import annotations

from typing import Any

Row = dict[str, str]
COLUMNS = (
    ("part", "part"),
    ("measure", "measure"),
    ("mrm_push", "mrm-push"),
    ("reference", "reference"),
    ("ratio", "ratio"),
    ("bound_by", "bounded by"),
)


def _ms(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("p50_ms") is None:
        return "-"
    return f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f} / {figures['max_ms']:.1f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def row(part: str, measure: str, ours: str, ref: str = "", ratio: str = "", bound: str = "") -> Row:
    return {
        "part": part,
        "measure": measure,
        "mrm_push": ours,
        "reference": ref,
        "ratio": ratio,
        "bound_by": bound,
    }


def lost_row(part: str, figures: dict[str, Any]) -> Row:
    lost, dup = figures.get("lost_total", 0), figures.get("duplicated_total", 0)
    detail = {k: v for k, v in (figures.get("lost") or {}).items() if v}
    return row(part, "lost / duplicated (must be 0 / 0)", f"{lost} / {dup}", str(detail or ""))


def ingest_rows(part: dict[str, Any]) -> list[Row]:
    runs = part["runs"]
    ours, bare, naive = runs["mrm-push"], runs["bare"], runs["naive"]
    ratios = part["ratios"]
    rate = ours["rate"]["offered_per_s"]
    return [
        row(
            "ingest",
            "ceiling, answers/s (closed loop)",
            _num(ours["closed"]["answers_per_s"]),
            f"naive {_num(naive['closed']['answers_per_s'])}, bare "
            f"{_num(bare['closed']['answers_per_s'])}",
            _ratio(ratios["closed_answers_per_s_vs_naive"]) + " of naive",
            ours["closed"]["bound_by"],
        ),
        row(
            "ingest",
            "ceiling, p50 / p99 / max ms",
            _ms(ours["closed"]),
            f"naive {_ms(naive['closed'])}",
        ),
        row(
            "ingest",
            f"at {rate:g}/s offered, p50 / p99 / max ms",
            _ms(ours["rate"]),
            f"naive {_ms(naive['rate'])}, bare {_ms(bare['rate'])}",
            _ratio(ratios["rate_p99_vs_naive"]) + " p99",
            ours["rate"]["bound_by"],
        ),
        lost_row("ingest", part),
    ]


def e2e_rows(part: dict[str, Any]) -> list[Row]:
    where = f"{part['offered_per_s']:g}/s over {part['calendars']} calendars"
    return [
        row(
            "e2e",
            f"webhook to FCM, {where}, p50 / p99 / max ms",
            _ms(part["fcm"]),
            bound=part["bound_by"],
        ),
        row("e2e", "webhook to WebSocket, p50 / p99 / max ms", _ms(part["ws"])),
        row("e2e", "webhook answers meanwhile, p50 / p99 / max ms", _ms(part["webhooks"])),
        lost_row("e2e", part),
    ]


def ws_rows(part: dict[str, Any]) -> list[Row]:
    ours, ref, ratios = part["mrm-push"], part.get("websockets"), part["ratios"]
    rows = [
        row(
            "ws",
            f"memory per idle client, KB ({part['clients']} clients)",
            _num(ours["memory"]["kb_per_client"], 1),
            _num(ref["memory"]["kb_per_client"], 1) if ref else "skipped",
            _ratio(ratios.get("kb_per_client")),
        ),
        row(
            "ws",
            "latency to all, p50 / p99 / max ms",
            _ms(ours["latency"]),
            _ms(ref["latency"]) if ref else "skipped",
            _ratio(ratios.get("latency_p99")) + " p99" if ref else "",
        ),
    ]
    for key in (k for k in ours if k.startswith("burst")):
        rows.append(
            row(
                "ws",
                f"frames/s, {ours[key]['burst']} notification(s) per tick",
                _num(ours[key]["frames_per_s"]),
                _num(ref[key]["frames_per_s"]) if ref else "skipped",
                _ratio(ratios.get(f"frames_per_s_{key}")),
                ours[key]["bound_by"],
            )
        )
    rows.append(lost_row("ws", part))
    return rows


def fcm_rows(part: dict[str, Any]) -> list[Row]:
    return [
        row(
            "fcm",
            f"sends/s ({part['sends']} to {part['rooms']} x {part['tokens_per_room']} tokens)",
            _num(part["sends_per_s"]),
            bound=part["bound_by"],
        ),
        lost_row("fcm", part),
    ]


BUILDERS = {"ingest": ingest_rows, "e2e": e2e_rows, "ws": ws_rows, "fcm": fcm_rows}


def table(parts: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for name, part in parts.items():
        status = part.get("status")
        if status == "ok":
            rows.extend(BUILDERS[name](part))
        else:
            reason = part.get("reason") or part.get("error") or ""
            rows.append(row(name, status or "?", "-", reason.splitlines()[0] if reason else ""))
    return rows


def render(rows: list[Row]) -> str:
    widths = {key: max([len(title)] + [len(r[key]) for r in rows]) for key, title in COLUMNS}
    lines = ["  ".join(title.ljust(widths[key]) for key, title in COLUMNS).rstrip()]
    lines.append("  ".join("-" * widths[key] for key, _ in COLUMNS))
    for r in rows:
        lines.append("  ".join(r[key].ljust(widths[key]) for key, _ in COLUMNS).rstrip())
    return "\n".join(lines)
