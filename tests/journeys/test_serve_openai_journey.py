"""Journey: `phi3local serve`, then OpenAI's clients as docs/serving.md shows them, from the user's folder.

The installed CLI serves the user's runs/onnx (the tiny random Phi-3 of tests/export_helpers.py, exported
for CPU) on a free loopback port. Every code block of docs/serving.md's "OpenAI's clients" section then runs
as written, with only the port changed: the curl lines in the user's shell (when curl is installed), each
Python block as a script of the user's, run by the venv's python. The openai client also gets a 4xx. The
server's log shows each call answered, and no traceback.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.journeys.conftest import MAIN_BIN, REPO
from tests.journeys.servers import serving

DOC = REPO / "docs" / "serving.md"
SECTION = "## OpenAI's clients"
DOC_PORT = "5001"
BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    import export_helpers as H

    def build(folder: Path) -> None:
        from phi3local.export.onnx import export_onnx

        export_onnx(H.tiny_base(tmp_path_factory), folder, precision="fp32", target="cpu", parity="none", show=False)

    return H.cached(tmp_path_factory, "tiny-onnx-cpu", build)


def doc_blocks() -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = [(m["lang"], m["code"]) for m in BLOCK.finditer(text[start:end if end > 0 else None])]
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"], blocks
    assert all(f"127.0.0.1:{DOC_PORT}" in code for _, code in blocks)
    return blocks


def test_openai_clients_as_the_docs_show_them(user, tiny_onnx):
    from openai import OpenAI, UnprocessableEntityError

    shutil.copytree(tiny_onnx, user.cwd / "runs" / "onnx")
    log = user.home / "serve.log"
    with serving(user, "runs/onnx", log) as port:
        for i, (lang, code) in enumerate(doc_blocks()):
            code = code.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}")
            if lang == "bash":
                if shutil.which("curl", path=user.env["PATH"]) is None:
                    continue  # no curl on this machine: the Python clients below still run
                out = user.shell(code, timeout=60).ok().out
                assert out.count('"object": "chat.completion"') == 1 and "data: [DONE]" in out, out
                assert '"id": "onnx"' in out, out  # the model list names the served folder
            else:
                script = user.cwd / f"client_{i}.py"
                script.write_text(code, encoding="utf-8")
                out = user.shell(f"{MAIN_BIN / 'python'} {script.name}", timeout=60).ok().out
                assert out.strip(), f"{script.name} printed nothing"  # a random model: any text is an answer

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(UnprocessableEntityError) as refused:
            client.chat.completions.create(model="onnx", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=100_000)
        assert refused.value.body["param"] == "max_tokens" and "cap of 512" in refused.value.body["message"]
    text = log.read_text()
    assert "also serves /v1/chat/completions" in text, text
    # what the docs' blocks called, each answered (the server's access log: method, path, status)
    for call in ("GET /v1/models 200", "POST /v1/chat/completions 200", "POST /chat/completions?api-version="):
        assert call in text, f"{call!r} not in the server's log:\n{text}"
    assert "POST /v1/chat/completions 422" in text, text
    assert "Traceback" not in text and "are not served" not in text, text
