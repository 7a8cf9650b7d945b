"""Recipes: typed dataclasses loaded from YAML, with `key=value` overrides from the command line.

The names here are the names in the YAML recipes and the names the stages use, unchanged.
Unknown keys and values of the wrong type are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe (or an override) is wrong; the message names the key and the file."""


@dataclass
class ModelConfig:
    # Local folder or Hub id of a Phi-3-family checkpoint; "tiny" is the embedded default model.
    name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"
    # Tokenizer folder or id; defaults to the model's own.
    tokenizer: str | None = None
    # "auto" picks flash_attention_2 on CUDA when flash-attn is importable, else sdpa.
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    # "auto": bf16 where the GPU supports it, fp16 on older CUDA GPUs, fp32 on CPU.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Label names for task=classification (the head has len(labels) outputs).
    labels: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train_file: str | None = None
    validation_file: str | None = None
    # auto: guess from file extension and the fields of the first row.
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "classification"] = "auto"
    # For CSV/Parquet/JSON with other column names: {our_name: their_column}, e.g. {prompt: question}.
    columns: dict[str, str] = field(default_factory=dict)
    val_fraction: float = 0.1
    split_seed: int = 42
    on_error: Literal["fail", "skip"] = "fail"
    max_errors_shown: int = 20
    max_seq_len: int = 2048
    # How to fit a conversation longer than max_seq_len: drop whole oldest turns, or reject the row.
    truncation: Literal["turns", "error"] = "turns"
    min_tokens: int = 0
    max_tokens: int | None = None
    dedupe: bool = True
    normalize_whitespace: bool = True
    system_prompt: str | None = None
    packing: bool = True
    # Where `prepare` writes its output; defaults to <output_dir>/prepared.
    prepared_dir: str | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    use_dora: bool = False
    use_rslora: bool = False
    # Train these modules fully (e.g. ["embed_tokens", "lm_head"]); the classification head is added for you.
    modules_to_save: list[str] = field(default_factory=list)
    enabled: bool = True


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class TrainingConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    epochs: int = 1
    # When > 0, overrides epochs.
    max_steps: int = 0
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    # "auto": paged 8-bit AdamW (bitsandbytes) on CUDA, torch AdamW elsewhere.
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = "auto"
    compile: bool = False
    # Tokens per chunk of the chunked cross-entropy (never materialise [tokens x vocab] at once).
    loss_chunk_size: int = 1024
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Peak FLOP/s of the device for MFU; 0 means measure it.
    peak_flops: float = 0.0
    display: Literal["auto", "rich", "plain", "none"] = "auto"


@dataclass
class EvalConfig:
    every: int = 0
    max_batches: int = 0
    generate_samples: int = 2
    max_new_tokens: int = 64


@dataclass
class ExportConfig:
    precision: Literal["int4", "fp16", "bf16", "fp32"] = "int4"
    target: Literal["cpu", "cuda"] = "cpu"
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class AzureConfig:
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    endpoint_name: str | None = None
    instance_type: str = "Standard_NC24ads_A100_v4"
    compute: str | None = None


@dataclass
class Recipe:
    task: Literal["causal_lm", "classification"] = "causal_lm"
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    azure: AzureConfig = field(default_factory=AzureConfig)
    # Where the recipe came from (not a recipe key): used to resolve relative data paths and in errors.
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Return `value` converted to `annotation`, or raise a RecipeError naming `key` and `source`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, source)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _check_type(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: {key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: {key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{source}: {key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise RecipeError(f"{source}: {key}: unsupported type {annotation}")


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: {prefix.rstrip('.') or '<top>'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields)
            raise RecipeError(f"{source}: unknown key '{prefix}{key}' (known keys here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check_type(value, hint, f"{prefix}{key}", source)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"command line: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    # YAML parsing gives 1e-4 -> float, true -> bool, [a, b] -> list, null -> None.
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def _coerce_scientific(value: Any) -> Any:
    # PyYAML reads "1e-4" (no dot) as a string; recipes write learning rates that way.
    if isinstance(value, str):
        try:
            if any(c in value for c in "eE") and value.strip()[0] in "0123456789.-+":
                return float(value)
        except ValueError:
            return value
    return value


def _walk_coerce(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _walk_coerce(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_walk_coerce(v) for v in values]
    return _coerce_scientific(values)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe and apply `key=value` overrides (dotted keys, YAML values)."""
    values: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from e
        values = loaded or {}
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(values).__name__}")
    values = _walk_coerce(values)
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"command line: {text!r}: '{k}' is not a section")
        node[keys[-1]] = _coerce_scientific(value)
    recipe = _build(Recipe, values, "", source if not overrides else f"{source} (with overrides)")
    recipe.source = source
    return recipe


def recipe_from_dict(values: dict[str, Any], source: str = "<dict>") -> Recipe:
    recipe = _build(Recipe, _walk_coerce(values), "", source)
    recipe.source = source
    return recipe
