"""Convert a llama2.c checkpoint (Karpathy's stories260K) into a Hugging Face `Phi3ForCausalLM` folder.

Phi-3 is Llama with two fused projections: `qkv_proj` holds the q, k and v rows one after the other and
`gate_up_proj` the gate (w1) rows then the up (w3) rows. llama2.c rotates interleaved pairs
(x[2i], x[2i+1]) where transformers rotates halves, so the q and k rows are permuted per head first,
exactly as transformers' Llama converter does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phi3local.errors import Phi3LocalError
from phi3local.model.tiny import build_once

if TYPE_CHECKING:
    from transformers import Phi3Config

V1_MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
ROPE_THETA = 10000.0  # llama2.c's run.c hard-codes both of these
RMS_NORM_EPS = 1e-5
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
# llama2.c trained TinyStories with BOS (id 1) as the only delimiter between stories and never saw
# </s> (id 2): its </s> embedding is untrained, so a LoRA fine-tune hardly learns to emit it, while
# id 1 is what the pretrained model already predicts when a text is finished. So a turn ends with <s>.
TURN_END_ID = BOS_ID

# Plain-text turn markers (the 512-piece vocabulary has no chat tokens). Every turn ends with the
# tokenizer's eos_token, which is `<s>` (see TURN_END_ID), one real token the model already predicts
# at the end of a text, so it learns to stop. The space after "Assistant:" becomes
# the `▁` of the content's first word, so the answer is tokenised as SentencePiece would tokenise it on
# its own, and the generation prompt ends before that space.
STORIES_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Bump when the converted folder changes, so cached conversions are rebuilt.
CONVERTER_VERSION = 2
ENV_SHARED_DATA = "PHI3LOCAL_SHARED_DATA"


class Llama2cFormatError(Phi3LocalError, ValueError):
    """The file is not a llama2.c float32 checkpoint this converter understands."""


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ----------------------------------------------------------------------------------------- reading


def read_llama2c(path: Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Config and float32 weights in llama2.c's own layout ([out, in] matrices, stacked over layers)."""
    raw = Path(path).read_bytes()
    if len(raw) >= 8 and struct.unpack_from("<I", raw, 0)[0] == V1_MAGIC:
        return _read_v1(raw, path)
    return _read_legacy(raw, path)


def _read_v1(raw: bytes, path: Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    version = struct.unpack_from("<i", raw, 4)[0]
    if version != 1:
        raise Llama2cFormatError(f"{path}: llama2.c export version {version}; only version 1 (fp32) is supported")
    params = struct.unpack_from("<7i", raw, 8)
    shared = bool(raw[8 + 7 * 4])
    config = Llama2cConfig(*params, shared_classifier=shared)
    # Export "version 1" order: all norms first, then the matrices.
    order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not shared:
        order.append("wcls")
    return config, _take(raw, V1_HEADER_BYTES, order, config, path)


def _read_legacy(raw: bytes, path: Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    # A negative vocab_size is how the legacy format says the classifier is not shared.
    config = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)
    order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
             "freq_cis_real", "freq_cis_imag"]
    if not config.shared_classifier:
        order.append("wcls")
    weights = _take(raw, 7 * 4, order, config, path)
    del weights["freq_cis_real"], weights["freq_cis_imag"]  # run.c recomputes RoPE; unused
    return config, weights


def _shapes(c: Llama2cConfig) -> dict[str, tuple[int, ...]]:
    kv_dim = c.n_kv_heads * c.head_dim
    return {
        "token_embedding": (c.vocab_size, c.dim),
        "rms_att": (c.n_layers, c.dim),
        "rms_ffn": (c.n_layers, c.dim),
        "rms_final": (c.dim,),
        "wq": (c.n_layers, c.n_heads * c.head_dim, c.dim),
        "wk": (c.n_layers, kv_dim, c.dim),
        "wv": (c.n_layers, kv_dim, c.dim),
        "wo": (c.n_layers, c.dim, c.n_heads * c.head_dim),
        "w1": (c.n_layers, c.hidden_dim, c.dim),
        "w2": (c.n_layers, c.dim, c.hidden_dim),
        "w3": (c.n_layers, c.hidden_dim, c.dim),
        "freq_cis_real": (c.seq_len, c.head_dim // 2),
        "freq_cis_imag": (c.seq_len, c.head_dim // 2),
        "wcls": (c.vocab_size, c.dim),
    }


def _take(raw: bytes, offset: int, order: list[str], config: Llama2cConfig, path: Path) -> dict[str, np.ndarray]:
    if min(config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) <= 0 or \
            config.dim % config.n_heads or config.n_heads % config.n_kv_heads:
        raise Llama2cFormatError(f"{path}: implausible llama2.c header {config}")
    shapes = _shapes(config)
    needed = offset + 4 * sum(int(np.prod(shapes[name])) for name in order)
    if len(raw) != needed:
        raise Llama2cFormatError(f"{path}: {len(raw)} bytes, but the header {config} implies {needed}")
    out = {}
    for name in order:
        count = int(np.prod(shapes[name]))
        out[name] = np.frombuffer(raw, dtype="<f4", count=count, offset=offset).reshape(shapes[name])
        offset += 4 * count
    return out


# ----------------------------------------------------------------------------------------- converting


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (llama2.c/Meta) to rotate-half (transformers)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def phi3_config(config: Llama2cConfig) -> Phi3Config:
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, hidden_act="silu",
        max_position_embeddings=config.seq_len, original_max_position_embeddings=config.seq_len,
        rms_norm_eps=RMS_NORM_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=config.shared_classifier, sliding_window=None,
        # <unk> pads: it never occurs in text (byte fallback), whereas a pad equal to eos (</s>) would let
        # collators that mask pad ids also mask the turn-ending </s> the model must learn to produce.
        bos_token_id=BOS_ID, eos_token_id=TURN_END_ID, pad_token_id=UNK_ID,
    )


def phi3_state_dict(config: Llama2cConfig, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """llama2.c weights under Phi-3's parameter names, with fused qkv_proj and gate_up_proj."""
    t = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()}
    sd = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        q = permute_rotary(t["wq"][i], config.n_heads)
        k = permute_rotary(t["wk"][i], config.n_kv_heads)
        sd[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, t["wv"][i]], dim=0)
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_up_proj.weight"] = torch.cat([t["w1"][i], t["w3"][i]], dim=0)
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
    sd["lm_head.weight"] = t["token_embedding"] if config.shared_classifier else t["wcls"]
    return {k: v.contiguous() for k, v in sd.items()}


def convert_llama2c(checkpoint: Path, tokenizer_model: Path, out_dir: Path) -> Path:
    """Write a Phi3ForCausalLM folder (safetensors, config, generation config, tokenizer) from llama2.c files."""
    from transformers import GenerationConfig, Phi3ForCausalLM

    config, weights = read_llama2c(Path(checkpoint))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = write_sentencepiece_tokenizer(Path(tokenizer_model), out_dir, model_max_length=config.seq_len)
    if vocab != config.vocab_size:
        raise Llama2cFormatError(f"{tokenizer_model} has {vocab} pieces but {checkpoint} has vocab {config.vocab_size}")
    hf_config = phi3_config(config)
    with torch.device("meta"):
        model = Phi3ForCausalLM(hf_config)
    model.load_state_dict(phi3_state_dict(config, weights), assign=True, strict=True)
    if config.shared_classifier:
        model.tie_weights()
    model.save_pretrained(out_dir)
    # Every stop id goes into eos_token_id: the turn end (<s>) and </s>.
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[TURN_END_ID, EOS_ID], pad_token_id=UNK_ID).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------- tokenizer


def write_sentencepiece_tokenizer(sp_model: Path, out_dir: Path, model_max_length: int) -> int:
    """tokenizer.json + tokenizer_config.json from a SentencePiece BPE model (transformers' converter).

    Two changes to the converted tokenizer: every text segment gets SentencePiece's dummy-prefix `▁`
    (also the ones after `</s>`, as when each turn is encoded on its own), and plain encoding adds BOS,
    as llama2.c always did. The chat template writes BOS itself and is encoded without special tokens.
    Returns the vocabulary size.
    """
    from tokenizers import pre_tokenizers, processors
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # transformers 5 converts a SentencePiece model only when it sits in a folder as tokenizer.model.
        shutil.copyfile(sp_model, Path(tmp) / "tokenizer.model")
        converted = LlamaTokenizer.from_pretrained(tmp)
    backend = converted.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    if backend.token_to_id("<s>") != BOS_ID or backend.token_to_id("</s>") != EOS_ID:
        raise Llama2cFormatError(f"{sp_model}: expected <s>=1 and </s>=2")
    backend.save(str(out_dir / "tokenizer.json"))
    config = {
        # The generic class: AutoTokenizer then uses tokenizer.json as written (LlamaTokenizer would rebuild
        # the pre-tokenizer).
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<s>", "eos_token": "<s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length, "padding_side": "left",  # left: batched generation
        "clean_up_tokenization_spaces": False,
        "chat_template": STORIES_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return backend.get_vocab_size()


# ----------------------------------------------------------------------------------------- cache


def shared_data_dir(shared_data: Path | str | None = None) -> Path:
    """The shared artifacts folder: the argument, else $PHI3LOCAL_SHARED_DATA, else <repo>/../shared/data."""
    if shared_data is not None:
        return Path(shared_data)
    if os.environ.get(ENV_SHARED_DATA):
        return Path(os.environ[ENV_SHARED_DATA])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_stories260k(cache_dir: Path, shared_data: Path | str | None = None) -> Path:
    """The converted stories260K folder at cache_dir, converted on first use (atomic, idempotent)."""
    data = shared_data_dir(shared_data)
    checkpoint = data / "stories260k" / "checkpoint_v1.bin"
    sp_model = data / "stories260k-tok512" / "tok512.model"
    missing = [str(p) for p in (checkpoint, sp_model) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"stories260K sources not found: {', '.join(missing)} (set {ENV_SHARED_DATA} to the shared data folder)"
        )
    stamp = {"converter_version": CONVERTER_VERSION, "checkpoint_sha256": _sha256(checkpoint),
             "tokenizer_sha256": _sha256(sp_model)}
    return build_once(Path(cache_dir), lambda tmp: convert_llama2c(checkpoint, sp_model, tmp), stamp)
