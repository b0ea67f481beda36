"""``philo-dataflow compare MODEL [MODEL ...]``: one or more fine-tuned models of any trainer and their base model
scored on one hold-out set (``philo_dataflow.comparison``), written to ``--output-dir`` as ``comparison.json``,
``answers.jsonl`` and ``report.html``.

    philo-dataflow compare outputs/quick                                     # a run against its base model
    philo-dataflow compare outputs/lr-2e-4 outputs/lr-1e-3                 # the first run's hold-out set
    philo-dataflow compare outputs/a outputs/b --data-path data/new.jsonl   # that file's hold-out split
    philo-dataflow compare trl-out/checkpoint-500 --data-path qa.jsonl      # any trainer's PEFT adapter
    philo-dataflow compare outputs outputs/merged outputs/merged/model.gguf # a run, its merged and GGUF copies

A MODEL is a run's output_dir, a PEFT adapter directory (its base from adapter_config.json, or --base), a
model directory or a hub id in the local cache, or a GGUF file (answered through llama.cpp). The base
model is --base, or the first model's base. The hold-out set is the first run's (its
``hold_out_predictions.jsonl``), and every run must have answered the same one; ``--data-path`` scores
every model on that file's hold-out split instead, made with the first run's split inputs (the defaults
when the first model is not a run), and ``--hold-out all`` on every record of the file. Every problem with
the command line is reported before anything is loaded or written (exit status 2).
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..lib.artifacts import COMPARISON_FILE, COMPARISON_FILES, output_dir_lock, output_dir_write_problem
from ..lib.inputs import BY_NAME, DEFAULTS, JUDGE_INPUTS, hyperparameter_problems
from ..lib.problems import InputProblems, Problem
from .common import configure_logging

#: Where the comparison is written unless ``--output-dir`` says otherwise.
DEFAULT_OUTPUT_DIR = "comparison"
#: The bootstrap's seed unless ``--seed`` says otherwise.
DEFAULT_SEED = 42


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="philo-dataflow compare",
        description="Score fine-tuned models of any trainer and their base model on one hold-out set.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:4]), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="*", metavar="MODEL",
                        help="a run's output_dir, a PEFT adapter directory, a model directory, a hub id in the local "
                             "cache or a .gguf file; one or more, of one base model")
    parser.add_argument("--base", metavar="MODEL",
                        help="the base model (a model directory, a hub id in the local cache, or a .gguf file to "
                             "dequantize); default: the first model's base (a run's model_id, an adapter's "
                             "base_model_name_or_path); stands for every adapter's base")
    parser.add_argument("--data-path", metavar="FILE",
                        help="score every model on this data file's hold-out split (made with the first run's split "
                             "inputs, else the defaults) instead of the first run's hold-out set; needed when the "
                             "runs' hold-out sets differ or the first model is not a run")
    parser.add_argument("--hold-out", choices=("split", "all"), default="split",
                        help="'split': the hold-out split (default); 'all': every record of the data file "
                             "(--data-path, else the first run's) as evaluation data")
    parser.add_argument("--prompt-template", metavar="TEMPLATE",
                        help="render every question with this format string over a record's keys (as the main "
                             "job's --prompt-template, e.g. '### Question:\\n{instruction}\\n\\n### Answer:') "
                             "instead of each model's own chat template; runs must have been trained with it")
    parser.add_argument("--no-repeat-ngram-size", metavar="N", type=int,
                        default=DEFAULTS["no_repeat_ngram_size"],
                        help="transformers models never repeat an n-gram of N tokens (0: off; llama.cpp has no "
                             "such setting, so GGUF files decode plain greedy) (default: %(default)s)")
    parser.add_argument("--train-data", metavar="FILE",
                        help="the data the compared models were tuned on, when you have it: name the hold-out "
                             "questions with an exact or near duplicate in it (content-word Jaccard of the runs' "
                             "near_duplicate_threshold or more) and give every pair's verdict without them too")
    parser.add_argument("--output-dir", metavar="DIR", default=DEFAULT_OUTPUT_DIR,
                        help=f"where to write {', '.join(COMPARISON_FILES)} (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=None,
                        help="cap on generated tokens per answer (default: the first run's max_new_tokens)")
    parser.add_argument("--generation-batch-size", metavar="N", type=int, default=BY_NAME["generation_batch_size"].default,
                        help="questions per batched generate call (default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=int, default=DEFAULT_SEED,
                        help="seed of the bootstrap resampling of the questions (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty --output-dir that holds no previous comparison")
    parser.add_argument("--visualize", metavar="PATH",
                        help="only draw the comparison's dataflow graph to PATH (.png/.svg) and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    from .job import add_input_flags

    add_input_flags(parser, tuple(BY_NAME[name] for name in JUDGE_INPUTS))
    return parser


def output_dir_problems(output_dir: str, overwrite: bool) -> list:
    """Why ``output_dir`` cannot take a comparison: a file, not creatable or not writable, or non-empty
    without a previous comparison (``COMPARISON_FILE``) and without ``overwrite``."""
    path = Path(output_dir)
    where = f"--output-dir {output_dir}"
    if path.exists() and not path.is_dir():
        return [Problem("output_dir", f"{where}: is a file, not a directory; give a directory.")]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem("output_dir", f"{where}: cannot be created, {existing} is a file; give another directory.")]
    unwritable = output_dir_write_problem(output_dir, where)  # permissions, read-only and virtual filesystems
    if unwritable:
        return [Problem("output_dir", unwritable)]
    if path.is_dir() and any(path.iterdir()) and not (path / COMPARISON_FILE).is_file() and not overwrite:
        return [Problem("output_dir", f"{where}: holds other files and no previous {COMPARISON_FILE}; "
                                      "give an empty or new directory, or pass --overwrite.")]
    return []


def max_new_tokens_problems(base: str, max_new_tokens: int) -> list:
    """``--max-new-tokens`` against the base model's context window (``lib.context_window``), read without
    weights; every compared model shares its base's window. Each model's prompts are checked with it before
    that model answers (``prediction.hold_out_prompt_ids``); none when the base cannot be read (``checked_models``
    says why)."""
    from ..lib.context_window import answer_room_problems
    from ..lib.model_sources import context_window_of, tokenizer_without_weights

    try:
        window = context_window_of(base, tokenizer_without_weights(base))
    except ValueError:
        return []
    return [Problem(name, line) for name, line in answer_room_problems(window, [], max_new_tokens)]


def checked_models(paths: list[str], data_path: Optional[str], base: Optional[str] = None, whole: bool = False,
                   prompt_template: Optional[str] = None) -> tuple[list, Optional[str], list, list]:
    """The models of ``paths`` (``compared_models.model_of``), their base, and, when the first run's hold-out
    set is answered, its rows; checked: every model found, none twice, one base model that loads here,
    runs trained with ``prompt_template`` when one is given, and a hold-out set to answer (the runs' own,
    all the same, without ``data_path``; ``data_path`` or a first run's data file with ``whole``).

    :return: ``(models, base, hold_out_rows, problems)``; ``hold_out_rows`` is empty with ``data_path`` or
        ``whole``.
    """
    from .. import comparison, compared_models  # torch, transformers and the models: only when run

    problems, models = [], []
    if not paths:
        problems.append(Problem("runs", "compare needs a model; give a run's output_dir (or a PEFT adapter, a model "
                                        "directory, a hub id, a .gguf file) for each model to compare (one model "
                                        "is compared with its base model)."))
    for path in paths:
        try:
            models.append(compared_models.model_of(path))
        except ValueError as error:
            problems.append(Problem("runs", str(error)))
    seen = {}
    for model in models:
        key = model.run.adapter_dir.resolve() if model.run else Path(model.path).resolve() \
            if Path(model.path).exists() else model.path
        if key in seen:
            problems.append(Problem("runs", f"{seen[key]} and {model.path} are the same model; give each model once."))
        seen.setdefault(key, model.path)
    if models and not problems:
        base, base_problems = compared_models.base_and_problems(models, base)
        problems += [Problem("base", line) for line in base_problems]
    runs = [model for model in models if model.run is not None]
    if prompt_template is not None:
        for model in runs:
            trained_with = model.run.manifest.get("prompt_template")
            if trained_with != prompt_template:
                problems.append(Problem("prompt_template", (
                    f"{model.path} was trained with prompt template {trained_with!r}, not --prompt-template; a run "
                    "answers the prompts it learnt: leave --prompt-template out, or compare runs trained with it.")))
    rows = []
    first_run = models[0].run if models else None
    if data_path is None and models and whole and first_run is None:
        problems.append(Problem("data_path", "--hold-out all needs the data file: give --data-path FILE."))
    elif data_path is None and models and first_run is None:
        problems.append(Problem("data_path", (
            f"{models[0].path} is not a run of ours, so it has no hold-out set to reuse: give --data-path FILE "
            "(its hold-out split is answered; --hold-out all answers every record).")))
    elif data_path is None and not whole and models and not problems:
        hold_outs = []
        for model in runs:
            try:
                hold_outs.append((model.path, comparison.predicted_hold_out(model.run)))
            except ValueError as error:
                problems.append(Problem("runs", str(error)))
        if len(hold_outs) == len(runs):
            first_path, rows = hold_outs[0]
            for path, other in hold_outs[1:]:
                difference = comparison.hold_out_difference(rows, other)
                if difference is not None:
                    problems.append(Problem("data_path", (
                        f"{first_path} and {path} were scored on different hold-out sets ({difference}); pass "
                        "--data-path FILE to score every run on that file's hold-out split.")))
    return models, base if models and not problems else None, rows, problems


def main(argv: list[str]) -> int:
    """``philo-dataflow compare``; returns the exit status (0, or 2 for a problem with the command line or the
    runs, one ``error:`` line each on stderr and nothing written)."""
    args = build_parser().parse_intermixed_args(argv)
    configure_logging(args.debug)
    from .. import comparison  # torch, transformers and the models: only when run
    if args.visualize:
        from ..comparison_dataflow import COMPARISON_OUTPUTS, build_comparison_driver
        from .job import UserError, draw_graph

        try:
            print(f"wrote {draw_graph(build_comparison_driver(), list(COMPARISON_OUTPUTS), {}, args.visualize)}")
        except (UserError, OSError) as error:
            print(f"error: --visualize {args.visualize}: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        models, base, rows, problems = checked_models(args.runs, args.data_path, args.base, args.hold_out == "all",
                                                      args.prompt_template)
        settings = {"generation_batch_size": args.generation_batch_size, "seed": args.seed,
                    "no_repeat_ngram_size": args.no_repeat_ngram_size}
        if args.max_new_tokens is not None:
            settings["max_new_tokens"] = args.max_new_tokens
        problems += hyperparameter_problems(settings)
        if base is not None and args.max_new_tokens is not None and not problems:
            problems += max_new_tokens_problems(base, args.max_new_tokens)
        problems += output_dir_problems(args.output_dir, args.overwrite)
        if args.train_data is not None:
            try:
                comparison.train_questions(args.train_data)  # read here so that its problems come first
            except ValueError as error:
                problems += [Problem("train_data", f"--train-data {line}".replace("check data_path", "check --train-data"))
                             for line in str(error).splitlines()]
        judge_inputs = None
        if args.judge_model is not None:
            from .. import preflight

            given = {name: getattr(args, name) for name in JUDGE_INPUTS if getattr(args, name) is not None}
            judge_inputs = {**{name: BY_NAME[name].default for name in JUDGE_INPUTS}, **given,
                            "output_dir": args.output_dir}
            problems += hyperparameter_problems(given) + preflight.judge_problems(judge_inputs)
        if problems:
            raise InputProblems(problems)
        from ..comparison_dataflow import COMPARISON_OUTPUTS, build_comparison_driver

        inputs = {"models": list(args.runs), "base": base, "data_path": args.data_path, "hold_out": args.hold_out,
                  "prompt_template": args.prompt_template, "max_new_tokens": args.max_new_tokens,
                  "generation_batch_size": args.generation_batch_size,
                  "no_repeat_ngram_size": args.no_repeat_ngram_size, "seed": args.seed,
                  "train_data": args.train_data, "judge_inputs": judge_inputs, "output_dir": args.output_dir}
        with output_dir_lock(args.output_dir):
            done = build_comparison_driver().execute(
                list(COMPARISON_OUTPUTS), inputs={name: value for name, value in inputs.items() if value is not None})
        result, paths = done["comparison"], done["saved_comparison"]["paths"]
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    compared = "1 model and its" if len(models) == 1 else f"{len(models)} models and their"
    print(f"\nCompared {compared} base model on {result['hold_out']['questions']} hold-out questions:")
    for line in comparison.summary_lines(result):
        print(f"  {line}")
    if result["hold_out"]["runs_split_otherwise"]:
        print(f"  Note: {', '.join(result['hold_out']['runs_split_otherwise'])} split another data file or with other "
              "split inputs, so may have trained on some of these questions.")
    print(f"Wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
