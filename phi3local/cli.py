"""The `phi3local` command: parse, load the recipe, call one stage, print. No logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from phi3local import folders, hints
from phi3local.argtypes import CommandHelpFormatter, DefaultsHelpFormatter, non_negative_float, positive_int, probability
from phi3local.config import load_recipe
from phi3local.errors import Phi3LocalError

console = Console()

EPILOG = "Recipes are YAML files (see recipes/); any key can be overridden: training.lr=1e-4 data.max_seq_len=2048"


def _recipe(args, launcher: list[str] = ()) -> object:
    """launcher: overrides from the launcher's own configuration (an accelerate FSDP config), before the user's."""
    overrides = [*launcher, *(o for o in args.overrides if o != "resume=auto")]
    if "resume=auto" in args.overrides:
        args.resume = True
    recipe = load_recipe(args.recipe, overrides)
    if args.verbose:  # the whole resolved recipe (~120 lines); it is saved as <run>/recipe.yaml either way
        from rich.syntax import Syntax

        console.rule(f"recipe {args.recipe}")
        console.print(Syntax(recipe.to_yaml(), "yaml", background_color="default"))
    return recipe


def _recipe_words(args) -> list[str]:
    """The recipe and overrides as the user gave them, for a hint that repeats their command."""
    return [str(args.recipe), *args.overrides]


def cmd_prepare(args) -> int:
    from phi3local.data.prepare import prepare
    from phi3local.model.load import resolve_model_path
    from phi3local.model.tokenizer import load_tokenizer

    recipe = _recipe(args)
    tokenizer = load_tokenizer(recipe.model.tokenizer or resolve_model_path(recipe.model.name_or_path),
                               revision=None if recipe.model.tokenizer else recipe.model.revision)
    out = Path(args.out) if args.out else None
    run_dir = Path(recipe.output_dir)
    # Into <run>/prepared: the run folder is claimed as a training run (so `train` takes it as its own) and
    # locked, so data is never replaced under a live training.
    in_run = out is None and not recipe.data.prepared_dir
    if in_run:
        folders.claim(run_dir, "train")
    with folders.exclusive(run_dir, "training") if in_run else contextlib.nullcontext():
        result = prepare(recipe, tokenizer, out_dir=out, console=console)
    console.print(f"prepared data in [bold]{escape(str(result.out_dir))}[/]", soft_wrap=True)
    hints.print_next(console, hints.command("train", args=_recipe_words(args)))
    return 0


def cmd_train(args) -> int:
    from phi3local.train.distributed import from_environment, launcher_overrides
    from phi3local.train.recipe import RunAlreadyFinished, TrainingInterrupted, run_training

    console.quiet = not from_environment().is_main  # under torchrun/accelerate rank 0 alone prints
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again: give one of them")
    launcher = launcher_overrides()
    if launcher:
        console.print(f"accelerate's FSDP config: {' '.join(launcher)}", soft_wrap=True, highlight=False)
    recipe = _recipe(args, launcher)
    try:
        summary = run_training(recipe, resume=args.resume, overwrite=args.overwrite, console=console)
    except RunAlreadyFinished as e:
        console.print(escape(str(e)), soft_wrap=True, highlight=False)
        return 0
    except TrainingInterrupted as e:
        console.print(f"[yellow]{escape(str(e))}[/]", soft_wrap=True, highlight=False)
        words = [w for w in _recipe_words(args) if w != "resume=auto"]
        hints.print_next(console, hints.command("train", args=[*words, "--resume"]), label="continue with:")
        return 128 + e.signum
    if summary.get("rank"):  # another rank than 0 under a launcher: rank 0 reports the run
        return 0
    run_dir = Path(recipe.output_dir)
    console.print(f"adapter saved in [bold]{escape(str(run_dir / 'adapter'))}[/]", soft_wrap=True)
    hints.print_next(console, hints.command("merge", run_dir, "--out", run_dir.parent / (run_dir.name + "-merged")))
    return 0 if summary else 1


def _print_report(args, report: dict, summary) -> None:
    """The stage's report as JSON for scripts (--json), else its short summary."""
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        summary.print(console)


def cmd_eval(args) -> int:
    from phi3local import summaries
    from phi3local.train.evaluate import evaluate_model

    quiet = Console(stderr=True, quiet=args.json)
    result = evaluate_model(Path(args.model), Path(args.data), args.overrides, console=quiet)
    _print_report(args, result, summaries.eval_table(result, Path(args.model), Path(args.data)))
    return 0


def cmd_merge(args) -> int:
    from phi3local import summaries
    from phi3local.export.merge import merge_adapter

    report = merge_adapter(Path(args.run), Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    _print_report(args, report, summaries.merge_table(report, Path(args.out)))
    return 0


def cmd_export(args) -> int:
    from phi3local import summaries

    if args.format in ("gguf", "ollama"):
        from phi3local.export.gguf import export_gguf, gguf_table

        if args.adapter:
            raise Phi3LocalError(f"--adapter is for --format onnx; merge first for --format {args.format}: "
                                 + hints.command("merge", args.adapter, "--out", "MERGED"))
        report = export_gguf(Path(args.model), Path(args.out), quant=args.quant, fmt=args.format,
                             overwrite=args.overwrite, parity=args.parity, show=False)
        _print_report(args, report, gguf_table(report, Path(args.out)))
        return 0
    if args.quant:
        raise Phi3LocalError("--quant is for --format gguf or ollama; ONNX takes --precision")
    from phi3local.export.onnx import export_onnx

    report = export_onnx(Path(args.model), Path(args.out), precision=args.precision, target=args.target,
                         adapter_path=Path(args.adapter) if args.adapter else None, overwrite=args.overwrite,
                         parity=args.parity, show=False)
    _print_report(args, report, summaries.export_table(report, Path(args.out)))
    return 0


def cmd_chat(args) -> int:
    from phi3local.serve.chat import chat

    chat(Path(args.model), prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p, show_reasoning=args.show_reasoning)
    return 0


def cmd_doctor(args) -> int:
    from phi3local import doctor

    findings = doctor.diagnose()
    if args.json:
        print(json.dumps(doctor.as_dicts(findings), indent=2))
    else:
        console.print(doctor.table(findings))
    return 0


def cmd_serve(args) -> int:
    from phi3local.serve.server import serve

    # Does not return: this process becomes the inference server.
    serve(Path(args.model), host=args.host, port=args.port, workers=args.workers, threads=args.threads,
          max_tokens_cap=args.max_tokens, max_body_bytes=args.max_body_bytes, health_port=args.health_port,
          model_name=args.model_name, monitor_log=args.monitor_log)
    return 0


class UsageError(Phi3LocalError):
    """Flags that contradict each other."""

    exit_code = 2


class BenchUnavailable(Phi3LocalError):
    """`phi3local bench` outside a source checkout."""


def cmd_bench(args) -> int:
    import subprocess

    # The benchmarks live beside the package in a source checkout, not in an installed wheel.
    root = Path(__file__).resolve().parents[1]
    if not (root / "kernels_bench" / "run_all.py").is_file():
        raise BenchUnavailable(f"the benchmarks ship with the source checkout (kernels_bench/), not found beside {root}")
    only = [] if args.which == "all" else ["--only", args.which]
    return subprocess.call([sys.executable, "-m", "kernels_bench.run_all", "--size", args.size, *only], cwd=root)




def _start_with() -> str:
    """--help's first step: the tiny recipe of the source checkout, as a command that runs from anywhere."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    if not recipe.is_file():  # an installed wheel: the recipes are in the source repository
        return "Start with the tiny recipe of the source repository: phi3local train recipes/tiny-cpu.yaml"
    return f"Start with (a tiny model, CPU, a few minutes):\n  {hints.command('train', recipe)}"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every sub-command's --help shows its defaults."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.formatter_class = DefaultsHelpFormatter
                _show_defaults(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3local",
        description="Fine-tune Microsoft Phi-3 models with 4-bit QLoRA on one machine, export to\nONNX, "
                    "chat locally, hand the result to Azure.",
        epilog=_start_with(),
        formatter_class=CommandHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(p):
        p.add_argument("recipe", help="YAML recipe, e.g. recipes/phi3-mini-4k-qlora.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")

    p = sub.add_parser("prepare", help="validate, clean, tokenise and split the recipe's data", epilog=EPILOG)
    with_recipe(p)
    p.add_argument("--out", help="output folder (default: data.prepared_dir or <output_dir>/prepared)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="fine-tune with (Q)LoRA: prepare, train, evaluate, save the adapter",
                       epilog=EPILOG + ". resume=auto is the same as --resume.")
    with_recipe(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run, checkpoint or merged model on a data file")
    p.add_argument("model", help="run folder, checkpoint folder, adapter folder or merged model folder")
    p.add_argument("--data", required=True, help="data file in any format prepare reads")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.max_seq_len=1024")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge a LoRA adapter into full-precision base weights")
    p.add_argument("run", help="run folder or adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged Hugging Face model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge output in --out")
    p.add_argument("--json", action="store_true", help="print the report (merge_report.json) instead of a table")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="export a merged model to ONNX (onnxruntime-genai) or GGUF/Ollama and check parity")
    p.add_argument("model", help="merged model folder")
    p.add_argument("--out", required=True, help="folder for the exported model")
    p.add_argument("--format", default="onnx", choices=["onnx", "gguf", "ollama"],
                   help="onnx: onnxruntime-genai; gguf: llama.cpp; ollama: the GGUF plus a Modelfile")
    p.add_argument("--quant", type=str.lower, metavar="TYPE",
                   help="GGUF type: f32, f16, bf16, q8_0 (llama.cpp's converter) or q4_k_m, q5_k_m, q6_k, q4_0, ... "
                        "(its quantizer); default f16 for gguf, q4_k_m for ollama")
    p.add_argument("--precision", default="int4", choices=["int4", "fp16", "bf16", "fp32"],
                   help="weight precision of the ONNX export")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="execution provider it runs on")
    p.add_argument("--adapter", help="export an unmerged LoRA adapter into the graph instead of merging first")
    p.add_argument("--parity", default="full", choices=["full", "short", "none"],
                   help="check against PyTorch: full also runs a LongRoPE model's prompts past its switch (at 3.8B "
                        "on a CPU most of an hour), short only the short prompts (the same as full for other "
                        "models), none nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--json", action="store_true", help="print the report (export_report.json) instead of a table")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="chat with an exported ONNX model (onnxruntime-genai)")
    p.add_argument("model", help="exported ONNX folder")
    p.add_argument("--prompt", help="answer one prompt and exit (for scripts)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--show-reasoning", action="store_true",
                   help="print a reasoning model's <think> trace (dimmed) before the answer; hidden without")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve an exported model through the Azure ML inference server (score.py)")
    p.add_argument("model", help="exported ONNX folder (or a folder holding exactly one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: reachable from the network)")
    p.add_argument("--port", type=positive_int, default=5001, help="port to listen on")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes, each with its own model copy")
    p.add_argument("--threads", type=positive_int, default=4, help="request threads per worker, sharing its model")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="cap (and default) of a request's max_tokens")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--health-port", type=positive_int, help="also answer GET / on this port (same workers)")
    p.add_argument("--model-name", help="`model` field of responses (default: the folder's name)")
    p.add_argument("--monitor-log", help="append one redacted record per request (JSONL; see `phi3local monitor`)")
    p.set_defaults(func=cmd_serve)

    from phi3local.azure import commands as azure_commands

    azure_commands.register(sub)
    from phi3local.train import plan_command

    plan_command.register(sub)
    from phi3local.safety import commands as safety_commands

    safety_commands.register(sub)
    from phi3local import monitor_report

    monitor_report.register(sub)

    p = sub.add_parser("doctor", help="what this machine has, what each stage will choose, how to fix gaps")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="run the benchmarks (make bench, bench-train, bench-kernels)")
    p.add_argument("which", nargs="?", default="all", choices=["all", "train", "kernels"])
    p.add_argument("--size", default="small", choices=["small", "full"], help="full: Phi-3-mini's real shapes (GPU)")
    p.set_defaults(func=cmd_bench)
    _show_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after flags too (`train r.yaml --resume training.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        from phi3local.quiet import silence_known_noise

        silence_known_noise()
    try:
        return args.func(args)
    except Phi3LocalError as e:
        # The package's own errors carry a message written for the user; anything else is a bug.
        if args.verbose:
            raise
        console.quiet = False  # a rank kept quiet still reports its error
        console.print(f"[red]phi3local {args.command}: error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
