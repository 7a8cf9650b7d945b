"""`azure spec`: the four Azure ML YAMLs and the code folder, checked by the SDK's own loaders; every
derived value (timeout, probes, WORKER_COUNT, environment) from the measurements and the recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_arm import make_export

from phi3local.azure import spec as spec_mod
from phi3local.azure.spec import (
    SpecError,
    check_code_folder,
    derive_serving,
    load_yaml,
    read_measurements,
    write_spec,
)
from phi3local.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
# azure-ai-ml's schemas use marshmallow features marshmallow 4 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")


def azure_cfg(*overrides: str):
    return load_recipe(None, ["azure.endpoint_name=phi3-chat", *overrides]).azure


def measured(per_token_ms=20.0, load_seconds=12.0, first_token_ms=150.0):
    return read_measurements(per_token_ms=per_token_ms, load_seconds=load_seconds, first_token_ms=first_token_ms)


def test_yamls_start_with_schema_and_load_through_the_sdk(tmp_path):
    onnx = make_export(tmp_path / "onnx", "cuda")
    spec = write_spec(onnx, tmp_path / "spec", azure_cfg("azure.max_concurrent_requests_per_instance=3"), measured())
    kinds = {"model": "model", "environment": "environment", "endpoint": "managedOnlineEndpoint",
             "deployment": "managedOnlineDeployment"}
    for kind, schema in kinds.items():
        first = spec.files[kind].read_text().splitlines()[0]
        assert first == f"$schema: https://azuremlschemas.azureedge.net/latest/{schema}.schema.json"
    e = spec.entities
    assert type(e["model"]).__name__ == "Model" and e["model"].type == "custom_model"
    assert Path(e["model"].path).resolve() == onnx.resolve()
    assert type(e["deployment"]).__name__ == "ManagedOnlineDeployment"
    d = e["deployment"]
    assert d.request_settings.request_timeout_ms == 21000  # 2 x (150 + 512 x 20) ms, whole seconds up
    assert d.request_settings.max_concurrent_requests_per_instance == 3
    assert d.environment_variables["WORKER_COUNT"] == "3"
    assert d.environment_variables["PHI3LOCAL_MAX_TOKENS"] == "512"
    assert d.liveness_probe.initial_delay == 24 and d.readiness_probe.initial_delay == 12
    assert d.instance_type == "Standard_NC24ads_A100_v4"
    assert d.code_configuration.scoring_script == "phi3local/serve/score.py"
    assert (spec.out_dir / "code" / d.code_configuration.scoring_script).is_file()
    assert e["endpoint"].auth_mode == "key" and e["endpoint"].name == "phi3-chat"
    # The GPU VM gets onnxruntime-genai's CUDA build on the GPU base image.
    env = e["environment"]
    pip = env.conda_file["dependencies"][-1]["pip"]
    assert any(p.startswith("onnxruntime-genai-cuda==") for p in pip)
    assert "cuda" in env.image
    summary = json.loads((spec.out_dir / "spec.json").read_text())
    assert summary["plan"]["request_timeout_ms"] == 21000 and summary["measurements"]["per_token_ms"] == 20.0


def test_cpu_instance_gets_the_cpu_build(tmp_path):
    onnx = make_export(tmp_path / "onnx", "cpu")
    spec = write_spec(onnx, tmp_path / "spec", azure_cfg("azure.instance_type=Standard_F8s_v2"), measured())
    pip = spec.entities["environment"].conda_file["dependencies"][-1]["pip"]
    assert any(p.startswith("onnxruntime-genai==") for p in pip)
    assert not any("cuda" in p for p in pip)
    assert spec.entities["environment"].image == azure_cfg().cpu_image


@pytest.mark.parametrize("target, instance, said", [
    ("cuda", "Standard_F8s_v2", "has no GPU"),
    ("cpu", "Standard_NC4as_T4_v3", "GPU VM but the export targets CPU"),
])
def test_export_and_vm_must_match(tmp_path, target, instance, said):
    onnx = make_export(tmp_path / "onnx", target)
    with pytest.raises(SpecError, match=said):
        write_spec(onnx, tmp_path / "spec", azure_cfg(f"azure.instance_type={instance}"), measured())


def test_timeout_is_clamped_to_the_service_maximum_and_says_what_fits():
    plan = derive_serving(azure_cfg("azure.max_tokens=4000"), measured(per_token_ms=40.0, first_token_ms=1000.0), "cuda")
    assert plan.request_timeout_ms == 180_000
    note = next(n for n in plan.notes if "clamped" in n)
    # (180000 / 2 - 1000) / 40 = 2225 tokens fit in the service maximum.
    assert "azure.max_tokens to 2225" in note and "322000 ms" in note


def test_timeout_is_never_stricter_than_the_service_default():
    plan = derive_serving(azure_cfg("azure.max_tokens=16"), measured(per_token_ms=1.0, first_token_ms=10.0), "cuda")
    assert plan.request_timeout_ms == 5000
    assert any("service default" in n for n in plan.notes)


def test_probes_follow_the_load_time_and_outlast_a_full_answer():
    plan = derive_serving(azure_cfg("azure.load_factor=3"), measured(load_seconds=40.5), "cuda")
    assert plan.liveness.initial_delay == 122  # ceil(3 x 40.5)
    assert plan.readiness.initial_delay == 41
    # A container busy with one full-length answer is not restarted: failures x period > the timeout.
    assert plan.liveness.failure_threshold * plan.liveness.period > plan.request_timeout_ms / 1000
    assert plan.environment_variables["GUNICORN_CMD_ARGS"] == "--threads 2"
    long = derive_serving(azure_cfg("azure.max_tokens=4000"), measured(per_token_ms=40.0), "cuda")
    assert long.request_timeout_ms == 180_000 and long.liveness.failure_threshold == 30  # 30 x 10 s > 180 s


def test_probes_are_never_stricter_than_the_service_defaults():
    plan = derive_serving(azure_cfg(), measured(load_seconds=0.8), "cuda")
    assert (plan.liveness.initial_delay, plan.readiness.initial_delay) == (10, 10)
    assert plan.liveness.failure_threshold == 30 and plan.liveness.timeout == 2 and plan.liveness.period == 10
    assert any("probe initial delays raised to the service default 10 s" in n for n in plan.notes)


def test_no_first_token_measurement_is_said():
    plan = derive_serving(azure_cfg(), read_measurements(per_token_ms=10, load_seconds=5), "cuda")
    assert plan.request_timeout_ms == 11000  # 2 x 512 x 10 ms
    assert any("first-token" in n for n in plan.notes)


def test_measurements_come_from_a_file_or_are_refused(tmp_path):
    onnx = make_export(tmp_path / "onnx", "cuda")
    with pytest.raises(SpecError, match=r"--per-token-ms.*--load-seconds"):
        read_measurements(onnx)
    (onnx / "measurements.json").write_text(json.dumps({"tokens_per_second": 50, "time_to_first_token": 0.2,
                                                        "load_seconds": 7, "measured_on": "RTX 4090"}))
    m = read_measurements(onnx)
    assert (m.per_token_ms, m.first_token_ms, m.load_seconds, m.measured_on) == (20.0, 200.0, 7.0, "RTX 4090")
    assert m.source.endswith("measurements.json")
    assert read_measurements(onnx, load_seconds=9).load_seconds == 9.0  # a flag wins over the file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"per_token_ms": -1, "load_seconds": 3}))
    with pytest.raises(SpecError, match=r"bad.json: per_token_ms must be a number > 0"):
        read_measurements(onnx, bad)


def test_a_broken_yaml_is_refused_with_the_sdks_message(tmp_path):
    spec = write_spec(make_export(tmp_path / "onnx"), tmp_path / "spec", azure_cfg(), measured())
    path = spec.files["deployment"]
    body = yaml.safe_load(path.read_text())
    del body["instance_type"]
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpecError, match=r"deployment.yml: Azure ML refuses this deployment YAML: instance_type: "
                                        r"Missing data for required field\.") as e:
        load_yaml("deployment", path)
    assert "\n" not in str(e.value)
    body["instance_type"] = "Standard_NC24ads_A100_v4"
    body["request_settings"]["request_timeout"] = 5  # the YAML key is request_timeout_ms
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpecError, match=r"request_settings\.request_timeout: Unknown field"):
        load_yaml("deployment", path)
    endpoint = spec.files["endpoint"]
    endpoint.write_text(endpoint.read_text().replace("auth_mode: key", "auth_mode: password"))
    with pytest.raises(SpecError, match=r"endpoint.yml: .*auth_mode"):
        load_yaml("endpoint", endpoint)


def test_bad_names_and_folders_are_refused(tmp_path):
    onnx = make_export(tmp_path / "onnx")
    with pytest.raises(SpecError, match="azure.endpoint_name"):
        write_spec(onnx, tmp_path / "s1", azure_cfg("azure.endpoint_name=9-starts-with-digit"), measured())
    with pytest.raises(SpecError, match="azure.deployment_name='b_'"):
        write_spec(onnx, tmp_path / "s2", azure_cfg("azure.deployment_name=b_"), measured())
    with pytest.raises(SpecError, match="inside the ONNX folder"):
        write_spec(onnx, onnx / "spec", azure_cfg(), measured())
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(SpecError, match="did not write"):
        write_spec(onnx, theirs, azure_cfg(), measured())
    with pytest.raises(SpecError, match="not an ONNX export"):
        write_spec(tmp_path / "theirs", tmp_path / "s3", azure_cfg(), measured())
    # An earlier spec folder is ours: it is rewritten.
    first = write_spec(onnx, tmp_path / "again", azure_cfg(), measured())
    second = write_spec(onnx, tmp_path / "again", azure_cfg("azure.max_tokens=100"), measured())
    assert first.out_dir == second.out_dir and second.plan.max_tokens == 100


def test_model_version_follows_the_files(tmp_path):
    onnx = make_export(tmp_path / "onnx")
    v1 = write_spec(onnx, tmp_path / "spec", azure_cfg(), measured()).model_version
    assert write_spec(onnx, tmp_path / "spec", azure_cfg(), measured()).model_version == v1
    (onnx / "genai_config.json").write_text((onnx / "genai_config.json").read_text().replace("4096", "2048"))
    assert write_spec(onnx, tmp_path / "spec", azure_cfg(), measured()).model_version != v1


@pytest.mark.parametrize("folder, derived", [
    ("onnx", "onnx"),
    ("Phi-3 mini_ONNX (int4)", "phi-3-mini-onnx-int4"),
    ("3b-onnx", "phi3local-3b-onnx"),  # must start with a letter
    ("x", "phi3local-x"),  # at least 3 characters
    ("___", "phi3local"),
    ("a" * 40, "a" * 32),  # at most 32
    ("phi3-mini-4k-instruct-onnx-int4-cpu-v2", "phi3-mini-4k-instruct-onnx-int4"),  # cut, no "-" last
])
def test_an_unset_endpoint_name_is_derived_from_the_folder_and_valid(tmp_path, folder, derived):
    onnx = make_export(tmp_path / folder)
    spec = write_spec(onnx, tmp_path / "spec", load_recipe(None).azure, measured())
    assert spec.endpoint_name == derived
    assert spec_mod.NAME_RULE.match(derived)
    assert spec.entities["endpoint"].name == derived  # the SDK's loader took it
    said = spec_mod.plan_lines(spec)
    assert any(f"endpoint name {derived}: derived from the folder name" in line for line in said)
    # A name that is set is used as it is, and said nowhere as derived.
    named = write_spec(onnx, tmp_path / "spec", azure_cfg(), measured())
    assert named.endpoint_name == "phi3-chat" and not any("derived" in n for n in named.plan.notes)


def test_an_unset_instance_type_follows_the_export_target(tmp_path):
    for target, instance in (("cpu", "Standard_F8s_v2"), ("cuda", "Standard_NC24ads_A100_v4")):
        spec = write_spec(make_export(tmp_path / target, target), tmp_path / f"spec-{target}", azure_cfg(), measured())
        assert spec.plan.instance_type == instance == spec.entities["deployment"].instance_type
        assert spec_mod.is_gpu_instance(instance) == (target == "cuda")
        assert any(f"instance type {instance}: the default for a {target.upper()} export" in n
                   for n in spec.plan.notes)
    assert load_recipe(None).azure.instance_type is None


def test_code_folder_is_the_serving_package_whole(tmp_path):
    spec = write_spec(make_export(tmp_path / "onnx"), tmp_path / "spec", azure_cfg(), measured())
    code = spec.code_dir
    from phi3local.serve import bundle

    shipped = sorted(p.relative_to(code).as_posix() for p in code.rglob("*.py"))
    package = sorted(p.relative_to(bundle.PACKAGE_PARENT).as_posix() for p in bundle.PACKAGE_DIR.glob("*.py"))
    assert shipped == sorted([*package, *bundle.PARENT_FILES])
    assert not list(code.rglob("__pycache__"))
    check_code_folder(code, bundle.PACKAGE_PARENT)  # passes as written
    # A module the copy lacks is named, with the file that imports it.
    (code / "phi3local" / "serve" / "stops.py").unlink()
    with pytest.raises(SpecError, match=r"phi3local\.serve\.stops \(imported by phi3local/serve/service\.py\)"):
        check_code_folder(code, bundle.PACKAGE_PARENT)


def test_closure_check_knows_eager_lazy_and_relative_imports(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for rel, text in {
        "phi3local/__init__.py": "",
        "phi3local/a.py": "from phi3local.b import thing\nfrom . import c\n",
        "phi3local/b.py": "thing = 1\n",
        "phi3local/c.py": "def f():\n    from phi3local.versions import package_versions\n",
        "phi3local/versions.py": "",
        "phi3local/d.py": "def g():\n    import phi3local.e\n",
        "phi3local/e.py": "",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    code = tmp_path / "code"
    for rel in ("phi3local/__init__.py", "phi3local/a.py", "phi3local/b.py", "phi3local/c.py"):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text((src / rel).read_text())
    with pytest.raises(SpecError, match=r"phi3local\.versions \(imported by phi3local/c\.py\)"):
        check_code_folder(code, src)  # lazy, but not listed
    monkeypatch.setitem(spec_mod.LAZY_NOT_SHIPPED, "phi3local.versions", "c.f (never on the scoring path)")
    check_code_folder(code, src)  # phi3local.versions: lazy and listed in LAZY_NOT_SHIPPED
    (code / "phi3local" / "d.py").write_text((src / "phi3local" / "d.py").read_text())
    with pytest.raises(SpecError, match=r"phi3local\.e \(imported by phi3local/d\.py\)"):
        check_code_folder(code, src)  # lazy, but not a known exception
    (code / "phi3local" / "d.py").unlink()
    (code / "phi3local" / "c.py").unlink()
    with pytest.raises(SpecError, match=r"phi3local\.c \(imported by phi3local/a\.py\)"):
        check_code_folder(code, src)  # `from . import c`: relative, at import time


def _serving_python() -> str | None:
    # The serving stack (azmlinfsrv, onnxruntime-genai) lives in the main venv, not in the Azure one.
    for candidate in (REPO / ".venv" / "bin" / "python", Path(sys.executable)):
        if candidate.is_file():
            probe = subprocess.run([str(candidate), "-c", "import azureml_inference_server_http, onnxruntime_genai"],
                                   capture_output=True, timeout=60)
            if probe.returncode == 0:
                return str(candidate)
    return None


def test_code_folder_imports_with_nothing_else_of_phi3local(tmp_path):
    python = _serving_python()
    assert python is not None, "no Python with azureml-inference-server-http and onnxruntime-genai (make install)"
    spec = write_spec(make_export(tmp_path / "onnx"), tmp_path / "spec", azure_cfg(), measured())
    code = spec.code_dir
    script = (
        "import sys, importlib\n"
        "m = importlib.import_module('phi3local.serve.score')\n"
        "assert callable(m.init) and callable(m.run)\n"
        "outside = [n for n, mod in sys.modules.items() if n.startswith('phi3local') and\n"
        "           not str(getattr(mod, '__file__', '') or '').startswith(sys.argv[1])]\n"
        "assert not outside, outside\n"
        "heavy = [n for n in ('torch', 'transformers', 'datasets') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok', len([n for n in sys.modules if n.startswith('phi3local')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, "-c", script, str(code.resolve())], cwd=code, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_recipe_azure_fields_are_range_checked():
    with pytest.raises(RecipeError, match=r"azure\.max_concurrent_requests_per_instance: 0 is out of range"):
        load_recipe(None, ["azure.max_concurrent_requests_per_instance=0"])
    with pytest.raises(RecipeError, match=r"azure\.timeout_factor: 0\.5 is out of range \(must be >= 1\)"):
        load_recipe(None, ["azure.timeout_factor=0.5"])


def test_schema_urls_are_the_azure_ml_ones():
    assert spec_mod.SCHEMA_URL.format("model") == "https://azuremlschemas.azureedge.net/latest/model.schema.json"


def test_the_azure_modules_import_nothing_heavy():
    # The Azure venv must not need the training or serving stacks: no torch, numpy, transformers, datasets,
    # onnxruntime, even after the SDK's loaders ran.
    script = (
        "import sys\n"
        "import phi3local.azure.commands, phi3local.azure.deploy, phi3local.azure.invoke, phi3local.azure.jobs\n"
        "import phi3local.azure.spec, phi3local.azure.workspace\n"
        "from phi3local.azure.spec import derive_serving, read_measurements\n"
        "from phi3local.config import load_recipe\n"
        "derive_serving(load_recipe(None).azure, read_measurements(per_token_ms=1, load_seconds=1), 'cuda')\n"
        "import azure.ai.ml\n"
        "heavy = [m for m in ('torch', 'numpy', 'transformers', 'datasets', 'onnxruntime', 'onnxruntime_genai')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_plan_shows_the_instances_hardware_and_price_per_hour_and_month(tmp_path):
    onnx = make_export(tmp_path / "onnx", "cuda")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"instances": {"Standard_NC24ads_A100_v4": {
        "gpu": "A100", "gpus": 1, "gpu_memory_gib": 80, "vcpus": 24, "memory_gib": 220, "usd_per_hour": 3.5}}}))
    spec = write_spec(onnx, tmp_path / "spec", azure_cfg("azure.instance_count=2", f"azure.price_table={prices}"),
                      measured())
    lines = spec_mod.plan_lines(spec)
    assert "instance     Standard_NC24ads_A100_v4: 1 x A100 (80 GiB each), 24 vCPU, 220 GiB RAM" in lines
    assert "             $7.00/hour, $5,110/month (2 x $3.5/h, 730 h)" in lines  # 7 x 730 = 5110
    shipped = spec_mod.plan_lines(write_spec(onnx, tmp_path / "spec2", azure_cfg(), measured()))
    assert any("placeholder price" in line for line in shipped)


def test_finetune_dry_run_prints_the_hosted_estimate_next_to_the_local_run(tmp_path, capsys):
    import argparse

    from phi3local.azure import commands

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A {i}."}]}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    (run / "prepared").mkdir(parents=True)
    import hashlib

    (run / "prepared" / "stats.json").write_text(json.dumps({
        "inputs": {"train": {"sha256": hashlib.sha256(data.read_bytes()).hexdigest()}},
        "tokens": {"all": {"tokens": 20_000}}}))
    (run / "summary.json").write_text(json.dumps({"tokens_per_second": 500.0, "cost": {
        "trained_tokens": 8_000, "device_hours": 0.25, "device": "cuda", "usd": 0.9, "peak_flops": 1e14}}))
    parser = argparse.ArgumentParser(prog="phi3local")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["azure", "finetune", str(data), f"output_dir={run}", "training.epochs=3",
                              "azure.finetune_usd_per_1k_tokens=0.005", "--model", "Phi-4-mini-instruct",
                              "--model-version", "1", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    # 20,000 tokens x 3 epochs / 1000 x $0.005 = $0.30
    assert "hosted: 20,000 tokens x 3 epoch(s) x $0.005/1k = $0.30" in out
    assert "counted by the local prepare" in out
    assert "local: 8,000 trained tokens in 0.2500 device-hours on cuda: $0.9000" in out


def test_collect_requests_enables_the_data_collector_and_score_pys_collection(tmp_path):
    onnx = make_export(tmp_path / "onnx", "cuda")
    off = write_spec(onnx, tmp_path / "off", azure_cfg(), measured())
    assert off.entities["deployment"].data_collector is None
    assert "PHI3LOCAL_COLLECT" not in off.entities["deployment"].environment_variables
    spec = write_spec(onnx, tmp_path / "on", azure_cfg("azure.collect_requests=true"), measured())
    d = spec.entities["deployment"]  # loaded back through the SDK's load_online_deployment
    assert sorted(d.data_collector.collections) == ["model_inputs", "model_outputs"]
    assert all(str(c.enabled).lower() == "true" for c in d.data_collector.collections.values())
    assert d.environment_variables["PHI3LOCAL_COLLECT"] == "true"
