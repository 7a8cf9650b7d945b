"""Tiny Phi-3 models, tokenizers and LoRA adapters for the export tests, all built offline.

The tokenizer mirrors Phi-3-mini's (SentencePiece-style BPE with byte fallback, `LlamaTokenizer` class,
`<|user|>`/`<|assistant|>`/`<|end|>` chat tokens with rstrip, the same chat template), only much smaller,
so that onnxruntime-genai's tokenizer is exercised on the same kind of files a real export ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CORPUS = [
    "Once upon a time there was a little cat who liked to play in the sun.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you!",
    "Fine-tuning small language models on one workstation is fun.",
    "What is the capital of France? The capital of France is Paris.",
]
# Phi-3's chat tokens (ids here are small; Phi-3-mini has them at 32000+).
CHAT_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|user|>", True),
]
PROMPTS = ["Once upon a time", "The capital of France is", "Hello, how are"]


def build_tokenizer(out_dir: Path, n_merges: int = 40) -> int:
    """Write tokenizer.json + tokenizer_config.json into out_dir; return the tokenizer's vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Learn a few merges on the corpus, then lay the vocabulary out like Phi-3's:
    # <unk> <s> </s>, 256 byte-fallback tokens, characters and merges, then the chat tokens.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Merges stay inside words (pieces start with ▁, as SentencePiece's do) and never take in punctuation:
    # onnxruntime-extensions' BPE split "un." differently from `tokenizers` when "un" + "." was a merge.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"), pre_tokenizers.Punctuation(),
    ])
    alphabet = sorted(set("".join(CORPUS).replace(" ", "▁")) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges, initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    learned_vocab = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in learned_vocab:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True),
                            AddedToken("<s>", normalized=False, special=True)])
    tok.add_tokens([AddedToken("</s>", normalized=False, rstrip=True, special=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False, rstrip=rstrip, special=True) for t, rstrip in CHAT_TOKENS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def load_test_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    try:
        from phi3local.model.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(folder)
    cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(Path(folder) / "tokenizer.json"),
        bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"), pad_token=cfg.get("pad_token"),
        unk_token=cfg.get("unk_token"), chat_template=cfg.get("chat_template"),
    )


def build_tiny_model(out_dir: Path, *, vocab_size: int = 384, hidden_size: int = 64, intermediate_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None,
                     seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """A random Phi-3 (fused qkv_proj / gate_up_proj) with the test tokenizer, saved as an HF folder.
    tie_word_embeddings: one matrix for the embedding and the head, as Phi-4-mini has."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    out_dir = Path(out_dir)
    n_tok = build_tokenizer(out_dir)
    assert vocab_size >= n_tok, (vocab_size, n_tok)
    vocab = json.loads((out_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config = Phi3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=512,
        original_max_position_embeddings=512, bos_token_id=ids["<s>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    # Larger-than-default weights so the logits have a useful spread (default init gives ~1e-2 logits).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
        # Zero logits for the stop tokens: greedy decoding of this random model then never stops early
        # (the largest of 384 random logits is positive), so parity can compare a fixed number of tokens.
        for tok in ("<|end|>", "<|endoftext|>"):
            model.lm_head.weight[ids[tok]] = 0.0
    model.eval()
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["<|endoftext|>"],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(out_dir)
    return out_dir


def build_adapter(base_dir: Path, run_dir: Path, *, task: str = "causal_lm", seed: int = 1, r: int = 8) -> Path:
    """A LoRA adapter that changes the output (init_lora_weights=False), saved as `<run>/adapter/`.

    task="classification" puts a 3-label `score` head on the causal base (in modules_to_save), as the
    training stage does, and writes the labels to `<run>/recipe.yaml` the way the training stage records them.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classification":
        # As the training stage does: a classification head on top of the causal checkpoint.
        labels = ["negative", "neutral", "positive"]
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        model.config.pad_token_id = json.loads((Path(base_dir) / "config.json").read_text())["pad_token_id"]
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        init_lora_weights=False, lora_dropout=0.0,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        modules_to_save=["score"] if task == "classification" else None,
    )
    model = get_peft_model(model, cfg)
    if task == "classification":
        with torch.no_grad():  # make the trained head differ from the base head
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.5)
    adapter_dir = Path(run_dir) / "adapter"
    model.save_pretrained(adapter_dir)
    if task == "classification":
        (Path(run_dir) / "recipe.yaml").write_text(
            "task: classification\nmodel:\n  labels: [negative, neutral, positive]\n")
    # peft records the path it was given; keep the base folder as the training stage does.
    cfg_path = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        src = Path(base_dir) / name
        if src.exists():
            (adapter_dir / name).write_bytes(src.read_bytes())
    return adapter_dir


def cached(tmp_path_factory, name: str, build) -> Path:
    """Build `name` once per test session under pytest's base temp folder (shared by the test modules)."""
    folder = Path(tmp_path_factory.getbasetemp()) / "export-assets" / name
    done = folder.parent / f"{name}.done"
    if not done.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        build(folder)
        done.touch()
    return folder


def tiny_base(tmp_path_factory) -> Path:
    return cached(tmp_path_factory, "base", lambda d: build_tiny_model(d))


def tiny_run(tmp_path_factory) -> Path:
    base = tiny_base(tmp_path_factory)
    return cached(tmp_path_factory, "run", lambda d: build_adapter(base, d))


def tiny_merged(tmp_path_factory) -> Path:
    """The tiny base with the LoRA adapter merged (fp32) by phi3local's merge stage."""
    from phi3local.export.merge import merge_adapter

    run = tiny_run(tmp_path_factory)
    return cached(tmp_path_factory, "merged", lambda d: merge_adapter(run, d, dtype="float32"))


@torch.no_grad()
def logits_of(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def family_member(tmp_path_factory, name: str) -> Path:
    """A tiny family member (phi3local/model/family.py) built once per test session."""
    from phi3local.data.demo import demo_texts
    from phi3local.model.family import ensure_tiny_member

    return ensure_tiny_member(name, Path(tmp_path_factory.getbasetemp()) / "export-assets" / f"family-{name}",
                              demo_texts())
