"""Export a merged Phi-3 folder to GGUF with llama.cpp's own converter and quantizer, then check parity.

    phi3local export MERGED --format gguf   [--quant f16|q8_0|q4_k_m|...] --out DIR
    phi3local export MERGED --format ollama [--quant ...]                 --out DIR   (+ Modelfile)

Phases (each its own function): check the source folder -> stage the converter's input (gguf_convert) ->
convert (llama.cpp's convert_hf_to_gguf.py: f32/f16/bf16/q8_0 directly; k-quants and q4/q5 from an f16 GGUF
with llama_model_quantize) -> describe the file (tensor types, metadata) -> parity against PyTorch through
llama-cpp-python (gguf_parity; f32/f16/bf16/q8_0 must meet their tolerance, other types are reported) ->
for Ollama, the Modelfile (ollama.py) -> publish the folder. Nothing is written to DIR unless all pass.

What llama.cpp does with the family's features (see docs/gguf.md): LongRoPE factors become the
rope_factors_long/short tensors and the factor set is chosen from the context size at load time; Phi-4-mini's
partial rotary is the rope dimension count; tied embeddings are written once (no output.weight) and llama.cpp
uses the token embedding as the LM head; the chat template, bos/eos/pad ids go into the metadata and llama.cpp
ends generation on eos and on end-of-turn tokens it recognises (`<|end|>`, `<|endoftext|>`, `<|im_end|>`, `</s>`).
"""

from __future__ import annotations

import time
from pathlib import Path

from phi3local.export.gguf_convert import (
    CONVERTER_TYPES,
    QUANTS,
    GGUFExportError,
    gguf_model_name,
    import_llama_cpp,
    quantize,
    read_metadata,
    run_converter,
    stage_converter_input,
    tensor_types,
)
from phi3local.export.parity import PARITY_LEVELS
from phi3local.folders import check_output_dir, dir_size, staged
from phi3local.serve.json_files import read_json, write_json
from phi3local.versions import export_versions

FORMATS = ("gguf", "ollama")
REPORT_FILES = ("parity.json", "export_report.json", "convert.log", "quantize.log")
METADATA_KEYS = ("general.architecture", "general.name", "phi3.context_length", "phi3.rope.dimension_count",
                 "phi3.rope.scaling.original_context_length", "phi3.rope.scaling.attn_factor",
                 "phi3.attention.head_count", "phi3.attention.head_count_kv", "tokenizer.ggml.model",
                 "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")


class GGUFParityError(GGUFExportError):
    """The GGUF's logits differ from PyTorch's by more than its type's tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def default_quant(fmt: str) -> str:
    """f16 for a GGUF (checked against PyTorch), q4_k_m for Ollama (what its library ships)."""
    return "q4_k_m" if fmt == "ollama" else "f16"


def check_source(model_dir: Path) -> dict:
    """The merged folder's config.json, or a GGUFExportError saying what is wrong with the folder."""
    from phi3local.export.onnx import ExportError, check_weight_files

    if not model_dir.is_dir():
        raise GGUFExportError(f"{model_dir}: no such folder (export takes the folder `phi3local merge` wrote)")
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(f"{model_dir} has no config.json (export takes a merged HF folder; run merge first)")
    if (model_dir / "adapter_config.json").is_file():
        raise GGUFExportError(f"{model_dir} is an adapter folder; merge it first (phi3local merge RUN --out DIR)")
    config = read_json(model_dir / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    if arch != "Phi3ForCausalLM":
        what = "a sequence classifier" if arch.endswith("ForSequenceClassification") else arch
        raise GGUFExportError(f"{model_dir} is {what}; the GGUF export converts Phi3ForCausalLM models only")
    if config.get("quantization_config"):
        raise GGUFExportError(f"{model_dir} is a quantized checkpoint; export the merged unquantised folder")
    if not (model_dir / "tokenizer.json").is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json (the GGUF carries the vocabulary)")
    try:
        check_weight_files(model_dir)
    except ExportError as e:
        raise GGUFExportError(str(e)) from None
    check_longrope_switch(config, model_dir)
    return config


def check_longrope_switch(config: dict, model_dir: Path) -> None:
    """llama.cpp runs LongRoPE's short factors only when its context is at most the switch, and it rounds every
    context up to a multiple of 256: a switch below 256 (the tiny stand-ins' 64; the real models' is 4096) would
    never get its short factors, so every prompt PyTorch runs on them would differ."""
    from phi3local.export.gguf_parity import CONTEXT_PAD
    from phi3local.model.shapes import longrope_switch_of

    switch = longrope_switch_of(config)
    if switch is not None and switch < CONTEXT_PAD:
        raise GGUFExportError(
            f"{model_dir}/config.json: LongRoPE switches factors at original_max_position_embeddings={switch}; llama.cpp "
            f"picks the short factors only when its context size is <= that, and rounds every context up to a "
            f"multiple of {CONTEXT_PAD}, so it would run this model on the long factors only (PyTorch runs prompts "
            f"up to {switch} tokens on the short ones). llama.cpp lacks a per-sequence switch; a switch of "
            f"{CONTEXT_PAD} or more (Phi-3-128k, Phi-3.5, Phi-4-mini: 4096) converts")


def convert(model_dir: Path, tmp: Path, quant: str) -> tuple[Path, dict]:
    """The GGUF of model_dir in tmp at quant, by llama.cpp's converter (and quantizer); returns it and timings."""
    staged = tmp / "_convert_input"
    info = stage_converter_input(model_dir, staged)
    name = gguf_model_name(model_dir, info["phi3_rstrip"])
    out = tmp / f"model-{quant}.gguf"
    timings = {}
    try:
        if quant in CONVERTER_TYPES:
            timings["convert_seconds"] = run_converter(staged, out, quant, info, name, tmp / "convert.log")
        else:
            import_llama_cpp()
            f16 = tmp / "_model-f16.gguf"
            timings["convert_seconds"] = run_converter(staged, f16, "f16", info, name, tmp / "convert.log")
            timings["quantize_seconds"] = quantize(f16, out, quant, tmp / "quantize.log")
            f16.unlink()
    finally:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
    return out, {**info, "model_name": name, **{k: round(v, 3) for k, v in timings.items()}}


def describe(gguf_path: Path) -> dict:
    """What the GGUF holds: tensor types (k-quants fall back on narrow rows), the family's features in it."""
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(str(gguf_path)).tensors}
    meta = read_metadata(gguf_path, METADATA_KEYS + ("tokenizer.chat_template",))
    return {
        "tensor_types": tensor_types(gguf_path),
        "rope_factors": "rope_factors_long.weight" in names and "rope_factors_short.weight" in names,
        "output_weight": "output.weight" in names,  # absent: tied, llama.cpp reuses token_embd
        "chat_template": bool(meta.pop("tokenizer.chat_template", None)),
        "metadata": meta,
    }


def check(gguf_path: Path, model_dir: Path, quant: str, prompts, new_tokens: int, show: bool,
          long_context: bool = True) -> dict:
    """Parity against PyTorch (gguf_parity); GGUFParityError when a type with a tolerance misses it."""
    from phi3local.export.gguf_parity import check_gguf_parity

    import_llama_cpp()
    parity = check_gguf_parity(gguf_path, model_dir, quant, prompts, new_tokens, long_context=long_context, show=show)
    if "passed" in parity and not parity["passed"]:
        raise GGUFParityError(
            f"{quant} GGUF differs from PyTorch by {parity['max_abs_diff']:.3g} (relative {parity['relative_error']:.3g} "
            f"of the logit scale, tolerance {parity['tolerance_relative']:g}); greedy "
            f"{parity['greedy_identical']}/{parity['greedy_compared']}. Nothing was written.", parity)
    return parity


def parity_summary(parity: dict) -> dict:
    keys = ("max_abs_diff", "logit_scale", "relative_error", "greedy_identical", "greedy_compared", "greedy_all_agree",
            "tokenizer_match", "stop_ids_in_gguf", "eog_token_ids_gguf", "chat_template_in_gguf", "tolerance_relative",
            "passed", "longrope", "seconds")
    return {k: parity[k] for k in keys if k in parity}


def export_gguf(model_dir: Path, out_dir: Path, quant: str | None = None, fmt: str = "gguf", *, overwrite: bool = False,
                parity: str = "full", prompts=None, new_tokens: int = 32, show: bool = True) -> dict:
    """Export the merged HF folder model_dir to out_dir as model-<quant>.gguf (+ Modelfile for fmt="ollama").

    quant: f32 | f16 | bf16 | q8_0 (llama.cpp's converter) or q4_k_m, q5_k_m, q6_k, q4_0, ... (its quantizer);
        default f16 for gguf, q4_k_m for ollama.
    parity: full | short | none (export.parity.PARITY_LEVELS): compare with PyTorch (parity.json), with a
        LongRoPE model's long prompt (full) or without (short); f32/f16/bf16/q8_0 must meet
        gguf_parity.TOLERANCES. none: no comparison.
    Returns the report also written to out_dir/export_report.json.
    """
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise GGUFExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    quant = (quant or default_quant(fmt)).lower()
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    if parity not in PARITY_LEVELS:
        raise GGUFExportError(f"parity must be one of {PARITY_LEVELS}, got {parity!r}")
    check_output_dir(out_dir, "export", overwrite)
    config = check_source(model_dir)

    with staged(out_dir, "export", overwrite) as tmp:
        gguf_path, conversion = convert(model_dir, tmp, quant)
        report = {
            "format": fmt, "model_dir": str(model_dir), "quant": quant, "gguf": gguf_path.name,
            "gguf_bytes": gguf_path.stat().st_size, "conversion": conversion, "file": describe(gguf_path),
            "source_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "vocab_size": config.get("vocab_size"), "versions": {**export_versions(), **_gguf_versions()},
        }
        level, parity = parity, None
        if level == "none":
            report["parity"] = {"skipped": "--parity none"}
        else:
            parity = check(gguf_path, model_dir, quant, prompts, new_tokens, show, long_context=level == "full")
            report["parity"] = parity_summary(parity)
        if fmt == "ollama":
            report["ollama"] = write_ollama(tmp, model_dir, gguf_path, out_dir)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["size_bytes"] = dir_size(tmp) - sum((tmp / n).stat().st_size for n in REPORT_FILES if (tmp / n).exists())
        write_json(tmp / "export_report.json", report)
    if parity is not None:  # point the report at the published file
        parity["gguf"] = str(out_dir / gguf_path.name)
        write_json(out_dir / "parity.json", parity)
    return report


def write_ollama(tmp: Path, model_dir: Path, gguf_path: Path, out_dir: Path) -> dict:
    """The Modelfile beside the GGUF (its template checked against the tokenizer's), and the `ollama create` line."""
    from phi3local.export.ollama import MODELFILE, create_command, ollama_name, write_modelfile
    from phi3local.export.tokenizer_files import load_hf_tokenizer
    from phi3local.model.tokenizer import collect_stop_ids

    tokenizer = load_hf_tokenizer(model_dir)
    meta = read_metadata(gguf_path, ("tokenizer.ggml.add_bos_token",))
    bos = tokenizer.bos_token if meta.get("tokenizer.ggml.add_bos_token") and tokenizer.bos_token else ""
    written = write_modelfile(tmp, gguf_path.name, tokenizer, collect_stop_ids(model_dir), bos_added=bos)
    name = ollama_name(model_dir)
    return {**written, "name": name, "create": create_command(name, out_dir / MODELFILE),
            "run": f"ollama run {name}"}


def _gguf_versions() -> dict:
    out = {}
    for mod in ("llama_cpp", "gguf"):
        try:
            from importlib.metadata import version

            out[mod] = version("llama_cpp_python" if mod == "llama_cpp" else mod)
        except Exception:  # noqa: BLE001 - a version we cannot read is left out
            pass
    return out


def gguf_table(report: dict, out_dir: Path):
    """The CLI's summary of a GGUF/Ollama export (the figures, then the command to run next)."""
    from phi3local.summaries import _table
    from phi3local.units import format_bytes

    types = ", ".join(f"{k} x{v}" for k, v in report["file"]["tensor_types"].items())
    rows = [("written to", str(out_dir / report["gguf"])), ("type", f"{report['quant']} (tensors: {types})"),
            ("size", format_bytes(report.get("size_bytes"))), ("time", f"{report.get('seconds', 0):.1f} s")]
    parity = report.get("parity") or {}
    if "max_abs_diff" in parity:
        verdict = ""
        if "passed" in parity:
            verdict = (f" (tolerance {parity['tolerance_relative']:g}) "
                       + ("[green]passed[/]" if parity["passed"] else "[red]FAILED[/]"))
        else:
            verdict = " (reported, no tolerance for this type)"
        rows.append(("parity", f"max |Δlogit| {parity['max_abs_diff']:.2g} = {parity['relative_error']:.1e} of "
                               f"scale{verdict}"))
        rows.append(("greedy tokens", f"{parity['greedy_identical']}/{parity['greedy_compared']} equal to PyTorch"))
        rows.append(("tokenizer", "llama.cpp encodes the prompts as transformers" if parity.get("tokenizer_match")
                     else "llama.cpp encodes some prompts DIFFERENTLY (see parity.json)"))
        if (parity.get("longrope") or {}).get("skipped"):
            rows.append(("long context", parity["longrope"]["skipped"]))
    elif "skipped" in parity:
        rows.append(("parity", f"not measured: {parity['skipped']}"))
    next_command = None
    if "ollama" in report:
        rows.append(("Modelfile", f"{out_dir / 'Modelfile'} (template renders as the chat template: "
                                  f"{len(report['ollama']['template_checks'])} chats)"))
        next_command = report["ollama"]["create"]
    details = [out_dir / name for name in ("export_report.json", "parity.json") if (out_dir / name).is_file()]
    rows.append(("details", ", ".join(map(str, details))))
    # Summary.print writes the next command with hints.print_next: one unwrapped line, copied in one piece.
    return _table("export", rows, next_command)
