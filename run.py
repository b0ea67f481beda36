"""philo_dataflow command line: fine-tune (or load) a LoRA adapter, compare it with its base model on
held-out questions, and write the adapter, predictions, metrics, figures, report and dataflow graph.

    python run.py                                   # embedded SmolLM2-135M-Instruct on example_data/
    python run.py --data-path ../shared/data/phillm/main_data.json --output-dir outputs/phillm
    python run.py --start presaved --presaved-model-dir outputs/adapter --output-dir outputs/re-eval
    python run.py --visualize dataflow.png          # only draw the dataflow graph
    python run.py --judge-model gpt-4.1             # also judge base vs fine-tuned (OPENAI_API_KEY)
    python run.py --judge-model local --judge-base-url http://127.0.0.1:8080/v1   # a local server

Every hyperparameter flag defaults to the library's documented default (shown in --help).
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_DATA_PATH = "example_data/philosophy_qa.jsonl"
#: Nodes computed (and so validated) before any model is loaded, then handed to the full run as overrides.
DATA_NODES = ("instruction_records", "train_set", "validation_set", "hold_out_set")

#: (flag name = input name, type, help). Defaults are read from the library's function signatures.
HYPERPARAMETERS = (
    ("input_text_key", str, "record key of the question (default: alpaca instruction/input)"),
    ("output_text_key", str, "record key of the answer (default: alpaca output)"),
    ("category_key", str, "record key of the category / school of thought"),
    ("validation_fraction", float, "share of each category held for validation (early stopping)"),
    ("hold_out_fraction", float, "share of each category held out for the final comparison"),
    ("seed", int, "seed of the split, model init, dropout and data order"),
    ("max_seq_length", int, "tokens per training example, prompt included"),
    ("lora_r", int, "LoRA rank"),
    ("lora_alpha", int, "LoRA scaling numerator (update scaled by alpha / r)"),
    ("lora_dropout", float, "dropout on the LoRA input"),
    ("lora_target_modules", str, "'all-linear' or comma-separated module names, e.g. q_proj,v_proj"),
    ("lora_layers_to_transform", str, "decoder layers to adapt: 'all', 'top:N', 'top:P%%' (last P percent) or indices such as 0-3,8"),
    ("learning_rate", float, "peak AdamW learning rate"),
    ("num_train_epochs", int, "passes over the train split (early stopping may end sooner)"),
    ("max_steps", int, "optimizer steps to stop after; -1 uses --num-train-epochs"),
    ("per_device_train_batch_size", int, "examples per training forward pass"),
    ("per_device_eval_batch_size", int, "examples per evaluation forward pass"),
    ("gradient_accumulation_steps", int, "forward passes per optimizer step"),
    ("warmup_ratio", float, "share of optimizer steps of linear warm-up"),
    ("lr_scheduler_type", str, "learning-rate schedule after warm-up"),
    ("weight_decay", float, "AdamW weight decay"),
    ("eval_steps", int, "optimizer steps between evaluations; unset = once per epoch"),
    ("logging_steps", int, "optimizer steps between training-loss logs"),
    ("early_stopping_patience", int, "evaluations without improvement before stopping"),
    ("neftune_noise_alpha", float, "NEFTune embedding-noise scale; unset = off"),
    ("max_new_tokens", int, "cap on generated tokens per answer"),
    ("generation_batch_size", int, "questions per batched generate call"),
    ("resume_from_checkpoint", str, "checkpoint dir of an interrupted run to resume, or 'last' (the newest complete one)"),
)
BOOLEAN_FLAGS = (
    ("bf16", "bf16 autocast in training; unset = auto: on where bf16 is native (CUDA GPU >= sm80, CPU with AVX512-BF16 or AMX)"),
    ("load_in_4bit", "QLoRA: 4-bit NF4 base weights through bitsandbytes (CUDA only)"),
    ("gradient_checkpointing", "memory-saving mode: recompute activations in backward, small loss chunks, return freed memory each step"),
    ("torch_compile", "compile each decoder layer for training (torch.compile); unset = auto: on for a CPU with a C++ compiler"),
    ("allow_pickle", "load pickle weights (.bin) when there are no safetensors (unpickling can run code)"),
    ("trust_remote_code", "let a model directory or hub repository run its own Python code (auto_map)"),
)
#: LLM-judge flags (flag name = input name, type, help); the judge runs only with --judge-model.
JUDGE_FLAGS = (
    ("judge_model", str, "judge model at the endpoint, e.g. gpt-4.1; giving it runs the LLM judge"),
    ("judge_base_url", str, "OpenAI-compatible /v1 base URL (OpenAI, vLLM, Ollama, llama.cpp server)"),
    ("judge_api_key_env", str, "environment variable holding the judge's API key (loopback needs none)"),
    ("judge_response_format", str, "structured output: auto (probe), json_schema or json_object"),
    ("judge_max_concurrency", int, "judge requests in flight at once"),
    ("judge_max_tokens", int, "cap on tokens of one judge reply"),
    ("judge_timeout", float, "seconds one judge request may take before it is retried"),
    ("judge_max_retries", int, "retries of one judge request on 429/5xx/timeouts, with backoff"),
    ("judge_malformed_retries", int, "re-asks of a judge reply that does not validate"),
    ("judge_rationale_max_chars", int, "cap on a rationale's characters with json_object (local servers)"),
    ("judge_cache_dir", str, "cache of judge replies; share one between runs to never pay twice"),
)
#: Inputs a presaved run takes from the adapter's manifest unless given on the command line.
FROM_MANIFEST = (
    "data_path", "input_text_key", "output_text_key", "category_key", "validation_fraction",
    "hold_out_fraction", "seed", "max_seq_length", "max_new_tokens",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[1:2]),
    )
    parser.add_argument("--data-path", help=f"question/answer file: .json, .jsonl or .csv (default: {DEFAULT_DATA_PATH})")
    parser.add_argument("--model-id", default=defaults["model_id"],
                        help="hub id, local model directory, .gguf file, or the embedded default (default: %(default)s)")
    parser.add_argument("--output-dir", default=defaults["output_dir"], help="run directory (default: %(default)s)")
    parser.add_argument("--start", choices=("base", "presaved"), default="base",
                        help="base: train a new adapter; presaved: load --presaved-model-dir (default: %(default)s)")
    parser.add_argument("--presaved-model-dir", help="adapter directory written by a base run (<output-dir>/adapter)")
    parser.add_argument("--outputs", default=None,
                        help="comma-separated final variables to compute (default: every file of a run)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing over another run's files in --output-dir")
    parser.add_argument("--visualize", metavar="PATH", help="only draw the dataflow graph to PATH (.png/.svg) and exit")
    parser.add_argument("--no-graph", action="store_true", help="do not draw <output-dir>/dataflow.png")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    group = parser.add_argument_group("hyperparameters (default: the library's default)")
    for name, kind, text in HYPERPARAMETERS:
        group.add_argument(_flag(name), type=kind, default=None, help=f"{text} (default: {str(defaults.get(name)).replace('%', '%%')})")
    for name, text in BOOLEAN_FLAGS:
        group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {'auto' if defaults.get(name) is None else defaults.get(name)})")
    judge = parser.add_argument_group("LLM judge (runs only with --judge-model; see docs/judge.md)")
    for name, kind, text in JUDGE_FLAGS:
        choices = ("auto", "json_schema", "json_object") if name == "judge_response_format" else None
        shown = "<output-dir>/judge_cache" if name == "judge_cache_dir" else defaults.get(name)
        judge.add_argument(_flag(name), type=kind, default=None, choices=choices, help=f"{text} (default: {shown})")
    return parser


class UserError(Exception):
    """A mistake in the command line or the files it names: one line, exit code 2."""


def _inputs_from_args(args: argparse.Namespace) -> dict:
    inputs = {"output_dir": args.output_dir}
    for name, *_ in HYPERPARAMETERS:
        if getattr(args, name) is not None:
            inputs[name] = getattr(args, name)
    for name, _ in BOOLEAN_FLAGS:
        if getattr(args, name) is not None:
            inputs[name] = getattr(args, name)
    if args.data_path:
        inputs["data_path"] = args.data_path
    if args.start == "base":
        inputs["model_id"] = args.model_id
        inputs.setdefault("data_path", DEFAULT_DATA_PATH)
    else:
        from philo_dataflow.modeling import _read_manifest

        presaved = args.presaved_model_dir or str(Path(args.output_dir) / "adapter")
        try:
            manifest_inputs = _read_manifest(presaved)["inputs"]
        except ValueError:
            manifest_inputs = {}  # the preflight reports what is wrong with the adapter directory
        for name in FROM_MANIFEST:
            if name not in inputs and manifest_inputs.get(name) is not None:
                inputs[name] = manifest_inputs[name]
        inputs["presaved_model_dir"] = presaved
    return inputs


def _flag_problems(args: argparse.Namespace, outputs: list, available: set) -> list:
    """Mistakes in the command line itself, reported with the preflight's problems."""
    from philo_dataflow.preflight import Problem

    problems = []
    judge_flags = [name for name, *_ in JUDGE_FLAGS if getattr(args, name) is not None]
    if judge_flags and args.judge_model is None:
        problems.append(Problem("judge_model", f"{', '.join(_flag(n) for n in judge_flags)} configure the LLM judge; "
                                               "add --judge-model to run it."))
    unknown = [o for o in outputs if o not in available]
    if unknown:
        problems.append(Problem("outputs", f"--outputs: unknown variable(s) {unknown}; see philo_dataflow.FINAL_VARIABLES."))
    return problems


def _draw_graph(dr, outputs: list, inputs: dict, path: str) -> str:
    if shutil.which("dot") is None:
        raise UserError("drawing the graph needs Graphviz's `dot`: apt-get install graphviz (setup.sh does).")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = str(Path(path).with_suffix("")), Path(path).suffix.lstrip(".") or "png"
    # Rendered aside and renamed into place, like every other output: a crash leaves no half-drawn file.
    with tempfile.TemporaryDirectory(prefix=".dataflow.", dir=Path(path).parent) as staging:
        dr.visualize_execution(outputs, str(Path(staging) / "graph"), render_kwargs={"format": suffix, "view": False},
                               inputs=inputs, bypass_validation=True, deduplicate_inputs=True)
        os.replace(Path(staging) / f"graph.{suffix}", f"{stem}.{suffix}")
    return f"{stem}.{suffix}"


def _print_summary(result: dict, output_dir: str, seconds: float) -> None:
    print(f"\nphilo_dataflow finished in {seconds / 60:.1f} min. Outputs in {output_dir}/:")
    for name, value in result.items():
        if name.startswith("saved_") or name == "save_best_models":
            paths = value.values() if isinstance(value, dict) else [value]
            for path in paths:
                if isinstance(path, str) and path.startswith(str(Path(output_dir))):
                    print(f"  {path}")
    metrics_path = Path(output_dir) / "metrics.json"
    if not metrics_path.is_file():
        return
    metrics = json.loads(metrics_path.read_text())
    base, tuned = metrics["hold_out"]["base"], metrics["hold_out"]["finetuned"]
    diff = metrics["hold_out"]["rougeL_difference"]
    print(f"\nHold-out ({base['count']} questions)     base    fine-tuned")
    print(f"  ROUGE-L                      {base['rougeL']:.3f}   {tuned['rougeL']:.3f}")
    print(f"  answers ending on EOS        {base['eos_stop_rate']:.0%}    {tuned['eos_stop_rate']:.0%}")
    print(f"  mean answer words            {base['mean_answer_words']:.0f}      {tuned['mean_answer_words']:.0f}")
    print(f"  ROUGE-L difference {diff['mean']:+.3f}, bootstrap 95% CI [{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}]")
    print(f"  validation loss of the kept checkpoint: {metrics['validation'].get('eval_loss', float('nan')):.4f}")
    _print_judge_summary(metrics)


def _print_judge_summary(metrics: dict) -> None:
    judge = metrics.get("judge")
    if judge is None:
        print("  LLM judge: not run (no judge endpoint configured; pass --judge-model NAME, and --judge-base-url "
              "for a server other than OpenAI's).")
        return
    from philo_dataflow.judging import CRITERIA

    settings, rubric, pairwise, calls = judge["settings"], judge["rubric"], judge["pairwise"], judge["calls"]
    print(f"\nLLM judge {settings['model']} ({settings['prompt_version']}): {calls['judgments']} judgments, "
          f"{calls['failed']} failed, {calls['replies_from_cache']} of {calls['replies']} replies from the cache")
    print("  rubric mean (1-5)            base    fine-tuned")
    for criterion in CRITERIA:
        print(f"  {criterion.replace('_', ' '):<28} {rubric['base'][criterion]:.2f}    {rubric['finetuned'][criterion]:.2f}")
    print(f"  pairwise, both orders ({pairwise['judged']} questions): fine-tuned wins {pairwise['win_rate']:.0%}, "
          f"ties {pairwise['tie_rate']:.0%}, loses {pairwise['loss_rate']:.0%}")
    print(f"  judge position consistency {pairwise['position_consistency']:.0%}; mean answer words "
          f"base {pairwise['mean_answer_words']['base']:.0f}, fine-tuned {pairwise['mean_answer_words']['finetuned']:.0f}")


def main(argv=None) -> int:
    import philo_dataflow
    from hamilton.plugins import h_tqdm
    from philo_dataflow import preflight

    defaults = preflight.library_defaults()
    args = build_parser(defaults).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # A user's mistake gets one line from us, not Hamilton's traceback banner or library deprecation notes.
        logging.getLogger("hamilton").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        outputs = [o.strip() for o in args.outputs.split(",")] if args.outputs else list(philo_dataflow.DEFAULT_OUTPUTS)
        judge_inputs = {name: getattr(args, name) for name, *_ in JUDGE_FLAGS if getattr(args, name) is not None}
        if args.judge_model is not None:
            outputs += [o for o in philo_dataflow.JUDGE_OUTPUTS if o not in outputs]
        dr = philo_dataflow.build_driver({"start": args.start}, adapters=[h_tqdm.ProgressBar("philo_dataflow")])
        if args.visualize:
            inputs = {"data_path": args.data_path or DEFAULT_DATA_PATH}
            print(f"wrote {_draw_graph(dr, outputs, inputs, args.visualize)}")
            return 0
        inputs = {**_inputs_from_args(args), **judge_inputs}
        # Every check that needs no model runs before anything is written, and all its problems are shown.
        problems = _flag_problems(args, outputs, {v.name for v in dr.list_available_variables()})
        problems += preflight.check_run_inputs(inputs, args.start, args.overwrite)
        if problems:
            raise preflight.InputProblems(problems)
        graph_note = None
        if not args.no_graph:
            try:
                graph_note = _draw_graph(dr, outputs, inputs, str(Path(args.output_dir) / "dataflow.png"))
            except UserError as error:
                graph_note = f"not drawn: {error}"
        started = time.time()
        # The data is loaded, checked and split before any model is loaded: a bad file fails in seconds.
        splits = dr.execute(list(DATA_NODES), inputs=inputs)
        result = dr.execute(outputs, inputs=inputs, overrides=splits)
    except (UserError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    _print_summary(result, args.output_dir, time.time() - started)
    if graph_note:
        print(f"  dataflow graph: {graph_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
