"""Loading a model folder's safetensors checkpoint without keeping the whole file in the process's memory.

transformers' `from_pretrained` maps every shard (mmap) and unmaps them only once the whole model is built, so
every page it has read stays resident in the process (RssFile) until the end: a 3.8B bf16 checkpoint adds its
7.6 GB to the load's peak on top of the model being built. Measured with `phi3local train` on Phi-4-mini's real
shapes (NF4, this 2-core CPU): 7.8 GB of checkpoint pages and 5.1 GB of model at the end of the load, a 13.2 GB
peak RSS, against 8.3 GB in the training step that follows. When the load converts the weights (quantizes them
or casts them), they are read through safetensors' `pread` backend instead: each tensor is copied out of the file
when transformers converts it and freed after, so the load's peak is the model being built plus the tensors in
flight (a Phi-3-mini-shaped 8-layer model in NF4: 2.55 GB peak RSS instead of 4.61 GB, the same weights bit for
bit). A load that keeps the stored dtype goes through from_pretrained's zero-copy mapping (`converts`).

Used for folders with `model.safetensors` or a `model.safetensors.index.json`: a local folder, or for a Hub id the
snapshot folder where the Hub client's cache already holds its config and every shard (a model used before, or
fetched with `hf download`). Anything else (a Hub id not yet downloaded, .bin checkpoints, a safetensors without
the pread backend) loads through `from_pretrained` as before, which downloads and reports problems in its own
words: resolving from the cache alone adds no network call, so an unreachable Hub is waited for once.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_names(index: Path) -> list[str]:
    """The shard files a safetensors index maps the weights to."""
    return sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a model folder as its index names them, or None when it has none."""
    index = folder / INDEX
    if index.is_file():
        files = [folder / name for name in shard_names(index)]
        return files if files and all(f.is_file() for f in files) else None
    single = folder / SINGLE
    return [single] if single.is_file() else None


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder in which the Hub client's cache holds a model's config and whole safetensors checkpoint
    (the index and every shard it names); None when any of it is not there (from_pretrained then downloads it)."""
    from huggingface_hub import hf_hub_download

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=True))

    try:
        config = fetch("config.json")
        try:
            shards = shard_names(fetch(INDEX))
        except Exception:  # no index: a single-file checkpoint
            shards = [SINGLE]
        for shard in shards:
            fetch(shard)
    except Exception:
        return None
    return config.parent


def _pread_handles(files: list[Path], stack: ExitStack) -> list | None:
    from safetensors import safe_open

    try:
        return [stack.enter_context(safe_open(str(f), framework="pt", device="cpu", backend="pread")) for f in files]
    except TypeError:  # a safetensors without the backend argument (< 0.6)
        return None


STORED_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # torch dtype -> safetensors dtype


def converts(handles: list, kwargs: dict) -> bool:
    """Whether loading converts the stored weights (quantizes them, or casts them to another dtype). Only then is
    each one copied anyway, so reading it through pread costs nothing; loaded as stored, from_pretrained's mapping
    is zero-copy, and the weights stay file pages the kernel can drop, which pread would make anonymous memory
    (the export's parity reference, a fp32 merged model loaded in fp32: 22.2 GB anonymous instead of 6.9 GB)."""
    if kwargs.get("quantization_config") is not None:
        return True
    wanted = str(kwargs.get("dtype") or "auto").removeprefix("torch.")
    if wanted not in STORED_NAMES:  # auto: as stored
        return False
    stored = {handle.get_slice(key).get_dtype() for handle in handles for key in handle.keys()}  # noqa: SIM118
    return any(name in STORED_NAMES.values() and name != STORED_NAMES[wanted] for name in stored)


def from_pretrained(auto_class, name_or_path: str, config_kwargs: dict | None = None, **kwargs):
    """`auto_class.from_pretrained(name_or_path, **config_kwargs, **kwargs)`, reading the safetensors of a local
    folder or a Hub id's snapshot through pread (the module docstring says why). config_kwargs: what goes into the
    config (num_labels, ...)."""
    from transformers import AutoConfig, GenerationConfig

    config_kwargs = config_kwargs or {}
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir() and not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") == 1:
        folder = hub_snapshot(name_or_path, kwargs.get("revision")) or folder
    files = checkpoint_files(folder) if folder.is_dir() else None
    model_class = None
    if files is not None:
        config = AutoConfig.from_pretrained(str(folder), **config_kwargs)
        model_class = getattr(auto_class, "_model_mapping", {}).get(type(config), None)
    if model_class is None:
        return auto_class.from_pretrained(name_or_path, **config_kwargs, **kwargs)
    with ExitStack() as stack:
        handles = _pread_handles(files, stack)
        if handles is None or not converts(handles, kwargs):
            return auto_class.from_pretrained(name_or_path, **config_kwargs, **kwargs)
        # Slices, not tensors: transformers reads each one when it converts it, as it does with its own handles.
        state = {key: handle.get_slice(key) for handle in handles for key in handle.keys()}  # noqa: SIM118 (a handle is not iterable)
        model = model_class.from_pretrained(None, config=config, state_dict=state,
                                            **{k: v for k, v in kwargs.items() if k != "revision"})
        del state
    # from_pretrained(None, ...) names the model "None"; peft and the model facts read where it came from.
    model.config.name_or_path = model.name_or_path = name_or_path
    if (folder / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model
