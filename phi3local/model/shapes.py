"""The Phi-3 family's real shapes, known without a download (from the public configs, see ../shared/FACTS.md).

Used where the numbers matter before any weight is fetched: the memory plan of a recipe, the checks that a
shipped recipe fits its target card, and the tiny family members that copy each member's config features.
`known_shape(model_id)` answers for a Hub id (a revision suffix or a different case is fine); a local folder
is read from its own config.json with `shape_from_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan and the recipe checks need to know about a Phi3ForCausalLM."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # embedding rows (larger than len(tokenizer): never resize to the tokenizer)
    max_position_embeddings: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    original_max_position_embeddings: int | None = None  # the LongRoPE switch point; None without LongRoPE
    rope_type: str = "default"  # "longrope" for the 128k / 3.5 / Phi-4-mini(-reasoning) members
    partial_rotary_factor: float = 1.0  # Phi-4-mini rotates 0.75 of each head
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    model_id: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.dims_per_head * self.partial_rotary_factor)

    @property
    def parameter_count(self) -> int:
        """All parameters: embeddings, lm_head (once when tied), attention, MLP, norms."""
        d, hd = self.hidden_size, self.dims_per_head
        attention = d * hd * (self.num_attention_heads + 2 * self.num_key_value_heads) + self.num_attention_heads * hd * d
        mlp = 3 * d * self.intermediate_size  # gate_up_proj (2 x intermediate) + down_proj
        norms = 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attention + mlp + norms) + embeddings + d


_PHI3_MINI = ModelShape(
    hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
    vocab_size=32064, max_position_embeddings=4096, pad_token_id=32000, eos_token_ids=(32000, 32001, 32007),
    sliding_window=2047, model_id="microsoft/Phi-3-mini-4k-instruct",
    notes=("the tokenizer has 32011 entries: the embedding keeps 32064 rows",
           "pad 32000 (<|endoftext|>) is also an eos id"),
)

_LONGROPE = dict(max_position_embeddings=131072, original_max_position_embeddings=4096, rope_type="longrope")

# Phi-4 (microsoft/phi-4, 14B): Phi-3-medium's body (40 layers, 5120 wide, 40 heads on 10 key/value heads) with
# a 100352-row tiktoken-style vocabulary (every row a token: 100256 byte-level pieces, then <|dummy_i|>,
# <|endoftext|> 100257, <|im_start|> 100264, <|im_end|> 100265, <|im_sep|> 100266, <|endofprompt|> 100276),
# untied embeddings, plain RoPE over the whole head, 16k positions. Ids from its tokenizer_config.json (Microsoft's
# test copy in onnxruntime-extensions, test/data/phi-4-base): eos <|im_end|>, pad <|dummy_85|> = 100349.
_PHI4 = ModelShape(
    hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10, intermediate_size=17920,
    vocab_size=100352, max_position_embeddings=16384, pad_token_id=100349, eos_token_ids=(100265,),
    model_id="microsoft/phi-4",
    notes=("chat format <|im_start|>role<|im_sep|>...<|im_end|>; pad <|dummy_85|> is not the end of a turn",
           "untied: the input and output embeddings are 0.5B parameters each, kept in 16 bits by QLoRA"),
)
_PHI4_REASONING = ("the Phi-4 body fine-tuned to answer with a <think>...</think> trace, 32k positions",)

KNOWN_SHAPES: dict[str, ModelShape] = {
    s.model_id.lower(): s
    for s in (
        _PHI3_MINI,
        replace(_PHI3_MINI, model_id="microsoft/Phi-3-mini-128k-instruct", sliding_window=None, **_LONGROPE),
        replace(_PHI3_MINI, model_id="microsoft/Phi-3.5-mini-instruct", sliding_window=None, **_LONGROPE),
        ModelShape(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                   intermediate_size=17920, vocab_size=32064, max_position_embeddings=4096, pad_token_id=32000,
                   eos_token_ids=(32000, 32001, 32007), model_id="microsoft/Phi-3-medium-4k-instruct"),
        ModelShape(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                   intermediate_size=17920, vocab_size=32064, pad_token_id=32000,
                   eos_token_ids=(32000, 32001, 32007), model_id="microsoft/Phi-3-medium-128k-instruct", **_LONGROPE),
        ModelShape(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                   intermediate_size=8192, vocab_size=200064, partial_rotary_factor=0.75, tie_word_embeddings=True,
                   pad_token_id=199999, eos_token_ids=(200020,), model_id="microsoft/Phi-4-mini-instruct",
                   notes=("full-vocabulary fp32 logits of 4096 tokens are 3.3 GB",), **_LONGROPE),
        _PHI4,
        replace(_PHI4, model_id="microsoft/Phi-4-reasoning", max_position_embeddings=32768, notes=_PHI4_REASONING),
        replace(_PHI4, model_id="microsoft/Phi-4-reasoning-plus", max_position_embeddings=32768,
                notes=_PHI4_REASONING),
        ModelShape(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                   intermediate_size=8192, vocab_size=200064, partial_rotary_factor=0.75, tie_word_embeddings=True,
                   pad_token_id=199999, eos_token_ids=(200020,), model_id="microsoft/Phi-4-mini-reasoning",
                   notes=("the Phi-4-mini body; answers with a <think>...</think> trace (plain text, not a token)",
                          "full-vocabulary fp32 logits of 4096 tokens are 3.3 GB"), **_LONGROPE),
    )
}


def known_shape(model_id: str) -> ModelShape | None:
    """The shape of a family member by Hub id (case-insensitive, `@revision` ignored), or None."""
    return KNOWN_SHAPES.get(model_id.split("@", 1)[0].strip().lower())


def shape_from_config(config: dict | Path) -> ModelShape:
    """A ModelShape from a config.json (a path or its parsed dict), as transformers 4 or 5 writes it."""
    if isinstance(config, Path):
        config = json.loads((config / "config.json" if config.is_dir() else config).read_text())
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    eos = config.get("eos_token_id")
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 4096), head_dim=config.get("head_dim"),
        # transformers 5 may keep it inside rope_parameters only
        original_max_position_embeddings=(config.get("original_max_position_embeddings")
                                          or rope.get("original_max_position_embeddings"))
        if rope_type in ("longrope", "su") else None,
        rope_type="longrope" if rope_type == "su" else rope_type,
        partial_rotary_factor=config.get("partial_rotary_factor") or 1.0,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), pad_token_id=config.get("pad_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        sliding_window=config.get("sliding_window"), model_id=config.get("_name_or_path", ""),
    )


def longrope_switch(name_or_path: str) -> int | None:
    """The LongRoPE switch point (original_max_position_embeddings) of a local folder or a known Hub id;
    None without LongRoPE or when the model is neither (batching then plans as for plain RoPE)."""
    folder = Path(name_or_path).expanduser()
    shape = shape_from_config(folder) if (folder / "config.json").is_file() else known_shape(name_or_path)
    return _switch(shape) if shape is not None else None


def longrope_switch_of(config: dict | Path) -> int | None:
    """The LongRoPE switch point of a config.json (a path or its parsed dict, either LongRoPE form), else None:
    where training batches keep long documents apart, the export writes longrope.json and llama.cpp's
    context must stay at or below it."""
    return _switch(shape_from_config(config))


def _switch(shape: ModelShape) -> int | None:
    if shape.rope_type != "longrope" or shape.original_max_position_embeddings is None:
        return None  # without the key transformers takes max_position_embeddings: the factors never switch
    return int(shape.original_max_position_embeddings)
