"""The serving limits, passed to every worker through environment variables.

A managed deployment sets them in its `environment_variables`; `phi3local serve` sets them from its
flags before the server forks the workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from phi3local.serve.errors import ServeError

ENV_MAX_TOKENS = "PHI3LOCAL_MAX_TOKENS"
ENV_MAX_BODY_BYTES = "PHI3LOCAL_MAX_BODY_BYTES"
ENV_MODEL_NAME = "PHI3LOCAL_MODEL_NAME"
ENV_MONITOR_LOG = "PHI3LOCAL_MONITOR_LOG"  # phi3local.serve.monitoring: the local JSONL of request records
ENV_COLLECT = "PHI3LOCAL_COLLECT"  # "true": Azure ML's data collector (model_inputs, model_outputs)
ENV_MAX_BATCH = "PHI3LOCAL_MAX_BATCH"  # requests a worker's decode loop runs together (0, the default: no loop)

# Bounds how long one request holds a worker thread (the server's scoring timeout does not apply to
# threaded workers or to streamed answers).
DEFAULT_MAX_TOKENS = 512
# A Phi-3 4k-token context is ~16 KB of text; 1 MiB leaves room for JSON escaping and long histories.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Requests a worker's decode loop advances together (phi3local.serve.batching; more wait their turn); 0: no
# loop, each request thread decodes its own request (measured faster on the 2-core CPU: docs/serving.md).
DEFAULT_MAX_BATCH = 0


@dataclass(frozen=True)
class ServeSettings:
    max_tokens_cap: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    model_name: str | None = None  # the `model` field of responses; default: the model folder's name
    monitor_log: str | None = None  # append one redacted record per request to this JSONL file
    collect: bool = False  # send the redacted records to Azure ML's data collector
    max_batch: int = DEFAULT_MAX_BATCH  # the decode loop's concurrent requests; 0: each request thread decodes its own

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        environ = os.environ if environ is None else environ
        return cls(
            max_tokens_cap=_int_env(environ, ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS),
            max_body_bytes=_int_env(environ, ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES),
            model_name=environ.get(ENV_MODEL_NAME) or None,
            monitor_log=environ.get(ENV_MONITOR_LOG) or None,
            collect=_flag(environ, ENV_COLLECT),
            max_batch=_int_env(environ, ENV_MAX_BATCH, DEFAULT_MAX_BATCH, minimum=0),
        )

    def to_env(self) -> dict[str, str]:
        env = {ENV_MAX_TOKENS: str(self.max_tokens_cap), ENV_MAX_BODY_BYTES: str(self.max_body_bytes)}
        if self.model_name:
            env[ENV_MODEL_NAME] = self.model_name
        if self.monitor_log:
            env[ENV_MONITOR_LOG] = self.monitor_log
        if self.collect:
            env[ENV_COLLECT] = "true"
        if self.max_batch != DEFAULT_MAX_BATCH:
            env[ENV_MAX_BATCH] = str(self.max_batch)
        return env

    def __post_init__(self):
        for name in ("max_tokens_cap", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 0:
            raise ServeError(f"max_batch must be a whole number >= 0 (0: no decode loop), got {self.max_batch!r}")


def _int_env(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    """A whole number from the environment, at least `minimum`; unset or empty gives `default`."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ServeError(f"environment variable {name}={raw!r} must be a whole number >= {minimum}")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ServeError(f"environment variable {name}={raw!r} must be true or false")
