"""export (onnxruntime-genai model builder) + parity + chat, on a tiny merged Phi-3."""

from __future__ import annotations

import json
from pathlib import Path

import export_helpers as H
import onnxruntime_genai  # noqa: F401  (the export extra is part of `make install`)
import pytest
import torch

from phi3local.export import onnx as onnx_mod
from phi3local.export.onnx import ExportError, ParityError, VocabCollisionError, export_onnx
from phi3local.export.parity import check_parity, fake_quantize_int4_, load_reference_model
from phi3local.folders import OutputExistsError
from phi3local.serve.chat import ChatError, OnnxChatModel, chat, generate_onnx

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return H.tiny_merged(tmp_path_factory)


@pytest.fixture(scope="module")
def fp32(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    report = export_onnx(merged, out, precision="fp32", target="cpu", new_tokens=NEW_TOKENS)
    return out, report


@pytest.fixture(scope="module")
def int4(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "int4"
    report = export_onnx(merged, out, precision="int4", target="cpu", new_tokens=NEW_TOKENS)
    return out, report


def _vocab(folder: Path) -> dict[str, int]:
    return {t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}


def test_fp32_parity_every_position_and_greedy(fp32):
    out, report = fp32
    parity = json.loads((out / "parity.json").read_text())
    assert parity["onnx_dir"] == str(out)
    assert len(parity["prompts"]) == 3
    for p in parity["prompts"]:
        tol = 1e-4 * p["logit_scale"]
        assert len(p["prompt_max_abs_diff_per_position"]) == p["prompt_tokens"]
        assert len(p["decode_max_abs_diff_per_position"]) == NEW_TOKENS  # through the KV cache
        assert all(d <= tol for d in p["prompt_max_abs_diff_per_position"])
        assert all(d <= tol for d in p["decode_max_abs_diff_per_position"])
        assert (p["greedy_identical"], p["greedy_compared"]) == (NEW_TOKENS, NEW_TOKENS)
        assert p["greedy_first_divergence"] is None
        assert p["tokenizer_match"] and p["logits_alignment_ok"]
    assert report["parity"]["passed"] and report["parity"]["tolerance_relative"] == 1e-4


def test_export_report_and_files(fp32, merged):
    out, report = fp32
    assert json.loads((out / "export_report.json").read_text())["precision"] == "fp32"
    assert report["export_seconds"] > 0 and report["model_bytes"] > 0
    bookkeeping = ("parity.json", "export_report.json", "measurements.json", ".phi3local.json")
    shipped = [p for p in out.rglob("*") if p.is_file() and p.name not in bookkeeping]
    assert report["size_bytes"] == sum(p.stat().st_size for p in shipped)
    # What `azure spec` derives the deployment's timeout and probes from, measured on these files.
    measured = json.loads((out / "measurements.json").read_text())
    assert measured == report["measurements"] and measured["tokens"] >= 2
    assert measured["load_seconds"] > 0 and measured["per_token_ms"] > 0 and measured["first_token_ms"] > 0
    assert report["model_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    # ort-genai reads tokenizer.json + tokenizer_config.json; ours are the model's own, not transformers' re-save.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (merged / name).read_bytes()
    assert not (out / "_builder_cache").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_genai_config_has_every_stop_id(fp32):
    out, report = fp32
    cfg = json.loads((out / "genai_config.json").read_text())
    vocab = _vocab(out)
    assert {vocab["<|end|>"], vocab["<|endoftext|>"]} <= set(cfg["model"]["eos_token_id"])
    assert report["eos_token_id"] == cfg["model"]["eos_token_id"]
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(out)))
    assert {vocab["<|end|>"], vocab["<|endoftext|>"]} <= {int(i) for i in tok.eos_token_ids}


def test_int4_export_runs_and_reports(int4, fp32):
    out, report = int4
    assert report["precision"] == "int4"
    assert report["model_bytes"] < fp32[1]["model_bytes"]
    p = report["parity"]
    assert "passed" not in p  # int4: reported, not judged
    assert 0 < p["relative_error"] < 1 and p["greedy_compared"] > 0 and p["logits_alignment_ok"]
    parity = json.loads((out / "parity.json").read_text())
    assert all(len(r["decode_max_abs_diff_per_position"]) > 0 for r in parity["prompts"])


def test_int4_export_equals_int4_rounded_pytorch(merged, tmp_path):
    """With float activations (accuracy_level=0) the int4 graph is exactly the int4-rounded model."""
    out = tmp_path / "int4-acc0"
    export_onnx(merged, out, precision="int4", extra_options={"accuracy_level": 0}, parity="none", show=False)
    ref = fake_quantize_int4_(load_reference_model(merged))
    parity = check_parity(out, merged, new_tokens=8, reference_model=ref, tolerance=1e-4)
    assert parity["passed"], parity["relative_error"]


def test_vocab_collision_is_refused_or_exported_correctly(tmp_path_factory, tmp_path):
    # intermediate_size == vocab_size: the builder's split gate_proj/up_proj look like LM heads to it.
    model = H.cached(tmp_path_factory, "collision", lambda d: H.build_tiny_model(d, intermediate_size=384))
    collisions = onnx_mod.vocab_collisions(json.loads((model / "config.json").read_text()))
    assert any("gate_proj" in c for c in collisions)

    with pytest.raises(VocabCollisionError, match="vocab_size 384"):
        export_onnx(model, tmp_path / "refused", precision="fp32", vocab_collision="refuse")
    assert not (tmp_path / "refused").exists()

    report = export_onnx(model, tmp_path / "fixed", precision="fp32", new_tokens=16, show=False)
    assert report["vocab_collision"] == collisions
    assert report["parity"]["passed"] and report["parity"]["greedy_all_agree"]

    # Without the correction the builder's export is wrong (skip once a builder release fixes it).
    builder, _ = onnx_mod._import_builder()
    raw = tmp_path / "raw"
    extra = builder.parse_extra_options(None, str(model), str(raw), "fp32", "cpu", str(tmp_path / "c"), [])
    builder.create_model(None, str(model), str(raw), "fp32", "cpu", str(tmp_path / "c"), **extra)
    parity = check_parity(raw, model, new_tokens=4, out_path=False)
    if parity["relative_error"] <= 1e-4:
        pytest.skip("this onnxruntime-genai builder no longer mistakes same-width projections for the LM head")
    assert parity["relative_error"] > 1e-2


def test_adapter_path_export_matches_base_plus_adapter(tmp_path_factory, tmp_path):
    base, run = H.tiny_base(tmp_path_factory), H.tiny_run(tmp_path_factory)
    report = export_onnx(base, tmp_path / "lora", precision="fp32", adapter_path=run, new_tokens=8, show=False)
    assert report["adapter_path"] == str(run / "adapter")
    assert report["parity"]["passed"]


def test_refusals(merged, tmp_path, tmp_path_factory):
    with pytest.raises(ExportError, match="cuda"):
        export_onnx(merged, tmp_path / "x", precision="fp16", target="cpu")
    with pytest.raises(ExportError, match="precision"):
        export_onnx(merged, tmp_path / "x", precision="int3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        export_onnx(merged, tmp_path / "full", precision="fp32")
    cls = tmp_path / "cls"
    cls.mkdir()
    cfg = json.loads((merged / "config.json").read_text())
    cfg["architectures"] = ["Phi3ForSequenceClassification"]
    (cls / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="sequence classifier"):
        export_onnx(cls, tmp_path / "y", precision="fp32")


def test_fp32_parity_failure_raises_and_writes_nothing(merged, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_mod, "FP32_PARITY_TOLERANCE", -1.0)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_onnx(merged, tmp_path / "o", precision="fp32", new_tokens=2, show=False)
    assert list(tmp_path.iterdir()) == []


def test_chat_one_shot_streams_and_matches_pytorch(fp32, merged):
    out, _ = fp32
    pieces: list[str] = []
    result = chat(out, prompt="What is the capital of France?", system="Be brief.", max_new_tokens=16,
                  stream=pieces.append)
    assert result["text"] == "".join(pieces) and result["text"]
    assert result["tokens_per_second"] > 0 and 0 < result["new_tokens"] <= 16

    # Same chat template and tokens as transformers' apply_chat_template + greedy generation.
    tok = H.load_test_tokenizer(merged)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    assert result["prompt"] == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(result["prompt"], add_special_tokens=False)["input_ids"]
    assert result["prompt_tokens"] == len(ids)
    model = load_reference_model(merged)
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert result["tokens"] == gen[: len(result["tokens"])]

    # Streaming detokenization gives transformers' text for ordinary tokens. (This random model's own
    # output is mostly byte-fallback pieces, which the stream emits byte by byte, so check known text.)
    onnx_model = OnnxChatModel(out)
    for text in ("Paris", "Hello, how are you?", "The capital of France is Paris."):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert onnx_model.detokenize(ids) == tok.decode(ids) == text
    assert onnx_model.detokenize(result["tokens"]) == result["text"]


def test_generate_onnx_and_repl(fp32):
    out, _ = fp32
    model = OnnxChatModel(out)
    msgs = [{"role": "user", "content": "Hello"}]
    a = generate_onnx(model, msgs, max_new_tokens=5)
    b = generate_onnx(out, msgs, max_new_tokens=5)
    assert a["tokens"] == b["tokens"] and a["finish_reason"] in ("stop", "length")
    sampled = generate_onnx(model, msgs, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=1)
    assert 0 < sampled["new_tokens"] <= 5

    lines = iter(["Hello", "/reset", "Hi there", "/exit"])
    shown: list[str] = []
    assert chat(out, max_new_tokens=4, stream=shown.append, input_fn=lambda _: next(lines)) is None
    assert sum("tokens/s" in s for s in shown) == 2


def test_chat_refuses_a_prompt_over_the_context_and_no_new_tokens(fp32):
    out, _ = fp32
    model = OnnxChatModel(out)
    with pytest.raises(ChatError, match=rf"over the model's context of {model.context_length}"):
        model.generate([{"role": "user", "content": "Hello there " * model.context_length}])
    for bad in (0, -1, 2.5):
        with pytest.raises(ChatError, match="max_new_tokens must be a whole number >= 1"):
            model.generate([{"role": "user", "content": "Hello"}], max_new_tokens=bad)


def test_cuda_targets_build_here_and_fp16_parity_runs_on_cpu(merged, tmp_path):
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("measured on the GPU itself where CUDA is available")
    fp16 = export_onnx(merged, tmp_path / "fp16", precision="fp16", target="cuda", new_tokens=8, show=False)
    assert fp16["parity"]["execution_provider"] == "cpu"
    assert fp16["parity"]["relative_error"] < 1e-2 and fp16["parity"]["tokenizer_match"]
    cfg = json.loads((tmp_path / "fp16" / "genai_config.json").read_text())
    assert "cuda" in json.dumps(cfg["model"]["decoder"]["session_options"]["provider_options"])
    bf16 = export_onnx(merged, tmp_path / "bf16", precision="bf16", target="cuda", show=False)
    assert "skipped" in bf16["parity"] and (tmp_path / "bf16" / "model.onnx").is_file()


# ------------------------------------------------------------------------------------------ int4 memory at size

_EXPORT_IN_A_CHILD = """
import sys
from pathlib import Path
from phi3local.export.onnx import _import_builder, export_onnx
_import_builder()
if sys.argv[1] != "imports-only":
    export_onnx(Path(sys.argv[1]), Path(sys.argv[2]), "int4", parity="none", show=False)
"""


def _peak_anon_of_child(*args: str) -> int:
    import subprocess
    import sys

    from kernels_bench.memory import ProcessMemorySampler

    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_IN_A_CHILD, *args])
    with ProcessMemorySampler(proc.pid, interval=0.05) as memory:
        assert proc.wait(timeout=600) == 0
    return memory.peak_anon


def test_int4_export_holds_the_fp32_weights_once(tmp_path):
    """At 3.8B the builder's in-memory quantisation needed twice the fp32 weights (torch model + a ModelProto
    copy: killed at 21.3 GB on a 24 GiB machine); quantising from the fp32 graph on disk holds them once at
    most. A 170M-parameter model (670 MB in fp32) shows the difference in the anonymous memory above the
    imports: 1.56x the fp32 weights the old way, 0.48x this way (measured); the bound is 1.0x."""
    model = H.build_tiny_model(tmp_path / "model", vocab_size=32064, hidden_size=1024, intermediate_size=2816,
                               num_layers=8, num_heads=16)
    fp32_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    imports = _peak_anon_of_child("imports-only")
    peak = _peak_anon_of_child(str(model), str(tmp_path / "onnx"))
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert not any(p.name == "_fp32_before_int4" for p in (tmp_path / "onnx").rglob("*"))
    assert peak - imports < 1.0 * fp32_bytes, (peak - imports) / fp32_bytes


_PARITY_IN_A_CHILD = """
import sys
from pathlib import Path
import onnxruntime_genai
from phi3local.export.parity import check_parity, load_reference_model
hf, onnx, words = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
model = load_reference_model(hf)
if words:
    report = check_parity(onnx, hf, prompts=[" ".join(["hello"] * words)], new_tokens=4, reference_model=model,
                          out_path=False)
    assert report["greedy_all_agree"] and report["relative_error"] < 1e-4, report["relative_error"]
    print(report["prompts"][0]["prompt_tokens"])
"""


def _peak_anon_of_parity(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    from kernels_bench.memory import ProcessMemorySampler

    proc = subprocess.Popen([sys.executable, "-c", _PARITY_IN_A_CHILD, *args], stdout=subprocess.PIPE, text=True)
    with ProcessMemorySampler(proc.pid, interval=0.02) as memory:
        out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0
    return memory.peak_anon, out.strip()


def test_parity_never_holds_every_positions_logits_twice_over(tmp_path):
    """At Phi-4-mini's real size (200,064-row vocabulary, LongRoPE prompts of 4,100 tokens) every position's logits
    are 3.3 GB in float32, and parity held about five such copies (runtime, reference, differences): the int4
    export of the real-size model was killed at 24.6 GB. The reference now makes its logits a block of rows at a
    time; what is left is the runtime's prompt logits (its buffer and our copy). Here: a 200,064-row head on a
    tiny model and a prompt of ~475 positions (its context is 512), 380 MB of logits each; above the loaded models parity needs
    under 2.6 of them (measured: 5.2 before, 2.1 now)."""
    model = H.build_tiny_model(tmp_path / "model", vocab_size=200064, hidden_size=64, intermediate_size=128)
    export_onnx(model, tmp_path / "onnx", "fp32", parity="none", show=False)
    loaded, _ = _peak_anon_of_parity(str(model), str(tmp_path / "onnx"), "0")
    peak, tokens = _peak_anon_of_parity(str(model), str(tmp_path / "onnx"), "95")
    logits_bytes = int(tokens) * 200064 * 4
    assert 400 <= int(tokens) < 512, tokens
    print("ratio", (peak - loaded) / logits_bytes)
    assert peak - loaded < 3.6 * logits_bytes, (peak - loaded) / logits_bytes


def test_int4_export_of_tied_embeddings_is_quiet_and_agrees(tmp_path, caplog):
    """Phi-4-mini ties its embedding to lm_head: the int4 graph's embedding reads lm_head's quantised weights,
    which exist only after quantising, so reading the fp32 graph back from disk made onnx_ir warn on the user's
    terminal that the model is invalid (seen at real size). The warning is expected and silenced; the export
    agrees with PyTorch greedily (measured 96 of 96 tokens)."""
    import logging

    model = H.build_tiny_model(tmp_path / "model", vocab_size=32064, hidden_size=256, intermediate_size=512,
                               tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING):
        report = export_onnx(model, tmp_path / "onnx", "int4", show=False)
    assert not [r for r in caplog.records if r.name.startswith("onnx_ir")], caplog.text[-2000:]
    assert report["parity"]["greedy_all_agree"] and report["parity"]["greedy_compared"] == 96
