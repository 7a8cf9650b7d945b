"""Serving speed: onnxruntime-genai int4 vs PyTorch `generate`, both behind azmlinfsrv and phi3local.serve.

    python -m kernels_bench.serve_speed [--hidden 256 --layers 4 --new-tokens 32 --clients 1,8 --requests 12,32]

Builds a Phi-3-shaped random model (the real Phi-3 vocabulary and tokenizer, as generate_speed does),
exports it int4 with the project's `export_onnx`, and starts two servers on loopback ports, each through
azmlinfsrv with the same request path (phi3local.serve's protocol, service and score.respond):
- ONNX: `python -m phi3local.serve.server` (phi3local/serve/score.py, the deployment's script);
- PyTorch: this file as the entry script (init()/run() below): `TorchEngine`, transformers' `generate`
  on the same weights in fp32, behind the same ChatService.
For each client count: non-streamed greedy requests with max_tokens = --new-tokens, each client a
keep-alive session; requests/s, p50/p95 latency and generated tokens/s. A random model rarely emits a
stop token, so both engines generate the full budget (reported per row).

Also measured: liveness (GET /) latency during a long stream with 1 thread per worker (gunicorn's sync
worker) and with the default threads, and the RSS of each worker, with 1 and 2 workers (each worker
loads its own model copy). Writes kernels_bench/results/serve_speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from azureml_inference_server_http.api.aml_request import rawhttp

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Summarize this dialog: Anna: hi! Ben: hello, how are you today?"}]


# ---- the PyTorch backend and the entry script azmlinfsrv loads for it -------------------------------------

class TorchEngine:
    """transformers `generate` behind phi3local.serve's engine interface (prepare / generate)."""

    def __init__(self, model_dir: str | Path):
        import torch
        from transformers import AutoModelForCausalLM

        from phi3local.model.tokenizer import load_tokenizer
        from phi3local.serve.json_files import as_id_list

        self.model_dir = Path(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.context_length = int(self.model.config.max_position_embeddings)
        self.stop_ids = set(as_id_list(self.model.generation_config.eos_token_id))
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

    def prepare(self, messages, max_tokens: int):
        from phi3local.serve import protocol
        from phi3local.serve.engine import Prompt

        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(ids) >= self.context_length:
            raise protocol.context_exceeded(len(ids), self.context_length)
        return Prompt(ids=ids, max_new_tokens=min(max_tokens, self.context_length - len(ids)))

    def generate(self, prompt, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        from phi3local.serve.engine import Generation

        return Generation(lambda generation: self._pieces(generation, prompt, temperature, top_p, seed))

    def _pieces(self, generation, prompt, temperature, top_p, seed):
        import torch

        ids = torch.from_numpy(prompt.ids)[None]
        options = {"max_new_tokens": prompt.max_new_tokens, "do_sample": temperature > 0, "pad_token_id": self.pad_id}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p)
            if seed is not None:
                torch.manual_seed(seed)  # process-wide: fine for a benchmark, not for a server
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        new = out[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(new) if t in self.stop_ids]
        if ends:
            new = new[:ends[0] + 1]
            generation.finish_reason = "stop"
        generation.completion_tokens = len(new)
        text = self.tokenizer.decode([t for t in new if t not in self.stop_ids], skip_special_tokens=False)
        if text:
            yield text  # one piece: `generate` returns the whole answer at once (streaming is not measured)


_service = None


def init() -> None:
    global _service
    from phi3local.serve.service import ChatService
    from phi3local.serve.settings import ServeSettings

    _service = ChatService(TorchEngine(os.environ["AZUREML_MODEL_DIR"]), ServeSettings.from_env())


@rawhttp
def run(request):
    from phi3local.serve.score import respond

    return respond(request, _service)


# ---- servers and clients ----------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path, port: int):
        import requests

        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {args} exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server {args} not ready: {log.read_text()[-2000:]}")

    def worker_rss(self) -> list[int]:
        import psutil

        return [p.memory_info().rss for p in psutil.Process(self.proc.pid).children()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def onnx_server(onnx_dir: Path, log: Path, threads: int, workers: int = 1, cap: int = 4000) -> Server:
    port = free_port()
    return Server(["phi3local.serve.server", str(onnx_dir), "--port", str(port), "--threads", str(threads),
                   "--workers", str(workers), "--max-tokens", str(cap)], log, port)


def torch_server(hf_dir: Path, log: Path, threads: int, cap: int = 4000) -> Server:
    port = free_port()
    return Server(["kernels_bench.serve_speed", "--serve-torch", str(hf_dir), "--port", str(port), "--threads",
                   str(threads), "--max-tokens", str(cap)], log, port)


def load(url: str, clients: int, n_requests: int, new_tokens: int) -> dict:
    """n_requests non-streamed chat requests from `clients` keep-alive clients; latency and throughput."""
    import requests

    body = {"messages": PROMPT, "max_tokens": new_tokens, "temperature": 0}
    local = threading.local()

    def one(_):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        t0 = time.perf_counter()
        r = local.session.post(url + "/score", json=body, timeout=600)
        seconds = time.perf_counter() - t0
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        return r.status_code, seconds, tokens

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: one request per client (sessions, first-run costs)
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
    latencies = [s for _, s, _ in results]
    tokens = sum(t for _, _, t in results)
    return {"clients": clients, "requests": n_requests, "errors": sum(code != 200 for code, _, _ in results),
            "wall_s": wall, "requests_per_s": n_requests / wall, "tokens_per_s": tokens / wall,
            "completion_tokens_mean": tokens / n_requests, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "max_s": max(latencies), "latencies_s": latencies}


def liveness_during_stream(url: str, stream_tokens: int) -> dict:
    """GET / latencies while one long streamed request is generating."""
    import requests

    finished = {}

    def stream():
        t0 = time.perf_counter()
        with requests.post(url + "/score", json={"messages": PROMPT, "max_tokens": stream_tokens, "stream": True},
                           stream=True, timeout=600) as r:
            finished["events"] = sum(1 for line in r.iter_lines() if line)
        finished["seconds"] = time.perf_counter() - t0

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.3)
    probes = []
    while streamer.is_alive() and len(probes) < 10:
        t0 = time.perf_counter()
        requests.get(url + "/", timeout=600)
        probes.append(time.perf_counter() - t0)
        time.sleep(0.05)
    streamer.join()
    return {"stream_s": finished["seconds"], "stream_events": finished["events"], "probes": len(probes),
            "liveness_max_s": max(probes) if probes else None,
            "liveness_median_s": statistics.median(probes) if probes else None, "liveness_s": probes}


# ---- the benchmark -----------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    from phi3local.serve.server import DEFAULT_THREADS

    p = argparse.ArgumentParser(prog="python -m kernels_bench.serve_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--clients", type=_ints, default=[1, 8], help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=_ints, default=[12, 32], help="requests per client count, comma-separated")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="request threads per worker (both servers)")
    p.add_argument("--stream-tokens", type=int, default=1500, help="length of the stream liveness is probed during")
    p.add_argument("--out", type=Path, default=REPO / "kernels_bench" / "results")
    # Internal: run the PyTorch server (this file as azmlinfsrv's entry script).
    p.add_argument("--serve-torch", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.requests) != len(args.clients):
        p.error("--requests needs one count per --clients entry")
    return args


def serve_torch(args: argparse.Namespace) -> int:
    from phi3local.serve.server import run_server
    from phi3local.serve.settings import ServeSettings

    run_server(Path(__file__).resolve(), args.serve_torch.resolve(), host="127.0.0.1", port=args.port, workers=1,
               threads=args.threads, settings=ServeSettings(max_tokens_cap=args.max_tokens))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_torch:
        return serve_torch(args)

    from kernels_bench.common import make_console, repo_relative
    from kernels_bench.generate_speed import build_model
    from kernels_bench.report import Column, fmt_bytes, fmt_num, fmt_ratio, fmt_seconds, print_table, save_result
    from phi3local.export.onnx import export_onnx

    console = make_console()
    started = time.perf_counter()
    rows, liveness, memory = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = build_model(tmp / "hf", args.hidden, args.layers, args.heads, args.intermediate)
        export = export_onnx(hf_dir, tmp / "int4", precision="int4", target="cpu", check=False, show=False)
        cap = max(args.new_tokens, args.stream_tokens)
        servers = {"onnxruntime-genai int4": onnx_server(tmp / "int4", tmp / "onnx.log", args.threads, cap=cap),
                   "pytorch generate fp32": torch_server(hf_dir, tmp / "torch.log", args.threads, cap=cap)}
        try:
            for i, (clients, n) in enumerate(zip(args.clients, args.requests)):
                order = list(servers.items())
                for engine, srv in (order if i % 2 == 0 else order[::-1]):  # alternate: drift hits both
                    row = {"engine": engine, **load(srv.url, clients, n, args.new_tokens)}
                    rows.append(row)
                    console.print(f"{engine}, {clients} client(s): {row['requests_per_s']:.2f} req/s, "
                                  f"p50 {row['p50_s'] * 1e3:.0f} ms, {row['tokens_per_s']:.1f} tokens/s")
            for engine, srv in servers.items():
                memory.append({"engine": engine, "workers": 1, "worker_rss_bytes": srv.worker_rss()})
            liveness.append({"workers": 1, "threads": args.threads,
                             **liveness_during_stream(servers["onnxruntime-genai int4"].url, args.stream_tokens)})
        finally:
            for srv in servers.values():
                srv.stop()
        sync = onnx_server(tmp / "int4", tmp / "sync.log", threads=1, workers=2, cap=cap)
        try:
            # Two sync workers: the idle one answers liveness, at the price of a second model copy.
            liveness.append({"workers": 2, "threads": 1, **liveness_during_stream(sync.url, args.stream_tokens)})
            memory.append({"engine": "onnxruntime-genai int4", "workers": 2, "worker_rss_bytes": sync.worker_rss()})
        finally:
            sync.stop()
        sync = onnx_server(tmp / "int4", tmp / "sync1.log", threads=1, workers=1, cap=cap)
        try:
            liveness.append({"workers": 1, "threads": 1, **liveness_during_stream(sync.url, args.stream_tokens)})
        finally:
            sync.stop()

    by = {(r["engine"], r["clients"]): r for r in rows}
    summary = {}
    for clients in args.clients:
        onnx, torch_row = by[("onnxruntime-genai int4", clients)], by[("pytorch generate fp32", clients)]
        summary[f"clients_{clients}"] = {
            "onnx_requests_per_s": onnx["requests_per_s"], "torch_requests_per_s": torch_row["requests_per_s"],
            "onnx_tokens_per_s": onnx["tokens_per_s"], "torch_tokens_per_s": torch_row["tokens_per_s"],
            "speedup_requests_per_s": onnx["requests_per_s"] / torch_row["requests_per_s"],
            "onnx_p50_s": onnx["p50_s"], "onnx_p95_s": onnx["p95_s"],
            "torch_p50_s": torch_row["p50_s"], "torch_p95_s": torch_row["p95_s"],
        }
    summary["liveness"] = [{k: v for k, v in entry.items() if k != "liveness_s"} for entry in liveness]
    summary["worker_rss_bytes"] = memory
    summary["errors"] = sum(r["errors"] for r in rows)
    config = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("serve_torch", "port", "max_tokens")}
    config["int4_size_bytes"] = export.get("size_bytes")
    notes = ["Both servers: azmlinfsrv, 1 worker x `threads` threads, phi3local.serve's protocol/service; greedy, "
             "non-streamed, max_tokens = new_tokens; a random model, so completion_tokens_mean shows whether the "
             "whole budget was generated.",
             "liveness: GET / latency while one long stream generates; 1 thread (gunicorn sync worker) waits for the "
             "stream to end, threads answer at once.",
             "N workers = N model copies: compare the per-worker RSS of the 1- and 2-worker rows (RSS read after "
             "each server's last request: it includes onnxruntime's grown memory arena and the KV cache it kept)."]
    path = save_result(args.out, "serve_speed", "small", "cpu", config, rows, summary, notes,
                       wall_s=time.perf_counter() - started)

    print_table(f"serving, Phi-3-shaped h{args.hidden} L{args.layers} random model, {args.new_tokens} new tokens",
                rows, [Column("engine", "engine", justify="left"), Column("clients", "clients"),
                       Column("requests", "requests"), Column("errors", "errors"),
                       Column("requests_per_s", "req/s", fmt_num), Column("p50_s", "p50", fmt_seconds),
                       Column("p95_s", "p95", fmt_seconds), Column("tokens_per_s", "tokens/s", lambda x: f"{x:.1f}"),
                       Column("completion_tokens_mean", "tokens/req", lambda x: f"{x:.1f}")], console=console)
    for clients in args.clients:
        s = summary[f"clients_{clients}"]
        console.print(f"{clients} client(s): ONNX int4 {fmt_ratio(s['speedup_requests_per_s'])} the requests/s of "
                      "PyTorch")
    print_table("liveness (GET /) during a long stream, ONNX int4 server", summary["liveness"],
                [Column("workers", "workers"), Column("threads", "threads"), Column("stream_s", "stream", fmt_seconds),
                 Column("probes", "probes"), Column("liveness_median_s", "median", fmt_seconds),
                 Column("liveness_max_s", "max", fmt_seconds)], console=console)
    print_table("worker memory", [{"engine": m["engine"], "workers": m["workers"],
                                   "rss": ", ".join(fmt_bytes(b) for b in m["worker_rss_bytes"])} for m in memory],
                [Column("engine", "engine", justify="left"), Column("workers", "workers"),
                 Column("rss", "RSS per worker", justify="left")], console=console)
    console.print(f"results: {path}")
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
