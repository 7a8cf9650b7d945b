"""Load a tokenizer so that its `tokenizer.json` is used exactly as written.

transformers 5's `AutoTokenizer` rebuilds `LlamaTokenizer` (the class Phi-3's config names) with its own
Metaspace pre-tokenizer instead of the file's normaliser. For Phi-3 that drops the `▁` that starts every
text segment after a special token and fails 15 of llama.cpp's 46 reference encodings, so training data
would be encoded unlike the model's pre-training. `PreTrainedTokenizerFast(tokenizer_file=...)` takes the
file as it is; the settings that live only in `tokenizer_config.json` are passed in next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from phi3local.errors import Phi3LocalError
from phi3local.serve.json_files import as_id_list, read_json

# Phi-3-mini-4k-instruct's chat template (current Hub revision): system-aware, every turn closed by
# <|end|>, and <|endoftext|> after the last turn unless a generation prompt is asked for.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# The Phi-3 special tokens the template writes, in the order of their ids in Phi-3's vocabulary
# (32000, 32001, 32006, 32007, 32010).
PHI3_SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

# Phi-4-mini-instruct's chat template: no newlines, tags `<|role|>`, every turn closed by <|end|>, tools in
# the system turn; <|endoftext|> after the last turn unless a generation prompt is asked for.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-4-mini's special tokens in the order of their ids (199999, then 200019-200028).
PHI4_SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
                       "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>"]

# Phi-4-mini-reasoning's chat template (Microsoft's test copy in onnxruntime-extensions,
# test/data/phi-4-mini-reasoning/chat_template.jinja at c1946f94901bf0a612d6bd15a6b9363687f52dd2): a fixed system
# turn that any system message is appended to, then Phi-4-mini's tags. Its answers open with a `<think>` trace in
# plain text (the tokenizer has no such token).
PHI4_MINI_REASONING_CHAT_TEMPLATE = (
    "{{ '<|system|>Your name is Phi, an AI math expert developed by Microsoft.' }}"
    "{% for message in messages %}{% if message['role'] == 'system' %} {{ message['content'] }}"
    "{% if 'tools' in message and message['tools'] is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}"
    "{% endif %}{% endif %}{% endfor %}{{ '<|end|>' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-4's (microsoft/phi-4) chat template: `<|im_start|>role<|im_sep|>content<|im_end|>`, no newlines, no text
# after the last turn. From its tokenizer_config.json (Microsoft's test copy in onnxruntime-extensions,
# test/data/phi-4-base/tokenizer_config.json at 52e1ef5dd14ea5ca0892522acec802f6836f03ef).
PHI4_IM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def phi4_im_special_tokens() -> list[str]:
    """Phi-4's 96 added tokens in the order of their ids, 100256-100351 (same source as PHI4_IM_CHAT_TEMPLATE):
    <|endoftext|> 100257, <|im_start|> 100264, <|im_end|> 100265 (eos), <|im_sep|> 100266, <|endofprompt|> 100276,
    and reserved <|dummy_i|> tokens around them; the pad is <|dummy_85|> (100349). All have lstrip and rstrip."""
    named = {1: "<|endoftext|>", 2: "<|fim_prefix|>", 3: "<|fim_middle|>", 4: "<|fim_suffix|>", 8: "<|im_start|>",
             9: "<|im_end|>", 10: "<|im_sep|>", 20: "<|endofprompt|>"}
    tokens, dummy = [], 0
    for i in range(96):
        if i in named:
            tokens.append(named[i])
        else:
            tokens.append(f"<|dummy_{dummy}|>")
            dummy += 1
    return tokens


PHI4_IM_PAD_TOKEN = "<|dummy_85|>"

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Plain settings copied from tokenizer_config.json when present.
_PLAIN_KEYS = ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces")


class TokenizerLoadError(Phi3LocalError, RuntimeError):
    """No tokenizer could be loaded from the given folder or id."""


def load_tokenizer(path_or_id: str | Path, revision: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of a model folder (or Hub id at `revision`), with a pad token and its own chat template."""
    folder = Path(path_or_id)
    try:
        if (folder / "tokenizer.json").is_file():
            tokenizer = _from_tokenizer_json(folder)
        else:
            tokenizer = _from_auto(str(path_or_id), revision)
    except TokenizerLoadError:
        raise
    except Exception as e:  # any loader failure becomes one clear error naming the path
        raise TokenizerLoadError(f"could not load a tokenizer from {path_or_id}: {type(e).__name__}: {e}") from e
    # Batching needs a pad id; positions past a document are masked by length, so eos is safe here.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_tokenizer_json(folder: Path) -> PreTrainedTokenizerFast:
    config = read_tokenizer_config(folder)
    kwargs: dict[str, Any] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = _token_content(config.get(key))
        if value is not None:
            kwargs[key] = value
    for key in _PLAIN_KEYS:
        if config.get(key) is not None:
            kwargs[key] = config[key]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        kwargs["extra_special_tokens"] = [_token_content(t) for t in extra]
    template = chat_template_of(folder, config)
    if template is not None:
        kwargs["chat_template"] = template

    tokenizer_file = folder / "tokenizer.json"
    has_post_processor = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("post_processor") is not None
    if not has_post_processor:
        # Only then does transformers build the BOS/EOS post-processor from these flags; otherwise
        # passing them would overwrite the file's own post-processor.
        for key in ("add_bos_token", "add_eos_token"):
            if key in config:
                kwargs[key] = bool(config[key])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)
    if has_post_processor:
        _sync_bos_eos_flags(tokenizer)
    tokenizer.name_or_path = str(folder)
    return tokenizer


def _from_auto(path_or_id: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    # No tokenizer.json (a Hub id, or a folder with only a SentencePiece model): let transformers build it.
    folder = Path(path_or_id)
    if folder.is_dir() and not any(folder.glob("tokenizer*")):
        raise TokenizerLoadError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id, **({"revision": revision} if revision else {}))


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def chat_template_of(folder: Path, config: dict[str, Any] | None = None) -> str | dict[str, str] | None:
    """The folder's chat template: `chat_template.jinja` (what transformers 5 writes) or the config's."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (config if config is not None else read_tokenizer_config(folder)).get("chat_template")
    if isinstance(template, list):
        # Older configs store named templates as [{"name": ..., "template": ...}].
        return {t["name"]: t["template"] for t in template}
    return template


def _token_content(value: Any) -> str | None:
    # Configs written by older transformers store special tokens as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _sync_bos_eos_flags(tokenizer: PreTrainedTokenizerFast) -> None:
    """Make `add_bos_token`/`add_eos_token` say what the file's post-processor really does.

    The setters only record the flag (they do not rebuild the post-processor), so the file stays in charge.
    """
    probe = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True).ids
    added = len(probe) > len(tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).ids)
    tokenizer.add_bos_token = added and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    tokenizer.add_eos_token = added and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id


# The tokens that end a Phi chat turn (with the tokenizer's own eos): generation stops at any of them.
STOP_TOKENS = ("<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Every id that ends a turn: STOP_TOKENS that the vocabulary has, plus the tokenizer's eos."""
    ids = []
    for token in (*STOP_TOKENS, tokenizer.eos_token):
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def token_ids_in_vocab(tokenizer_json: Path, tokens) -> dict[str, int]:
    """Ids of the given token strings in tokenizer.json (added tokens and model vocabulary)."""
    data = read_json(tokenizer_json)
    vocab = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    model_vocab = data.get("model", {}).get("vocab")
    found = {}
    for tok in tokens:
        if tok in vocab:
            found[tok] = int(vocab[tok])
        elif isinstance(model_vocab, dict) and tok in model_vocab:
            found[tok] = int(model_vocab[tok])
    return found


def collect_stop_ids(model_dir: Path, tokenizer_dir: Path | None = None) -> list[int]:
    """Every id that ends generation: eos of config/generation_config/tokenizer, `<|end|>`, `<|endoftext|>`."""
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        if (model_dir / name).is_file():
            ids += as_id_list(read_json(model_dir / name).get("eos_token_id"))
    tok_json = tokenizer_dir / "tokenizer.json"
    if tok_json.is_file():
        ids += list(token_ids_in_vocab(tok_json, STOP_TOKENS).values())
        cfg_path = tokenizer_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            eos = read_json(cfg_path).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                ids += list(token_ids_in_vocab(tok_json, [eos]).values())
    return sorted(set(ids))
