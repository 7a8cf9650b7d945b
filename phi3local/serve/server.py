"""Run the Azure ML inference server (azmlinfsrv) on an exported model with phi3local's score.py.

    python -m phi3local.serve.server ONNX_DIR [--host 127.0.0.1] [--port 5001] [--workers 1] [--threads 4]
                                     [--max-tokens 512] [--max-body-bytes 1048576] [--health-port P]
                                     [--monitor-log FILE]

The same server, scoring script and routes as an Azure deployment (GET / liveness, POST /score), with
three local differences: it binds 127.0.0.1 unless told otherwise (azmlinfsrv itself always binds
0.0.0.0 and has no host flag), each worker runs `threads` request threads, and each worker also answers
OpenAI's routes (POST /v1/chat/completions, GET /v1/models: phi3local.serve.openai_routes, added by a gunicorn
hook) through the same scoring view and score.run() as /score.

Workers and threads: every worker process runs score.init() and holds its own copy of the model (N
workers = N x the model's memory); threads share their worker's copy. A worker with one thread (the
server's default, gunicorn's sync worker) answers nothing else, liveness included, while it generates;
with threads (gunicorn's gthread worker) GET / is answered during a generation. The price: the server's
SCORING_TIMEOUT_MS (SIGALRM) only works on a worker's main thread, so max_tokens cap bounds a request's time.

The model reaches the server as a managed endpoint has it (`served_model_root`): AZUREML_MODEL_DIR is
<tmp>/<name>/1 holding the export folder by its own name (a symbolic link), which is what the server's
own model-id scan expects.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from phi3local.serve.errors import ServeError
from phi3local.serve.model_dir import find_model_dir
from phi3local.serve.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS, ServeSettings

SCORE_SCRIPT = Path(__file__).resolve().with_name("score.py")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
# Liveness stays answerable during generation, and a few requests share one model copy.
DEFAULT_THREADS = 4
GUNICORN_HOOKS = "python:phi3local.serve.gunicorn_hooks"


def deployment_environment(settings: ServeSettings, threads: int = DEFAULT_THREADS) -> dict[str, str]:
    """The variables a managed deployment sets (its `environment_variables`) to serve as `phi3local serve` does:
    the limits score.py reads and gunicorn's threads (a flag every gunicorn version knows)."""
    return {**settings.to_env(), "GUNICORN_CMD_ARGS": f"--threads {threads}"}


def server_environment(settings: ServeSettings, threads: int, health_port: int | None,
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """deployment_environment plus what only a local server needs; `base`: the environment it runs in."""
    base = dict(os.environ if base is None else base)
    env = deployment_environment(settings, threads)
    # The caller's own GUNICORN_CMD_ARGS go first: a later flag wins in gunicorn.
    gunicorn_args = f"{base.get('GUNICORN_CMD_ARGS', '').strip()} {env['GUNICORN_CMD_ARGS']}".strip()
    # OpenAI's routes (phi3local.serve.openai_routes), added in each worker by a gunicorn hook. Given here, the
    # config also keeps gunicorn from reading a gunicorn.conf.py in the folder the user serves from.
    gunicorn_args += f" --config {GUNICORN_HOOKS}"
    if _gunicorn_has_setting("control_socket_disable"):
        # gunicorn >= 24 opens ~/.gunicorn/gunicorn.ctl: one path for every server of the user
        gunicorn_args += " --no-control-socket"
    env["GUNICORN_CMD_ARGS"] = gunicorn_args
    if health_port is not None:
        env["SEPERATE_HEALTH_ENDPOINT"] = "true"  # sic: the server's spelling
    return env


def _gunicorn_has_setting(name: str) -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(setting.name == name for setting in KNOWN_SETTINGS)


def check_port_free(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as gunicorn binds
            pass
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port, or stop what "
                         "listens there)") from None


def serve(onnx_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1,
          threads: int = DEFAULT_THREADS, max_tokens_cap: int = DEFAULT_MAX_TOKENS,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, health_port: int | None = None,
          model_name: str | None = None, monitor_log: str | Path | None = None) -> NoReturn:
    """Serve the exported model in onnx_dir until the process is stopped (this process becomes the server).

    onnx_dir: the folder `phi3local export` wrote, or a folder holding exactly one such folder (a
    managed endpoint's model layout). health_port: also answer GET / on that port (same workers).
    """
    for name, value in (("workers", workers), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ServeError(f"{name} must be a whole number >= 1, got {value!r}")
    for name, value in (("port", port), ("health_port", health_port)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535):
            raise ServeError(f"{name} must be a port number in 1..65535, got {value!r}")
    if health_port == port:
        raise ServeError(f"health_port must differ from port ({port})")
    settings = ServeSettings(max_tokens_cap=max_tokens_cap, max_body_bytes=max_body_bytes, model_name=model_name,
                             monitor_log=str(Path(monitor_log).resolve()) if monitor_log else None)
    model_dir = find_model_dir(onnx_dir)  # fail here, with the reason, not in every worker's init()
    for p in (port, health_port):
        if p is not None:
            check_port_free(host, p)

    print(f"phi3local serve: {model_dir} on {_where(host)}, port {port}; {workers} worker(s) x {threads} "
          f"thread(s), max_tokens cap {max_tokens_cap}", flush=True)
    base = f"http://{_url_host(host)}:{port}"
    print(f"phi3local serve: POST {base}/score; OpenAI clients: base URL {base}/v1 (POST /v1/chat/completions, "
          f"GET /v1/models); azure-ai-inference: endpoint {base}", flush=True)
    run_server(SCORE_SCRIPT, served_model_root(model_dir, model_name), host=host, port=port, workers=workers,
               threads=threads, settings=settings, health_port=health_port)


def served_model_root(model_dir: Path, name: str | None = None, version: str = "1") -> Path:
    """AZUREML_MODEL_DIR for the export in model_dir, laid out as on a managed endpoint: <tmp>/<name>/<version>
    holding the export folder under its own name (a symbolic link to it; removed when this process exits).

    azmlinfsrv lists AZUREML_MODEL_DIR for the model ids it reports: a folder named by a number is read as
    <name>/<version>, any other as a root of <name>/<version> folders. Given an export folder itself, it took
    the export's files (parity.json, ...) for model folders and logged a traceback at every worker's start.
    score.py finds the model the same way in both layouts (phi3local.serve.model_dir).
    """
    model_dir = Path(model_dir).resolve()
    root = Path(tempfile.mkdtemp(prefix="phi3local-serve-"))
    # Only this process (the server's master) cleans up: its forked workers exit through atexit too.
    atexit.register(_remove_from, root, os.getpid())
    version_dir = root / _path_name(name or model_dir.name) / version
    version_dir.mkdir(parents=True)
    (version_dir / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    return version_dir


def _path_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "model"


def _remove_from(root: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(root, ignore_errors=True)


def run_server(entry_script: Path, model_dir: Path, *, host: str, port: int, workers: int, threads: int,
               settings: ServeSettings, health_port: int | None = None) -> NoReturn:
    """azmlinfsrv on entry_script with AZUREML_MODEL_DIR=model_dir, bound to host (arguments unchecked)."""
    from azureml_inference_server_http import amlserver

    os.environ.update(server_environment(settings, threads, health_port))
    amlserver.DEFAULT_HOST = host  # read by amlserver.run(): the server's only host setting
    sys.argv = ["azmlinfsrv", "--entry_script", str(entry_script), "--model_dir", str(model_dir),
                "--port", str(port), "--worker_count", str(workers)]  # what amlserver.run() parses
    if health_port is not None:
        sys.argv += ["--health_port", str(health_port)]
    amlserver.run()  # gunicorn: returns only by exiting
    raise SystemExit(0)


def _where(host: str) -> str:
    return "all interfaces" if host in ("0.0.0.0", "::", "") else host


def _url_host(host: str) -> str:
    """The host part of a URL that reaches this server from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi3local.serve.server", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir", help="the folder `phi3local export` wrote (or one holding exactly one)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0: network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of /score and / (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model copy")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"request threads per worker, sharing its model (default {DEFAULT_THREADS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"cap on a request's max_tokens, also its default (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--health-port", type=int, default=None, help="also answer liveness (GET /) on this port")
    p.add_argument("--model-name", default=None, help="the `model` field of responses (default: the folder's name)")
    p.add_argument("--monitor-log", default=None, help="append one redacted record per request to this JSONL file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        serve(args.onnx_dir, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
              max_tokens_cap=args.max_tokens, max_body_bytes=args.max_body_bytes, health_port=args.health_port,
              model_name=args.model_name, monitor_log=args.monitor_log)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
