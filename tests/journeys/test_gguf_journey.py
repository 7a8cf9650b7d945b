"""Journey of issue 27 (GGUF): a user exports a merged model to GGUF for llama.cpp, then for Ollama.

The installed console script from the user's own folder: `export MERGED --format gguf --quant f16 --out DIR`
checks the GGUF against PyTorch (parity passed, greedy identical); `--format ollama` writes the GGUF and a
Modelfile whose TEMPLATE renders each chat as the tokenizer's chat template does, and prints the `ollama create`
line on one line. Ollama itself is not run (not installed here).
"""

from __future__ import annotations

import json

import export_helpers as H
import pytest

from tests.journeys.conftest import User


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return H.tiny_merged(tmp_path_factory)


def test_export_gguf_then_ollama(user: User, merged):
    result = user.run("export", merged, "--format", "gguf", "--quant", "f16", "--out", "gguf-f16").ok()
    out = user.cwd / "gguf-f16"
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["greedy_all_agree"]
    assert (out / "model-f16.gguf").is_file()
    assert "passed" in result.out and "model-f16.gguf" in result.out

    result = user.run("export", merged, "--format", "ollama", "--out", "ollama").ok()
    out = user.cwd / "ollama"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n") and 'PARAMETER stop "<|end|>"' in modelfile
    # The `ollama create` line, whole on one line whatever the terminal's width.
    line = next(c for c in result.next_commands() if c.startswith("ollama create"))
    assert line == "ollama create merged -f ollama/Modelfile"

    from phi3local.export.ollama import render_go_template
    from phi3local.export.tokenizer_files import load_hf_tokenizer

    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = load_hf_tokenizer(merged)
    for chat in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                 [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
                  {"role": "user", "content": "Three?"}]):
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert render_go_template(template, chat) == want
