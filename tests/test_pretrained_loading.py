"""Loading a checkpoint leaves only the model in memory, not the checkpoint's file pages (phi3local.model.pretrained).

Found at real size: `phi3local train` on Phi-4-mini peaked at 13.2 GB RSS while loading, 7.8 GB of it the bf16
checkpoint's pages, which transformers' from_pretrained keeps mapped until the whole model is built; the
training step after it needed 8.3 GB. Reproduced here on a model whose 4-bit weights are a quarter of its
268 MB checkpoint, each loader in a fresh process.
"""

import gc
import json

import pytest
import torch

from kernels_bench.isolate import run_isolated

LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 8, 1024, 4096, 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Phi-3-shaped model in two bf16 safetensors shards with an index, as the Hub ships large models."""
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    config = Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                        num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=16,
                        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Phi3ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    names = list(shapes)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in part}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def load_peak(folder: str, loader: str) -> dict:
    """In a fresh process: the rise of peak RSS and of resident file pages (RssFile, sampled every 10 ms) while
    `loader` loads the model in NF4 (the second time: the first imports what a 4-bit load needs), and its logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kernels_bench.memory import ProcessMemorySampler, current_rss_bytes, reset_peak_rss, vm_hwm_bytes
    from phi3local.model.pretrained import from_pretrained

    kwargs = {"dtype": torch.float32, "device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)}
    def load():
        if loader == "transformers":
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        return from_pretrained(AutoModelForCausalLM, folder, **kwargs)

    load()  # the libraries a first 4-bit load imports (bitsandbytes' backends, ...) are not the load's memory
    gc.collect()
    assert reset_peak_rss()
    before, files_before = current_rss_bytes(), ProcessMemorySampler(interval=0.01)
    files_before.sample()
    with ProcessMemorySampler(interval=0.01) as sampled:
        model = load()
    peak_rise = vm_hwm_bytes() - before
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"peak_rise": peak_rise, "file_pages_rise": sampled.peak_file - files_before.peak_file,
            "logits": logits.flatten()[::97].tolist(),
            "class": type(model).__name__, "eos": model.generation_config.eos_token_id}


def test_loading_holds_the_model_and_not_the_checkpoint_pages(checkpoint):
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    ours = run_isolated("tests.test_pretrained_loading:load_peak", {"folder": str(checkpoint), "loader": "phi3local"},
                        timeout=600)
    theirs = run_isolated("tests.test_pretrained_loading:load_peak",
                          {"folder": str(checkpoint), "loader": "transformers"}, timeout=600)
    mb = {k: {m: round(r[m] / 1e6) for m in ("peak_rise", "file_pages_rise")} for k, r in
          (("phi3local", ours), ("transformers", theirs))}
    print(f"checkpoint {checkpoint_bytes / 1e6:.0f} MB; rises in MB: {mb}")
    # The cause, still there in transformers: every page of the checkpoint it read stays resident to the end.
    assert theirs["file_pages_rise"] > 0.9 * checkpoint_bytes, (mb, checkpoint_bytes)
    # Ours: the file's pages are copied out tensor by tensor, never held.
    assert ours["file_pages_rise"] < 0.05 * checkpoint_bytes, (mb, checkpoint_bytes)
    assert ours["peak_rise"] < theirs["peak_rise"], mb
    assert ours["logits"] == theirs["logits"]  # the same weights, bit for bit
    assert ours["class"] == theirs["class"] == "Phi3ForCausalLM" and ours["eos"] == theirs["eos"] == 2


def test_a_single_file_checkpoint_cast_on_load_gives_the_same_weights(tmp_path):
    """merge loads this way (a checkpoint cast to fp32, no quantization): the same tensors as from_pretrained's. A
    load in the stored dtype keeps from_pretrained's zero-copy mapping (the parity reference: a fp32 merged model
    in fp32 held 22.2 GB anonymous through pread instead of 6.9 GB)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Phi3Config, Phi3ForCausalLM

    from phi3local.model.pretrained import checkpoint_files, converts, from_pretrained

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(tmp_path)
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt", backend="pread") as stored_fp32:
        assert not converts([stored_fp32], {"dtype": torch.float32}) and not converts([stored_fp32], {})
        assert converts([stored_fp32], {"dtype": torch.bfloat16})
        assert converts([stored_fp32], {"dtype": torch.float32, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True)})
    model = from_pretrained(AutoModelForCausalLM, str(tmp_path), dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert model.config.name_or_path == str(tmp_path)


def test_a_folder_it_cannot_read_whole_goes_to_from_pretrained(tmp_path):
    from phi3local.model.pretrained import checkpoint_files

    assert checkpoint_files(tmp_path) is None  # nothing there
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    assert checkpoint_files(tmp_path) is None  # a shard the index names is missing: transformers says which


def hub_load(repo_id: str) -> dict:
    """In a process whose Hub cache and offline mode come from its environment: load `repo_id` both ways."""
    from transformers import AutoModelForCausalLM

    from phi3local.model.pretrained import from_pretrained, hub_snapshot

    snapshot = hub_snapshot(repo_id)
    ours = from_pretrained(AutoModelForCausalLM, repo_id, dtype=torch.bfloat16)  # cast: read through pread
    theirs = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.bfloat16)
    same = ours.state_dict().keys() == theirs.state_dict().keys() and all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    return {"snapshot": str(snapshot), "missing": hub_snapshot("acme/not-there"), "same": same,
            "name_or_path": ours.name_or_path, "eos": ours.generation_config.eos_token_id}


def test_a_hub_id_loads_from_its_cached_snapshot_the_same_way(tmp_path):
    """A Hub id (the usual model.name_or_path) goes through the snapshot folder the Hub client keeps: here a cache
    laid out as the client lays it out, read offline."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-phi"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=7)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(snapshot, max_shard_size="20KB")
    GenerationConfig(eos_token_id=[7, 5]).save_pretrained(snapshot)
    assert (snapshot / "model.safetensors.index.json").is_file()
    result = run_isolated("tests.test_pretrained_loading:hub_load", {"repo_id": "acme/tiny-phi"}, timeout=300,
                          env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result["snapshot"] == str(snapshot)
    assert result["missing"] is None  # not cached and offline: from_pretrained gets it and says so
    assert result["same"] and result["name_or_path"] == "acme/tiny-phi" and result["eos"] == [7, 5]
