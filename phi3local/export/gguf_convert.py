"""llama.cpp's own HF -> GGUF conversion (convert_hf_to_gguf.py) and quantization, for a merged Phi-3 folder.

The llama-cpp-python wheel ships only the `llama_cpp` bindings, not the converter; its sdist vendors llama.cpp
with `convert_hf_to_gguf.py`, its `conversion/` package and the matching `gguf-py`. `make install-gguf` builds
the wheel from that sdist (pip caches the built wheel) and extracts those three into
`<venv>/share/phi3local/llama.cpp`; `PHI3LOCAL_LLAMA_CPP` may point at a llama.cpp checkout instead.

The converter runs in a child process (`python -m phi3local.export.gguf_convert`), which imports it with its
own gguf-py first on sys.path, as the script does, and covers two gaps for a fine-tune's folder:

  * Phi-3's converter reads the SentencePiece `tokenizer.model`, which Hub Phi-3 checkpoints carry but a folder
    written by transformers (our merge, the tiny and stories260K models) may not: a SentencePiece BPE model is
    written into a staging copy from tokenizer.json (same pieces, ids, byte pieces; score = -id, the order the
    BPE learned them). The GGUF is then checked: llama.cpp's tokenizer must encode the parity prompts as
    transformers does (`tokenizer_match` in the report).
  * A byte-level BPE vocabulary (Phi-4-mini's family) goes through the converter's GPT-2 path; the converter
    recognises a pre-tokenizer only by a hash of known Hub tokenizers, so an unknown one whose pre-tokenizer is
    GPT-2's ByteLevel regex is named `gpt-2` (any other unknown one is refused, naming what is missing).

llama.cpp sets Phi-3's rstrip on its special tokens (`<|end|>\\n` -> `<|end|>`) only when the model's name
contains "phi3"/"phi-3", so the GGUF gets a name that says so exactly when tokenizer.json rstrips them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from phi3local.errors import Phi3LocalError
from phi3local.serve.json_files import read_json

ENV_LLAMA_CPP = "PHI3LOCAL_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter itself writes (its --outtype); the rest are made from f16 by llama_model_quantize.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {  # --quant name -> llama_cpp.LLAMA_FTYPE_* constant
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTS = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)
# tokenizers' ByteLevel pre-tokenizer regex (GPT-2's), which llama.cpp calls "gpt-2".
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class GGUFExportError(Phi3LocalError, RuntimeError):
    """The model cannot be converted to GGUF as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------------------- where llama.cpp is


def find_converter() -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/, or a GGUFExportError saying how to get it."""
    candidates = []
    if os.environ.get(ENV_LLAMA_CPP):
        candidates.append(Path(os.environ[ENV_LLAMA_CPP]))
    candidates.append(Path(sys.prefix) / "share" / "phi3local" / "llama.cpp")
    for folder in candidates:
        if (folder / CONVERTER).is_file() and (folder / "gguf-py").is_dir():
            return folder
    raise GGUFExportError(
        f"llama.cpp's converter ({CONVERTER} with its conversion/ and gguf-py/) is not installed: looked in "
        f"{', '.join(str(c) for c in candidates)}. Run `make install-gguf` in the phi3local checkout (builds "
        f"llama-cpp-python and extracts the converter from its sdist), or set {ENV_LLAMA_CPP} to a llama.cpp checkout")


def import_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise GGUFExportError(f"llama-cpp-python cannot be imported ({e}); run `make install-gguf` "
                              "(or pip install 'phi3local[gguf]')") from e
    return llama_cpp


# ----------------------------------------------------------------------------------------- the vocabulary


def vocab_kind(tokenizer_json: dict) -> str:
    """"spm" (SentencePiece-style BPE: Phi-3, stories260K) or "gpt2" (byte-level BPE: Phi-4 family)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer.json has a {model.get('type')!r} model; the GGUF export converts BPE "
                              "vocabularies only (SentencePiece-style as Phi-3's, or byte-level as Phi-4's)")
    parts = [tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("decoder") or {}]
    for part in list(parts):
        parts += part.get("pretokenizers", []) + part.get("decoders", [])
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "gpt2"
    return "spm"


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for tokenizer.json's byte-level pre-tokenizer when it is GPT-2's regex, else None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and (steps[0].get("pattern") or {}).get("Regex") == GPT2_REGEX:
        return "gpt-2"
    return None


def rstrips_chat_tokens(tokenizer_json: dict) -> bool:
    """Whether the chat tokens absorb the whitespace after them (Phi-3's rstrip), as llama.cpp's "phi3" rule does."""
    chat = [t for t in tokenizer_json.get("added_tokens", []) if t.get("special") and t["content"] in
            ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")]
    return bool(chat) and all(t.get("rstrip") for t in chat)


def write_sentencepiece_model(tokenizer_json: dict, path: Path) -> int:
    """A SentencePiece BPE model with tokenizer.json's base vocabulary (what Phi-3's converter reads).

    Pieces keep their ids; `<unk>` is UNKNOWN, `<s>`/`</s>` CONTROL, `<0xXX>` BYTE, the rest NORMAL with
    score -id (BPE learns pieces in id order). Added tokens (the chat tokens) are taken by the converter from
    tokenizer.json itself. Returns the number of pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = tokenizer_json["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise GGUFExportError("tokenizer.json's vocabulary ids are not 0..n-1; cannot write a SentencePiece model")
    unk = model.get("unk_token") or "<unk>"
    proto = pb.ModelProto()
    for piece, i in vocab:
        p = proto.pieces.add()
        p.piece = piece
        if piece == unk:
            p.type, p.score = pb.ModelProto.SentencePiece.UNKNOWN, 0.0
        elif piece in ("<s>", "</s>"):
            p.type, p.score = pb.ModelProto.SentencePiece.CONTROL, 0.0
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            p.type, p.score = pb.ModelProto.SentencePiece.BYTE, 0.0
        else:
            p.type, p.score = pb.ModelProto.SentencePiece.NORMAL, -float(i)
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(vocab)
    ts.byte_fallback = bool(model.get("byte_fallback"))
    ids = dict(vocab)
    ts.unk_id = ids.get(unk, 0)
    ts.bos_id = ids.get("<s>", -1)
    ts.eos_id = ids.get("</s>", -1)
    ts.pad_id = -1
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    path.write_bytes(proto.SerializeToString())
    return len(vocab)


# ----------------------------------------------------------------------------------------- the converter's input


def gguf_model_name(model_dir: Path, phi3_rstrip: bool) -> str:
    """The GGUF's general.name: contains "phi3" exactly when the chat tokens rstrip (llama.cpp keys on the name)."""
    base = re.sub(r"(?i)phi-?3", "phi", Path(model_dir).resolve().name) or "model"
    return f"phi3 {base}" if phi3_rstrip else base


def stage_converter_input(model_dir: Path, staging: Path) -> dict:
    """A folder the converter reads: model_dir's files linked, plus what it lacks (tokenizer.model for a
    SentencePiece-style vocabulary). Returns how the vocabulary is converted."""
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    kind = vocab_kind(tok)
    staging.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file():
            (staging / path.name).symlink_to(path.resolve())
    info = {"vocab": kind, "phi3_rstrip": rstrips_chat_tokens(tok), "tokenizer_model": "the folder's own"}
    if kind == "spm" and not (model_dir / "tokenizer.model").is_file():
        n = write_sentencepiece_model(tok, staging / "tokenizer.model")
        info["tokenizer_model"] = f"written from tokenizer.json ({n} pieces)"
    if kind == "gpt2":
        info["pre_tokenizer_fallback"] = pre_tokenizer_name(tok)
    # The converter reads the chat template from tokenizer_config.json or chat_template.jinja.
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file() and not read_json(cfg_path).get("chat_template") and not (model_dir / "chat_template.jinja").is_file():
        info["chat_template"] = None
    return info


def run_converter(source: Path, outfile: Path, outtype: str, info: dict, model_name: str, log_path: Path) -> float:
    """convert_hf_to_gguf.py on source, in a child process; returns its seconds. GGUFExportError with its output."""
    converter = find_converter()
    env = {**os.environ, "PHI3LOCAL_GGUF_VOCAB": info["vocab"],
           "PHI3LOCAL_GGUF_PRE": info.get("pre_tokenizer_fallback") or ""}
    env.pop("NO_LOCAL_GGUF", None)
    args = [sys.executable, "-m", "phi3local.export.gguf_convert", str(converter), str(source), "--outfile", str(outfile),
            "--outtype", outtype, "--model-name", model_name]
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_path.write_text(proc.stdout, encoding="utf-8")
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        hint = ""
        if "BPE pre-tokenizer was not recognized" in proc.stdout:
            hint = ("\nllama.cpp's converter knows a byte-level tokenizer only by the hash of a known Hub tokenizer, "
                    "and this one's pre-tokenizer is not GPT-2's regex either: convert with a llama.cpp whose "
                    "convert_hf_to_gguf_update.py lists it")
        raise GGUFExportError(f"llama.cpp's {CONVERTER} failed (exit {proc.returncode}){hint}\n--- its output ---\n{tail}")
    return time.perf_counter() - t0


def quantize(src: Path, dst: Path, quant: str, log_path: Path, threads: int = 0) -> float:
    """llama_model_quantize from src (f16 GGUF) to dst, its per-tensor log (C stdout/stderr) into log_path;
    returns its seconds."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[quant])
    params.nthread = threads
    t0 = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    if rc != 0 or not dst.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise GGUFExportError(f"llama_model_quantize to {quant} failed (returned {rc})\n--- its output ---\n{tail}")
    return time.perf_counter() - t0


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the GGUF holds (k-quants fall back on rows they cannot split)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def read_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """Some GGUF metadata values, decoded (strings, numbers, arrays of numbers)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key in keys:
        field = reader.get_field(key)
        if field is None:
            continue
        value = field.contents()
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------- the child process


def _child_main(argv: list[str]) -> int:
    """Run convert_hf_to_gguf.py as its own script does, with the two gaps covered (see the module docstring)."""
    converter = Path(argv[0])
    sys.path.insert(0, str(converter))
    sys.path.insert(1, str(converter / "gguf-py"))
    import convert_hf_to_gguf  # noqa: E402  (puts its gguf-py first, imports conversion/)
    from conversion import base, phi  # noqa: E402

    vocab = os.environ.get("PHI3LOCAL_GGUF_VOCAB", "spm")
    pre = os.environ.get("PHI3LOCAL_GGUF_PRE") or None
    original_set_vocab = phi.Phi3MiniModel.set_vocab

    def set_vocab(self):
        if vocab == "gpt2":
            return self._set_vocab_gpt2()
        return original_set_vocab(self)

    original_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original_pre(self, tokenizer)
        except NotImplementedError:
            if pre is None:
                raise
            base.logger.warning(f"unknown pre-tokenizer hash; tokenizer.json's pre-tokenizer is {pre!r}'s regex")
            return pre

    phi.Phi3MiniModel.set_vocab = set_vocab
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [CONVERTER, *argv[1:]]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

