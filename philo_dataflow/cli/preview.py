"""``philo-dataflow preview [data and model flags]``: the data as a new run would train on it, before any
training. Loads, splits and tokenizes the records with the model's real tokenizer through the dataflow's own
nodes, and prints the split sizes per category, the near-duplicate groups, the token counts, what
``overlong_policy`` does, and the first examples rendered as the model sees them with the tokens that carry
loss marked (colour on a terminal, ``[[`` ... ``]]`` when piped).

    philo-dataflow preview                                   # the packaged example data, embedded model
    philo-dataflow preview --data-path my_data.jsonl --examples 5 --split validation
    philo-dataflow preview --config configs/cpu_demo.yaml    # the data settings of a config file

It refuses (exit 2, one ``error:`` line each) an example with no supervised token and a supervised span that
does not end on the EOS / end-of-turn token (``lib.supervision``), besides every problem the main job's
preflight finds in the data and the model. It writes nothing and loads no model weights (a ``.gguf`` model,
the embedded default included, is converted once into the model cache on first use by any command).

A subcommand rather than ``--dry-run`` of the main job: it takes only the data and model flags (a training
flag would be silently ignored by a dry run), and its output is the data, not a run.
"""

import argparse
import os
import sys
from typing import Optional

from ..lib.inputs import BY_NAME
from ..lib.problems import InputProblems, Problem
from .common import PROG, configure_logging

#: The inputs the preview takes: every data input, and which model's tokenizer to use.
PREVIEW_INPUTS = tuple(spec for spec in BY_NAME.values() if spec.cli and (
    spec.group == "data" or spec.name in ("model_id", "trust_remote_code", "allow_pickle")))
#: ``--split`` choices -> the dataflow's tokenized split and split names.
SPLITS = {"train": ("tokenized_train", "train_set"), "validation": ("tokenized_validation", "validation_set"),
          "hold_out": ("tokenized_hold_out", "hold_out_set")}
#: Nodes the preview computes: none loads model weights.
PREVIEW_NODES = ("instruction_records", "raw_records", "train_set", "validation_set", "hold_out_set",
                 "near_duplicate_groups", "split_summary", "overlong_records", "tokenizer", "prompt_format",
                 *(tokenized for tokenized, _ in SPLITS.values()))
#: Near-duplicate groups listed, and characters shown of each question in them.
LISTED_GROUPS, QUESTION_CHARS = 5, 70


def build_parser() -> argparse.ArgumentParser:
    from .job import add_config_flags, add_input_flags

    parser = argparse.ArgumentParser(prog=f"{PROG} preview", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    add_config_flags(parser)
    parser.add_argument("--examples", type=int, default=3, metavar="N", help="examples shown (default: 3)")
    parser.add_argument("--split", choices=tuple(SPLITS), default="train", help="split the examples come from "
                        "(default: train)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="mark supervised tokens in colour: auto (on a terminal), always, never (brackets)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    add_input_flags(parser, PREVIEW_INPUTS)
    return parser


def _marks(color: str):
    from ..lib.supervision import BRACKETS, COLOUR

    on_terminal = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    return COLOUR if color == "always" or (color == "auto" and on_terminal) else BRACKETS


def _print_splits(result: dict) -> None:
    summary = result["split_summary"]
    names = ("train_set", "validation_set", "hold_out_set")
    categories = sorted({c for name in names for c in summary[name]["per_category"]})
    width = max([len("category"), *map(len, categories)])
    print(f"\nsplit            {'  '.join(f'{n:>14}' for n in names)}")
    print(f"  {'total':<{width}}  " + "  ".join(f"{summary[n]['total']:>14}" for n in names))
    for category in categories:
        print(f"  {category:<{width}}  " + "  ".join(f"{summary[n]['per_category'].get(category, 0):>14}" for n in names))
    groups = result["near_duplicate_groups"]["groups"]
    leakage = summary["hold_out_set"]["leakage"]
    print(f"\nnear-duplicate groups (content-word Jaccard >= {leakage['threshold']}): {len(groups)}, each kept whole "
          f"in one split; hold-out questions with a near-duplicate in train: {leakage['questions']}")
    for group in groups[:LISTED_GROUPS]:
        print("  - " + " | ".join(question[:QUESTION_CHARS] + ("..." if len(question) > QUESTION_CHARS else "")
                                  for question in group))
    if len(groups) > LISTED_GROUPS:
        print(f"  ... and {len(groups) - LISTED_GROUPS} more")


def _print_tokens(result: dict, max_seq_length: int) -> None:
    from ..lib.supervision import IGNORE_INDEX

    overlong = result["overlong_records"]
    print(f"\ntokens (max_seq_length {max_seq_length}, overlong_policy {overlong['policy']})")
    for split, (tokenized_name, split_name) in SPLITS.items():
        tokenized = result[tokenized_name]
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        supervised = sum(sum(label != IGNORE_INDEX for label in labels) for labels in tokenized["labels"])
        cut = sum(tokenized["truncated"])
        print(f"  {split:<10} {len(lengths):>5} examples, {sum(lengths):>7} tokens ({supervised} carry loss), "
              f"longest {max(lengths)}; answers cut {cut}, questions shortened "
              f"{len(overlong[split_name]['prompt_truncated'])}, dropped {len(overlong[split_name]['dropped'])}")


def _print_examples(result: dict, split: str, count: int, marks: tuple, seq2seq: bool) -> None:
    from ..lib.supervision import IGNORE_INDEX, marked_text

    tokenizer = result["tokenizer"]
    tokenized_name, split_name = SPLITS[split]
    tokenized, records = result[tokenized_name], result[split_name]

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    print(f"\nexamples ({split_name}; prompt format {result['prompt_format']}; tokens that carry loss between "
          f"{marks[0]!r} and {marks[1]!r})")
    for row in tokenized.select(range(min(count, len(tokenized)))):
        index = row["record_index"]
        supervised = sum(label != IGNORE_INDEX for label in row["labels"])
        print(f"\n--- {split_name} record {index} ({records[index]['category']}): {len(row['input_ids'])} tokens, "
              f"{supervised} carry loss" + (", answer cut" if row["truncated"] else ""))
        if seq2seq:  # the encoder reads the prompt; the decoder's labels are the answer
            print(decode(row["input_ids"]))
            print(marks[0] + decode(row["labels"]) + marks[1])
        else:
            print(marked_text(decode, row["input_ids"], row["labels"], marks))


def _refusals(result: dict) -> list[str]:
    """``lib.supervision.supervision_problems`` of the three tokenized splits, one line each."""
    from ..lib.supervision import supervision_problems

    tokenizer = result["tokenizer"]
    lines = []
    for tokenized_name, split_name in SPLITS.values():
        tokenized = result[tokenized_name]
        lines += supervision_problems(split_name, tokenized["labels"], tokenized["record_index"],
                                      tokenizer.eos_token_id, tokenizer.eos_token)
    return lines


def main(argv: Optional[list] = None) -> int:
    """``philo-dataflow preview``; returns the exit status (0, or 2 for bad input or a refused example)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    if args.examples < 0:
        print("error: --examples must be 0 or more.", file=sys.stderr)
        return 2
    from .. import dataflow, preflight
    from .job import driver_config, resolved_settings, run_inputs

    try:
        settings = resolved_settings(args)
        if settings["start"] != "base":
            raise InputProblems([Problem("start", "the preview shows the data a new run trains on; leave out start "
                                                  f"(--config key 'start: {settings['start']}').")])
        names = {spec.name for spec in PREVIEW_INPUTS}
        given = {name: value for name, value in settings["given"].items() if name in names}
        inputs = run_inputs("base", given)
        problems = preflight.check_data_and_model(inputs, "base")
        if problems:
            raise InputProblems(problems)
        config = driver_config("base", False, settings["finetuning_method"], inputs)
        result = dataflow.build_driver(config).execute(list(PREVIEW_NODES), inputs=inputs)
    except ValueError as error:
        if args.debug:
            raise
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    tokenizer = result["tokenizer"]
    print(f"data {inputs['data_path']}: {len(result['raw_records'])} records, {len(result['instruction_records'])} "
          f"examples")
    print(f"model {inputs['model_id']}: tokenizer {type(tokenizer).__name__}, EOS {tokenizer.eos_token!r} "
          f"(id {tokenizer.eos_token_id}), prompt format {result['prompt_format']}")
    _print_splits(result)
    _print_tokens(result, inputs.get("max_seq_length", BY_NAME["max_seq_length"].default))
    _print_examples(result, args.split, args.examples, _marks(args.color), config["architecture"] == "seq2seq")
    refusals = _refusals(result)
    for line in refusals:
        print(f"error: {line}", file=sys.stderr)
    return 2 if refusals else 0
