"""The `phi3local azure ...` sub-commands: parse, resolve the recipe and the workspace, call one module.

cli.py calls `register(subparsers)`. Nothing here imports the Azure SDK at import time (it lives in its own
virtual environment); each command first imports the SDK packages it needs (`phi3local.azure.sdk.require`),
so without them it stops with one line naming `make install-azure`, before reading or writing anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phi3local.argtypes import positive_float, positive_int
from phi3local.azure import sdk

OVERRIDES_HELP = "recipe overrides, e.g. azure.endpoint_name=phi3-chat azure.max_tokens=256"
MEASURE_EPILOG = (
    "The request timeout and the probe delays are derived from measurements of this model, never defaulted: "
    "--per-token-ms and --load-seconds, or --measurements FILE (JSON: per_token_ms or tokens_per_second, "
    "load_seconds, optional first_token_ms), or measurements.json in the ONNX folder. "
    "request_timeout_ms = azure.timeout_factor x (first token + azure.max_tokens x per-token latency), "
    "clamped to Azure's 5-180 s; WORKER_COUNT = azure.max_concurrent_requests_per_instance. "
    "Unset, azure.endpoint_name is derived from the ONNX folder's name and azure.instance_type from the export's "
    "target (a CPU VM for a CPU export, a GPU VM for a CUDA one); both are printed.")


def _require(args, *, sends: bool = True) -> None:
    """The SDK packages this command uses (all of them unless it is a dry run), or one line saying how to get them."""
    modules = ["azure.ai.ml"]
    if sends and not getattr(args, "dry_run", False):
        modules += ["azure.identity", "azure.storage.blob"]
    sdk.require(*modules)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _say(console: Any):
    return lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)


def _recipe(args) -> Any:
    from phi3local.config import load_recipe

    return load_recipe(getattr(args, "recipe", None), list(getattr(args, "overrides", []) or []))


def _measurements(args) -> Any:
    from phi3local.azure.spec import read_measurements

    return read_measurements(args.onnx_dir, args.measurements, per_token_ms=args.per_token_ms,
                             first_token_ms=args.first_token_ms, load_seconds=args.load_seconds)


def _workspace(args, recipe) -> Any:
    from phi3local.azure.workspace import resolve_workspace

    return resolve_workspace(recipe.azure, subscription_id=args.subscription, resource_group=args.resource_group,
                             workspace=args.workspace, config_file=args.config)


def _client_factory(ref) -> Any:
    from phi3local.azure.workspace import connect

    return lambda: connect(ref)


# ------------------------------------------------------------------------------------------ commands

def cmd_spec(args) -> int:
    _require(args, sends=False)
    from phi3local.azure.spec import plan_lines, write_spec

    recipe = _recipe(args)
    console = _console()
    spec = write_spec(args.onnx_dir, args.out, recipe.azure, _measurements(args))
    say = _say(console)
    for line in plan_lines(spec):
        say(line)
    say(f"wrote {', '.join(p.name for p in spec.files.values())}, code/ and spec.json in {spec.out_dir} "
        "(each YAML loaded back through the Azure ML SDK)")
    return 0


def cmd_push(args) -> int:
    _require(args)
    from phi3local.azure.deploy import push

    recipe = _recipe(args)
    console = _console()
    out = Path(args.out) if args.out else Path(f"{Path(args.onnx_dir).resolve()}.azure")
    measurements = _measurements(args)
    ref = _dry_run_workspace(args, recipe) if args.dry_run else _workspace(args, recipe)
    push(args.onnx_dir, out, recipe.azure, measurements, ws=ref, client_factory=None if args.dry_run else
         _client_factory(ref), dry_run=args.dry_run, say=_say(console), console=console, safety=recipe.safety,
         safety_report=args.safety_report, allow_safety_regression=args.allow_safety_regression)
    return 0


def _dry_run_workspace(args, recipe) -> Any:
    # A dry run names the workspace in its plan when it can, but does not need one.
    from phi3local.azure.workspace import WorkspaceError

    try:
        return _workspace(args, recipe)
    except WorkspaceError:
        return None


def cmd_invoke(args) -> int:
    _require(args)
    from phi3local.azure.invoke import STREAMING_NOTE, InvokeError, chat_body, invoke

    recipe = _recipe(args)
    endpoint = args.endpoint or recipe.azure.endpoint_name
    if not endpoint:
        raise InvokeError("no endpoint: give --endpoint NAME (or azure.endpoint_name in the recipe)")
    console = _console()
    say = _say(console)
    ml = _client_factory(_workspace(args, recipe))()
    result = invoke(ml, endpoint, chat_body(args.prompt, args.system, args.max_tokens), deployment=args.deployment,
                    timeout_s=args.timeout)
    say(f"note: {STREAMING_NOTE}")
    status = f"{result.status}" + (f" (container: {result.model_status})" if result.model_status else "")
    say(f"status {status}, latency {result.latency_s:.2f} s")
    if not result.ok:
        raise InvokeError(result.error or f"the endpoint answered {result.status}", result)
    say(result.answer or "")
    if result.usage:
        u = result.usage
        say(f"[{u.get('prompt_tokens')} prompt + {u.get('completion_tokens')} completion tokens, "
            f"finish_reason {result.finish_reason}]")
    return 0


def cmd_train(args) -> int:
    _require(args)
    from phi3local.azure.jobs import submit_train
    from phi3local.cost import azure_train_estimate

    if args.parallelism:
        args.overrides = [*(args.overrides or []), f"training.parallelism={args.parallelism}"]
    recipe = _recipe(args)
    console = _console()
    ref = None if args.dry_run else _workspace(args, recipe)
    submit_train(recipe, compute=args.compute, instance_count=args.instance_count, gpus_per_node=args.gpus_per_node,
                 client_factory=None if args.dry_run else _client_factory(ref), dry_run=args.dry_run,
                 say=_say(console), console=console)
    _say_estimate(_say(console), "cost", azure_train_estimate(recipe, args.instance_count, args.gpus_per_node).lines)
    return 0


def _say_estimate(say, label: str, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        say(f"{label if i == 0 else '':<12} {line}")


def cmd_finetune(args) -> int:
    _require(args)
    from phi3local.azure.jobs import submit_finetune
    from phi3local.azure.workspace import registry_client
    from phi3local.cost import finetune_comparison

    recipe = _recipe(args)
    console = _console()
    ref = None if args.dry_run else _workspace(args, recipe)
    submit_finetune(recipe, Path(args.data), model=args.model, model_version=args.model_version,
                    validation=Path(args.validation) if args.validation else None, output_name=args.output_name,
                    client_factory=None if args.dry_run else _client_factory(ref),
                    registry_factory=None if args.dry_run else (lambda: registry_client("azureml")),
                    dry_run=args.dry_run, say=_say(console), console=console)
    _say_estimate(_say(console), "cost", finetune_comparison(recipe, Path(args.data)))
    return 0


# ------------------------------------------------------------------------------------------ parser

def _workspace_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workspace", "Flags win over --config, which wins over the recipe's azure section. "
                                          "Credentials: DefaultAzureCredential only (e.g. `az login`).")
    g.add_argument("--config", help="config.json of the workspace as the Azure portal downloads it "
                                    "(default: ./config.json or ./.azureml/config.json if present)")
    g.add_argument("--subscription", help="subscription id")
    g.add_argument("--resource-group", help="resource group")
    g.add_argument("--workspace", help="Azure ML workspace name")


def _recipe_flags(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("recipe", help="YAML recipe, e.g. recipes/phi3-mini-4k-qlora.yaml")
    else:
        p.add_argument("--recipe", help="YAML recipe whose azure (and training) sections to use (default: defaults)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _measure_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurements", "What the timeout and the probes are derived from (default: "
                                             "measurements.json, which `phi3local export` writes in the ONNX "
                                             "folder).")
    g.add_argument("--measurements", help="JSON file with per_token_ms (or tokens_per_second), load_seconds, "
                                          "optional first_token_ms")
    g.add_argument("--per-token-ms", type=positive_float, help="measured decode latency per new token, ms")
    g.add_argument("--first-token-ms", type=positive_float, help="measured time to the first token, ms")
    g.add_argument("--load-seconds", type=positive_float, help="measured model load time of one worker, s")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `azure` and its actions to the CLI's sub-parsers; returns the `azure` parser.

    Imports nothing but argparse's helpers: the SDK and the stages are imported by the command that runs."""
    azure = subparsers.add_parser(
        "azure", help="hand the model to Azure ML: spec, push, invoke, train, finetune",
        description="Deploy an ONNX export to Azure ML, test it, or train on Azure.",
        epilog="The Azure SDK lives in a venv of its own: make install-azure.")
    azure.set_defaults(func=lambda args: _no_action(azure))
    sub = azure.add_subparsers(dest="azure_command", metavar="ACTION")

    p = sub.add_parser("spec", help="write the deployment's Azure ML YAML and code folder",
                       description="Write the Azure ML YAML of a deployment (model, environment, endpoint, "
                                   "deployment) and its code folder, each YAML loaded back through the SDK.",
                       epilog=MEASURE_EPILOG)
    p.add_argument("onnx_dir", help="folder `phi3local export` wrote")
    p.add_argument("--out", required=True, help="folder for the spec (new, empty, or an earlier spec)")
    _recipe_flags(p)
    _measure_flags(p)
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("push", help="upload, register, deploy to a managed endpoint",
                       description="Upload the model, register it, deploy it to a managed online endpoint and "
                                   "give that deployment all the traffic.",
                       epilog=MEASURE_EPILOG + " Run with --dry-run first: it writes the spec and prints the plan.")
    p.add_argument("onnx_dir", help="folder `phi3local export` wrote")
    p.add_argument("--out", help="folder for the spec (default: ONNX_DIR.azure beside the export)")
    p.add_argument("--dry-run", action="store_true", help="write the spec and print the plan; send nothing to Azure")
    p.add_argument("--safety-report", help="safety.json of `phi3local safety` (default: ONNX_DIR.safety/safety.json)")
    p.add_argument("--allow-safety-regression", action="store_true",
                   help="deploy although the safety gate refuses (recorded in the deployment's tags)")
    _recipe_flags(p)
    _measure_flags(p)
    _workspace_flags(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("invoke", help="send a test chat request; print answer, latency",
                       description="Send one test chat request to the endpoint; print the answer and the latency.",
                       epilog="Errors are explained: 424 (the container answered an error: its real status is in "
                              "ms-azureml-model-error-statuscode), 408 (request_timeout_ms exceeded), 429 (too many "
                              "concurrent requests). Managed endpoints are reported not to stream through this "
                              "server, so the request asks for the whole answer.")
    p.add_argument("--endpoint", help="endpoint name (default: azure.endpoint_name)")
    p.add_argument("--deployment", help="send to this deployment, bypassing the traffic split")
    p.add_argument("--prompt", default="Say hello in one short sentence.", help="the user message")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=positive_int, help="max_tokens of the request (default: the served cap)")
    p.add_argument("--timeout", type=positive_float, default=200.0,
                   help="seconds to wait here (above Azure's 180 s limit, so its 408 shows)")
    _recipe_flags(p)
    _workspace_flags(p)
    p.set_defaults(func=cmd_invoke)

    p = sub.add_parser("train", help="submit the recipe as a command job on a cluster",
                       description="Submit the recipe as an Azure ML command job on a compute cluster.",
                       epilog="The data files become uri_file inputs, the run folder a uri_folder output; the job "
                              "runs `python -m phi3local train recipe.yaml data.train_file=${{inputs.train}} "
                              "output_dir=${{outputs.run}}`. With --instance-count or --gpus-per-node above 1 the job "
                              "gets a PyTorchDistribution: Azure ML starts one process per GPU on every node and sets "
                              "RANK, WORLD_SIZE, MASTER_ADDR/PORT; the ranks train the recipe together (DDP, NCCL; "
                              "--parallelism fsdp shards the model over them), global batch = processes x "
                              "micro_batch_size x grad_accum.")
    _recipe_flags(p, positional=True)
    p.add_argument("--compute", help="compute cluster name (default: azure.compute)")
    p.add_argument("--instance-count", type=positive_int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=positive_int, default=1, help="processes per node")
    p.add_argument("--parallelism", choices=["ddp", "fsdp"],
                   help="training.parallelism for the job (default: the recipe's): ddp replicates the model on "
                        "every GPU, fsdp shards it over them (for what does not fit one)")
    p.add_argument("--dry-run", action="store_true", help="stage and print the job; send nothing")
    _workspace_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune", help="hand chat data to Azure's hosted fine-tuning",
        description="Check a chat JSONL against the hosted service's rules and submit it to Azure's hosted "
                    "(serverless) fine-tuning.",
        epilog="Models the service lists today for Microsoft serverless fine-tuning: Phi-4, Phi-4-mini-instruct, "
               "Phi-4-multimodal-instruct (East US 2, East US, North/South Central US, West US, West US 3; hub-based "
               "projects); Phi-3/3.5 are no longer listed. The data (chat `messages` JSONL, UTF-8, BOM allowed, under "
               "512 MB, at least 10 rows, optional weight 0/1 on assistant turns) is checked here first, each "
               "problem named by file:line. Hyperparameters come from the recipe: training.epochs -> "
               "num_train_epochs, training.micro_batch_size -> per_device_train_batch_size, training.lr -> "
               "learning_rate. Billing: per trained token x epochs, plus an hourly fee for each deployed "
               "fine-tuned model.")
    p.add_argument("data", help="training data: chat messages JSONL")
    p.add_argument("--model", required=True, help="model in the azureml registry, e.g. Phi-4-mini-instruct")
    p.add_argument("--model-version", help="its version (default: the one labelled latest)")
    p.add_argument("--validation", help="validation JSONL (default: data.val_fraction of DATA is held out)")
    p.add_argument("--output-name", help="name of the registered fine-tuned model (default: <model>-phi3local)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the job; send nothing")
    _recipe_flags(p)
    _workspace_flags(p)
    p.set_defaults(func=cmd_finetune)
    return azure


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


__all__ = ["register", "cmd_spec", "cmd_push", "cmd_invoke", "cmd_train", "cmd_finetune"]
