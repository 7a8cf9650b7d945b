"""Merge a LoRA adapter into its base model and save a plain Hugging Face folder.

The base is reloaded *unquantised* in the chosen dtype (the adapter was trained on NF4 weights, but
merging into 4-bit weights would round the LoRA update away and leave a model no other tool can load).
The merge is verified: logits of base+adapter (peft, unmerged) and of the merged model are compared on a
few prompts and the merge fails loudly when they differ by more than the tolerance for the dtype.

Output folder (written to a temporary name, renamed when complete):
    config.json, model.safetensors (or shards), generation_config.json (every stop id),
    tokenizer.json, tokenizer_config.json (with chat_template), merge_report.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from phi3local.errors import Phi3LocalError
from phi3local.export.tokenizer_files import copy_tokenizer_files, find_tokenizer_dir, load_hf_tokenizer
from phi3local.folders import check_output_dir, dir_size, staged
from phi3local.model.pretrained import from_pretrained
from phi3local.model.tokenizer import collect_stop_ids
from phi3local.serve.json_files import as_id_list, read_json, write_json
from phi3local.versions import export_versions

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Default tolerance of the merge check, as a fraction of the logit scale (max |logit| of base+adapter).
# fp32: merged and unmerged differ only by float32 rounding order (measured ~1e-7 relative).
# 16-bit: the merged weight W + s·BA is rounded once to 8 (bf16) or 11 (fp16) mantissa bits, where the
# unmerged model rounds W·x and s·B(A·x) separately; measured on tiny models ~1e-3 (fp16), ~1e-2 (bf16).
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

DEFAULT_PROMPTS = (
    "Hello! Who are you?",
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
)


class MergeError(Phi3LocalError, RuntimeError):
    """The adapter cannot be merged as asked; the message says why."""


class MergeVerificationError(MergeError):
    """The merged model's logits differ from base+adapter by more than the tolerance."""


def resolve_adapter_dir(run_or_adapter: Path) -> Path:
    """`<run>` (uses `<run>/adapter`) or the adapter folder itself."""
    p = Path(run_or_adapter)
    if not p.is_dir():
        raise MergeError(f"{p}: no such folder (give a run folder or its adapter/)")
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    raise MergeError(f"{p} is neither a peft adapter folder nor a run folder with adapter/ (no adapter_config.json)")


def resolve_base(name_or_path: str, adapter_dir: Path) -> str:
    """The base model folder named in adapter_config.json (a path, an embedded alias, or a Hub id)."""
    if not name_or_path:
        raise MergeError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path")
    if Path(name_or_path).is_dir():
        return name_or_path
    if (adapter_dir / name_or_path).is_dir():  # a path relative to the adapter folder
        return str(adapter_dir / name_or_path)
    try:
        from phi3local.model.load import EMBEDDED_MODELS, resolve_model_path
    except ImportError:
        return name_or_path
    if name_or_path in EMBEDDED_MODELS:
        return resolve_model_path(name_or_path)
    return name_or_path  # a Hub id: transformers finds it in the local cache or downloads it


def _read_labels(adapter_dir: Path) -> list[str] | None:
    """Label names the training stage recorded in `<run>/recipe.yaml` (model.labels)."""
    for folder in (adapter_dir, adapter_dir.parent):
        recipe = folder / "recipe.yaml"
        if recipe.is_file():
            import yaml

            data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
            labels = (data.get("model") or {}).get("labels")
            if labels:
                return [str(x) for x in labels]
    return None


def _num_labels_from_adapter(adapter_dir: Path) -> int | None:
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            parts = key.split(".")
            if "score" in parts and key.endswith("weight"):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _load_base(base: str, task: str, dtype: torch.dtype, adapter_dir: Path, tokenizer, revision: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    # The Hub commit training used (adapter_config.json "revision", from model.revision); a folder has none.
    pinned = {"revision": revision} if revision and not Path(base).is_dir() else {}
    config = AutoConfig.from_pretrained(base, **pinned)
    if getattr(config, "quantization_config", None):
        raise MergeError(
            f"the base model {base} is a quantized checkpoint ({config.quantization_config}); merging needs "
            "the unquantised base weights (point base_model_name_or_path at the original model)"
        )
    kwargs = {"dtype": dtype, **pinned}
    if task == "SEQ_CLS":
        labels = _read_labels(adapter_dir)
        n = _num_labels_from_adapter(adapter_dir) or (len(labels) if labels else None)
        if n is None:
            raise MergeError("cannot tell the number of labels: the adapter has no `score` weights and no recipe.yaml")
        if labels is None or len(labels) != n:
            labels = [f"LABEL_{i}" for i in range(n)]
        model = from_pretrained(AutoModelForSequenceClassification, base, config_kwargs={
            "num_labels": n, "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}},
            **kwargs)
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    elif task in ("CAUSAL_LM", None, ""):
        model = from_pretrained(AutoModelForCausalLM, base, **kwargs)
    else:
        raise MergeError(f"adapter task_type {task!r} is not supported (CAUSAL_LM or SEQ_CLS)")
    return model.eval()


def _prompt_ids(tokenizer, prompts) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        text = p
        if getattr(tokenizer, "chat_template", None):
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


@torch.no_grad()
def _logits(model, batches, device) -> list[torch.Tensor]:
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batches]


def _merge(peft_model):
    """peft's merge_and_unload (a seam the tests use to simulate a faulty merge)."""
    return peft_model.merge_and_unload()


def merge_adapter(
    run_or_adapter: Path,
    out_dir: Path,
    dtype: str = "float32",
    verify_tolerance: float | None = None,
    *,
    overwrite: bool = False,
    prompts=None,
    device: str = "cpu",
) -> dict:
    """Merge the LoRA adapter of a run into its unquantised base and save an HF folder at out_dir.

    run_or_adapter: the run folder (its adapter/ is used) or the adapter folder.
    dtype: float32 | bfloat16 | float16 (also fp32/bf16/fp16): the dtype of the reloaded base and the output.
    verify_tolerance: the largest accepted max |logit difference| between base+adapter and merged, as a
        fraction of the logit scale (max |logit| of base+adapter); default 1e-4 for float32, 1e-2 for
        float16, 5e-2 for bfloat16. Over it, MergeVerificationError is raised and nothing is written.
    overwrite: replace a non-empty out_dir (otherwise OutputExistsError).
    prompts: texts (or message lists) to compare logits on; rendered with the chat template when there is one.
    Returns the report also written to out_dir/merge_report.json.
    """

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "merge", overwrite)
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    adapter_dir = resolve_adapter_dir(run_or_adapter)
    adapter_cfg = read_json(adapter_dir / "adapter_config.json")
    task = adapter_cfg.get("task_type") or "CAUSAL_LM"
    base = resolve_base(adapter_cfg.get("base_model_name_or_path"), adapter_dir)
    tok_dir = find_tokenizer_dir(adapter_dir, Path(base) if Path(base).is_dir() else None)
    if tok_dir is None:
        raise MergeError(f"no tokenizer.json in {adapter_dir} or the base folder {base}")
    tokenizer = load_hf_tokenizer(tok_dir)

    log.info("merging %s into %s (%s, %s)", adapter_dir, base, task, dtype)
    model = _load_base(base, task, torch_dtype, adapter_dir, tokenizer, adapter_cfg.get("revision")).to(device)
    from phi3local.model.load import load_adapter

    peft_model = load_adapter(model, adapter_dir, MergeError).eval()
    merged_model, check = merge_and_verify(peft_model, _prompt_ids(tokenizer, list(prompts or DEFAULT_PROMPTS)),
                                           device, torch_dtype, verify_tolerance, out_dir)
    report = {"adapter_dir": str(adapter_dir), "base_model": base, "task_type": task,
              "dtype": str(torch_dtype).removeprefix("torch."), "device": str(device), **check}
    write_merged(merged_model, out_dir, overwrite, report, adapter_dir, base, tok_dir, task, t0)
    log.info("merged model saved to %s (max |diff| %.3g, %.3g x logit scale)", out_dir, report["max_abs_diff"],
             report["relative_diff"])
    return report


def merge_and_verify(peft_model, batches: list, device: str, torch_dtype, verify_tolerance: float | None,
                     out_dir: Path):
    """Merge the adapter into the base weights and compare the merged model's logits with base+adapter's on
    `batches`: (merged model, the report's check fields); MergeVerificationError over the tolerance."""
    unmerged = _logits(peft_model, batches, device)
    with peft_model.disable_adapter():
        base_only = _logits(peft_model, batches, device)
    merged_model = _merge(peft_model).eval()
    merged = _logits(merged_model, batches, device)

    per_prompt = [float((a - b).abs().max()) for a, b in zip(unmerged, merged)]
    max_diff = max(per_prompt)
    scale = max(float(a.abs().max()) for a in unmerged)
    tol_rel = DEFAULT_TOLERANCE[torch_dtype] if verify_tolerance is None else float(verify_tolerance)
    tol_abs = tol_rel * scale
    adapter_effect = max(float((a - b).abs().max()) for a, b in zip(unmerged, base_only))
    check = {
        "prompts": len(batches),
        "max_abs_diff": max_diff,
        "max_abs_diff_per_prompt": per_prompt,
        "logit_scale": scale,
        "relative_diff": max_diff / scale if scale else 0.0,
        "tolerance_relative": tol_rel,
        "tolerance_abs": tol_abs,
        "passed": max_diff <= tol_abs,
        # How much the adapter changes the logits; 0 means the adapter is a no-op (e.g. zero-initialised B).
        "adapter_effect_max_abs": adapter_effect,
    }
    if not check["passed"]:
        raise MergeVerificationError(
            f"merged model differs from base+adapter by {max_diff:.3g} (max |logit diff| over "
            f"{len(batches)} prompts), over the tolerance {tol_abs:.3g} = {tol_rel:g} x logit scale {scale:.3g} "
            f"for {str(torch_dtype).removeprefix('torch.')}; nothing was written to {out_dir}"
        )
    if adapter_effect == 0.0:
        log.warning("the adapter does not change the logits at all (untrained or zero-initialised LoRA B)")
    return merged_model, check


def write_merged(merged_model, out_dir: Path, overwrite: bool, report: dict, adapter_dir: Path, base: str,
                 tok_dir: Path, task: str, started: float) -> None:
    """The merged folder, whole or not at all: weights, a clean config, the tokenizer, a generation_config with
    every stop id (causal LMs) and merge_report.json (`report`, completed here)."""
    with staged(out_dir, "merge", overwrite) as tmp:
        merged_model.config.use_cache = True  # training turns it off; inference needs the KV cache
        merged_model.save_pretrained(tmp)
        report["tie_word_embeddings"] = _clean_config(tmp / "config.json")
        report["tokenizer_files"] = copy_tokenizer_files(tok_dir, tmp)
        if task != "SEQ_CLS":
            report["stop_token_ids"] = _write_generation_config(tmp, adapter_dir, base, tok_dir)
        report["size_bytes"] = dir_size(tmp)
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["versions"] = export_versions()
        write_json(tmp / "merge_report.json", report)


def _clean_config(path: Path) -> bool:
    """Drop `auto_map` (remote code of the base's old revision: transformers has Phi3 built in, and a stale
    pointer breaks loaders that follow it) and keep use_cache on; returns whether the embeddings are tied
    (then saved once, and reloaded as one matrix)."""
    config = read_json(path)
    config.pop("auto_map", None)
    config["use_cache"] = True
    write_json(path, config)
    return bool(config.get("tie_word_embeddings", False))


def _write_generation_config(folder: Path, adapter_dir: Path, base: str, tok_dir: Path) -> list[int]:
    """generation_config.json with every stop id (`<|end|>`, `<|endoftext|>`, eos) as eos_token_id."""
    from transformers import GenerationConfig

    source = None
    for candidate in (adapter_dir, Path(base), folder):
        if (candidate / "generation_config.json").is_file():
            source = candidate
            break
    if source is not None:
        gen = GenerationConfig.from_pretrained(str(source))
    else:
        gen = GenerationConfig()
    config = read_json(folder / "config.json")
    stop_ids = set(collect_stop_ids(folder, tok_dir))
    stop_ids |= set(as_id_list(gen.eos_token_id))
    stop_ids |= set(as_id_list(config.get("eos_token_id")))
    stop_ids = sorted(stop_ids)
    gen.eos_token_id = stop_ids if len(stop_ids) != 1 else stop_ids[0]
    if gen.bos_token_id is None and config.get("bos_token_id") is not None:
        gen.bos_token_id = config["bos_token_id"]
    if gen.pad_token_id is None:
        gen.pad_token_id = config.get("pad_token_id", stop_ids[0] if stop_ids else None)
    gen.save_pretrained(str(folder))
    # Keep the list form even for one id so readers can rely on it.
    data = json.loads((folder / "generation_config.json").read_text())
    data["eos_token_id"] = stop_ids
    (folder / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")
    return stop_ids
