"""Tiny members of the Phi-3 family: each copies one real member's config features, built with no download.

    longrope  Phi-3-mini-128k / Phi-3.5-mini: LongRoPE with short and long factors, switching after
              `original_max_position_embeddings` (64 here, 4096 in the real ones), max 256 positions
    medium    Phi-3-medium: grouped-query attention (4 query heads share 1 key/value head, as 40 share 10)
    phi4mini  Phi-4-mini: LongRoPE on 0.75 of each head (48 of 64 dims: onnxruntime-genai's CPU rotary needs
              rotary_dims / 2 <= head_size / 2 and a multiple of 8, which Phi-4-mini's 96 of 128 pass),
              GQA 3:1, tied embeddings, a byte-level vocabulary 3.5 times the tiny Phi-3's (2112 rows), Phi-4's chat
              template and special tokens, and a pad token (`<|endoftext|>`) that is not the end of a turn
    phi4      Phi-4 (also the body of Phi-4-reasoning and -reasoning-plus): GQA 4:1 (as 40 query heads share 10),
              plain RoPE over the whole head, untied embeddings, a byte-level vocabulary whose last 96 rows are
              Phi-4's added tokens in their order (`<|im_start|>`, `<|im_sep|>`, `<|im_end|>`, reserved
              `<|dummy_i|>`, all with lstrip/rstrip as there), the `<|im_start|>role<|im_sep|>...<|im_end|>` template,
              eos `<|im_end|>` and pad `<|dummy_85|>`, which is not the end of a turn

The small sizes keep every test fast; the features are the ones that broke or could break something
(the export's rope config, the switch point, tied weights, the KV-head count). Each member is a pure
function of the texts and the seed, cached like the tiny default (`ensure_tiny_member`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phi3local.errors import Phi3LocalError
from phi3local.model.tiny import _special_ids, _vocab_of, build_once, build_tiny_tokenizer, seeded, texts_digest
from phi3local.model.tokenizer import (
    PHI4_CHAT_TEMPLATE,
    PHI4_IM_CHAT_TEMPLATE,
    PHI4_IM_PAD_TOKEN,
    PHI4_SPECIAL_TOKENS,
    phi4_im_special_tokens,
)

FAMILY_VERSION = 1  # bump when a built member changes, so cached builds are rebuilt


@dataclass(frozen=True)
class TinyMember:
    """A tiny model's shape and the real member it imitates."""

    name: str
    imitates: str  # the Hub id whose config features it copies
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    original_max_position_embeddings: int | None = None  # the LongRoPE switch; None: plain RoPE
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    # "phi3" (SentencePiece-style, tiny.py), "phi4" (byte-level, Phi-4-mini's tokens) or "phi4-im" (byte-level,
    # Phi-4's <|im_start|> tokens)
    tokenizer: str = "phi3"
    vocab_pieces: int = 512  # tokenizer entries before the chat tokens (phi3: base pieces; phi4*: learned)
    notes: tuple[str, ...] = field(default=())

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


MEMBERS: dict[str, TinyMember] = {m.name: m for m in (
    TinyMember("longrope", "microsoft/Phi-3.5-mini-instruct", max_position_embeddings=256,
               original_max_position_embeddings=64),
    TinyMember("medium", "microsoft/Phi-3-medium-4k-instruct", num_key_value_heads=1),
    TinyMember("phi4mini", "microsoft/Phi-4-mini-instruct", hidden_size=192, num_attention_heads=3,
               num_key_value_heads=1, intermediate_size=256, max_position_embeddings=256,
               original_max_position_embeddings=64, partial_rotary_factor=0.75, tie_word_embeddings=True,
               tokenizer="phi4", vocab_pieces=2048),
    # 1056 byte-level entries + Phi-4's 96 added tokens = 1152 rows, a multiple of 64 as Phi-4's 100352 are, so
    # (as there) every embedding row is a token.
    TinyMember("phi4", "microsoft/phi-4", hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
               intermediate_size=256, tokenizer="phi4-im", vocab_pieces=1056),
)}


class UnknownMemberError(Phi3LocalError, KeyError):
    """A tiny family member name that does not exist."""


def member(name: str) -> TinyMember:
    try:
        return MEMBERS[name]
    except KeyError:
        raise UnknownMemberError(f"no tiny family member {name!r}; known: {', '.join(MEMBERS)}") from None


def longrope_factors(n: int) -> tuple[list[float], list[float]]:
    """Short factors near 1 (as the real ones, 1.0-1.1) and long factors growing to 8 (the real ones reach ~60),
    so the two factor sets give clearly different rotations and a wrong switch shows in the logits."""
    short = [round(1.0 + 0.1 * i / max(n - 1, 1), 6) for i in range(n)]
    long = [round(8.0 ** (i / max(n - 1, 1)), 6) for i in range(n)]
    return short, long


def rope_parameters(m: TinyMember) -> dict:
    """The rope section as transformers 5 writes it (`rope_parameters`, key `rope_type`)."""
    if m.original_max_position_embeddings is None:
        return {"rope_type": "default", "rope_theta": 10000.0}
    short, long = longrope_factors(m.rotary_dims // 2)
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": m.original_max_position_embeddings}


# ----------------------------------------------------------------------------------------- Phi-4 tokenizer


def _byte_level_bpe(texts: Sequence[str], n_pieces: int):
    """A byte-level BPE (GPT-style, as both Phi-4 tokenizers are) trained on texts up to n_pieces entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(list(texts), trainer)
    return tok


def _save_tokenizer(tok, out_dir: Path, config: dict) -> Path:
    """tokenizer.json and a tokenizer_config.json of `config` in out_dir, as a Hugging Face folder has them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", **config}  # AutoTokenizer then uses tokenizer.json as written
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def build_phi4_tokenizer(out_dir: Path, texts: Sequence[str], n_pieces: int) -> Path:
    """A byte-level BPE (GPT-style, as Phi-4-mini's o200k-based tokenizer) with Phi-4's special tokens after
    the learned pieces, and Phi-4-mini's chat template; `<|endoftext|>` is bos, eos and pad, as there."""
    from tokenizers import AddedToken

    tok = _byte_level_bpe(texts, n_pieces)
    # As in Phi-4-mini: <|endoftext|>, reserved <|dummy_i|> tokens (here they fill the vocabulary up to
    # n_pieces, so its size is not set by how many merges the texts allow), then the chat and tool tokens.
    dummies = [f"<|dummy_{i}|>" for i in range(max(n_pieces - tok.get_vocab_size() - 1, 0))]
    specials = PHI4_SPECIAL_TOKENS[:1] + dummies + PHI4_SPECIAL_TOKENS[1:]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return _save_tokenizer(tok, out_dir, {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 256, "padding_side": "left", "clean_up_tokenization_spaces": False,
        "chat_template": PHI4_CHAT_TEMPLATE,
    })


def build_phi4_im_tokenizer(out_dir: Path, texts: Sequence[str], n_pieces: int) -> Path:
    """A byte-level BPE (Phi-4's is tiktoken cl100k-based) with Phi-4's 96 added tokens after n_pieces entries
    (reserved `<|unused_i|>` fill what the texts' merges leave, as Phi-4-mini's stand-in does), Phi-4's chat
    template, bos `<|endoftext|>`, eos `<|im_end|>` and pad `<|dummy_85|>`, as in Phi-4's tokenizer_config.json."""
    from tokenizers import AddedToken

    tok = _byte_level_bpe(texts, n_pieces)
    unused = [f"<|unused_{i}|>" for i in range(max(n_pieces - tok.get_vocab_size(), 0))]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in unused])
    # Phi-4's own tokens strip the whitespace on both sides into themselves (lstrip and rstrip true).
    tok.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True)
                            for t in phi4_im_special_tokens()])
    return _save_tokenizer(tok, out_dir, {
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": PHI4_IM_PAD_TOKEN,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 512,
        "clean_up_tokenization_spaces": False, "chat_template": PHI4_IM_CHAT_TEMPLATE,
    })


# ----------------------------------------------------------------------------------------- model


def vocab_rows(n_tokens: int, m: TinyMember) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64 (Phi-3: 32011 -> 32064), moved past
    any projection width (the export builder takes a Linear of that width for the LM head)."""
    rows = -(-n_tokens // 64) * 64
    kv = m.num_key_value_heads * m.head_dim
    widths = {m.hidden_size, m.intermediate_size, 2 * m.intermediate_size, m.num_attention_heads * m.head_dim,
              kv, m.num_attention_heads * m.head_dim + 2 * kv}
    while rows in widths:
        rows += 64
    return rows


def build_member_model(out_dir: Path, m: TinyMember, vocab_size: int, seed: int = 0) -> Path:
    """A randomly initialised Phi3ForCausalLM with m's features, saved (as transformers 5 writes it) in out_dir,
    where the tokenizer was built first (its special tokens give bos/eos/pad and the stop ids)."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    ids = _special_ids(out_dir)
    pad = ids["<|endoftext|>"]
    # Phi-4-mini ends a turn with <|end|> (its eos); its pad <|endoftext|> ends only a whole text.
    eos = ids["<|end|>"] if m.tokenizer == "phi4" else ids["<|endoftext|>"]
    stops = sorted({ids["<|end|>"], ids["<|endoftext|>"]}) if "<|end|>" in ids else []
    if m.tokenizer == "phi4-im":
        # Phi-4 ends a turn with <|im_end|> (its eos) and pads with a reserved token that ends nothing.
        pad, eos = ids[PHI4_IM_PAD_TOKEN], ids["<|im_end|>"]
        stops = sorted({eos, ids["<|endoftext|>"]})
    longrope = m.original_max_position_embeddings is not None
    config = Phi3Config(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        original_max_position_embeddings=m.original_max_position_embeddings or m.max_position_embeddings,
        partial_rotary_factor=m.partial_rotary_factor, rope_parameters=rope_parameters(m), rms_norm_eps=1e-5,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=ids.get("<s>", ids["<|endoftext|>"]), eos_token_id=eos,
        pad_token_id=pad, sliding_window=None,
    )
    if longrope:
        config.original_max_position_embeddings = m.original_max_position_embeddings
    with seeded(seed):
        model = Phi3ForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stops, pad_token_id=pad).save_pretrained(out_dir)
    return out_dir


def ensure_tiny_member(name: str, cache_dir: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """The tiny family member `name` (tokenizer + model in one HF folder) at cache_dir, built on first use."""
    m = member(name)
    texts = list(texts)

    def build(folder: Path) -> None:
        if m.tokenizer == "phi4":
            build_phi4_tokenizer(folder, texts, m.vocab_pieces)
        elif m.tokenizer == "phi4-im":
            build_phi4_im_tokenizer(folder, texts, m.vocab_pieces)
        else:
            build_tiny_tokenizer(folder, texts, m.vocab_pieces, split_punctuation=True)
        build_member_model(folder, m, vocab_rows(len(_vocab_of(folder)), m), seed=seed)

    stamp = {"family_version": FAMILY_VERSION, "member": name, "texts_sha256": texts_digest(texts), "seed": seed}
    return build_once(Path(cache_dir), build, stamp)
