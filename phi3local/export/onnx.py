"""Export a merged Phi-3 folder to an onnxruntime-genai model with its model builder, then check parity.

Uses the builder's Python API (onnxruntime_genai.models.builder):
    extra = parse_extra_options(model_name, input_path, output_dir, precision, execution_provider,
                                cache_dir, ["key=value", ...])     # loads config + tokenizer (hf_details)
    create_model(model_name, input_path, output_dir, precision, execution_provider, cache_dir, **extra)

Known builder defects handled here:
  * LM head by shape: the builder walks `model.modules()` and takes every `nn.Linear` whose
    out_features == vocab_size for the LM head, including the q/k/v and gate/up projections it creates
    while splitting Phi-3's fused qkv_proj / gate_up_proj (and o_proj/down_proj when hidden == vocab).
    Such a model is exported wrong. We detect the collision from config.json and, while the builder runs,
    make its `has_lm_head` match only the model's real output embeddings (`get_output_embeddings()`);
    parity then shows the export is correct. vocab_collision="refuse" refuses instead.
  * Tokenizer files: the builder re-saves the tokenizer through transformers' AutoTokenizer, which in
    transformers 5 writes tokenizer_class "TokenizersBackend", moves the chat template to
    chat_template.jinja and rewrites tokenizer.json. We copy the model folder's own files back
    (onnxruntime-genai needs tokenizer.json and tokenizer_config.json).
  * Stop ids: genai_config.json gets every stop id (`<|end|>`, `<|endoftext|>`, eos of the configs).
  * Rope config: the builder reads `rope_parameters["type"]`, which a config saved by transformers 5 lacks
    (it fails with "'type'"); the builder then reads a staging copy in the Hub's `rope_scaling` form.
  * LongRoPE: the switch point goes to longrope.json (genai_config.json refuses unknown keys), for `chat`,
    `serve` and parity, which re-prefill a decode that crosses it (onnxruntime-genai does so only at 4097).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import time
from pathlib import Path

from phi3local.errors import Phi3LocalError
from phi3local.export.parity import PARITY_LEVELS
from phi3local.export.tokenizer_files import copy_tokenizer_files
from phi3local.folders import check_output_dir, dir_size, staged
from phi3local.model.shapes import longrope_switch_of
from phi3local.model.tokenizer import collect_stop_ids
from phi3local.serve.chat import LONGROPE_FILE
from phi3local.serve.json_files import as_id_list, read_json, write_json
from phi3local.versions import export_versions

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "fp16", "bf16", "fp32")
# What export writes beside the model itself (not counted in its size).
REPORT_FILES = ("parity.json", "export_report.json", "measurements.json")
TARGETS = ("cpu", "cuda")
# What the builder can make (its own list: FP32 CPU, FP32 CUDA, FP16 CUDA, BF16 CUDA, INT4 CPU, INT4 CUDA).
VALID_COMBINATIONS = {("fp32", "cpu"), ("int4", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("bf16", "cuda"),
                      ("int4", "cuda")}
# fp32 exports must match PyTorch to this fraction of the logit scale at every position.
FP32_PARITY_TOLERANCE = 1e-4


class ExportError(Phi3LocalError, RuntimeError):
    """The model cannot be exported as asked; the message says why and what to do."""


class VocabCollisionError(ExportError):
    """A projection's width equals vocab_size, which the builder mistakes for the LM head."""


class ParityError(ExportError):
    """The exported model's logits differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def vocab_collisions(config: dict) -> list[str]:
    """Linear layers (as the builder sees them) whose out_features equal vocab_size, from config.json."""
    vocab = int(config["vocab_size"])
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    widths = {
        "self_attn.qkv_proj": q + 2 * kv,
        "self_attn.q_proj (split from qkv_proj)": q,
        "self_attn.k_proj (split from qkv_proj)": kv,
        "self_attn.v_proj (split from qkv_proj)": kv,
        "self_attn.o_proj": hidden,
        "mlp.gate_up_proj": 2 * inter,
        "mlp.gate_proj (split from gate_up_proj)": inter,
        "mlp.up_proj (split from gate_up_proj)": inter,
        "mlp.down_proj": hidden,
    }
    return [f"{name} (out_features {w})" for name, w in widths.items() if w == vocab]


def _import_builder():
    try:
        with _quiet_builder_logging():
            from onnxruntime_genai.models import builder
    except ImportError as e:
        raise ExportError(
            f"the onnxruntime-genai model builder cannot be imported ({e}); install the export extras: "
            "pip install onnxruntime-genai onnx onnx-ir"
        ) from e
    # The builder imports its submodules as top-level modules (it puts its folder on sys.path).
    base_mod = sys.modules.get("builders.base")
    if base_mod is None:
        import importlib

        base_mod = importlib.import_module("builders.base")
    return builder, base_mod


@contextlib.contextmanager
def _quiet_builder_logging():
    """onnxruntime's quantizer calls logging.basicConfig(level=INFO) on import and logs every MatMul;
    keep the root logger as it was and the quantizer at WARNING."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ort_logger = logging.getLogger("onnxruntime")
    ort_level = ort_logger.level
    ort_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        ort_logger.setLevel(ort_level)


@contextlib.contextmanager
def _lm_head_matches_output_embeddings(base_mod):
    """While the builder runs, only the model's real output embeddings count as the LM head."""
    import torch

    model_cls = getattr(base_mod, "Model", None)
    original = getattr(model_cls, "has_lm_head", None)
    if original is None:
        raise VocabCollisionError("this onnxruntime-genai builder has no Model.has_lm_head to correct")

    def has_lm_head(self, module):
        weights = getattr(self, "weights", None)
        get_head = getattr(weights, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, torch.nn.Linear):
            return module is head
        return original(self, module)

    model_cls.has_lm_head = has_lm_head
    try:
        yield
    finally:
        model_cls.has_lm_head = original


@contextlib.contextmanager
def _int4_from_disk(base_mod, staging: Path):
    """While the builder runs, quantise to int4 from the fp32 graph on disk instead of from memory.

    The builder's `to_nbits` copies the whole fp32 graph into one in-memory ModelProto (`ir.to_proto`) while the
    torch model it was made from is still alive: twice the fp32 weights, 30 GB for a 3.8B model, which a 24 GiB
    machine does not have (measured: killed at 21.3 GB RSS). Here `save_model` first writes the fp32 graph to
    disk one tensor at a time and reads it back with its weights left in the file, which releases the torch
    weights; the quantiser then reads each weight from the file. The file's tensors are referenced by a path
    relative to the working directory (what `ir.to_proto` keeps of them), so the builder's save runs there; its
    output folder is absolute. The copy is deleted with the builder's other temporary files.
    """
    import gc

    import onnx_ir as ir

    original = base_mod.Model.save_model
    folder = staging / "_fp32_before_int4"

    def save_model(self, out_dir):
        if self.onnx_dtype not in (ir.DataType.INT4, ir.DataType.UINT4):
            return original(self, out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        ir.save(self.model, folder / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
        # With tied embeddings the embedding's GatherBlockQuantized names lm_head's int4 weights, which quantising
        # creates: reading the graph back, onnx_ir warns (to the user's terminal) that they are missing.
        serde = logging.getLogger("onnx_ir.serde")
        level = serde.level
        serde.setLevel(logging.ERROR)
        try:
            self.model = ir.load(folder / "model.onnx")
        finally:
            serde.setLevel(level)
        gc.collect()
        with contextlib.chdir(folder):
            return original(self, str(Path(out_dir).resolve()))

    base_mod.Model.save_model = save_model
    try:
        yield
    finally:
        base_mod.Model.save_model = original
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _no_gqa_for_small_heads(base_mod, head_dim: int):
    """onnxruntime's CPU GroupQueryAttention kernel needs head_size % 16 == 0; the builder picks it for
    every fp32 CPU export anyway. For smaller heads (stories260K: 8) make it use MultiHeadAttention
    (its packed "Attention" path writes a graph without present.*.key outputs in 0.18)."""
    model_cls = getattr(base_mod, "Model", None)
    names = ("is_gqa_supported", "is_packed_attn_supported")
    originals = {n: getattr(model_cls, n, None) for n in names}
    if None in originals.values() or head_dim % 16 == 0:
        yield
        return
    for n in names:
        setattr(model_cls, n, lambda self: False)
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(model_cls, n, f)


def hub_rope_config(config: dict) -> dict | None:
    """config.json with its rope section rewritten the way Hub checkpoints carry it, or None when it is already so.

    transformers 5 saves `rope_parameters: {rope_type, rope_theta, short_factor, ...}`; the builder reads
    `rope_parameters["type"]`, which only the Hub form (`rope_scaling: {type, short_factor, long_factor}`,
    rope_theta at the top level) gives it, so a transformers-5 LongRoPE config fails with "'type'".
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "type" in rope or isinstance(config.get("rope_scaling"), dict):
        return None
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope_type = rope.get("rope_type", "default")
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key in rope:
            out.setdefault(key, rope[key])
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor",
                                                          "original_max_position_embeddings")}
    out["rope_scaling"] = {"type": rope_type, **scaling} if rope_type != "default" else None
    return out


@contextlib.contextmanager
def builder_input(model_dir: Path, config: dict, staging: Path):
    """The folder the builder reads: model_dir itself, or (when its config needs the Hub's rope form) a copy in
    staging that links model_dir's files and carries the rewritten config.json; the user's folder is not touched."""
    rewritten = hub_rope_config(config)
    if rewritten is None:
        yield model_dir
        return
    folder = staging / "_builder_input"
    folder.mkdir()
    try:
        for path in model_dir.iterdir():
            if path.is_file() and path.name != "config.json":
                (folder / path.name).symlink_to(path.resolve())
        write_json(folder / "config.json", rewritten)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_cpu_partial_rotary(config: dict, model_dir: Path) -> None:
    """onnxruntime's CPU GroupQueryAttention rotates a partial-rotary head only when rotary_dims / 2 is at most
    head_size / 2 and a multiple of 8; otherwise the export builds and then fails at its first run. Phi-4-mini
    (96 of 128 dims) passes; a head of 32 with factor 0.75 (24 dims) does not."""
    from phi3local.model.shapes import shape_from_config

    shape = shape_from_config(config)
    half = shape.rotary_dims // 2
    if shape.partial_rotary_factor < 1.0 and (half > shape.dims_per_head // 2 or half % 8):
        raise ExportError(
            f"{model_dir}/config.json: partial_rotary_factor {shape.partial_rotary_factor:g} of head_dim "
            f"{shape.dims_per_head} rotates {shape.rotary_dims} dims; onnxruntime's CPU attention needs "
            f"rotary_dims / 2 ({half}) <= head_dim / 2 and a multiple of 8 (the export would fail at its first run). "
            "Use a head_dim and factor that meet it (Phi-4-mini: 96 of 128)")


def _fix_genai_config(out: Path, stop_ids: list[int]) -> dict:
    cfg = read_json(out / "genai_config.json")
    model = cfg["model"]
    ids = sorted(set(as_id_list(model.get("eos_token_id"))) | set(stop_ids))
    model["eos_token_id"] = ids if len(ids) != 1 else ids[0]
    if model.get("pad_token_id") is None and ids:
        model["pad_token_id"] = ids[0]
    write_json(out / "genai_config.json", cfg)
    return cfg


def check_weight_files(model_dir: Path) -> None:
    """Every safetensors file readable end to end in its header and sizes, or an ExportError naming it
    (the model builder's own message does not say which file is damaged)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), "np") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); the merged model is "
                              "damaged or cut short: merge again") from None


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    precision: str = "int4",
    target: str = "cpu",
    adapter_path: Path | None = None,
    *,
    overwrite: bool = False,
    parity: str = "full",
    prompts=None,
    new_tokens: int = 32,
    vocab_collision: str = "fix",
    extra_options: dict | None = None,
    show: bool = True,
) -> dict:
    """Export the HF folder model_dir (a merged Phi-3) to an onnxruntime-genai folder out_dir.

    precision: int4 | fp16 | bf16 | fp32; target: cpu | cuda (fp16/bf16 need cuda).
    adapter_path: a peft adapter folder the builder applies on top of model_dir (unmerged LoRA MatMuls).
    parity: full | short | none (export.parity.PARITY_LEVELS): run check_parity (written to
        out_dir/parity.json) when the export can run here, with a LongRoPE model's long prompts (full) or without
        (short); none checks nothing. The model is timed (measurements.json) at every level. An fp32 export fails
        (ParityError, nothing written) if any position's max |logit diff| > 1e-4 x logit scale; int4/fp16/bf16
        report error and greedy agreement only.
    vocab_collision: "fix" (export correctly, see the module docstring) or "refuse" (VocabCollisionError).
    extra_options: more builder options, as its --extra_options take them (e.g. {"block_size": 64} or
        {"accuracy_level": 0} for int4; the CPU int4 default accuracy_level=4 also rounds activations to int8).
    Returns the report also written to out_dir/export_report.json.
    """
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, "export", overwrite)
    config, collisions = check_request(model_dir, precision, target, vocab_collision, parity)
    builder, base_mod = _import_builder()
    kv = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if (adapter_path / "adapter" / "adapter_config.json").is_file():
            adapter_path = adapter_path / "adapter"
        kv.append(f"adapter_path={adapter_path}")
    stop_ids = collect_stop_ids(model_dir)

    with staged(out_dir, "export", overwrite) as tmp:
        build_seconds = run_builder(builder, base_mod, model_dir, config, tmp, precision, target, kv, collisions)
        report = {
            "model_dir": str(model_dir),
            "adapter_path": str(adapter_path) if adapter_path else None,
            "precision": precision,
            "target": target,
            "export_seconds": round(build_seconds, 3),
            **complete_folder(tmp, model_dir, config, stop_ids),
            "source_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "vocab_size": config["vocab_size"],
            "vocab_collision": collisions,
            "vocab_collision_fix": "has_lm_head matched only get_output_embeddings()" if collisions else None,
            "versions": export_versions(),
        }
        level, parity = parity, None
        if level == "none":
            report["parity"] = {"skipped": "--parity none"}
        else:
            parity = check_export(tmp, model_dir, precision, target, adapter_path, prompts, new_tokens, report,
                                  out_dir, show, long_context=level == "full")
        measure_export(tmp, target, report)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        # The model as shipped: everything but the reports.
        report["size_bytes"] = dir_size(tmp) - sum(
            (tmp / n).stat().st_size for n in REPORT_FILES if (tmp / n).exists())
        write_json(tmp / "export_report.json", report)

    if parity is not None:  # point the report at the published folder
        parity["onnx_dir"] = str(out_dir)
        write_json(out_dir / "parity.json", parity)
    if show:
        _print_report(report)
    return report


def check_request(model_dir: Path, precision: str, target: str, vocab_collision: str,
                  parity: str = "full") -> tuple[dict, list[str]]:
    """Refuse, before anything is built, what the builder cannot export right: (config.json, vocab collisions)."""
    if parity not in PARITY_LEVELS:
        raise ExportError(f"parity must be one of {PARITY_LEVELS}, got {parity!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if (precision, target) not in VALID_COMBINATIONS:
        raise ExportError(f"the model builder does not make {precision} models for {target}; "
                          "use fp32 or int4 for cpu, or target=cuda for fp16/bf16")
    if vocab_collision not in ("fix", "refuse"):
        raise ExportError(f"vocab_collision must be 'fix' or 'refuse', got {vocab_collision!r}")
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such folder (export takes the folder `phi3local merge` wrote)")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json (export takes a merged HF folder; run merge first)")
    if (model_dir / "adapter_config.json").is_file():
        raise ExportError(f"{model_dir} is an adapter folder; merge it first or pass it as adapter_path")
    config = read_json(model_dir / "config.json")
    check_weight_files(model_dir)
    arch = (config.get("architectures") or ["?"])[0]
    if arch != "Phi3ForCausalLM":
        what = "a sequence classifier" if arch.endswith("ForSequenceClassification") else arch
        raise ExportError(f"{model_dir} is {what}; onnxruntime-genai exports Phi3ForCausalLM models only")
    if config.get("quantization_config"):
        raise ExportError(f"{model_dir} is a quantized checkpoint; export the merged unquantised folder")
    if not (model_dir / "tokenizer.json").is_file() or not (model_dir / "tokenizer_config.json").is_file():
        raise ExportError(f"{model_dir} needs tokenizer.json and tokenizer_config.json (onnxruntime-genai reads both)")

    if target == "cpu":
        check_cpu_partial_rotary(config, model_dir)
    collisions = vocab_collisions(config)
    if collisions and vocab_collision == "refuse":
        raise VocabCollisionError(
            f"vocab_size {config['vocab_size']} equals the width of {', '.join(collisions)}: the onnxruntime-genai "
            "model builder takes every nn.Linear with out_features == vocab_size for the LM head and would "
            "export this model wrong. Use vocab_collision='fix' (matches only the real lm_head) or change "
            "vocab_size (e.g. pad the embeddings to a multiple of 64 that differs from every projection width)."
        )
    return config, collisions


def run_builder(builder, base_mod, model_dir: Path, hf_config: dict, tmp: Path, precision: str, target: str, kv: list[str],
                collisions: list[str]) -> float:
    """onnxruntime-genai's model builder from model_dir into tmp, with the project's patches; its output goes to
    tmp/builder.log (and into the error when it fails). Returns the build's seconds."""
    cache = tmp / "_builder_cache"
    log_path = tmp / "builder.log"
    patch = _lm_head_matches_output_embeddings(base_mod) if collisions else contextlib.nullcontext()
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    started = time.perf_counter()
    buf = io.StringIO()
    try:
        with patch, _no_gqa_for_small_heads(base_mod, head_dim), _int4_from_disk(base_mod, tmp), \
                _quiet_builder_logging(), \
                contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                builder_input(model_dir, hf_config, tmp) as source:
            extra = builder.parse_extra_options(None, str(source), str(tmp), precision, target, str(cache), kv)
            builder.create_model(None, str(source), str(tmp), precision, target, str(cache), **extra)
    except Exception as e:
        raise ExportError(f"the model builder failed: {e}\n--- builder output ---\n{buf.getvalue()[-4000:]}") from e
    finally:
        log_path.write_text(buf.getvalue(), encoding="utf-8")
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    return seconds


def complete_folder(tmp: Path, model_dir: Path, config: dict, stop_ids: list[int]) -> dict:
    """What the runtime reads beside the graph: the tokenizer files, the LongRoPE switch and a genai_config with
    every stop id. Returns the report's fields about the folder."""
    tokenizer_files = copy_tokenizer_files(model_dir, tmp)
    switch = longrope_switch_of(config)
    if switch is not None:
        write_json(tmp / LONGROPE_FILE, {"original_max_position_embeddings": switch})
    genai_cfg = _fix_genai_config(tmp, stop_ids)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return {"model_bytes": sum(s for n, s in files.items() if n.endswith((".onnx", ".onnx.data"))), "files": files,
            "eos_token_id": genai_cfg["model"]["eos_token_id"], "tokenizer_files": tokenizer_files}


def check_export(tmp: Path, model_dir: Path, precision: str, target: str, adapter_path: Path | None, prompts,
                 new_tokens: int, report: dict, out_dir: Path, show: bool, long_context: bool = True) -> dict | None:
    """Parity against PyTorch where the graph runs here (fp32: ParityError past FP32_PARITY_TOLERANCE), into
    `report`. Returns the parity report."""
    parity = None
    provider = None
    if target == "cuda" and not _cuda_available():
        # No CUDA here: fp16 and int4 CUDA graphs still run on the CPU EP, so parity can be measured
        # (bf16 MatMul has no CPU kernel; the fp32 CUDA graph does not load on the CPU EP).
        provider = "cpu" if precision in ("fp16", "int4") else None
    runnable = target == "cpu" or _cuda_available() or provider == "cpu"
    tol = FP32_PARITY_TOLERANCE if precision == "fp32" else None
    if runnable:
        from phi3local.export.parity import check_parity

        try:
            parity = check_parity(tmp, model_dir, prompts, new_tokens, adapter_path=adapter_path,
                                  tolerance=tol, execution_provider=provider, long_context=long_context,
                                  show=show)
        except Exception as e:
            if provider is None:
                raise
            # A CUDA graph that does not run on the CPU EP after all: report it, don't fail the export.
            report["parity"] = {"skipped": f"{precision} for {target} does not run on the CPU EP here: "
                                           f"{str(e).splitlines()[0][:300]}"}
    else:
        report["parity"] = {"skipped": f"{precision} for {target} cannot run on this machine"}
    if parity is not None:
        report["parity"] = {k: parity[k] for k in (
            "max_abs_diff", "logit_scale", "relative_error", "greedy_identical", "greedy_compared",
            "greedy_all_agree", "tokenizer_match", "logits_alignment_ok", "execution_provider", "long_context",
            "seconds")
            if k in parity}
        if "passed" in parity:
            report["parity"]["passed"] = parity["passed"]
            report["parity"]["tolerance_relative"] = tol
        if tol is not None and not parity["passed"]:
            raise ParityError(
                f"fp32 export differs from PyTorch by {parity['max_abs_diff']:.3g} (relative "
                f"{parity['relative_error']:.3g} of the logit scale, tolerance {tol:g}); greedy "
                f"{parity['greedy_identical']}/{parity['greedy_compared']}. Nothing was written to {out_dir}.",
                parity,
            )
    return parity


def measure_export(tmp: Path, target: str, report: dict) -> None:
    """The serving measurements (measurements.json, which `azure spec` sizes the deployment from), where the
    graph runs on its own target: a CUDA graph timed on the CPU says nothing."""
    if target == "cpu" or _cuda_available():
        from phi3local.export.measure import MEASUREMENTS_FILE, measure_serving

        report["measurements"] = measure_serving(tmp)
        write_json(tmp / MEASUREMENTS_FILE, report["measurements"])


def _cuda_available() -> bool:
    try:
        import onnxruntime_genai as og

        return bool(og.is_cuda_available())
    except (ImportError, AttributeError, RuntimeError):
        return False


def _print_report(report: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    mib = report["size_bytes"] / 2**20
    line = (f"exported {report['precision']}/{report['target']} in {report['export_seconds']:.1f} s, "
            f"{mib:.2f} MiB on disk")
    p = report.get("parity") or {}
    if "max_abs_diff" in p:
        line += (f"; parity max |Δ| {p['max_abs_diff']:.3g} ({p['relative_error']:.2e} of scale), "
                 f"greedy {p['greedy_identical']}/{p['greedy_compared']}")
    console.print(line)
