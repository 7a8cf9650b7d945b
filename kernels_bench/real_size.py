"""Real size: Phi-3-mini and Phi-4-mini (3.8B) end to end on this machine, through the CLI a user runs, against TRL.

    make bench-real-size                                   # both members, every stage
    python -m kernels_bench.real_size --models phi4-mini --stages plan,train,trl

Per member (`kernels_bench.real_models`: the real shapes, seeded random bf16 weights written once):
  plan    `phi3local plan RECIPE --device cpu --json`: the planned peak of the run's settings
  train   `phi3local train RECIPE` (NF4 QLoRA, packing and checkpointing on) as a subprocess: its peak RSS
          (wait4), load time (start to its "trainable parameters" line), trained tokens/s over the timed steps
  trl     TRL's SFTTrainer + peft on the same 4-bit model, prepared tokens, LoRA, steps, packing and checkpointing,
          LoRA weights kept fp32 (kernels_bench.train_e2e's trl_packed_fp32_gc), in a process of its own
  merge   `phi3local merge RUN --out MERGED --json` (its own check: merged logits against base + adapter)
  export  `phi3local export MERGED --precision int4 --target cpu --json` (time, peak RSS, size, parity report)
  chat    `phi3local chat ONNX --prompt ...` (one answer) and serve (`phi3local serve`, one /score request)
The order of phi3local and TRL alternates between members (the first member trains phi3local first). Every
figure goes to kernels_bench/results/real_size.json as soon as it is measured, so a stage that fails or does not
fit leaves the ones before it and says what failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kernels_bench.common import CHAT_DATA, RESULTS_DIR, WORK_DIR, repo_relative, write_results
from kernels_bench.memory import ProcessMemorySampler
from kernels_bench.real_models import MEMBERS, ensure_real_model, tokenizer_of

NAME = "real_size"
STAGES = ("plan", "train", "trl", "merge", "export", "chat")
TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# The run's settings: a few steps of one packed row each, what 2 cores can do at 3.8B in minutes per contender.
SETTINGS = {"max_seq_len": 512, "micro_batch_size": 1, "steps": 3, "skip": 1, "lora_r": 16, "lora_alpha": 32,
            "lr": 2e-4, "seed": 0, "eval_batches": 2}
PHI3LOCAL = [sys.executable, "-m", "phi3local"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Bench:
    """One member's runs: where they go and their settings (`SETTINGS`, plus `device` and `attn` for a GPU).
    model/tokenizer: another model folder than the member's real-size build (the smoke test's tiny model)."""

    member: str
    folder: Path
    s: dict
    model: Path | None = None
    tokenizer_folder: Path | None = None

    @property
    def device(self) -> str:
        return self.s.get("device", "cpu")

    @property
    def model_dir(self) -> Path:
        return self.model or ensure_real_model(self.member, device=self.device)

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_folder or tokenizer_of(self.member, device=self.device)


def work(member: str) -> Path:
    return WORK_DIR / "real_size" / member


def write_recipe(b: Bench) -> Path:
    """The recipe a user would write for this run (absolute paths), next to the run."""
    import yaml

    s = b.s
    recipe = {
        "task": "causal_lm", "output_dir": str(b.folder / "run"), "seed": s["seed"],
        "model": {"name_or_path": str(b.model_dir), "tokenizer": str(b.tokenizer),
                  "attn_implementation": s.get("attn", "auto")},
        "data": {"train_file": str(CHAT_DATA / "train.jsonl"), "validation_file": str(CHAT_DATA / "validation.jsonl"),
                 "max_seq_len": s["max_seq_len"], "packing": True, "on_error": "skip"},
        "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": 0.0, "target_modules": TARGET_MODULES},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True},
        "training": {"lr": s["lr"], "warmup_steps": 0, "max_steps": s["steps"], "micro_batch_size": s["micro_batch_size"],
                     "grad_accum": 1, "gradient_checkpointing": True, "log_every": 1, "checkpoint_every": 0,
                     "display": "plain"},
        "eval": {"every": 0, "max_batches": s["eval_batches"], "generate_samples": 0},
        "export": {"precision": "int4", "target": b.device},
    }
    path = b.folder / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------- measuring a command

def _reset_peak_rss() -> None:
    """Linux hands a forked child its parent's peak RSS, and wait4 reports it: after building a 3.8B model here the
    plan's 250 MB read 8.3 GB. Resetting this process's peak (clear_refs 5) before each command leaves each figure
    the command's own above a floor of this process's RSS when it starts the command (~0.3-0.4 GB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_command(args: list[str], log: Path, marker: str | None = None, timeout: float = 7200) -> dict:
    """Run a phi3local command as a user would (a subprocess from a folder outside the checkout), with its output
    in `log`: wall seconds, peak RSS (wait4: the process and the children it waited for), exit status, and the
    seconds until the first output line containing `marker`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV}
    _reset_peak_rss()
    started = time.perf_counter()
    marker_s = None
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=log.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        sampler = ProcessMemorySampler(proc.pid).__enter__()
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if marker and marker_s is None and marker in line:
                marker_s = time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                proc.kill()
        sampler.__exit__()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(str(a) for a in args), "exit": proc.returncode,
            "wall_s": time.perf_counter() - started, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_anon_bytes": sampler.peak_anon,
            "marker_s": marker_s, "log": repo_relative(log), "output_tail": log.read_text()[-1500:]}


def last_json(text: str):
    """The JSON document a `--json` command printed last (its output may start with progress lines)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    return json.loads(text[start:]) if start >= 0 else None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- stages

# The commands each stage runs, as a user types them (also printed by `gpu_check --dry-run`).
def plan_args(b: Bench, recipe: Path) -> list[str]:
    card = ["--device-memory", f"{b.s['device_memory_gib']}GB"] if b.s.get("device_memory_gib") else []
    return PHI3LOCAL + ["plan", str(recipe), "--device", b.device, *card, "--json"]


def train_args(recipe: Path) -> list[str]:
    return PHI3LOCAL + ["train", str(recipe), "--overwrite"]


def merge_args(b: Bench) -> list[str]:
    return PHI3LOCAL + ["merge", str(b.folder / "run"), "--out", str(b.folder / "merged"), "--overwrite", "--json"]


def export_args(b: Bench, precision: str = "int4") -> list[str]:
    return PHI3LOCAL + ["export", str(b.folder / "merged"), "--out", str(b.folder / f"onnx-{precision}"), "--precision",
                        precision, "--target", b.device, "--overwrite", "--json"]


def stage_plan(b: Bench, recipe: Path) -> dict:
    result = run_command(plan_args(b, recipe), b.folder / "plan.log")
    plans = last_json((b.folder / "plan.log").read_text())
    plan = plans[0]["plan"]
    return {**result, "planned_peak_bytes": plan["total"], "plan": plan}


def stage_train(b: Bench, recipe: Path) -> dict:
    s, run_dir = b.s, b.folder / "run"
    result = run_command(train_args(recipe), b.folder / "train.log", marker="trainable parameters")
    if result["exit"] != 0:
        return result
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r]
    trained = [b["trained_tokens"] - a["trained_tokens"] for a, b in zip([{"trained_tokens": 0}] + steps, steps)]
    timed = slice(s["skip"], None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**result, "load_s": result["marker_s"], "step_seconds": [r["step_seconds"] for r in steps],
            "step_peak_memory_bytes": [r.get("peak_memory_bytes") for r in steps],
            "step_trained_tokens": trained, "train_loss": [r["loss"] for r in steps],
            "trained_tokens_per_s": sum(trained[timed]) / sum(r["step_seconds"] for r in steps[timed]),
            "run_summary": {k: summary.get(k) for k in ("steps", "trained_tokens", "seconds", "tokens_per_second",
                                                        "peak_memory_bytes", "peak_rss_bytes", "final")}}


def child_trl(model_dir: str, tokenizer: str, prepared: str, run_dir: str, s: dict, packing: bool = True,
              unsloth: bool = False) -> dict:
    """TRL SFTTrainer + peft on the same 4-bit model and prepared tokens, checkpointing on. CPU: fp32 compute and
    LoRA weights kept fp32 (kernels_bench.train_e2e's trl_packed_fp32_gc); CUDA: bf16, paged 8-bit AdamW (phi3local's
    CUDA default); unsloth: Unsloth's FastLanguageModel loads and wraps the model, trained by the same SFTTrainer."""
    if unsloth:
        import unsloth as _unsloth  # noqa: F401  (first: it patches transformers, peft and trl as it imports)
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from kernels_bench.train_e2e import load_4bit_for_trl, step_clock
    from phi3local.data.prepare import load_prepared
    from phi3local.model.tokenizer import load_tokenizer

    cuda = s.get("device", "cpu") == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    began = time.perf_counter()
    memory = ProcessMemorySampler().__enter__()
    torch.manual_seed(s["seed"])
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                             target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    if unsloth:
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=s["max_seq_len"],
                                                     dtype=dtype, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=TARGET_MODULES, bias="none",
                                                 use_gradient_checkpointing="unsloth", random_state=s["seed"])
        peft_config = None
    else:
        model = load_4bit_for_trl(Path(model_dir), torch.device("cuda" if cuda else "cpu"), s.get("attn", "sdpa"))
    load_s = time.perf_counter() - began
    train_ds, _ = load_prepared(Path(prepared))
    train_ds = train_ds.select_columns(["input_ids", "labels"])
    step_tokens: list[int] = []
    clock = step_clock(torch.device("cuda" if cuda else "cpu"))

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                step_tokens.append(int((inputs["labels"][..., 1:] != -100).sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    args = SFTConfig(
        output_dir=run_dir, max_steps=s["steps"], per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=1, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="paged_adamw_8bit" if cuda else "adamw_torch",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=s["max_seq_len"], packing=packing, seed=s["seed"], data_seed=s["seed"], logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not cuda, bf16=cuda, fp16=False)
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=train_ds,
                                 processing_class=load_tokenizer(tokenizer), peft_config=peft_config,
                                 callbacks=[clock])
    if not cuda:  # SFTTrainer casts LoRA weights to bf16 for 4-bit models; fp32 is faster on a CPU without bf16 units
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    memory.__exit__()
    timed, step_seconds = slice(s["skip"], None), clock.step_seconds
    return {"load_s": load_s, "peak_anon_bytes": memory.peak_anon, "step_seconds": step_seconds,
            "step_trained_tokens": step_tokens, "packing": packing,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "trained_tokens_per_s": sum(step_tokens[timed]) / sum(step_seconds[timed])}


def stage_trl(b: Bench, packing: bool = True, unsloth: bool = False, name: str = "trl") -> dict:
    from kernels_bench.isolate import run_isolated

    kwargs = {"model_dir": str(b.model_dir), "tokenizer": str(b.tokenizer), "prepared": str(b.folder / "run" / "prepared"),
              "run_dir": str(b.folder / name), "s": b.s, "packing": packing, "unsloth": unsloth}
    began = time.perf_counter()
    result = run_isolated("kernels_bench.real_size:child_trl", kwargs, timeout=7200, env=ENV)
    return {**result, "wall_s": time.perf_counter() - began}


def stage_merge(b: Bench) -> dict:
    out = b.folder / "merged"
    result = run_command(merge_args(b), b.folder / "merge.log")
    if result["exit"] == 0:
        result["report"] = json.loads((out / "merge_report.json").read_text())
        result["size_bytes"] = folder_bytes(out)
    return result


def stage_export(b: Bench, precision: str = "int4") -> dict:
    out = b.folder / f"onnx-{precision}"
    result = run_command(export_args(b, precision), b.folder / f"export-{precision}.log")
    if result["exit"] == 0:
        result["report"] = json.loads((out / "export_report.json").read_text())
        result["size_bytes"] = folder_bytes(out)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_chat(b: Bench) -> dict:
    onnx = b.folder / "onnx-int4"
    chat = run_command(PHI3LOCAL + ["chat", str(onnx), "--prompt", "What is the capital of France?",
                                    "--max-new-tokens", "16"], b.folder / "chat.log")
    port = free_port()
    log = (b.folder / "serve.log").open("w")
    server = subprocess.Popen(PHI3LOCAL + ["serve", str(onnx), "--port", str(port)], cwd=b.folder,
                              env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    served: dict = {}
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 16}).encode()
        deadline = time.time() + 600
        while time.time() < deadline and server.poll() is None:
            try:
                began = time.perf_counter()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as resp:
                    served = {"status": resp.status, "seconds": time.perf_counter() - began,
                              "answer": json.loads(resp.read())}
                break
            except OSError:
                time.sleep(2)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    return {"chat": chat,
            "serve": served or {"error": "no answer", "log_tail": (b.folder / "serve.log").read_text()[-1500:]}}


# --------------------------------------------------------------------------------------------- driver

def save(results: dict) -> Path:
    return write_results(RESULTS_DIR / f"{NAME}.json", results)


def summarise(entry: dict) -> dict:
    """The ratios and errors the issue asks for, from what was measured."""
    out: dict = {}
    train, trl, plan = entry.get("train", {}), entry.get("trl", {}), entry.get("plan", {})
    if train.get("trained_tokens_per_s") and trl.get("trained_tokens_per_s"):
        out["tokens_per_s_ratio_vs_trl"] = train["trained_tokens_per_s"] / trl["trained_tokens_per_s"]
        out["peak_rss_ratio_vs_trl"] = train["peak_rss_bytes"] / trl["peak_rss_bytes"]
        if train.get("peak_anon_bytes") and trl.get("peak_anon_bytes"):
            out["peak_anon_ratio_vs_trl"] = train["peak_anon_bytes"] / trl["peak_anon_bytes"]
    if plan.get("planned_peak_bytes") and train.get("peak_rss_bytes"):
        # On CPU the plan counts the step's tensors; the process's RSS adds Python, torch and the libraries.
        out["plan_error_vs_peak_rss"] = plan["planned_peak_bytes"] / train["peak_rss_bytes"] - 1
        if train.get("peak_anon_bytes"):
            out["plan_error_vs_peak_anon"] = plan["planned_peak_bytes"] / train["peak_anon_bytes"] - 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels_bench.real_size", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MEMBERS), help="comma-separated: " + ", ".join(MEMBERS))
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--max-seq-len", type=int, default=SETTINGS["max_seq_len"])
    args = parser.parse_args(argv)
    s = {**SETTINGS, "steps": args.steps, "max_seq_len": args.max_seq_len}
    stages = [x for x in args.stages.split(",") if x]
    path = RESULTS_DIR / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"name": NAME, "machine": machine(), "settings": s})
    results.setdefault("models", {})
    for i, member in enumerate(args.models.split(",")):
        began = time.perf_counter()
        b = Bench(member, work(member), s)
        entry = results["models"].setdefault(member, {})
        entry["model"] = {**json.loads((b.model_dir / "real_model.json").read_text()),
                          "build_s": time.perf_counter() - began}
        recipe = write_recipe(b)
        order = ["train", "trl"] if i % 2 == 0 else ["trl", "train"]
        for stage in [x for x in ("plan", *order, "merge", "export", "chat") if x in stages]:
            if stage == "trl" and not (b.folder / "run" / "prepared").is_dir():
                stage_train_prepare_only(b, recipe)
            print(f"[real_size] {member}: {stage} ...", flush=True)
            began = time.perf_counter()
            entry[stage] = run_stage(stage, b, recipe)
            entry[stage]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            entry["summary"] = summarise(entry)
            save(results)
            print(f"[real_size] {member}: {stage} done in {time.perf_counter() - began:.0f} s: "
                  f"{brief(entry[stage])}", flush=True)
    print(json.dumps({m: e.get("summary") for m, e in results["models"].items()}, indent=2))
    return 0


def run_stage(stage: str, b: Bench, recipe: Path) -> dict:
    if stage in ("plan", "train"):
        return {"plan": stage_plan, "train": stage_train}[stage](b, recipe)
    return {"trl": stage_trl, "merge": stage_merge, "export": stage_export, "chat": stage_chat}[stage](b)


def stage_train_prepare_only(b: Bench, recipe: Path) -> None:
    """TRL reads the tokens phi3local's prepare stage wrote: make them when TRL goes first."""
    run_command(PHI3LOCAL + ["prepare", str(recipe)], b.folder / "prepare.log")


def brief(result: dict) -> str:
    keys = ("exit", "wall_s", "peak_rss_bytes", "load_s", "trained_tokens_per_s", "planned_peak_bytes", "size_bytes")
    return ", ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result[k]}"
                     for k in keys if result.get(k) is not None)


def machine() -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()), "disk_free_bytes": shutil.disk_usage(WORK_DIR).free
            if WORK_DIR.exists() else None}


if __name__ == "__main__":
    sys.exit(main())
