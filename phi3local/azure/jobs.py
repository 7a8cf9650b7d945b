"""Azure ML jobs: `azure train` (the same recipe as a command job on a cluster) and `azure finetune` (the
handoff to Azure's hosted, serverless fine-tuning).

train: the recipe's data files are uploaded (content-addressed, so a rerun re-uses them) and become uri_file
inputs; the phi3local source and the resolved recipe are the job's code; the run folder is a uri_folder
output; the command runs `python -m phi3local train recipe.yaml data.train_file=${{inputs.train}}
output_dir=${{outputs.run}}` from the code folder (phi3local's dependencies are in the environment's image;
nothing is pip-installed, so the processes of a node never race on one install). With several nodes or GPUs
per node the job gets a PyTorchDistribution: Azure ML starts process_count_per_instance processes on each of
instance_count nodes (its per-process launch, no torchrun) and sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
LOCAL_RANK and NODE_RANK, which phi3local.train.distributed reads: one DDP rank per GPU, NCCL. The run
output is one mounted folder all nodes see; rank 0 alone writes it.

finetune: the chat JSONL is checked locally against the service's stated rules (below) and the rules
phi3local's own training applies, a validation file is split off when none is given (the SDK raises
UnboundLocalError on validation_data=None), and the job is built by azure.ai.ml.finetuning's
create_finetuning_job with the recipe's hyperparameters as strings.

Service rules (READ: Microsoft's docs, as of FACTS-AZURE.md): `messages` JSONL, UTF-8 (a BOM is allowed),
under 512 MB, at least 10 rows, roles system/user/assistant, optional `weight` 0 or 1 on assistant turns.
Models it lists today for Microsoft serverless fine-tuning: Phi-4, Phi-4-mini-instruct,
Phi-4-multimodal-instruct (East US 2, East US, North/South Central US, West US, West US 3; hub-based
projects); Phi-3/3.5 are no longer listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3local.azure.workspace import BlobTarget, azure_call, blob_target, upload_to_datastore
from phi3local.data.records import DataError, Location, RowProblem
from phi3local.data.validate import check_messages
from phi3local.errors import Phi3LocalError

PREFIX = "phi3local"
FINETUNE_MODELS = ("Phi-4", "Phi-4-mini-instruct", "Phi-4-multimodal-instruct")
FINETUNE_REGIONS = ("eastus2", "eastus", "northcentralus", "southcentralus", "westus", "westus3")
MAX_FINETUNE_BYTES = 512 * 1000 * 1000  # "under 512 MB": the stricter reading of MB
MIN_FINETUNE_ROWS = 10
BOM = b"\xef\xbb\xbf"
SOURCE_FILES = ("pyproject.toml", "README.md")  # what `pip install .` of the source needs besides phi3local/


class JobError(Phi3LocalError):
    """A job cannot be built from this recipe or data; the message says why."""

    exit_code = 2


@dataclass
class JobPlan:
    kind: str  # "train" or "finetune"
    lines: list[str] = field(default_factory=list)
    job: Any = None  # the SDK job entity (built even in a dry run)
    submitted: Any = None  # what the service returned
    staging: Path | None = None
    notes: list[str] = field(default_factory=list)


def _sha12(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _stage(files: dict[str, Path], dest: Path) -> Path:
    """A folder holding exactly `files` (name -> source): hard links where possible, else copies (the upload
    refuses symbolic links)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        target = dest / name
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return dest


def _file_uri(target: BlobTarget, prefix: str, name: str) -> str:
    return f"azureml://datastores/{target.datastore}/paths/{prefix.strip('/')}/{name}"


def resolve_data_path(value: str, recipe: Any) -> Path:
    """A data path as the recipe means it (the rule of phi3local.data.prepare.resolve_data_path, which this
    cannot import: that module loads the tokenizer stack): absolute, else beside the recipe, else the cwd."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    source = Path(recipe.source)
    if recipe.source not in ("<defaults>", "<dict>") and source.is_file() and (source.parent / path).exists():
        return source.parent / path
    return path


# ------------------------------------------------------------------------------------------ train

def source_root() -> Path:
    """The checkout holding phi3local/ and pyproject.toml (the job installs phi3local from it)."""
    root = Path(__file__).resolve().parents[2]
    if not all((root / f).is_file() for f in SOURCE_FILES) or not (root / "phi3local").is_dir():
        raise JobError(f"azure train ships the phi3local source to the cluster and needs a source checkout "
                       f"(pyproject.toml, README.md, phi3local/), not found at {root}")
    return root


def project_dependencies(root: Path) -> list[str]:
    """The `dependencies` of pyproject.toml: what the training environment's image gets."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python 3.10: read the one list we need
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.DOTALL | re.MULTILINE)
        return re.findall(r'"([^"]+)"', block.group(1)) if block else []


def train_conda(root: Path) -> dict[str, Any]:
    return {"name": "phi3local-train", "channels": ["conda-forge"],
            "dependencies": ["python=3.11", "pip", {"pip": project_dependencies(root)}]}


def stage_train_code(recipe: Any, dest: Path) -> Path:
    """dest/ with pyproject.toml, README.md, phi3local/ (no caches) and the resolved recipe.yaml."""
    root = source_root()
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(root / "phi3local", dest / "phi3local",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".lock"))
    for name in SOURCE_FILES:
        shutil.copyfile(root / name, dest / name)
    # The data paths and output_dir are given on the command line; the recipe keeps everything else.
    (dest / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return dest


def train_command(inputs: dict[str, Any]) -> str:
    """What every process runs (once per GPU under a PyTorchDistribution)."""
    overrides = [f"data.{name}_file=${{{{inputs.{name}}}}}" for name in ("train", "validation") if name in inputs]
    return "python -m phi3local train recipe.yaml " + " ".join(overrides) + " output_dir=${{outputs.run}}"


def build_train_job(recipe: Any, *, compute: str, instance_count: int, gpus_per_node: int, code: str,
                    data: dict[str, str], environment: Any, display_name: str) -> Any:
    """The command job entity. data: input name ("train", "validation") -> uri of the uploaded file."""
    from azure.ai.ml import Input, Output, PyTorchDistribution, command

    inputs = {name: Input(type="uri_file", path=uri) for name, uri in data.items()}
    distribution = (PyTorchDistribution(process_count_per_instance=gpus_per_node)
                    if gpus_per_node > 1 or instance_count > 1 else None)
    return command(
        code=code, command=train_command(inputs), environment=environment, compute=compute,
        instance_count=instance_count, distribution=distribution, inputs=inputs,
        outputs={"run": Output(type="uri_folder")}, display_name=display_name,
        experiment_name=recipe.azure.experiment_name,
        description=f"phi3local train {Path(recipe.source).name}",
    )


def train_data_files(recipe: Any) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for name in ("train", "validation"):
        value = getattr(recipe.data, f"{name}_file")
        if value:
            path = resolve_data_path(value, recipe)
            if not path.is_file():
                raise JobError(f"data.{name}_file: {value}: no such file (azure train uploads data files; a "
                               "save_to_disk folder is not supported here)")
            files[name] = path
    if "train" not in files:
        raise JobError("data.train_file is not set: azure train uploads the recipe's own data (the embedded demo "
                       "data is for local runs)")
    model = recipe.model.name_or_path
    if model != "tiny" and Path(model).expanduser().exists():
        raise JobError(f"model.name_or_path {model} is a local folder: the cluster downloads the model itself, so "
                       "give a Hugging Face Hub id")
    if recipe.model.adapter:
        raise JobError(f"model.adapter {recipe.model.adapter}: azure train does not upload a start adapter yet; "
                       "train from the base model there (model.adapter=null) or run this recipe locally")
    return files


def submit_train(recipe: Any, *, compute: str | None, instance_count: int, gpus_per_node: int,
                 client_factory: Callable[[], Any] | None, dry_run: bool, say: Callable[[str], None] = print,
                 console: Any = None, blob_account_url: str | None = None, upload_fn: Any = None,
                 container_factory: Any = None, work_dir: Path | None = None) -> JobPlan:
    """Upload the data and the code, create the training environment, submit the command job."""
    from azure.ai.ml.entities import Environment

    compute = compute or recipe.azure.compute
    if not compute:
        raise JobError("no compute cluster: give --compute CLUSTER (or azure.compute in the recipe)")
    if instance_count < 1 or gpus_per_node < 1:
        raise JobError("--instance-count and --gpus-per-node must be at least 1")
    if recipe.training.parallelism == "fsdp" and instance_count * gpus_per_node == 1:
        raise JobError("training.parallelism=fsdp shards the model over several processes: give --gpus-per-node or "
                       "--instance-count above 1, or use training.parallelism=ddp")
    files = train_data_files(recipe)
    work = Path(work_dir or tempfile.mkdtemp(prefix="phi3local-train-"))
    code_dir = stage_train_code(recipe, work / "code")
    from phi3local.azure.spec import fingerprint

    code_prefix = f"{PREFIX}/jobs/code/{fingerprint(code_dir)}"
    data_prefix = f"{PREFIX}/data/{_sha12(*files.values())}"
    root = source_root()
    conda = train_conda(root)
    image = recipe.azure.train_image
    env_version = hashlib.sha256((image + json.dumps(conda, sort_keys=True)).encode()).hexdigest()[:12]
    environment = Environment(name="phi3local-train", version=env_version, image=image, conda_file=conda,
                              description="phi3local's training dependencies (pyproject.toml) on a CUDA image")
    plan = JobPlan("train", staging=work)
    procs = instance_count * gpus_per_node
    plan.lines = [
        f"compute      {compute}: {instance_count} node(s) x {gpus_per_node} process(es)"
        + (" (PyTorchDistribution)" if procs > 1 else ""),
        *(f"upload       data.{n}_file {p} -> {data_prefix}/{n}{p.suffix}" for n, p in files.items()),
        f"upload       code (phi3local source + recipe.yaml) -> {code_prefix}/",
        f"environment  phi3local-train:{env_version} ({image} + {len(conda['dependencies'][2]['pip'])} pip packages)",
        f"command      {train_command(dict.fromkeys(files))}",
    ]
    if procs > 1:
        t = recipe.training
        engine = (f"FSDP2, one per GPU, each holding 1/{procs} of the weights, adapter and optimizer state"
                  if t.parallelism == "fsdp" else "DDP, one per GPU")
        plan.notes.append(f"{procs} ranks ({engine}): global batch {procs} x micro_batch_size "
                          f"{t.micro_batch_size} x grad_accum {t.grad_accum} = {procs * t.micro_batch_size * t.grad_accum}"
                          " sequences per optimizer step; lower grad_accum to keep a single GPU's batch")
    placeholder = BlobTarget(recipe.azure.datastore, "<account>", "<container>", "https://<account>.blob.core.windows.net")
    data_names = {n: f"{n}{p.suffix}" for n, p in files.items()}
    display = f"phi3local-train-{Path(recipe.source).stem}"
    if dry_run:
        plan.job = build_train_job(recipe, compute=compute, instance_count=instance_count, gpus_per_node=gpus_per_node,
                                   code=placeholder.blob_url(code_prefix),
                                   data={n: _file_uri(placeholder, data_prefix, f) for n, f in data_names.items()},
                                   environment=environment, display_name=display)
        _say_plan(say, plan, dry_run=True)
        return plan
    if client_factory is None:
        raise ValueError("submit_train needs a client_factory unless dry_run")
    _say_plan(say, plan, dry_run=False)
    ml = client_factory()
    target = blob_target(ml, recipe.azure.datastore, account_url=blob_account_url)
    staged = _stage({data_names[n]: p for n, p in files.items()}, work / "data")
    upload_to_datastore(target, staged, data_prefix, console=console, upload_fn=upload_fn,
                        client_factory=container_factory, description="data")
    upload_to_datastore(target, code_dir, code_prefix, console=console, upload_fn=upload_fn,
                        client_factory=container_factory, description="code")
    with azure_call(f"create environment phi3local-train:{env_version}"):
        env = ml.environments.create_or_update(environment)
    plan.job = build_train_job(recipe, compute=compute, instance_count=instance_count, gpus_per_node=gpus_per_node,
                               code=target.blob_url(code_prefix),
                               data={n: _file_uri(target, data_prefix, f) for n, f in data_names.items()},
                               environment=env.id, display_name=display)
    with azure_call(f"submit training job on {compute}"):
        plan.submitted = ml.jobs.create_or_update(plan.job)
    _say_submitted(say, plan)
    return plan


def _say_plan(say: Callable[[str], None], plan: JobPlan, *, dry_run: bool) -> None:
    # Said before anything is sent, so the notes are read even when Azure then refuses the job.
    for line in plan.lines:
        say(line)
    for note in plan.notes:
        say(f"note         {note}")
    if dry_run:
        say(f"dry run: nothing was sent (staged in {plan.staging})")


def _say_submitted(say: Callable[[str], None], plan: JobPlan) -> None:
    job = plan.submitted
    say(f"submitted job {getattr(job, 'name', '?')} ({getattr(job, 'status', '?')})")
    if getattr(job, "studio_url", None):
        say(f"follow it: {job.studio_url}")


# ------------------------------------------------------------------------------------------ finetune

@dataclass
class FinetuneData:
    path: Path
    rows: list[bytes]  # each valid row's line, as read (without the BOM and line end)
    problems: list[RowProblem]
    size: int


def check_finetune_file(path: str | Path) -> FinetuneData:
    """Every row of a chat JSONL against the service's rules and phi3local's chat rules (check_messages:
    roles, order, non-empty contents, an assistant turn last, weight 0/1 on assistant turns only)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: no such file")
    size = path.stat().st_size
    problems: list[RowProblem] = []
    if size >= MAX_FINETUNE_BYTES:
        problems.append(RowProblem(Location(str(path)), "file", f"{size} bytes: the service takes files under 512 MB"))
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]  # allowed by the service; not part of the first row
    rows: list[bytes] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        loc = Location(str(path), line=number)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(RowProblem(loc, "row", f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        try:
            data = json.loads(text)
        except ValueError as e:
            problems.append(RowProblem(loc, "row", f"not valid JSON: {e}"))
            continue
        if not isinstance(data, dict):
            problems.append(RowProblem(loc, "row", "must be a JSON object with `messages`"))
            continue
        problem = check_messages(data.get("messages"), loc)
        if problem is not None:
            problems.append(problem)
            continue
        rows.append(line)
    return FinetuneData(path, rows, problems, size)


def validate_finetune(train: Path, validation: Path | None, max_shown: int = 20) -> tuple[FinetuneData, FinetuneData | None]:
    checked = [check_finetune_file(train)] + ([check_finetune_file(validation)] if validation else [])
    problems = [p for c in checked for p in c.problems]
    if not problems and len(checked[0].rows) < MIN_FINETUNE_ROWS:
        problems.append(RowProblem(Location(str(train)), "file",
                                   f"{len(checked[0].rows)} rows: the service needs at least {MIN_FINETUNE_ROWS}"))
    if not problems and validation and not checked[1].rows:
        problems.append(RowProblem(Location(str(validation)), "file", "no rows"))
    if problems:
        raise DataError(problems, max_shown, hint="Azure's fine-tuning takes chat `messages` JSONL: fix these rows "
                                                  "(each is named by file:line) and run it again.")
    return checked[0], (checked[1] if validation else None)


def split_validation(data: FinetuneData, fraction: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """(train rows, validation rows): a seeded shuffle, at least one validation row, at least 10 left to train."""
    n = len(data.rows)
    n_val = max(1, round(n * fraction))
    if n - n_val < MIN_FINETUNE_ROWS:
        raise JobError(f"{data.path}: {n} rows are too few to hold out a validation set and keep "
                       f"{MIN_FINETUNE_ROWS} to train: give --validation FILE, or add rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(data.rows) if i not in held], [r for i, r in enumerate(data.rows) if i in held]


def finetune_hyperparameters(recipe: Any) -> tuple[dict[str, str], list[str]]:
    """The recipe's training settings under the names the service takes, as strings; notes for the rest."""
    t = recipe.training
    params = {"num_train_epochs": str(t.epochs), "per_device_train_batch_size": str(t.micro_batch_size),
              "learning_rate": repr(float(t.lr))}
    notes = []
    if t.max_steps:
        notes.append(f"training.max_steps={t.max_steps} is not passed: the service trains whole epochs")
    if t.epochs < 1:
        raise JobError("training.epochs must be at least 1 for hosted fine-tuning (it trains whole epochs)")
    return params, notes


def model_id(name: str, version: str) -> str:
    return f"azureml://registries/azureml/models/{name}/versions/{version}"


def resolve_model_version(registry: Any, name: str) -> str:
    """The version the `latest` label points at in the azureml registry."""
    with azure_call(f"find the latest version of {name} in the azureml registry"):
        return str(registry.models.get(name, label="latest").version)


def _write_rows(path: Path, rows: list[bytes]) -> None:
    path.write_bytes(b"".join(r + b"\n" for r in rows))


def submit_finetune(recipe: Any, train: Path, *, model: str, model_version: str | None, validation: Path | None,
                    output_name: str | None, client_factory: Callable[[], Any] | None,
                    registry_factory: Callable[[], Any] | None, dry_run: bool, say: Callable[[str], None] = print,
                    console: Any = None, blob_account_url: str | None = None, upload_fn: Any = None,
                    container_factory: Any = None, work_dir: Path | None = None) -> JobPlan:
    """Validate the data, split a validation file if needed, upload both, submit the fine-tuning job."""
    from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

    train_data, val_data = validate_finetune(Path(train), Path(validation) if validation else None,
                                             recipe.data.max_errors_shown)
    plan = JobPlan("finetune")
    if model not in FINETUNE_MODELS:
        plan.notes.append(f"{model} is not among the models the service lists for serverless fine-tuning today "
                          f"({', '.join(FINETUNE_MODELS)}); the submission may be refused")
    if val_data is None:
        # The SDK cannot take validation_data=None (UnboundLocalError), and a held-out set is worth having.
        train_rows, val_rows = split_validation(train_data, recipe.data.val_fraction or 0.1, recipe.data.split_seed)
        plan.notes.append(f"no --validation file: held out {len(val_rows)} of {len(train_data.rows)} rows "
                          f"(data.val_fraction {recipe.data.val_fraction or 0.1:g}, seed {recipe.data.split_seed})")
    else:
        train_rows, val_rows = train_data.rows, val_data.rows
    work = Path(work_dir or tempfile.mkdtemp(prefix="phi3local-finetune-"))
    staged = work / "data"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    _write_rows(staged / "train.jsonl", train_rows)
    _write_rows(staged / "validation.jsonl", val_rows)
    plan.staging = work
    prefix = f"{PREFIX}/finetune/{_sha12(staged / 'train.jsonl', staged / 'validation.jsonl')}"
    params, notes = finetune_hyperparameters(recipe)
    plan.notes += notes
    output = output_name or re.sub(r"[^A-Za-z0-9-]", "-", f"{model}-phi3local").strip("-")

    if model_version is None and not dry_run:
        if registry_factory is None:
            raise ValueError("submit_finetune needs a registry_factory to resolve the latest model version")
        model_version = resolve_model_version(registry_factory(), model)
    version_shown = model_version or "latest (resolved when submitted)"
    plan.lines = [
        f"model        {model_id(model, model_version) if model_version else model + ' ' + version_shown}",
        f"data         {len(train_rows)} training rows, {len(val_rows)} validation rows -> {prefix}/",
        f"hyperparams  {', '.join(f'{k}={v}' for k, v in params.items())}",
        f"output       registered model {output}",
        "billing      per trained token x epochs, plus an hourly fee for each deployed fine-tuned model "
        "(an idle one is deleted after 15 days)",
    ]

    def build(target: BlobTarget, version: str) -> Any:
        return create_finetuning_job(
            model=model_id(model, version), task=FineTuningTaskType.CHAT_COMPLETION,
            training_data=_file_uri(target, prefix, "train.jsonl"),
            validation_data=_file_uri(target, prefix, "validation.jsonl"),
            hyperparameters=params, output_model_name_prefix=output,
            display_name=f"phi3local-finetune-{model}", experiment_name=recipe.azure.experiment_name)

    if dry_run:
        placeholder = BlobTarget(recipe.azure.datastore, "<account>", "<container>", "https://<account>.blob.core.windows.net")
        plan.job = build(placeholder, model_version or "latest")
        _say_plan(say, plan, dry_run=True)
        return plan
    if client_factory is None:
        raise ValueError("submit_finetune needs a client_factory unless dry_run")
    ml = client_factory()
    _check_region(ml, plan)
    _say_plan(say, plan, dry_run=False)
    target = blob_target(ml, recipe.azure.datastore, account_url=blob_account_url)
    upload_to_datastore(target, staged, prefix, console=console, upload_fn=upload_fn, client_factory=container_factory,
                        description="data")
    plan.job = build(target, model_version)  # type: ignore[arg-type]
    with azure_call(f"submit fine-tuning job of {model}"):
        plan.submitted = ml.jobs.create_or_update(plan.job)
    _say_submitted(say, plan)
    return plan


def _check_region(ml: Any, plan: JobPlan) -> None:
    with azure_call("read the workspace"):
        ws = ml.workspaces.get(ml.workspace_name)
    location = (getattr(ws, "location", "") or "").replace(" ", "").lower()
    if location and location not in FINETUNE_REGIONS:
        plan.notes.append(f"the workspace is in {location}; the docs list serverless fine-tuning of Microsoft models "
                          f"only in {', '.join(FINETUNE_REGIONS)}")
