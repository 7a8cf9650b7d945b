"""Serving speed: onnxruntime-genai int4 vs PyTorch `generate`, both behind azmlinfsrv and phi3local.serve.

    python -m kernels_bench.serve_speed [--hidden 256 --layers 4 --new-tokens 32 --clients 1,8 --requests 24,64]

Builds a Phi-3-shaped random model (the real Phi-3 vocabulary and tokenizer, as generate_speed does),
exports it int4 with the project's `export_onnx`, and starts two servers on loopback ports, each through
azmlinfsrv with the same request path (phi3local.serve's protocol, service and score.respond):
- ONNX: `python -m phi3local.serve.server` (phi3local/serve/score.py, the deployment's script);
- PyTorch: this file as the entry script (init()/run() below): `TorchEngine`, transformers' `generate`
  on the same weights in fp32, behind the same ChatService.
- ONNX with the opt-in decode loop (PHI3LOCAL_MAX_BATCH=8, phi3local.serve.batching: one thread advances
  every running request a token per round), for the loop's effect under the same load.
For each client count: non-streamed greedy requests with max_tokens = --new-tokens, each client a
keep-alive session, request i asking prompt i mod 8 (PROMPTS: 8 prompts of different lengths); requests/s,
p50/p95 latency and generated tokens/s. A random model rarely emits a stop token, so the engines generate
the full budget (reported per row). Greedy identity: every answer of every row must equal the answer the
same server gave that prompt with one client (`greedy_identical`), and the ONNX servers must agree.
The 8-client / 1-client requests/s ratio of each server is the batching figure (`clients_ratio`); the load
average at start and end is recorded, since the machine may be shared.

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
ONNX, ONNX_LOOP, TORCH = "onnxruntime-genai int4", "onnxruntime-genai int4, decode loop", "pytorch generate fp32"
ENGINES = (ONNX, ONNX_LOOP, TORCH)
LOOP_BATCH = 8  # PHI3LOCAL_MAX_BATCH of the decode-loop server
PROMPT = [{"role": "user", "content": "Summarize this dialog: Anna: hi! Ben: hello, how are you today?"}]
# Request i asks PROMPTS[i % 8]: prompts of different lengths, so that concurrent requests differ.
PROMPTS = [PROMPT] + [[{"role": "user", "content": text}] for text in (
    "Hi", "What is the capital of France?", "Summarize: the meeting moved to Tuesday at ten.",
    "Write a haiku about the sea, the wind and the rocks on a grey morning in late autumn.",
    "Anna: are we still on for lunch? Ben: yes, at noon. Anna: great, see you there. Summarize this dialog.",
    "List three colours.",
    "Translate to French: the weather is nice today and we are going to the park with the children after school.")]


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


def onnx_server(onnx_dir: Path, log: Path, threads: int, workers: int = 1, cap: int = 4000,
                max_batch: int | None = None) -> Server:
    """max_batch: the worker's decode loop (PHI3LOCAL_MAX_BATCH; 0: none); None: the server's default."""
    port = free_port()
    saved = os.environ.get("PHI3LOCAL_MAX_BATCH")
    if max_batch is not None:
        os.environ["PHI3LOCAL_MAX_BATCH"] = str(max_batch)  # the server process inherits it
    try:
        return Server(["phi3local.serve.server", str(onnx_dir), "--port", str(port), "--threads", str(threads),
                       "--workers", str(workers), "--max-tokens", str(cap)], log, port)
    finally:
        if saved is None:
            os.environ.pop("PHI3LOCAL_MAX_BATCH", None)
        else:
            os.environ["PHI3LOCAL_MAX_BATCH"] = saved


def torch_server(hf_dir: Path, log: Path, threads: int, cap: int = 4000) -> Server:
    port = free_port()
    return Server(["kernels_bench.serve_speed", "--serve-torch", str(hf_dir), "--port", str(port), "--threads",
                   str(threads), "--max-tokens", str(cap)], log, port)


def load(url: str, clients: int, n_requests: int, new_tokens: int) -> dict:
    """n_requests non-streamed greedy chat requests from `clients` keep-alive clients (request i asks
    PROMPTS[i % len(PROMPTS)]); latency, throughput, and the answers by prompt."""
    import requests

    local = threading.local()

    def one(i):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        k = i % len(PROMPTS)
        body = {"messages": PROMPTS[k], "max_tokens": new_tokens, "temperature": 0}
        t0 = time.perf_counter()
        r = local.session.post(url + "/score", json=body, timeout=600)
        seconds = time.perf_counter() - t0
        if r.status_code != 200:
            return r.status_code, seconds, 0, k, None
        answer = r.json()
        return r.status_code, seconds, answer["usage"]["completion_tokens"], k, answer["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: one request per client (sessions, first-run costs)
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
    latencies = [s for _, s, _, _, _ in results]
    tokens = sum(t for _, _, t, _, _ in results)
    answers: dict[int, set[str]] = {}
    for code, _, _, k, text in results:
        if code == 200:
            answers.setdefault(k, set()).add(text)
    return {"clients": clients, "requests": n_requests, "errors": sum(r[0] != 200 for r in results),
            "wall_s": wall, "requests_per_s": n_requests / wall, "tokens_per_s": tokens / wall,
            "completion_tokens_mean": tokens / n_requests, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "max_s": max(latencies), "latencies_s": latencies,
            "answers": {k: sorted(v) for k, v in sorted(answers.items())}}


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


# ---- why the batch does not pay here: two in-process measurements ------------------------------------------

def batched_decode_cost(onnx_dir: Path, new_tokens: int, batches=(1, 8), repeats: int = 4) -> list[dict]:
    """og.Generator greedy decode with batch_size B (one prompt repeated B times): median time of one decode
    step, and per sequence. A batched forward pays off only if a step of B rows costs less than B steps of 1."""
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    tokenizer = og.Tokenizer(model)
    ids = np.asarray(tokenizer.encode("<|user|>Summarize this dialog: Anna: hi! Ben: hello<|end|><|assistant|>"),
                     dtype=np.int32)
    out = []
    for batch in batches:
        steps = []
        for _ in range(repeats):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, batch_size=batch)
            generator = og.Generator(model, params)
            generator.append_tokens(np.tile(ids, (batch, 1)))
            generator.generate_next_token()  # the prefill
            for _ in range(new_tokens - 2):
                t0 = time.perf_counter()
                generator.generate_next_token()
                generator.get_next_tokens()
                steps.append(time.perf_counter() - t0)
            del generator
        step = float(np.median(steps))
        out.append({"batch_size": batch, "step_s": step, "per_sequence_s": step / batch})
    return out


def gil_held_during_decode(onnx_dir: Path, seconds: float = 1.0) -> dict:
    """Progress of a pure-Python spinning thread while this thread decodes (og.Generator, greedy), against
    its progress alone: near 50% on 2 cores means the decode holds the GIL (a thread cannot run beside it)."""
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    ids = np.asarray(og.Tokenizer(model).encode("<|user|>Hello there<|end|><|assistant|>"), dtype=np.int32)

    def spin_for(stop: threading.Event, counter: list[int]) -> None:
        while not stop.is_set():
            counter[0] += 1

    def spinner_rate(busy: bool) -> float:
        stop, counter = threading.Event(), [0]
        thread = threading.Thread(target=spin_for, args=(stop, counter))
        t0 = time.perf_counter()
        thread.start()
        if busy:
            while time.perf_counter() - t0 < seconds:
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=len(ids) + 64, do_sample=False)
                generator = og.Generator(model, params)
                generator.append_tokens(ids)
                while not generator.is_done():
                    generator.generate_next_token()
                del generator
        else:
            time.sleep(seconds)
        stop.set()
        thread.join()
        return counter[0] / (time.perf_counter() - t0)

    alone, beside = spinner_rate(False), spinner_rate(True)
    return {"spinner_alone_per_s": alone, "spinner_beside_decode_per_s": beside, "fraction": beside / alone}


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
    p.add_argument("--requests", type=_ints, default=[24, 64], help="requests per client count, comma-separated")
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
    load_at_start = list(os.getloadavg())  # a shared machine: the figures are only as quiet as it was
    rows, liveness, memory = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = build_model(tmp / "hf", args.hidden, args.layers, args.heads, args.intermediate)
        export = export_onnx(hf_dir, tmp / "int4", precision="int4", target="cpu", parity="none", show=False)
        cap = max(args.new_tokens, args.stream_tokens)
        batch_cost = batched_decode_cost(tmp / "int4", args.new_tokens)
        gil = gil_held_during_decode(tmp / "int4")
        servers = {ONNX: onnx_server(tmp / "int4", tmp / "onnx.log", args.threads, cap=cap),
                   ONNX_LOOP: onnx_server(tmp / "int4", tmp / "loop.log", args.threads, cap=cap, max_batch=LOOP_BATCH),
                   TORCH: torch_server(hf_dir, tmp / "torch.log", args.threads, cap=cap)}
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
                             **liveness_during_stream(servers[ONNX].url, args.stream_tokens)})
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

    load_at_end = list(os.getloadavg())
    by = {(r["engine"], r["clients"]): r for r in rows}
    summary = {"load_average_at_start": load_at_start, "load_average_at_end": load_at_end}
    few, many = min(args.clients), max(args.clients)
    summary["clients_ratio"] = {engine: {
        "clients": [few, many], "requests_per_s": [by[(engine, few)]["requests_per_s"], by[(engine, many)]["requests_per_s"]],
        "ratio": by[(engine, many)]["requests_per_s"] / by[(engine, few)]["requests_per_s"]} for engine in ENGINES}
    summary["greedy_identical"] = greedy_identity(rows, few)
    summary["batched_decode_cost"] = batch_cost
    summary["gil_held_during_decode"] = gil
    for clients in args.clients:
        onnx, torch_row = by[(ONNX, clients)], by[(TORCH, clients)]
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
    summary["decode_loop_effect"] = {f"clients_{c}": by[(ONNX_LOOP, c)]["requests_per_s"] / by[(ONNX, c)]["requests_per_s"]
                                     for c in args.clients}
    config = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("serve_torch", "port", "max_tokens")}
    config["int4_size_bytes"] = export.get("size_bytes")
    notes = ["All servers: azmlinfsrv, 1 worker x `threads` threads, phi3local.serve's protocol/service; greedy, "
             "non-streamed, max_tokens = new_tokens; a random model, so completion_tokens_mean shows whether the "
             "whole budget was generated.",
             f"{ONNX}: the server's default, each request thread runs its own Generator; {ONNX_LOOP}: "
             f"PHI3LOCAL_MAX_BATCH={LOOP_BATCH}, the worker's decode loop (phi3local.serve.batching). "
             "decode_loop_effect: the loop server's requests/s over the default's.",
             "clients_ratio: requests/s with the most clients over requests/s with the fewest, same server, same "
             "run; measured under the load average recorded at start and end (the machine may be shared).",
             "greedy_identical: each prompt's answers in every row equal that server's one-client answer, and the "
             "two ONNX servers' answers agree.",
             "batched_decode_cost: og.Generator greedy decode step time with batch_size 1 and 8, in this process "
             "(no server running); per_sequence_s equal across batch sizes = a batched forward saves nothing.",
             "gil_held_during_decode: a pure-Python thread's speed beside an og.Generator decode over its speed "
             "alone (~0.5 on 2 cores: the decode holds the GIL, so a worker's threads take turns).",
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
    for engine, r in summary["clients_ratio"].items():
        console.print(f"{engine}: {many} clients {fmt_ratio(r['ratio'])} the requests/s of {few} "
                      f"({r['requests_per_s'][1]:.1f} vs {r['requests_per_s'][0]:.1f})")
    for b in batch_cost:
        console.print(f"og.Generator batch {b['batch_size']}: decode step {b['step_s'] * 1e3:.2f} ms, "
                      f"{b['per_sequence_s'] * 1e3:.3f} ms per sequence")
    console.print(f"a Python thread beside an og.Generator decode runs at {gil['fraction']:.0%} of its speed alone")
    console.print(f"greedy outputs unchanged by concurrency: {summary['greedy_identical']}; load average "
                  f"{load_at_start[0]:.2f} at start, {load_at_end[0]:.2f} at end")
    print_table("liveness (GET /) during a long stream, ONNX int4 server", summary["liveness"],
                [Column("workers", "workers"), Column("threads", "threads"), Column("stream_s", "stream", fmt_seconds),
                 Column("probes", "probes"), Column("liveness_median_s", "median", fmt_seconds),
                 Column("liveness_max_s", "max", fmt_seconds)], console=console)
    print_table("worker memory", [{"engine": m["engine"], "workers": m["workers"],
                                   "rss": ", ".join(fmt_bytes(b) for b in m["worker_rss_bytes"])} for m in memory],
                [Column("engine", "engine", justify="left"), Column("workers", "workers"),
                 Column("rss", "RSS per worker", justify="left")], console=console)
    console.print(f"results: {path}")
    onnx_identical = all(v for k, v in summary["greedy_identical"].items() if k != TORCH)
    return 0 if summary["errors"] == 0 and onnx_identical else 1


def greedy_identity(rows: list[dict], few: int) -> dict[str, bool]:
    """Per server: every answer to a prompt, in every row, is the one its one-client row gave; and the ONNX
    servers with and without the decode loop give the same answers."""
    base = {r["engine"]: r["answers"] for r in rows if r["clients"] == few}
    out = {}
    for engine, answers in base.items():
        out[engine] = all(len(texts) == 1 for texts in answers.values()) and all(
            texts == answers.get(k) for r in rows if r["engine"] == engine for k, texts in r["answers"].items())
    out["onnx_loop_equals_default"] = base.get(ONNX) == base.get(ONNX_LOOP)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
