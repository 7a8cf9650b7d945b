"""The embedded default model: a tiny random Phi-3 with a small Phi-3-style tokenizer, built with no download.

The tokenizer copies the structure of Phi-3's own `tokenizer.json` (SentencePiece-style BPE with byte
fallback: `<unk>`, `<s>`, `</s>`, then `<0x00>`..`<0xFF>`, then learned pieces; a `▁` prepended to every
text segment) and Phi-3's real chat tokens and template, so data preparation, masking, stopping and
export behave as they do for Phi-3-mini. Everything is a pure function of the texts and the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phi3local.model.tokenizer import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS

TINY_VOCAB = 512  # base pieces (specials, 256 bytes, learned); Phi-3's 5 chat tokens come after
N_BYTES = 256
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
# Phi-3 gives <|endoftext|> no rstrip and the chat tags rstrip=True: the '\n' the template writes after
# a tag is absorbed into it.
RSTRIP = {"<|endoftext|>": False, "<|assistant|>": True, "<|system|>": True, "<|end|>": True, "<|user|>": True}
STAMP_FILE = "phi3local_build.json"
TINY_VERSION = 1  # bump when the built folder changes, so cached builds are rebuilt


# ----------------------------------------------------------------------------------------- tokenizer


def _train_pieces(texts: Sequence[str], n_pieces: int, split_punctuation: bool = False
                  ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learned pieces and merges (BPE inside `▁`-prefixed words, as SentencePiece splits on whitespace).

    split_punctuation: no merge takes in punctuation. onnxruntime-extensions' BPE splits a word such as
    "assistant." differently from `tokenizers` when a learned piece ends in punctuation, so only then do
    onnxruntime-genai and transformers encode every text the same way.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    if split_punctuation:
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(vocab_size=len(BASE_SPECIALS) + n_pieces, special_tokens=BASE_SPECIALS,
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)  # deterministic: checked across processes
    model = json.loads(tok.to_str())["model"]
    learned = sorted(((p, i) for p, i in model["vocab"].items() if p not in BASE_SPECIALS), key=lambda x: x[1])
    return dict(learned), [tuple(m) for m in model["merges"]]


def build_tiny_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int = TINY_VOCAB,
                         split_punctuation: bool = False) -> Path:
    """Train a small Phi-3-style BPE tokenizer on texts and save it (tokenizer.json + config) in out_dir."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    n_fixed = len(BASE_SPECIALS) + N_BYTES
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size must exceed {n_fixed} (3 specials + 256 byte pieces), got {vocab_size}")
    learned, merges = _train_pieces(texts, vocab_size - n_fixed, split_punctuation)
    vocab = {p: i for i, p in enumerate(BASE_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(BASE_SPECIALS) + b for b in range(N_BYTES)})
    for piece in learned:  # in trained order: alphabet, then one piece per merge
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Phi-3's tokenizer.json: no pre-tokenizer; the normaliser marks spaces and prefixes each segment.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # no BOS, as Phi-3
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BASE_SPECIALS[:2]])
    tok.add_tokens([AddedToken("</s>", normalized=False, rstrip=True, special=False)])  # as in Phi-3
    tok.add_special_tokens([AddedToken(t, normalized=False, rstrip=RSTRIP[t], special=True)
                            for t in PHI3_SPECIAL_TOKENS])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "TokenizersBackend",  # AutoTokenizer then uses tokenizer.json as written
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 512, "padding_side": "left", "clean_up_tokenization_spaces": False,
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ----------------------------------------------------------------------------------------- model


def _special_ids(folder: Path) -> dict[str, int]:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return {}
    return {t["content"]: t["id"] for t in json.loads(path.read_text(encoding="utf-8"))["added_tokens"]}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random weights drawn from `seed` alone, leaving the caller's random state as it was.

    A run seeds torch, then may build its model here or read it from the cache: either way what it draws next
    (the LoRA init, dropout) must be the same, or the same recipe gives another run depending on the cache.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_model(
    out_dir: Path,
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    sliding_window: int | None = None,
) -> Path:
    """A randomly initialised Phi3ForCausalLM saved in out_dir.

    Build the tokenizer into out_dir first: its Phi-3 special tokens give bos/eos/pad and the stop ids
    (`<|end|>`, `<|endoftext|>`) written to generation_config.json.
    """
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    head_dim = hidden_size // num_attention_heads
    linear_outs = {hidden_size, 2 * intermediate_size, (num_attention_heads + 2 * num_key_value_heads) * head_dim}
    if vocab_size in linear_outs | {intermediate_size}:
        # onnxruntime-genai's builder takes any Linear with out_features == vocab_size for the LM head.
        raise ValueError(f"vocab_size {vocab_size} equals a layer width {sorted(linear_outs)}; pick another size")
    ids = _special_ids(out_dir)
    eos, pad = ids.get("<|endoftext|>"), ids.get("<|endoftext|>")
    stops = sorted(ids[t] for t in ("<|end|>", "<|endoftext|>") if t in ids)
    config = Phi3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=max_position_embeddings, sliding_window=sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # as Phi-3-mini
        bos_token_id=ids.get("<s>"), eos_token_id=eos, pad_token_id=pad,
    )
    with seeded(seed):
        model = Phi3ForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stops or eos, pad_token_id=pad
                     ).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------- cache


def build_once(target: Path, build: Callable[[Path], Any], stamp: dict[str, Any]) -> Path:
    """Build a folder once: reuse target if its stamp matches, else build in a temp folder and rename.

    A crash never leaves a half folder at target (the stamp is written last, inside the temp folder), and
    two processes racing both end up with one complete folder.
    """
    target = Path(target)
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists() and not _stamp_matches(target, stamp):
            stale = target.with_name(f".stale-{target.name}-{os.getpid()}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _stamp_matches(target, stamp):  # someone else's complete build is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stamp_matches(folder: Path, stamp: dict[str, Any]) -> bool:
    path = folder / STAMP_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(stamp))
    except (OSError, ValueError):
        return False


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def ensure_tiny_default(cache_dir: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """The tiny default (tokenizer + model in one HF folder) at cache_dir, built on first use."""
    texts = list(texts)

    def build(folder: Path) -> None:
        build_tiny_tokenizer(folder, texts)
        n_tokens = len(_vocab_of(folder))
        build_tiny_model(folder, vocab_size=n_tokens, seed=seed)

    stamp = {"tiny_version": TINY_VERSION, "texts_sha256": texts_digest(texts), "seed": seed}
    return build_once(Path(cache_dir), build, stamp)


def _vocab_of(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab(with_added_tokens=True)
