"""Request monitoring of score.py: one record per request, personal data redacted before anything is stored.

Two sinks, both opt-in (phi3local.serve.settings):

    PHI3LOCAL_MONITOR_LOG=FILE   a JSONL file, one line per request (`phi3local serve --monitor-log FILE`);
                                 `phi3local monitor FILE` summarises it
    PHI3LOCAL_COLLECT=true       Azure ML's data collector (azureml-ai-monitoring): collections
                                 model_inputs and model_outputs, joined by the correlation id; a deployment
                                 gets it with azure.collect_requests=true, which also enables the collections
                                 in its data_collector spec. Off Azure the Collector raises unless it is given
                                 on_error (FACTS-AZURE), so it always is; with AZUREML_MDC_LOCAL_CAPTURE=true it
                                 logs the payloads locally (logger "local.capture").

A record: correlation_id, time, latency_ms, status, stream, prompt_tokens, completion_tokens, finish_reason,
error (the code of a 4xx/5xx), messages and answer after `redact` (emails, phone numbers, API keys and
other secrets). `redactor` replaces `redact` for a deployment with its own rules.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("phi3local.serve")

# Order matters: keys first (a key may contain digit runs that look like phone numbers).
REDACTIONS: tuple[tuple[str, re.Pattern], ...] = (
    ("[KEY]", re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|"
                         r"\bxox[abpr]-[A-Za-z0-9-]{10,}|\bAIza[0-9A-Za-z_-]{35}\b|"
                         r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    (r"\1[KEY]", re.compile(r"(?i)(\b(?:api[_-]?key|secret|token|password|passwd|pwd)[\"']?\s*[:=]\s*[\"']?)"
                            r"[^\s\"',;]{6,}")),
    ("[KEY]", re.compile(r"\b(?=[A-Za-z0-9+/_-]*\d)(?=[A-Za-z0-9+/_-]*[A-Za-z])[A-Za-z0-9+/_-]{32,}={0,2}")),
    ("[EMAIL]", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("[PHONE]", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}|"
                           r"\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4})(?!\w)")),
)


def redact(text: str) -> str:
    """text with emails, phone numbers and API keys / secrets replaced by [EMAIL], [PHONE], [KEY]."""
    for replacement, pattern in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def correlation_id(headers: Mapping[str, str]) -> str:
    """The caller's x-request-id (or Azure's x-ms-client-request-id), else a new one."""
    for name in ("x-request-id", "x-ms-client-request-id"):
        value = (headers.get(name) or "").strip()
        if value:
            return value[:128]
    return uuid.uuid4().hex


class RequestMonitor:
    def __init__(self, log_file: str | Path | None = None, collect: bool = False,
                 redactor: Callable[[str], str] = redact, collector_factory: Callable[..., Any] | None = None):
        self.log_file = Path(log_file) if log_file else None
        self.redactor = redactor
        self._lock = threading.Lock()
        self.inputs = self.outputs = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if collect:
            self.inputs, self.outputs = _collectors(collector_factory)

    @classmethod
    def from_settings(cls, settings: Any) -> RequestMonitor | None:
        if not settings.monitor_log and not settings.collect:
            return None
        return cls(settings.monitor_log, settings.collect)

    def record(self, *, correlation: str, started: float, status: int, stream: bool = False,
               messages: Sequence[Mapping[str, Any]] = (), answer: str | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, finish_reason: str | None = None,
               error: str | None = None) -> dict[str, Any]:
        """Store one request's record (redacted) in every sink; a failing sink is logged, never raised."""
        now = time.time()
        record = {
            "correlation_id": correlation, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "unix": round(now, 3), "latency_ms": round((time.perf_counter() - started) * 1000, 2), "status": status,
            "stream": stream, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "finish_reason": finish_reason, "error": error,
            "messages": [{"role": str(m.get("role")), "content": self.redactor(str(m.get("content", "")))}
                         for m in messages],
            "answer": self.redactor(answer) if answer is not None else None,
        }
        if self.log_file is not None:
            self._append(record)
        if self.inputs is not None:
            self._collect(record)
        return record

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with self._lock:  # threads of this worker; other workers' lines are whole too (one O_APPEND write each)
                fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError:
            logger.exception("monitoring: cannot append to %s", self.log_file)

    def _collect(self, record: dict[str, Any]) -> None:
        try:
            import pandas as pd
            from azureml.ai.monitoring.context import BasicCorrelationContext

            context = BasicCorrelationContext(id=record["correlation_id"])
            self.inputs.collect(pd.DataFrame([{"correlation_id": record["correlation_id"],
                                               "messages": json.dumps(record["messages"], ensure_ascii=False)}]),
                                context)
            outputs = {k: record[k] for k in ("correlation_id", "status", "latency_ms", "prompt_tokens",
                                              "completion_tokens", "finish_reason", "error", "answer")}
            self.outputs.collect(pd.DataFrame([outputs]), context)
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            logger.exception("monitoring: the data collector failed")


def _collectors(factory: Callable[..., Any] | None) -> tuple[Any, Any]:
    if factory is None:
        from azureml.ai.monitoring import Collector as factory  # noqa: N813

    def on_error(error: Exception) -> None:
        logger.warning("monitoring: data collector: %s", error)

    # on_error: without it the Collector raises off Azure and init() would kill the worker (FACTS-AZURE).
    return factory(name="model_inputs", on_error=on_error), factory(name="model_outputs", on_error=on_error)
