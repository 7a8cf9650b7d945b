"""phi3local.serve.monitoring (redaction, the JSONL sink, Azure ML's data collector in its local-capture mode)
and `phi3local monitor` (percentiles, rates, windows) on planted logs. The served path is in test_serve.py."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from phi3local.cli import main
from phi3local.monitor_report import MonitorLogError, percentile, read_log, summarize
from phi3local.serve.monitoring import RequestMonitor, correlation_id, redact
from phi3local.serve.settings import ServeSettings

EMAIL = "jane.doe+work@example.co.uk"
KEY = "sk-proj-AbCdEf0123456789AbCdEf0123456789"


@pytest.mark.parametrize("text, redacted", [
    (f"mail {EMAIL} today", "mail [EMAIL] today"),
    ("call +1 (555) 123-4567 or 555-123-4567 or +44 20 7946 0958.", "call [PHONE] or [PHONE] or [PHONE]."),
    (f"my key is {KEY}", "my key is [KEY]"),
    ("AWS AKIAIOSFODNN7EXAMPLE and ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "AWS [KEY] and [KEY]"),
    ('api_key=hunter2secret, "password": "s3cr3t!!"', 'api_key=[KEY], "password": "[KEY]"'),
    ("token 0123456789abcdef0123456789abcdef01 end", "token [KEY] end"),
])
def test_redaction_replaces_personal_data_and_secrets(text, redacted):
    assert redact(text) == redacted


@pytest.mark.parametrize("text", [
    "Who: Ben. What: cake.", "On 2026-12-02 at 10:30 we sold 1,000 items for $12.50.", "Call me at noon, room 4.",
])
def test_redaction_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_correlation_id_is_the_callers_or_new():
    assert correlation_id({"x-request-id": " abc "}) == "abc"
    assert correlation_id({"x-ms-client-request-id": "ms-1"}) == "ms-1"
    generated = correlation_id({})
    assert len(generated) == 32 and generated != correlation_id({})


def test_jsonl_sink_writes_one_whole_redacted_line_per_request_from_many_threads(tmp_path):
    log = tmp_path / "logs" / "requests.jsonl"
    monitor = RequestMonitor.from_settings(ServeSettings(monitor_log=str(log)))
    assert RequestMonitor.from_settings(ServeSettings()) is None  # off unless asked

    def one(i):
        monitor.record(correlation=f"r{i}", started=time.perf_counter(), status=200,
                       messages=[{"role": "user", "content": f"I am {EMAIL}, key {KEY}, request {i}"}],
                       answer=f"Noted, {EMAIL}.", prompt_tokens=10 + i, completion_tokens=3, finish_reason="stop")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(400)))
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["correlation_id"] for r in records) == sorted(f"r{i}" for i in range(400))
    assert EMAIL not in text and KEY not in text
    r7 = next(r for r in records if r["correlation_id"] == "r7")
    assert r7["messages"] == [{"role": "user", "content": "I am [EMAIL], key [KEY], request 7"}]
    assert (r7["answer"], r7["prompt_tokens"], r7["completion_tokens"], r7["status"]) == ("Noted, [EMAIL].", 17, 3, 200)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_data_collector_in_local_capture_mode_gets_the_redacted_payloads(monkeypatch):
    from azureml.ai.monitoring import init as mdc

    monkeypatch.setenv("AZUREML_MDC_ENABLED", "true")
    monkeypatch.setenv("AZUREML_MDC_LOCAL_CAPTURE", "true")
    mdc.teardown()
    try:
        monitor = RequestMonitor(collect=True)  # the real Collector, with on_error
        captured = Captured()
        logging.getLogger("local.capture").addHandler(captured)  # after the collector's own logging setup
        monitor.record(correlation="corr-42", started=time.perf_counter(), status=200,
                       messages=[{"role": "user", "content": f"reach me at {EMAIL}"}], answer=f"Use {KEY}.",
                       prompt_tokens=5, completion_tokens=2, finish_reason="stop")
        deadline = time.monotonic() + 20
        while len(captured.messages) < 2 and time.monotonic() < deadline:  # the collector's worker thread sends
            time.sleep(0.05)
    finally:
        mdc.teardown(wait_for_flush=True)
        logging.getLogger("local.capture").removeHandler(captured)
    assert len(captured.messages) == 2, captured.messages
    inputs, outputs = sorted(captured.messages, key=lambda m: "model_outputs" in m)
    assert "model_inputs" in inputs and "model_outputs" in outputs
    assert all("corr-42" in m for m in captured.messages)  # both joined by our correlation id
    assert "reach me at [EMAIL]" in inputs and "Use [KEY]." in outputs
    assert EMAIL not in inputs + outputs and KEY not in inputs + outputs


def test_off_azure_the_collector_is_a_no_op_not_a_crash(monkeypatch):
    from azureml.ai.monitoring import init as mdc

    monkeypatch.delenv("AZUREML_MDC_ENABLED", raising=False)
    mdc.teardown()
    # FACTS-AZURE: without on_error this constructor raises off Azure (and would end score.init()).
    monitor = RequestMonitor(collect=True)
    assert monitor.inputs is not None and not mdc.is_sdk_ready()
    assert monitor.record(correlation="x", started=time.perf_counter(), status=200, answer="a")["status"] == 200


def test_a_failing_sink_never_fails_the_request(tmp_path, caplog):
    class Broken:
        def __init__(self, name, on_error):
            self.name = name

        def collect(self, data, context=None):
            raise RuntimeError("collector down")

    monitor = RequestMonitor(tmp_path / "is-a-dir", collect=True, collector_factory=Broken)
    (tmp_path / "is-a-dir").mkdir()
    record = monitor.record(correlation="x", started=time.perf_counter(), status=500, error="server_error")
    assert record["error"] == "server_error"
    assert "cannot append" in caplog.text and "data collector failed" in caplog.text


# ------------------------------------------------------------------------------------------ phi3local monitor

def planted_log(path):
    """20 requests over 100 s: latencies 10..200 ms, two 4xx, one 5xx, one failed stream, 4 refusals."""
    rows = []
    for i in range(20):
        status = 422 if i in (3, 4) else 500 if i == 10 else 200
        error = {422: "context_length_exceeded", 500: "server_error"}.get(status)
        if i == 15:
            error = "server_error"  # a stream that failed after its 200
        answer = None if status != 200 else ("I'm sorry, but I can't help with that." if i % 5 == 0 else "Sure: 42.")
        rows.append({"correlation_id": f"c{i}", "unix": 1000.0 + 5 * i, "time": "t", "latency_ms": 10.0 * (i + 1),
                     "status": status, "error": error, "prompt_tokens": 20 if status == 200 else None,
                     "completion_tokens": 4 if status == 200 else None, "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_monitor_summary_numbers(tmp_path):
    summary = summarize(read_log(planted_log(tmp_path / "log.jsonl")), windows=4)
    s = summary["overall"]
    assert (s["requests"], s["errors_4xx"], s["errors_5xx"], s["stream_failures"]) == (20, 2, 1, 1)
    assert s["error_rate"] == 4 / 20
    # Latency over the 16 answered requests only (i = 3, 4, 10, 15 are errors: 40, 50, 110, 160 ms).
    assert s["answered"] == 16
    assert s["latency_ms"] == {"p50": 100.0, "p90": 190.0, "p99": 200.0, "max": 200.0}
    assert s["error_latency_ms"] == {"p50": 50.0, "p90": 160.0, "p99": 160.0, "max": 160.0}
    assert (s["prompt_tokens_mean"], s["completion_tokens_mean"]) == (20, 4)
    # Answered: 16 (a 200 without an error); refusals among them: i = 0 and 5 (10 is a 5xx, 15 a failed stream).
    assert s["refusal_rate"] == 2 / 16
    assert [w["requests"] for w in summary["over_time"]] == [5, 5, 5, 5] and summary["seconds"] == 95.0
    assert summary["over_time"][0]["error_rate"] == 2 / 5 and summary["over_time"][0]["refusal_rate"] == 1 / 3
    assert percentile([3, 1, 2], 50) == 2 and percentile([], 50) is None


def test_monitor_command_table_json_and_plot(tmp_path, capsys):
    log = planted_log(tmp_path / "log.jsonl")
    assert main(["monitor", str(log), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"]["requests"] == 20 and (tmp_path / "log.png").stat().st_size > 10_000
    assert main(["monitor", str(log), "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 4xx, 1 5xx, 1 failed stream(s)" in out and "all" in out
    assert max(len(line) for line in out.splitlines() if "plot:" not in line) <= 80  # the path may be longer


def fast_errors_log(path, start=1000.0, spacing=1.0):
    """10 answers of 1000..1900 ms and 30 refusals (422) answered in 0.2 ms, interleaved."""
    rows = []
    for i in range(40):
        ok = i % 4 == 0
        rows.append({"correlation_id": f"c{i}", "unix": start + spacing * i, "time": "t",
                     "latency_ms": 1000.0 + 100 * (i // 4) if ok else 0.2, "status": 200 if ok else 422,
                     "error": None if ok else "context_length_exceeded",
                     "prompt_tokens": 30 if ok else None, "completion_tokens": 8 if ok else None,
                     "answer": "Sure." if ok else None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_latency_percentiles_are_the_answered_requests_not_the_fast_4xx(tmp_path, capsys, monkeypatch):
    """Issue 23: 0.2 ms 4xx answers were counted in the latency percentiles (p50 0.2 ms for 1-2 s answers)."""
    log = fast_errors_log(tmp_path / "log.jsonl")
    s = summarize(read_log(log), windows=2)["overall"]
    answers = [1000.0 + 100 * k for k in range(10)]
    assert s["latency_ms"] == {"p50": percentile(answers, 50), "p90": percentile(answers, 90),
                               "p99": percentile(answers, 99), "max": 1900.0}
    assert s["latency_ms"]["p50"] == 1400.0
    assert (s["requests"], s["answered"], s["errors_4xx"], s["error_rate"]) == (40, 10, 30, 0.75)
    assert s["error_latency_ms"] == {"p50": 0.2, "p90": 0.2, "p99": 0.2, "max": 0.2}
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["monitor", str(log), "--windows", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    all_row = next(line.split() for line in lines if line.split()[:1] == ["all"])
    assert all_row[:6] == ["all", "40", "75.0%", "1,400", "1,800", "1,900"], all_row
    errors_row = next(line.split() for line in lines if line.split()[:1] == ["errors"])
    assert errors_row[:6] == ["errors", "30", "100.0%", "0.2", "0.2", "0.2"], errors_row
    assert "answered requests (2xx, no error) only" in " ".join(out.split())
    assert max(len(line) for line in lines if "plot:" not in line) <= 80  # the plot's path may be longer


def test_monitor_table_fits_80_columns_over_long_windows(tmp_path, monkeypatch, capsys):
    log = fast_errors_log(tmp_path / "log.jsonl", start=1_700_000_000.0, spacing=3600.0)  # 39 hours
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the table's own width must still be <= 80
    capsys.readouterr()
    assert main(["monitor", str(log)]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    table = [line for line in lines if line.strip().endswith(("%", "—"))]  # 6 windows, all, errors
    assert len(table) == 6 + 2 and all("…" not in line for line in table), table
    assert max(len(line) for line in lines if "plot:" not in line) <= 80


def test_a_bad_log_line_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"correlation_id": "a", "unix": 1, "latency_ms": 1, "status": 200}\n{oops\n')
    with pytest.raises(MonitorLogError, match=r"log.jsonl:2: not a JSON record"):
        read_log(log)
    log.write_text('{"correlation_id": "a"}\n')
    with pytest.raises(MonitorLogError, match=r"log.jsonl:1: missing unix, latency_ms, status"):
        read_log(log)
    with pytest.raises(MonitorLogError, match="no such log"):
        read_log(tmp_path / "none.jsonl")
