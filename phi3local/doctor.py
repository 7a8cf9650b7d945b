"""`phi3local doctor`: what this machine has, what each stage will choose on it, and how to fix what is missing.

Every check is a `Finding` (what was looked at, what was found, whether it is fine, and the command that
fixes it). The choices are made by the same functions the stages call (`model.load.pick_*`), so what
doctor says is what `train` will do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Finding:
    topic: str
    found: str
    ok: bool = True
    fix: str | None = None  # the command (or setting) that fixes it, when not ok


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(dist: str, topic: str, fix: str, what: str = "") -> Finding:
    v = _version(dist)
    return Finding(topic, f"{dist} {v}{what}" if v else "not installed", v is not None, None if v else fix)


def hardware() -> list[Finding]:
    import torch

    found = [Finding("python", sys.version.split()[0]), Finding("torch", f"{torch.__version__} (CUDA build "
                                                                          f"{torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        fix = ("install the NVIDIA driver, then `make install` (it picks the CUDA torch when nvidia-smi works)"
               if shutil.which("nvidia-smi") else None)
        found.append(Finding("GPU", "none visible to torch: training runs on the CPU (fine for tiny models)",
                             ok=fix is None, fix=fix))
        return found
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        found.append(Finding(f"GPU {i}", f"{props.name}, compute capability {props.major}.{props.minor}, "
                                         f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
    found.append(Finding("bf16", "supported" if torch.cuda.is_bf16_supported() else "not supported: fp16 is used"))
    return found


def choices() -> list[Finding]:
    """What train and export will pick here with the recipe's `auto` settings."""
    import torch

    from phi3local.model.load import pick_attn_implementation, pick_compute_dtype, pick_device

    device = pick_device()
    dtype = pick_compute_dtype("auto", device)
    attn = pick_attn_implementation("auto", device, dtype)
    out = [Finding("train: device", str(device)), Finding("train: compute dtype", str(dtype).removeprefix("torch.")),
           Finding("train: attention", attn),
           Finding("train: optimizer", "paged_adamw_8bit (bitsandbytes)" if device.type == "cuda" else "adamw (torch)")]
    if device.type == "cuda" and attn != "flash_attention_2":
        out[-2] = Finding("train: attention", f"{attn} (flash-attention 2 would be faster)", ok=False,
                          fix="pip install 'phi3local[cuda]' (needs compute capability >= 8.0)")
    bnb = _version("bitsandbytes")
    if bnb:
        backend = "CUDA" if device.type == "cuda" else "CPU"
        out.append(Finding("4-bit (bitsandbytes)", f"{bnb}, NF4 on the {backend}"))
    else:
        out.append(Finding("4-bit (bitsandbytes)", "not installed", False, "make install"))
    if torch.cuda.is_available():
        out.append(Finding("export: target", "cuda (int4/fp16/bf16) or cpu"))
    else:
        out.append(Finding("export: target", "cpu (int4 or fp32; a cuda export builds here but runs on a GPU)"))
    return out


def runtimes() -> list[Finding]:
    out = []
    og = _version("onnxruntime-genai") or _version("onnxruntime-genai-cuda")
    if og is None:
        out.append(Finding("onnxruntime-genai", "not installed: export, chat and serve need it", False,
                           "pip install 'phi3local[export]'"))
    else:
        import onnxruntime_genai

        cuda = getattr(onnxruntime_genai, "is_cuda_available", lambda: False)()
        out.append(Finding("onnxruntime-genai", f"{og}, {'CUDA' if cuda else 'CPU'} build"))
    out.append(_installed("azureml-inference-server-http", "serve extra", "pip install 'phi3local[serve]'",
                          " (azmlinfsrv)"))
    azure = _version("azure-ai-ml")
    if azure:
        out.append(Finding("azure extra", f"azure-ai-ml {azure}"))
    else:
        venv = REPO / ".venv-azure" / "bin" / "phi3local"
        where = f"; `{venv} azure ...` has it" if venv.exists() else ""
        out.append(Finding("azure extra", f"not in this environment{where}", bool(where),
                           None if where else "make install-azure (a venv of its own: it clashes with serve)"))
    node = shutil.which("node")
    if node:
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        has_azurite = (REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob").exists()
        out.append(Finding("Node (Azurite, tests)", f"{version}; Azurite {'' if has_azurite else 'not '}installed",
                           has_azurite, None if has_azurite else "make azurite"))
    else:
        out.append(Finding("Node (Azurite, tests)", "not found (only the Azure upload tests need it)", True))
    return out


def diagnose() -> list[Finding]:
    return hardware() + choices() + runtimes()


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def table(findings: list[Finding]):
    from rich.table import Table

    t = Table(title="phi3local doctor", title_justify="left", show_header=False, box=None, padding=(0, 1))
    t.add_column(no_wrap=True)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column(overflow="fold")
    for f in findings:
        mark = "[green]ok[/]" if f.ok else "[yellow]!![/]"
        t.add_row(mark, f.topic, f.found + (f"\n[dim]fix:[/] {f.fix}" if f.fix else ""))
    return t
