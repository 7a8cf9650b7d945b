"""`phi3local doctor` on this CPU-only machine names the CPU choices every stage will make."""

import json
import subprocess
import sys

from phi3local.cli import main


def test_doctor_names_this_machines_cpu_choices(capsys):
    assert main(["doctor", "--json"]) == 0
    findings = {f["topic"]: f for f in json.loads(capsys.readouterr().out)}
    assert findings["train: device"]["found"] == "cpu"
    assert findings["train: compute dtype"]["found"] == "float32"
    assert findings["train: attention"]["found"] == "sdpa"
    assert findings["train: optimizer"]["found"].startswith("adamw")
    assert "CPU" in findings["onnxruntime-genai"]["found"] and "NF4 on the CPU" in findings["4-bit (bitsandbytes)"]["found"]
    assert all(f["fix"] for f in findings.values() if not f["ok"])  # every gap comes with its fix
    assert main(["doctor"]) == 0
    shown = capsys.readouterr().out
    assert "train: attention" in shown and max(len(line) for line in shown.splitlines()) <= 80


def test_python_dash_m_phi3local_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "phi3local", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(f["topic"] == "train: device" for f in json.loads(out.stdout))
