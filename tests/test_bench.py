"""`mrm-push bench`: the whole command with tiny numbers (its JSON, nothing lost, the exit
status), and the accounting that decides what counts as lost. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon.bench.accounting import account, change_latencies
from daemon.bench.run import api_key, exit_code, problems
from daemon.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "mrm-push"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "daemon.cli"]
# Seconds, not minutes: a handful of webhooks, calendars, tablets and sockets per part.
TINY = [
    *("--requests", "100", "--rate", "200", "--rate-seconds", "0.25"),
    *("--channels", "4", "--connections", "4", "--tablets", "2"),
    *("--calendars", "4", "--e2e-rate", "100", "--e2e-seconds", "0.25"),
    *("--fcm-rooms", "2", "--fcm-tokens", "3", "--fcm-rounds", "2"),
    *("--ws-clients", "10", "--ws-latency-count", "3", "--ws-latency-rate", "50"),
    *("--ws-flood-seconds", "0.5", "--ws-bursts", "1"),
    *("--max-seconds", "30", "--log-level", "warning"),
]
LATENCY = {"count", "p50_ms", "p99_ms", "max_ms"}


def test_the_bench_runs_every_part_and_loses_nothing(tmp_path):
    # Runs ~15 s: four parts, each with its own service, reference or WebSocket servers.
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [*COMMAND, "bench", "--json", str(out), *TINY],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert {"machine", "pinning", "options", "parts", "table", "lost_total", "exit_code"} <= set(
        report
    )
    assert report["exit_code"] == 0
    assert report["lost_total"] == 0 and report["duplicated_total"] == 0
    assert {"cpu_model", "cpus", "python", "load_average"} <= set(report["machine"])
    assert report["pinning"]["description"]
    assert report["options"]["only"] == ["ingest", "e2e", "ws", "fcm"]
    assert "api_key" not in report["options"]
    parts = report["parts"]
    assert list(parts) == ["ingest", "e2e", "ws", "fcm"]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["lost_total"] == 0 and part["duplicated_total"] == 0, (name, part["lost"])

    ingest = parts["ingest"]
    for receiver in ("bare", "naive", "mrm-push"):
        for load in ("closed", "rate"):
            figures = ingest["runs"][receiver][load]
            assert LATENCY <= set(figures) and figures["answers_per_s"] > 0
            assert figures["bound_by"] and "service" in figures["cpu"]
    ours = ingest["runs"]["mrm-push"]
    assert ours["counts"]["answered_200"] == ours["counts"]["stored_webhook_notifications"]
    assert ours["counts"]["fcm_expected"] == ours["counts"]["fcm_arrived"] > 0
    assert ours["changes_made"] > 0 and ours["service_exit_code"] == 0
    assert ingest["ratios"]["closed_answers_per_s_vs_naive"] > 0

    e2e = parts["e2e"]
    assert e2e["fcm"]["count"] >= e2e["counts"]["changes"] - 4  # the warm-up's are not timed
    assert LATENCY <= set(e2e["fcm"]) and LATENCY <= set(e2e["ws"])
    assert e2e["counts"]["ws_frames"] == e2e["publications"]

    ws = parts["ws"]
    for server in ("mrm-push", "websockets"):
        assert ws[server]["memory"]["clients"] == 10
        assert ws[server]["latency"]["missing"] == 0
        assert ws[server]["burst1"]["frames"] == ws[server]["burst1"]["expected"]
    assert ws["ratios"]["frames_per_s_burst1"] > 0

    fcm = parts["fcm"]
    assert fcm["sends"] >= 2 * 3 * 2  # rounds x rooms x tokens, at least
    assert fcm["counts"]["fcm_expected"] == fcm["counts"]["fcm_arrived"]

    measures = {(row["part"], row["measure"]) for row in report["table"]}
    assert ("ingest", "ceiling, answers/s (closed loop)") in measures
    assert ("fcm", "lost / duplicated (must be 0 / 0)") in measures
    assert "ceiling, answers/s" in result.stdout and "whole run:" in result.stdout


def notification(id_, calendar, seq, events, *, full=False):
    return {
        "id": id_,
        "seq": seq,
        "calendar_id": calendar,
        "source": "webhook",
        "resource_state": "exists",
        "changes": [{"event_id": e} for e in events],
        "full_resync": full,
    }


def test_the_accounting_counts_what_is_lost_and_what_comes_twice():
    published = [notification(1, "a", 1, ["e1", "e2"]), notification(3, "b", 2, ["e2"])]
    stored = [*published, notification(2, "a", None, [])]
    rows = [["ta", "1", "a", [], False, 10.0], ["ta", "1", "a", [], False, 10.1]]
    rows.append(["tx", "9", "z", [], False, 11.0])
    outcome = account(
        answered_200=4,
        stored=stored,
        published=published,
        changes=["e1", "e2", "e3"],
        room_tokens={"a": ["ta"], "b": ["tb"]},
        fcm_rows=rows,
        ws_seqs=[1, 1],
    )
    assert outcome["lost"] == {
        "unstored": 1,  # 4 answered 200, 3 stored
        "unpublished": 1,  # e3
        "republished": 1,  # e2 twice
        "fcm_missing": 1,  # notification 3 to tb
        "fcm_duplicate": 1,  # notification 1 to ta twice
        "fcm_unexpected": 1,  # notification 9
        "ws_missing": 1,  # seq 2
        "ws_duplicate": 1,  # seq 1 twice
    }
    assert outcome["lost_total"] == 4 and outcome["duplicated_total"] == 4
    nothing = account(
        answered_200=3,
        stored=stored,
        published=published[:1],
        changes=["e1", "e2"],
        room_tokens={"a": ["ta"]},
        fcm_rows=rows[:1],
        ws_seqs=[1],
    )
    assert nothing["lost_total"] == 0 and nothing["duplicated_total"] == 0


def test_a_change_is_timed_to_the_last_tablet_that_got_it():
    published = [notification(7, "a", 1, ["e1", "e2"]), notification(8, "a", 2, ["e3"])]
    sent = {"e1": 1.0, "e2": 1.5, "e3": 2.0}
    latencies = change_latencies(sent, published, {"7": [2.0, 3.0]})
    assert latencies == [2.0, 1.5]  # e3's notification never arrived: not timed (it is lost)


def test_the_exit_status_says_whether_anything_was_lost_or_failed():
    assert exit_code({"ingest": {"status": "ok", "lost_total": 0, "duplicated_total": 0}}) == 0
    assert exit_code({"ws": {"status": "skipped"}}) == 0
    assert exit_code({"e2e": {"status": "ok", "lost_total": 1}}) == 1
    assert exit_code({"fcm": {"status": "ok", "duplicated_total": 2}}) == 1
    assert exit_code({"ingest": {"status": "failed", "error": "x"}}) == 1


def test_a_running_service_must_be_on_loopback_and_come_with_its_key(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("# the bench's key\nbench-key-0123456789\n")
    ours = ["bench", "--url", "http://127.0.0.1:1", "--emulator-url", "http://127.0.0.1:2"]
    args = build_parser().parse_args([*ours, "--api-key-file", str(key_file)])
    assert api_key(args) == "bench-key-0123456789"
    args.api_key = api_key(args)
    assert problems(args) == []
    remote = build_parser().parse_args(["bench", "--url", "http://192.0.2.1:8080"])
    assert any("127.0.0.1" in p for p in problems(remote))
    keyless = build_parser().parse_args(ours)
    assert any("--api-key-file" in p for p in problems(keyless))
