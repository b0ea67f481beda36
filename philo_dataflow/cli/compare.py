"""``philo-dataflow compare RUN_DIR [RUN_DIR ...]``: one or more runs' fine-tuned models and their base model
scored on one hold-out set (``philo_dataflow.comparison``), written to ``--output-dir`` as ``comparison.json``,
``answers.jsonl`` and ``report.html``.

    philo-dataflow compare outputs/quick                                     # a run against its base model
    philo-dataflow compare outputs/lr-2e-4 outputs/lr-1e-3                 # the first run's hold-out set
    philo-dataflow compare outputs/a outputs/b --data-path data/new.jsonl   # that file's hold-out split

The hold-out set is the first run's (its ``hold_out_predictions.jsonl``), and every run must have
answered the same one; ``--data-path`` scores every run on that file's hold-out split instead, made with
the first run's split inputs. Every problem with the command line is reported before anything is loaded
or written (exit status 2).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..lib.artifacts import (
    COMPARISON_ANSWERS_FILE,
    COMPARISON_FILE,
    COMPARISON_FILES,
    COMPARISON_REPORT_FILE,
    PREDICTIONS_JSONL_FILE,
    write_text_atomically,
)
from ..lib.inputs import BY_NAME, hyperparameter_problems
from ..lib.problems import InputProblems, Problem
from .common import configure_logging

#: Where the comparison is written unless ``--output-dir`` says otherwise.
DEFAULT_OUTPUT_DIR = "comparison"
#: The bootstrap's seed unless ``--seed`` says otherwise.
DEFAULT_SEED = 42


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="philo-dataflow compare",
        description="Score several runs' fine-tuned models and their base model on one hold-out set.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="a finished run's output_dir (or its adapter directory); one or more, of one base model")
    parser.add_argument("--data-path", metavar="FILE",
                        help="score every run on this data file's hold-out split (made with the first run's split "
                             "inputs) instead of the first run's hold-out set; needed when the runs' hold-out sets differ")
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
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
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem("output_dir", f"{where}: {existing} is not writable; give a directory you can write to.")]
    if path.is_dir() and any(path.iterdir()) and not (path / COMPARISON_FILE).is_file() and not overwrite:
        return [Problem("output_dir", f"{where}: holds other files and no previous {COMPARISON_FILE}; "
                                      "give an empty or new directory, or pass --overwrite.")]
    return []


def checked_runs(paths: list[str], data_path: Optional[str]) -> tuple[list, list, list]:
    """The runs of ``paths`` and, without ``data_path``, the first run's hold-out rows, checked: every run
    found, no run twice, one base model, and (without ``data_path``) one hold-out set.

    :return: ``(runs, hold_out_rows, problems)``; ``hold_out_rows`` is empty with ``data_path``.
    """
    from .. import comparison  # torch, transformers and the models: only when run

    problems, runs = [], []
    if not paths:
        problems.append(Problem("runs", "compare needs a run directory; give the output_dir of each run to compare "
                                        "(one run is compared with its base model)."))
    for path in paths:
        try:
            runs.append((path, comparison.run_of(path)))
        except ValueError as error:
            problems.append(Problem("runs", str(error)))
    seen = {}
    for path, run in runs:
        key = run.adapter_dir.resolve()
        if key in seen:
            problems.append(Problem("runs", f"{seen[key]} and {path} are the same run; give each run once."))
        seen.setdefault(key, path)
    if runs:
        first_path, first = runs[0]
        for path, run in runs[1:]:
            if run.base_model_id != first.base_model_id:
                problems.append(Problem("runs", (
                    f"{path} was trained on base model {run.base_model_id!r} but {first_path} on "
                    f"{first.base_model_id!r}; compare runs of one base model.")))
    rows = []
    if data_path is None and runs and not problems:
        hold_outs = []
        for path, run in runs:
            try:
                hold_outs.append((path, comparison.predicted_hold_out(run)))
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
    return [run for _, run in runs], rows, problems


def _written(output_dir: str, result: dict, rows: list[dict]) -> list[str]:
    from .. import comparison  # torch, transformers and the models: only when run

    out = Path(output_dir)
    answers = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    # comparison.json last: it marks the directory as holding a finished comparison.
    return [
        write_text_atomically(out / COMPARISON_ANSWERS_FILE, answers),
        write_text_atomically(out / COMPARISON_REPORT_FILE, comparison.report_html(result, rows)),
        write_text_atomically(out / COMPARISON_FILE, json.dumps(result, indent=2, allow_nan=False)),
    ]


def main(argv: list[str]) -> int:
    """``philo-dataflow compare``; returns the exit status (0, or 2 for a problem with the command line or the
    runs, one ``error:`` line each on stderr and nothing written)."""
    args = build_parser().parse_intermixed_args(argv)
    configure_logging(args.debug)
    from .. import comparison  # torch, transformers and the models: only when run
    try:
        runs, rows, problems = checked_runs(args.runs, args.data_path)
        settings = {"generation_batch_size": args.generation_batch_size, "seed": args.seed}
        if args.max_new_tokens is not None:
            settings["max_new_tokens"] = args.max_new_tokens
        problems += hyperparameter_problems(settings)
        problems += output_dir_problems(args.output_dir, args.overwrite)
        train_questions = None
        if args.train_data is not None:
            try:
                train_questions = comparison.train_questions(args.train_data)
            except ValueError as error:
                problems += [Problem("train_data", f"--train-data {line}".replace("check data_path", "check --train-data"))
                             for line in str(error).splitlines()]
        if problems:
            raise InputProblems(problems)
        first = runs[0]
        max_new_tokens = args.max_new_tokens or first.manifest["inputs"].get(
            "max_new_tokens", BY_NAME["max_new_tokens"].default)
        if args.data_path is not None:
            hold_out_set = comparison.data_hold_out_set(first, args.data_path)
            source = f"the hold-out split of {args.data_path} (split inputs of {first.run_dir})"
        else:
            hold_out_set = comparison.predicted_hold_out_set(first, rows)
            source = str(first.run_dir / PREDICTIONS_JSONL_FILE)
        result, answer_rows = comparison.compared(runs, hold_out_set, source, max_new_tokens,
                                                  args.generation_batch_size, args.seed, args.data_path,
                                                  (args.train_data, train_questions) if train_questions else None)
        paths = _written(args.output_dir, result, answer_rows)
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    compared = "1 run and its" if len(runs) == 1 else f"{len(runs)} runs and their"
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
