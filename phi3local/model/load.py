"""Load a Phi-3-family model for training: 4-bit NF4 base (bitsandbytes), LoRA adapter (peft), attention choice."""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from phi3local.config import Recipe
from phi3local.errors import Phi3LocalError
from phi3local.model.document_attention import use_document_attention
from phi3local.model.fused_lora import use_fused_lora
from phi3local.model.pretrained import from_pretrained
from phi3local.model.selective_checkpointing import checkpoint_kwargs

log = logging.getLogger(__name__)

# Aliases for the models the project makes itself, so recipes and tests need no download.
EMBEDDED_MODELS = ("tiny", "stories260k")


class ModelSetupError(Phi3LocalError, RuntimeError):
    """The recipe asks for something this model or machine cannot do; the message says what to change."""


def cache_dir() -> Path:
    return Path(os.environ.get("PHI3LOCAL_CACHE", Path.home() / ".cache" / "phi3local")).expanduser().resolve()


def resolve_model_path(name_or_path: str) -> str:
    """Turn an embedded alias into the folder that holds it (building it on first use)."""
    if name_or_path == "tiny":
        from phi3local.data.demo import demo_texts
        from phi3local.model.tiny import ensure_tiny_default

        return str(ensure_tiny_default(cache_dir() / "tiny", demo_texts()))
    if name_or_path == "stories260k":
        from phi3local.model.llama2c import ensure_stories260k

        return str(ensure_stories260k(cache_dir() / "stories260k"))
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        # A path, not a Hub id ("org/name"): say so, rather than the Hub client's complaint about repo ids.
        raise ModelSetupError(f"model.name_or_path: {name_or_path}: no such folder")
    return name_or_path


def revision_kwargs(name_or_path: str, revision: str | None) -> dict:
    """{"revision": ...} for a Hub id when the recipe pins one (from_pretrained refuses it for nothing else)."""
    return {"revision": revision} if revision and not Path(name_or_path).expanduser().is_dir() else {}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU fp32 is both the exact and (without AMX) the fastest choice.
    return torch.float32


def pick_attn_implementation(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    flash_ok = (
        device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability()[0] >= 8
    )
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ModelSetupError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU of compute capability >= 8.0, "
            "the flash-attn package (pip install 'phi3local[cuda]') and a 16-bit compute dtype; "
            "use model.attn_implementation=sdpa (exact, slower) or auto"
        )
    return requested


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what LoRA `target_modules` can name)."""
    import bitsandbytes as bnb

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    present = linear_layer_names(model)
    missing = [t for t in targets if t not in present]
    if missing:
        hint = ""
        if {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(missing):
            hint = (" Phi-3 fuses q/k/v into 'qkv_proj' and gate/up into 'gate_up_proj'"
                    " (names copied from Llama notebooks do not exist here).")
        raise ModelSetupError(
            f"lora.target_modules names {missing}, which this model does not have. "
            f"Its linear layers are: {present}.{hint}"
        )


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a peft model (or the plain model when lora.enabled is false)
    device: torch.device
    compute_dtype: torch.dtype
    attn_implementation: str
    base_path: str


def load_model(recipe: Recipe, tokenizer, device: torch.device | None = None) -> LoadedModel:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    device = device or pick_device()
    dtype = pick_compute_dtype(recipe.model.compute_dtype, device)
    attn = pick_attn_implementation(recipe.model.attn_implementation, device, dtype)
    base_path = resolve_model_path(recipe.model.name_or_path)
    # model.adapter is checked before the base loads: a wrong path or LoRA shape fails in a second.
    start = check_start_adapter(recipe, base_path) if recipe.model.adapter else None
    quant = recipe.quantization
    kwargs: dict = {"attn_implementation": attn, "dtype": dtype, **revision_kwargs(base_path, recipe.model.revision)}
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            # Storing 4-bit weights in the compute dtype lets FSDP/compile treat them like any parameter.
            bnb_4bit_quant_storage=dtype,
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index else device.type}
    if recipe.task == "classification":
        labels = recipe.model.labels
        if len(labels) < 2:
            raise ModelSetupError("task=classification needs model.labels with at least two label names")
        model = from_pretrained(AutoModelForSequenceClassification, base_path, config_kwargs={
            "num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = from_pretrained(AutoModelForCausalLM, base_path, **kwargs)
    if not quant.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        keep_cpu_4bit_layout(model)
    if attn == "sdpa":  # packed rows' documents attended one by one, not through a whole-row mask
        use_document_attention(model)
    log.info("attention implementation: %s, compute dtype: %s, device: %s", attn, dtype, device)

    prepare_for_training(model, dtype, recipe.training.gradient_checkpointing is True,
                         freeze=quant.load_in_4bit or recipe.lora.enabled,
                         selective=recipe.training.selective_checkpointing is True)
    model.config.use_cache = False

    if recipe.lora.enabled:
        check_target_modules(model, recipe.lora.target_modules)
        modules_to_save = list(recipe.lora.modules_to_save)
        if recipe.task == "classification" and "score" not in modules_to_save:
            modules_to_save.append("score")
        tied = [m for m in modules_to_save if m.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")]
        if tied and getattr(model.config, "tie_word_embeddings", False):
            # peft trains a separate copy of each listed module: the merged model would carry two matrices.
            raise ModelSetupError(
                f"lora.modules_to_save lists {tied}, but this model ties its input and output embeddings "
                "(tie_word_embeddings, e.g. Phi-4-mini): training a copy would untie them and double their size "
                "in the merged model. Remove them from lora.modules_to_save (LoRA on the other layers suffices)")
        lora_config = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=recipe.lora.target_modules,
            use_dora=recipe.lora.use_dora,
            use_rslora=recipe.lora.use_rslora,
            modules_to_save=modules_to_save or None,
            revision=revision_kwargs(base_path, recipe.model.revision).get("revision"),  # merge loads the same
            task_type=TaskType.SEQ_CLS if recipe.task == "classification" else TaskType.CAUSAL_LM,
        )
        if start is not None:  # the adapter's own config (its rank/alpha patterns too), with this run's settings
            lora_config = start_config(start, lora_config)
        model = get_peft_model(model, lora_config)
        keep_trainable_fp32(model)
        # peft stores the path it was given; keep the resolved folder so merge finds the base offline.
        model.peft_config[TRAINED_ADAPTER].base_model_name_or_path = base_path
        if start is not None:
            load_start_adapter(model, start, recipe)
        if recipe.training.fused_lora:
            use_fused_lora(model)
    return LoadedModel(model=model, device=device, compute_dtype=dtype, attn_implementation=attn,
                       base_path=base_path)


def prepare_for_training(model: torch.nn.Module, dtype: torch.dtype, gradient_checkpointing: bool,
                         freeze: bool = True, selective: bool = False) -> None:
    """Freeze the base model with its floating parameters in the compute dtype, and turn on checkpointing
    (`selective`: keeping the expensive ops' outputs, `phi3local.model.selective_checkpointing`).

    What peft's prepare_model_for_kbit_training does, minus its fp32 upcast of embeddings, lm_head and
    norms: that upcast cost ~1 GiB of fp32 copies on Phi-3-mini (4.0 -> 3.1 GiB and 0.282 -> 0.138 s/step
    measured on an H100, kernels_bench/results/train_e2e_full.json) and the one-step loss stays equal
    (tests/test_model_load.py). The 4-bit weights (Params4bit) keep their packed storage.
    """
    import bitsandbytes as bnb

    for param in model.parameters():
        if freeze:  # LoRA and modules_to_save get their trainable weights from peft afterwards
            param.requires_grad_(False)
        if param.is_floating_point() and param.dtype != dtype and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)
    if gradient_checkpointing:
        kwargs = checkpoint_kwargs(selective)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_trainable_fp32(model: torch.nn.Module) -> None:
    """Trainable weights (LoRA, modules_to_save copies) in fp32: bf16 updates of lr x grad round to zero.

    peft already upcasts LoRA weights (autocast_adapter_dtype); the modules_to_save copies inherit the
    base model's compute dtype and are upcast here. Their fp32 AdamW state follows.
    """
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.is_floating_point()]
        if not any(p.dtype != torch.float32 for p in own):
            continue
        for param in own:
            param.data = param.data.float()
        if isinstance(module, torch.nn.Linear):  # e.g. the classification head fed bf16 hidden states
            module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def activation_offload(enabled: bool, device: torch.device):
    """The context that keeps tensors saved for backward in (pinned) CPU memory during the forward pass.

    With gradient checkpointing those are the checkpointed layer inputs (the recomputation in backward
    runs outside the context and stays on the GPU): long contexts then cost host memory instead of GPU
    memory. On a CPU device there is nothing to move.
    """
    import contextlib

    if enabled and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def keep_cpu_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' trainable NF4 layout on CPUs with AVX512-BF16.

    On such CPUs bitsandbytes (0.50) repacks a Linear4bit's weight in place for a faster bf16 kernel the
    first time it runs without gradients (our evaluation). Two things then go wrong: the packing asserts
    out_features % 32 == 0 (stories260K's gate_up_proj has 344), and every later forward, training ones
    included, runs that kernel, which has no autograd formula: no gradient flows back through the frozen
    4-bit weights, silently (only the LoRA branch carries one), so earlier layers learn from a wrong
    gradient. The training loop alternates evaluation and training, so the trainable layout is kept.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_adapter(model, adapter_dir: Path, error: type[Exception]):
    """peft's PeftModel over `model`; damaged adapter weights are an `error` naming the file, not a traceback."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (SafetensorError, OSError) as e:
        raise error(f"{adapter_dir / 'adapter_model.safetensors'} cannot be read "
                    f"({str(e).splitlines()[0][:200]}); the adapter is damaged") from None


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying *ForCausalLM / *ForSequenceClassification under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------- model.adapter: start from one

# peft's names of the two adapters a run started from model.adapter holds: the one that trains (and is the only one
# saved) and, for preference tuning with a reference, a frozen copy of the adapter as it was loaded.
TRAINED_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
# The LoRA keys that shape an adapter's weights or scale them: a recipe continuing an adapter must say the same.
# (recipe key, adapter_config.json key)
LORA_SHAPE_KEYS = (("r", "r"), ("alpha", "lora_alpha"), ("target_modules", "target_modules"),
                   ("use_dora", "use_dora"), ("use_rslora", "use_rslora"), ("modules_to_save", "modules_to_save"))


@dataclass
class StartAdapter:
    """model.adapter resolved and checked against the recipe (`check_start_adapter`)."""

    given: str  # as the recipe says it (errors name it)
    folder: Path  # the peft folder: adapter_config.json, adapter_model.safetensors
    config: dict  # adapter_config.json

    @property
    def weights(self) -> Path:
        return self.folder / "adapter_model.safetensors"


def resolve_start_adapter(recipe: Recipe) -> tuple[str, Path]:
    """(model.adapter as given, the peft folder it names): a peft adapter folder, or a run or checkpoint folder
    holding one in adapter/. A relative path is read beside the recipe file, else from the current folder."""
    given = str(recipe.model.adapter)
    path = Path(given).expanduser()
    source = Path(recipe.source)
    if not path.is_absolute() and recipe.source not in ("<defaults>", "<dict>") and source.is_file():
        beside = source.parent / path
        if beside.exists():
            path = beside
    if not path.is_dir():
        raise ModelSetupError(f"model.adapter: {given}: no such folder (give a run folder or a peft adapter folder)")
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return given, folder
    if (path / "checkpoints").is_dir():
        raise ModelSetupError(f"model.adapter: {given} is a run that has not finished (no adapter/ yet): finish it "
                              f"with --resume, or name one of its checkpoints ({path / 'checkpoints'}/step-N)")
    raise ModelSetupError(f"model.adapter: {given} is neither a peft adapter folder nor a run folder with adapter/ "
                          "(no adapter_config.json)")


def check_start_adapter(recipe: Recipe, base_path: str) -> StartAdapter:
    """model.adapter resolved and checked, before anything loads: a LoRA adapter in safetensors, trained on this
    base model (and revision), whose LoRA shape the recipe repeats; each refusal is one line naming the key."""
    import json

    given, folder = resolve_start_adapter(recipe)
    where = f"model.adapter: {given}"
    if not recipe.lora.enabled:
        raise ModelSetupError(f"{where}: continuing an adapter needs lora.enabled=true")
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelSetupError(f"{where}: {folder / 'adapter_config.json'} cannot be read ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ModelSetupError(f"{where}: {folder} holds a {kind or 'non-peft'} adapter; phi3local continues LoRA "
                              "adapters only")
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ModelSetupError(
            f"{where}: {folder} has no adapter_model.safetensors"
            + (" (its adapter_model.bin is a pickle, which phi3local never loads: re-save it with peft's "
               "save_pretrained(safe_serialization=True))" if pickled else ""))
    trained_on = config.get("base_model_name_or_path")
    if not trained_on:
        raise ModelSetupError(f"{where}: {folder / 'adapter_config.json'} names no base_model_name_or_path")
    if not _same_base(str(trained_on), folder, base_path):
        raise ModelSetupError(f"{where} was trained on {trained_on}, but model.name_or_path is "
                              f"{recipe.model.name_or_path}: set model.name_or_path={trained_on}")
    pinned = revision_kwargs(base_path, recipe.model.revision).get("revision")
    if not Path(base_path).expanduser().is_dir() and (config.get("revision") or None) != pinned:
        raise ModelSetupError(f"{where} was trained on revision {config.get('revision') or 'latest (none pinned)'} of "
                              f"{trained_on}, this recipe asks for {pinned or 'the latest'}: set "
                              f"model.revision={config.get('revision') or 'null'}")
    if config.get("task_type") == "SEQ_CLS" and recipe.task != "classification":
        raise ModelSetupError(f"{where} is a classification adapter; task={recipe.task} needs a causal-LM one")
    wrong = []
    for key, theirs in LORA_SHAPE_KEYS:
        mine, saved = getattr(recipe.lora, key), config.get(theirs)
        if key in ("target_modules", "modules_to_save"):
            mine = sorted(set(mine) - {"score"})
            if isinstance(saved, str):  # a regular expression: no recipe list says the same
                raise ModelSetupError(f"{where} names its target modules by the pattern {saved!r}; phi3local "
                                      "continues adapters whose target_modules are a list of names")
            saved = sorted(set(saved or []) - {"score"})
        elif key in ("use_dora", "use_rslora"):
            saved = bool(saved)
        if mine != saved:
            wrong.append((key, mine, saved))
    if wrong:
        def show(value):
            return f"[{','.join(value)}]" if isinstance(value, list) else str(value).lower()

        raise ModelSetupError(
            f"{where} was trained with {', '.join(f'lora.{k}={show(s)}' for k, _, s in wrong)}; this recipe has "
            f"{', '.join(f'lora.{k}={show(m)}' for k, m, _ in wrong)}: set "
            f"{' '.join(f'lora.{k}={show(s)}' for k, _, s in wrong)} (an adapter continues in its own shape)")
    return StartAdapter(given=given, folder=folder, config=config)


def _same_base(trained_on: str, adapter_folder: Path, base_path: str) -> bool:
    """Whether adapter_config.json's base (a folder, maybe relative to the adapter, an embedded alias, or a Hub id)
    is the model the recipe loads."""
    if trained_on == base_path:
        return True
    if trained_on in EMBEDDED_MODELS:
        return resolve_model_path(trained_on) == base_path
    mine = Path(base_path).expanduser()
    for candidate in (Path(trained_on).expanduser(), adapter_folder / trained_on):
        if candidate.is_dir() and mine.is_dir():
            return candidate.resolve() == mine.resolve()
    return False


def start_config(start: StartAdapter, recipe_config):
    """The trained adapter's peft config: the start adapter's own (its rank and alpha patterns, layers, bias: what
    its weights mean), with this run's dropout, task type, modules_to_save (a classification head added) and base."""
    import copy

    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(start.folder))
    config = copy.deepcopy(config)
    config.lora_dropout = recipe_config.lora_dropout
    config.task_type = recipe_config.task_type
    config.modules_to_save = recipe_config.modules_to_save
    config.revision = recipe_config.revision
    config.inference_mode = False
    return config


def load_start_adapter(model, start: StartAdapter, recipe: Recipe) -> None:
    """Put the start adapter's weights into the trained adapter; for preference tuning with a reference (dpo, ipo)
    also load them into a frozen second adapter, the reference (`reference_adapter`). Only the trained adapter is
    saved (checkpoints and the final adapter)."""
    _load_weights(model, start, TRAINED_ADAPTER)
    if _compares_with_reference(recipe):
        add_reference_adapter(model, start)
    _save_trained_adapter_only(model)


def add_start_reference(model, recipe: Recipe, base_path: str) -> None:
    """For `phi3local eval` of a run that continued model.adapter (`model`: the run's adapter loaded by peft): the
    reference training compared with (dpo, ipo), so the rewards are the ones training logged."""
    if recipe.model.adapter and _compares_with_reference(recipe):
        add_reference_adapter(model, check_start_adapter(recipe, base_path))
        _save_trained_adapter_only(model)


def _compares_with_reference(recipe: Recipe) -> bool:
    from phi3local.train.preference_loss import uses_reference

    return recipe.task == "preference" and uses_reference(recipe.preference.loss)


def add_reference_adapter(model, start: StartAdapter) -> None:
    """The start adapter again, as the frozen adapter `reference` beside the trained one: no dropout, no gradient,
    its trainable copies (modules_to_save) in the dtype of the trained ones."""
    import copy

    config = copy.deepcopy(model.peft_config[TRAINED_ADAPTER])
    config.lora_dropout, config.inference_mode = 0.0, True
    model.add_adapter(REFERENCE_ADAPTER, config)
    params = dict(model.named_parameters())
    marker = f".{REFERENCE_ADAPTER}."
    for name, param in params.items():
        if marker not in name:
            continue
        param.requires_grad_(False)
        twin = params.get(name.replace(marker, f".{TRAINED_ADAPTER}."))
        if twin is not None and twin.dtype != param.dtype:  # e.g. an fp32 lm_head copy: compare like with like
            param.data = param.data.to(twin.dtype)
    for name, module in model.named_modules():
        if name.endswith(f"modules_to_save.{REFERENCE_ADAPTER}") and isinstance(module, torch.nn.Linear) \
                and module.weight.dtype == torch.float32:
            module.register_forward_pre_hook(_inputs_to_fp32)
    _load_weights(model, start, REFERENCE_ADAPTER)


def _load_weights(model, start: StartAdapter, adapter_name: str) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"model.adapter: {start.given}"
    try:
        weights = load_file(str(start.weights))
    except (SafetensorError, OSError) as e:
        raise ModelSetupError(f"{where}: {start.weights} cannot be read ({str(e).splitlines()[0][:200]}); the "
                              "adapter is damaged") from None
    # A classification head the adapter did not have (a causal-LM adapter continuing as classification) keeps its
    # fresh weights; any other weight must come from the file.
    fresh = set(model.peft_config[adapter_name].modules_to_save or []) - set(start.config.get("modules_to_save") or [])
    if fresh:
        from peft.utils import get_peft_model_state_dict

        current = get_peft_model_state_dict(model, adapter_name=adapter_name)
        weights.update({k: v for k, v in current.items() if k not in weights and any(f".{m}." in f".{k}" for m in fresh)})
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    except (RuntimeError, KeyError) as e:  # a size mismatch: another model's adapter under the same name
        raise ModelSetupError(f"{where}: {start.weights} does not fit this model and LoRA config "
                              f"({str(e).splitlines()[-1].strip()[:200]})") from None
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        names = (list(result.unexpected_keys) or missing)[:3]
        raise ModelSetupError(f"{where}: {start.weights} does not fit this model and LoRA config "
                              f"({'unexpected' if result.unexpected_keys else 'missing'} weights: {names})")


def _save_trained_adapter_only(model) -> None:
    """peft saves every adapter of a model (the others in subfolders); checkpoints and the final adapter must hold
    the trained one alone, where merge, export, chat and --resume read it."""
    save = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        kwargs.setdefault("selected_adapters", [TRAINED_ADAPTER])
        return save(save_directory, *args, **kwargs)

    model.save_pretrained = save_pretrained


def has_reference_adapter(model) -> bool:
    return REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {})


@contextmanager
def reference_adapter(model):
    """The frozen start adapter active for the block's forward passes (preference tuning's reference after
    model.adapter); afterwards the trained adapter is active again and exactly the parameters that required a
    gradient before do again (peft's set_adapter changes requires_grad)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(TRAINED_ADAPTER, inference_mode=True)
        for param in trainable:
            param.requires_grad_(True)
