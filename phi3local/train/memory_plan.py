"""The memory a training step will need, worked out from the model's shapes before anything is loaded.

Parts (bytes), for `micro_batch_size` rows of `max_seq_len` tokens (a packed row is full; the plan is the
worst case of a padded one too), rounded up to data.pad_to_multiple_of as collate pads them (the width can
then exceed max_seq_len, up to the model's positions):
- weights: the 4-bit NF4 linear layers (half a byte per weight, plus one uint8 absmax per 64 weights and
  one fp32 absmax per 256 of those with double quant, fp32 absmax per 64 without), and the parts kept in
  the compute dtype (embeddings, lm_head, norms; `phi3local.model.load.prepare_for_training`);
- LoRA: the adapter weights (fp32), their gradients (fp32) and the optimizer state (AdamW: two fp32
  moments; paged 8-bit AdamW: two uint8 moments plus a fp32 scale per 256), and the same for
  lora.modules_to_save copies;
- activations: what autograd keeps for backward. Without checkpointing, per token and layer, the
  tensors each op of a Phi-3 decoder layer saves (listed in `saved_per_token_per_layer`) plus one
  layer's gradients in flight; with checkpointing, one layer input per layer plus one layer recomputed;
  selective checkpointing also keeps, per token and layer, the outputs of the frozen matmuls and attention
  (`selective_kept_per_token_per_layer`);
- loss: `phi3local.train.loss` keeps the trained tokens' hidden states and their gradient, plus one
  chunk of fp32 logits (and its cast when the lm_head weight is 16-bit).

`task: classification` (a `*ForSequenceClassification` model) has no lm_head and no vocabulary loss: its
`score` head (hidden x labels, no bias) is kept frozen in the compute dtype and trained as a fp32
modules_to_save copy (weights, gradient, optimizer state), and it maps every token's final hidden state to
labels-wide logits of which the loss takes each row's last real token (`phi3local.train.recipe.forward_loss`).

`task: preference` scores a pair's two sequences (prompt + chosen, prompt + rejected) in one row, so a row of
the plan is 2 x max_seq_len tokens (data.max_seq_len bounds one sequence) and every count above is for those
tokens. dpo and ipo add the reference pass: the same model with its adapter off under no_grad, run on the
micro-batch before the policy's forward, when nothing of the step is kept yet. No-grad frees each layer's
tensors as the next one starts, so it needs about one layer's forward tensors (the saved-tensor count of a
layer, an upper bound) plus the residual stream and one loss chunk: the plan takes the larger of that and the
policy's peak (an approximation stated as such; orpo and simpo have no reference pass; with
preference.precompute_reference the pass runs once before training, not in the step, and the plan counts it
the same). Started from an SFT adapter (`model.adapter`), the reference is that adapter kept frozen beside the
trained one: its weights (the trained adapter's size, fp32) are counted as `reference_adapter`.

`training.parallelism: fsdp` on N ranks (`ranks`, from the launcher's WORLD_SIZE unless given): every part of the
weights, the LoRA weights and gradients and the optimizer state is held 1/N per rank (FSDP2 shards each on dim 0;
`phi3local.train.fsdp`), plus what is gathered whole while the step runs (`gathered`): the root unit (embeddings,
lm_head, final norm) for the whole pass and two decoder layers (the one computing and the next, prefetched).
Activations are per rank as without sharding.

Checked against torch's own accounting of a real CPU step in tests/test_memory_plan.py (within 15%), and the
same way at real size (Phi-3-mini and Phi-4-mini, 512 tokens, selective checkpointing: within 1.1%;
docs/benchmarks.md).
The device side: CUDA's free memory (`torch.cuda.mem_get_info`) less a reserve for the CUDA context and
allocator slack; on CPU the available RAM (MemAvailable).

The plan's peak counts the step's tensors only. A run's summary reports, on CUDA, the allocator's peak of
tensors (`torch.cuda.max_memory_allocated`, comparable with the plan) and, on CPU, the process's peak
resident memory (RSS), which also holds the Python runtime, torch and the other libraries, the tokenizer
and the data: hundreds of MiB more than the plan for a tiny model.

The longest sequence is searched up to the model's positions (max_position_embeddings): a longer row is
not one the model can take, however much memory there is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from phi3local.config import Recipe
from phi3local.errors import Phi3LocalError
from phi3local.model.shapes import ModelShape, known_shape, shape_from_config
from phi3local.train.batching import padded_width, resolved_pad_to_multiple_of
from phi3local.train.preference_loss import uses_reference

GIB = 1024**3
LONGEST_SEARCHED = 262144  # the longest sequence searched when the model's positions are unknown
# CUDA: the context, cuBLAS workspace and allocator fragmentation that tensor accounting does not see.
CUDA_RESERVE_BYTES = int(0.75 * GIB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The linear layers of a Phi-3 decoder layer (LoRA targets the plan counts; see layer_linears for their sizes).
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class MemoryPlanError(Phi3LocalError, RuntimeError):
    """The shapes for a plan are unknown, or the plan does not fit; the message says what would."""


@dataclass
class MemoryPlan:
    micro_batch_size: int
    max_seq_len: int
    gradient_checkpointing: bool
    compute_dtype: str
    optimizer: str
    weights_4bit: int
    weights_kept: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    activations: int  # kept for backward over the whole step
    backward_working: int  # extra while backward passes one layer
    loss: int  # extra while one loss chunk runs (backward_working and loss never overlap)
    available: int | None = None  # bytes the step may use on the device; None: unknown
    device: str = ""
    task: str = "causal_lm"  # classification: `loss` is the score head's logits, not a vocabulary chunk
    width: int = 0  # tokens per sequence planned: max_seq_len rounded up to data.pad_to_multiple_of
    sequences: int = 1  # sequences per row: 2 for preference pairs (chosen and rejected)
    reference: int = 0  # preference dpo/ipo: the reference pass's no-grad forward (before anything is kept)
    ranks: int = 1  # fsdp: the ranks every weight, gradient and optimizer state above is sharded over (per rank)
    gathered: int = 0  # fsdp: gathered whole during the step (the root unit and two decoder layers)
    reference_adapter: int = 0  # dpo/ipo from model.adapter: the start adapter kept frozen as the reference (fp32)
    selective_checkpointing: bool = False  # with checkpointing: the frozen matmuls' and attention's outputs kept
    cpu_offload: bool = False  # fsdp: the shards (weights, LoRA weights and gradients, optimizer) in host memory

    @property
    def shards(self) -> int:
        """The weights, LoRA weights and gradients and optimizer state (one rank's shards under fsdp)."""
        return self.weights_4bit + self.weights_kept + self.lora_weights + self.lora_gradients + self.optimizer_state

    @property
    def total(self) -> int:
        """The device's peak; with cpu_offload the shards are in host memory instead (`host`)."""
        return ((0 if self.cpu_offload else self.shards) + self.reference_adapter + self.gathered
                + max(self.activations + max(self.backward_working, self.loss), self.reference))

    @property
    def host(self) -> int:
        """Host memory the step's shards take under cpu_offload (0 otherwise)."""
        return self.shards if self.cpu_offload else 0

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "host": self.host, "fits": self.fits}


def layer_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    d, hd = shape.hidden_size, shape.dims_per_head
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    return {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * shape.intermediate_size),
            "down_proj": (shape.intermediate_size, d)}


def weight_bytes(shape: ModelShape, dtype_bytes: int, double_quant: bool = True,
                 load_in_4bit: bool = True, num_labels: int = 0) -> tuple[int, int]:
    """(4-bit linear layers incl. their quantization constants, parts kept in the compute dtype).

    num_labels > 0: a classification model, whose `score` head (hidden x num_labels) replaces the lm_head."""
    n_linear = shape.num_hidden_layers * sum(i * o for i, o in layer_linears(shape).values())
    if load_in_4bit:
        blocks = n_linear / 64
        constants = blocks + blocks / 256 * 4 if double_quant else blocks * 4
        quantized = int(n_linear / 2 + constants)
    else:
        quantized = n_linear * dtype_bytes
    if num_labels:
        rows = shape.vocab_size * shape.hidden_size + shape.hidden_size * num_labels
    else:
        rows = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    return quantized, (rows + norms) * dtype_bytes


def trainable_parameter_count(shape: ModelShape, r: int, targets: list[str], modules_to_save: list[str],
                              num_labels: int = 0) -> int:
    """LoRA's parameters plus the modules_to_save copies; num_labels > 0: a classification model, which
    trains its `score` head (load.py adds it to modules_to_save) and has no lm_head to train."""
    count = shape.num_hidden_layers * sum(r * (i + o) for name, (i, o) in layer_linears(shape).items()
                                          if name in targets)
    embedding = shape.vocab_size * shape.hidden_size
    heads = ("embed_tokens",) if num_labels else ("embed_tokens", "lm_head")
    count += embedding * sum(1 for m in modules_to_save if m in heads)
    return count + shape.hidden_size * num_labels


def optimizer_state_bytes(params: int, optimizer: str) -> int:
    if optimizer == "paged_adamw_8bit":
        return int(params * 2 + params / 256 * 2 * 4)
    return params * 8


def saved_per_token_per_layer(shape: ModelShape, b: int, r: int, n_lora: int, fused_lora: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer (b: compute dtype bytes; LoRA runs in fp32).

    Counted with a saved-tensors hook over a real forward (unique storages, weights excluded) on
    Phi-3-shaped models of several widths, in fp32 and bf16: per layer 5 fp32 and 6 compute-dtype
    tensors of hidden width (the norms' fp32 input and normalised tensor, q, k, v, the attention output
    and o_proj's input, the residual sum), 1 fp32 and 3 compute-dtype tensors of intermediate width
    (gate_up_proj's output counts two; silu(gate), silu(gate) * up, peft's fp32 copy for the adapter),
    the r-wide middle of each LoRA layer (fp32) and the attention's fp32 log-sum-exp per head.
    With the fused 4-bit LoRA node (`phi3local.model.fused_lora`) the adapters' inputs are kept in the compute
    dtype instead of peft's fp32 copies: 3 hidden-width and the intermediate-width one, b bytes instead of 4
    (measured the same way: 3,032 instead of 3,672 bytes per token on the tiny model in bf16; equal in fp32).
    """
    adapter_input = b if fused_lora else 4
    return ((2 * 4 + 3 * adapter_input + 6 * b) * shape.hidden_size + (adapter_input + 3 * b) * shape.intermediate_size
            + 4 * r * n_lora + 4 * shape.num_attention_heads)


def selective_kept_per_token_per_layer(shape: ModelShape, b: int) -> int:
    """Bytes selective checkpointing keeps per token and layer beyond the layer's input
    (`phi3local.model.selective_checkpointing`): the frozen matmuls' outputs (qkv, o, gate_up, down) and
    attention's (its output, and a fp32 log-sum-exp per head), in the compute dtype."""
    qkv = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.dims_per_head
    return b * (qkv + 3 * shape.hidden_size + 2 * shape.intermediate_size) + 4 * shape.num_attention_heads


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, gradient_checkpointing: bool,
                     r: int, n_lora: int, selective: bool = False, fused_lora: bool = False) -> tuple[int, int]:
    """(kept for backward through the whole step, extra while backward passes one layer).

    Kept: every layer's saved tensors, or with checkpointing only each layer's input (selective: plus the
    kept outputs of `selective_kept_per_token_per_layer`); plus the loss's
    gradient w.r.t. the trained hidden states (`phi3local.train.loss`) and half a hidden width more (the
    embedding output and final norm). In backward a layer's gradients (about three hidden widths in the
    compute dtype) are alive, and with checkpointing the recomputed layer's saved tensors too (selective: less
    the kept outputs, which the recomputation reuses).
    """
    b, d = dtype_bytes, shape.hidden_size
    per_layer = saved_per_token_per_layer(shape, b, r, n_lora, fused_lora)
    kept_per_layer = d * b if gradient_checkpointing else per_layer
    recomputed = per_layer if gradient_checkpointing else 0
    if gradient_checkpointing and selective:  # the recomputation reuses the kept outputs instead of making them
        selective_kept = selective_kept_per_token_per_layer(shape, b)
        kept_per_layer += selective_kept
        recomputed = max(per_layer - selective_kept, 0)
    kept = tokens * (shape.num_hidden_layers * kept_per_layer + d * b + d * b // 2)
    working = tokens * (3 * d * b + recomputed)
    return kept, working


def loss_bytes(shape: ModelShape, trained_tokens: int, dtype_bytes: int, chunk_size: int,
               head_trained: bool) -> int:
    """Extra while one chunk of the loss runs: its fp32 logits and logsumexp's temporary of the same size,
    plus (16-bit lm_head) the matmul output and the gradient's cast; a trained lm_head's fp32 gradient."""
    chunk = min(chunk_size, trained_tokens)
    head_bytes = 4 if head_trained else dtype_bytes
    per_row = 2 * 4 + (2 * head_bytes if head_bytes < 4 else 0)
    head_grad = shape.vocab_size * shape.hidden_size * 4 if head_trained else 0
    return chunk * shape.vocab_size * per_row + head_grad


def classification_head_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, num_labels: int) -> tuple[int, int]:
    """(kept for backward, extra while the loss runs) of the `score` head over `tokens` tokens.

    Kept: with a 16-bit body the fp32 head's input cast (`phi3local.model.load.keep_trainable_fp32`), which
    it saves for its weight gradient (a fp32 body's head saves the final norm's output, already counted).
    Extra: every token's fp32 logits and, in backward, their gradient (labels wide: kilobytes), and the
    head's fp32 weight gradient. No vocabulary-sized logits exist, so nothing else."""
    kept = tokens * shape.hidden_size * 4 if dtype_bytes < 4 else 0
    return kept, 2 * tokens * num_labels * 4 + shape.hidden_size * num_labels * 4


def reference_pass_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, r: int, n_lora: int, loss: int,
                         fused_lora: bool = False) -> int:
    """The preference reference pass (no grad): one layer's forward tensors, the residual stream and its input,
    and one loss chunk (the module docstring says why this approximates it)."""
    per_layer = saved_per_token_per_layer(shape, dtype_bytes, r, n_lora, fused_lora)
    return tokens * (per_layer + 2 * shape.hidden_size * dtype_bytes) + loss


def plan_step(shape: ModelShape, recipe: Recipe, micro_batch_size: int, max_seq_len: int,
              gradient_checkpointing: bool, compute_dtype: str, optimizer: str,
              available: int | None = None, device: str = "", ranks: int = 1, selective: bool = False) -> MemoryPlan:
    """The plan for one micro-batch of `micro_batch_size` x `max_seq_len` tokens (rounded up to the recipe's
    data.pad_to_multiple_of for `device`, default cpu), every token trained; per rank of `ranks` under fsdp."""
    b = DTYPE_BYTES[compute_dtype]
    multiple = resolved_pad_to_multiple_of(recipe.data.pad_to_multiple_of, device or "cpu")
    width = padded_width(max_seq_len, multiple, shape.max_position_embeddings or None)
    lora = recipe.lora
    targets = [t for t in lora.target_modules if t in LINEARS] if lora.enabled else []
    saved = list(lora.modules_to_save) if lora.enabled else []
    num_labels = len(recipe.model.labels) if recipe.task == "classification" else 0
    quantized, unquantized = weight_bytes(shape, b, recipe.quantization.double_quant, recipe.quantization.load_in_4bit,
                                          num_labels)
    trainable = trainable_parameter_count(shape, lora.r, targets, saved, num_labels)
    sequences = 2 if recipe.task == "preference" else 1
    tokens = micro_batch_size * width * sequences
    selective = selective and gradient_checkpointing
    fused = bool(targets) and recipe.quantization.load_in_4bit and recipe.training.fused_lora
    saved_tensors, working = activation_bytes(shape, tokens, b, gradient_checkpointing, lora.r, len(targets),
                                              selective, fused)
    if num_labels:
        head_kept, loss = classification_head_bytes(shape, tokens, b, num_labels)
        saved_tensors += head_kept
    else:
        loss = loss_bytes(shape, tokens, b, recipe.training.loss_chunk_size, "lm_head" in saved)
    reference = reference_adapter = 0
    if recipe.task == "preference" and uses_reference(recipe.preference.loss):
        reference = reference_pass_bytes(shape, tokens, b, lora.r, len(targets), loss, fused)
        if recipe.model.adapter:  # the reference is the start adapter, a frozen fp32 copy beside the trained one
            reference_adapter = trainable * 4
    gathered = 0
    if ranks > 1:  # fsdp: the root unit (all but the decoder layers) and two layers whole, the rest sharded
        layers = max(shape.num_hidden_layers, 1)
        gathered = unquantized + 2 * (quantized + trainable * 4) // layers
    return MemoryPlan(
        micro_batch_size=micro_batch_size, max_seq_len=max_seq_len, gradient_checkpointing=gradient_checkpointing,
        compute_dtype=compute_dtype, optimizer=optimizer, weights_4bit=_per_rank(quantized, ranks),
        weights_kept=_per_rank(unquantized, ranks), lora_weights=_per_rank(trainable * 4, ranks),
        lora_gradients=_per_rank(trainable * 4, ranks),
        optimizer_state=_per_rank(optimizer_state_bytes(trainable, optimizer), ranks),
        activations=saved_tensors, backward_working=working,
        loss=loss,
        available=available, device=device, task=recipe.task, width=width, sequences=sequences, reference=reference,
        ranks=ranks, gathered=gathered, reference_adapter=reference_adapter, selective_checkpointing=selective,
        cpu_offload=ranks > 1 and recipe.training.fsdp_cpu_offload,
    )


def _per_rank(total: int, ranks: int) -> int:
    """One rank's share of `total` bytes sharded over `ranks` (rounded up, as FSDP2 pads the last shard)."""
    return -(-total // ranks)


def fsdp_ranks(recipe: Recipe, environ=None) -> int:
    """The ranks the recipe shards over: the launcher's WORLD_SIZE under training.parallelism=fsdp, else 1 (ddp and
    one process hold everything on every rank)."""
    environ = os.environ if environ is None else environ
    if recipe.training.parallelism != "fsdp":
        return 1
    try:
        return max(int(environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:  # the launcher's variables are checked where the ranks start (train.distributed)
        return 1


# --------------------------------------------------------------------------------------------- inputs

def recipe_shape(recipe: Recipe) -> ModelShape:
    """The model's shapes: its config.json when the model is a local folder, else the known family shapes."""
    name = recipe.model.name_or_path
    if name in ("tiny", "stories260k"):
        from phi3local.model.load import resolve_model_path

        name = resolve_model_path(name)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text()))
    shape = known_shape(name)
    if shape is None:
        shape = _cached_hub_shape(name)
    if shape is None:
        raise MemoryPlanError(f"model.name_or_path: {name}: no local config.json and not a known Phi-3-family "
                              "model id, so its shapes are unknown without a download")
    return shape


def _cached_hub_shape(name: str) -> ModelShape | None:
    """The shapes of a Hub model already in the local Hugging Face cache (never downloads)."""
    try:
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(name, local_files_only=True).to_dict())
    except (OSError, ValueError, KeyError, ImportError):
        return None


def device_kind(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolved_dtype(recipe: Recipe, device: str) -> str:
    """model.compute_dtype as load.pick_compute_dtype decides it (a card planned from here: bf16)."""
    if recipe.model.compute_dtype != "auto":
        return recipe.model.compute_dtype
    if device != "cuda":
        return "float32"
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def resolved_optimizer(recipe: Recipe, device: str) -> str:
    """auto: paged 8-bit AdamW on CUDA, torch AdamW elsewhere and where the optimizer steps in host memory
    (training.fsdp_cpu_offload)."""
    choice = recipe.training.optimizer
    if choice != "auto":
        return choice
    return "paged_adamw_8bit" if device == "cuda" and not recipe.training.fsdp_cpu_offload else "adamw"


def available_bytes(device: str) -> int | None:
    """What a training step may allocate: CUDA free memory less a reserve, or the CPU's available RAM."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return max(free - CUDA_RESERVE_BYTES, 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def card_bytes(gib: float) -> int:
    """A card of `gib` GiB ("a 24 GB card"): what a step may use after the CUDA reserve."""
    return max(int(gib * GIB) - CUDA_RESERVE_BYTES, 0)


def parse_memory(text: str) -> float:
    """'16GB', '16 GiB', '16G', '16' -> 16.0 (GiB: card makers' 'GB' are GiB); anything else raises."""
    t = text.strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    try:
        value = float(t)
    except ValueError:
        raise MemoryPlanError(f"--device-memory {text!r}: expected a size such as 16GB or 24GiB") from None
    if not value > 0 or not math.isfinite(value):
        raise MemoryPlanError(f"--device-memory {text!r}: must be a positive size")
    return value


# --------------------------------------------------------------------------------------------- search

@dataclass
class PlanReport:
    plan: MemoryPlan
    largest_micro_batch: int  # at plan.max_seq_len; 0: not even one row fits
    # At longest_at_micro_batch, multiples of 128 up to the model's positions (LONGEST_SEARCHED when they are
    # unknown), never above them; 0: none fits.
    longest_seq_len: int
    longest_at_micro_batch: int = 1  # the micro-batch longest_seq_len is for
    model_positions: int = 0  # the model's max_position_embeddings (0: unknown); no row may be longer

    @property
    def longest_limited_by(self) -> str:
        """What stops longest_seq_len: "model positions" (memory would allow more), "memory", or "search"
        (the model's positions unknown and LONGEST_SEARCHED fits)."""
        if self.model_positions and self.longest_seq_len >= self.model_positions:
            return "model positions"
        return "search" if self.longest_seq_len >= LONGEST_SEARCHED else "memory"

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "largest_micro_batch": self.largest_micro_batch,
                "longest_seq_len": self.longest_seq_len, "longest_limited_by": self.longest_limited_by,
                "longest_at_micro_batch": self.longest_at_micro_batch, "model_positions": self.model_positions}


def make_plan(recipe: Recipe, device: str | None = None, available: int | None = None,
              micro_batch_size: int | None = None, gradient_checkpointing: bool | None = None,
              shape: ModelShape | None = None, ranks: int | None = None,
              selective_checkpointing: bool | None = None) -> PlanReport:
    """The plan of the recipe on `device` (default: this machine's) against `available` bytes (default: its
    free memory), with the largest micro-batch and longest sequence that fit; per rank of `ranks` under fsdp
    (default `fsdp_ranks`: the launcher's WORLD_SIZE)."""
    device = device_kind(device)
    ranks = ranks if ranks is not None else fsdp_ranks(recipe)
    shape = shape or recipe_shape(recipe)
    if available is None:
        available = available_bytes(device)
    dtype, optimizer = resolved_dtype(recipe, device), resolved_optimizer(recipe, device)
    t = recipe.training
    mbs = micro_batch_size or (t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1)
    gc = gradient_checkpointing if gradient_checkpointing is not None else t.gradient_checkpointing is not False
    # auto counts as off (the least memory), as auto checkpointing counts as on
    selective = (selective_checkpointing if selective_checkpointing is not None
                 else t.selective_checkpointing is True)
    seq = recipe.data.max_seq_len

    def plan(batch: int, length: int) -> MemoryPlan:
        return plan_step(shape, recipe, batch, length, gc, dtype, optimizer, available, device, ranks, selective)

    largest = largest_fitting(lambda n: plan(n, seq).fits, 1, 4096)
    at = mbs if largest >= 1 else 1  # nothing fits at this length: how long a row of one may be
    positions = shape.max_position_embeddings or 0
    longest = _longest(lambda n: plan(at, n).fits, positions or LONGEST_SEARCHED)
    return PlanReport(plan(mbs, seq), largest, longest, at, positions)


def largest_fitting(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n) (fits is monotone: true then false); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _longest(fits, limit: int) -> int:
    step = 128 if limit >= 128 else 1
    n = largest_fitting(lambda k: fits(k * step), 1, max(limit // step, 1))
    return limit if n == limit // step and fits(limit) else n * step


# --------------------------------------------------------------------------------------------- summary

LIMITED_BY = {"model positions": "model positions", "memory": "memory",
              "search": f"search ({LONGEST_SEARCHED})"}


def _checkpointing(p: MemoryPlan) -> str:
    if not p.gradient_checkpointing:
        return "checkpointing off"
    return "selective checkpointing" if p.selective_checkpointing else "checkpointing on"


def plan_table(report: PlanReport, title: str = "memory plan"):
    """Two columns (part, bytes) that fit 80 terminal columns, then the verdict and what fits; every memory
    figure says what it counts (the step's tensors, not the process: see the module's docstring)."""
    from rich.table import Table

    from phi3local.units import format_bytes

    p = report.plan
    padded = f" (max_seq_len {p.max_seq_len} padded)" if p.width > p.max_seq_len else ""
    pairs = f" x {p.sequences} sequences" if p.sequences > 1 else ""
    per_rank = f", per rank of {p.ranks} (fsdp{', offload' if p.cpu_offload else ''})" if p.ranks > 1 else ""
    table = Table(title=f"{title}: {p.micro_batch_size}{pairs} x {p.width or p.max_seq_len} tokens{padded}, {p.compute_dtype}, "
                        f"{_checkpointing(p)}{per_rank}",
                  title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    shards = [
        ("weights, 4-bit", p.weights_4bit), (f"weights, {p.compute_dtype}", p.weights_kept),
        ("LoRA weights + gradients", p.lora_weights + p.lora_gradients), (f"optimizer ({p.optimizer})", p.optimizer_state),
    ]
    rows = ([] if p.cpu_offload else shards) + [
        ("activations kept", p.activations), ("backward, one layer", p.backward_working),
        ("score head logits" if p.task == "classification" else "loss chunk", p.loss),
    ] + ([("reference adapter (frozen)", p.reference_adapter)] if p.reference_adapter else []) + (
        [("reference pass (no grad)", p.reference)] if p.reference else []) + (
        [("gathered (fsdp root + 2 layers)", p.gathered)] if p.ranks > 1 else [])
    for name, value in rows:
        table.add_row(name, format_bytes(value))
    table.add_row("[bold]peak (step's tensors)[/]", f"[bold]{format_bytes(p.total)}[/]")
    if p.cpu_offload:  # fsdp_cpu_offload: the shards are host memory, not the device's
        table.add_row("host memory (offloaded shards)", format_bytes(p.host))
    if p.available is not None:
        table.add_row(f"available ({p.device})", format_bytes(p.available))
        verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
        table.add_row("verdict", verdict)
    table.add_row("largest micro-batch", f"{report.largest_micro_batch} at {p.max_seq_len} tokens")
    table.add_row("longest sequence", f"{report.longest_seq_len} at micro-batch {report.longest_at_micro_batch}")
    table.add_row("  limited by", LIMITED_BY[report.longest_limited_by])
    table.add_row("model positions", str(report.model_positions) if report.model_positions else "unknown")
    peak = "peak: the step's tensors (of the last two parts only the larger: they never overlap)"
    if p.reference:
        peak = ("peak: the step's tensors (backward and loss chunk never overlap; the reference pass runs before "
                "anything is kept: the larger of it and the rest)")
    if p.device == "cpu":
        table.caption = (f"{peak}. A run's summary shows the process's peak RSS: that plus Python, torch, the "
                         "other libraries and the data. available: the RAM free now.")
    else:
        table.caption = (f"{peak}, as a run's summary counts them on CUDA. available: the card's free memory less "
                         f"{format_bytes(CUDA_RESERVE_BYTES)} for the CUDA context and allocator slack.")
    table.caption_justify = "left"
    return table


def does_not_fit_message(report: PlanReport) -> str:
    p = report.plan
    from phi3local.units import format_bytes

    fixes = []
    if report.largest_micro_batch >= 1:
        fixes.append(f"training.micro_batch_size={report.largest_micro_batch} (raise training.grad_accum to keep "
                     "the batch)")
    if report.longest_seq_len >= 1:
        batch = "" if report.longest_at_micro_batch == p.micro_batch_size else "training.micro_batch_size=1 with "
        fixes.append(f"{batch}data.max_seq_len={min(report.longest_seq_len, p.max_seq_len)}")
    if not p.gradient_checkpointing:
        fixes.append("training.gradient_checkpointing=true")
    if p.selective_checkpointing:
        fixes.append("training.selective_checkpointing=false")
    hint = "; ".join(fixes) if fixes else "a GPU with more memory (even one row of 128 tokens does not fit)"
    return (f"the memory plan needs {format_bytes(p.total)} for micro_batch_size={p.micro_batch_size} x "
            f"max_seq_len={p.max_seq_len}, but {p.device} has {format_bytes(p.available)} available; what fits: "
            f"{hint}")
