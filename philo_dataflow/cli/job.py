"""The main job, ``philo-dataflow [FLAGS]``: fine-tune a model (LoRA by default) on question/answer data,
answer held-out questions with the base and the fine-tuned model, and write the adapter, predictions,
metrics, figures, report, resolved configuration and dataflow graph.

    philo-dataflow                                          # the embedded SmolLM2-135M-Instruct on the example data
    philo-dataflow --data-path my_data.jsonl --output-dir outputs/mine
    philo-dataflow --config configs/cpu_demo.yaml --set lora_r=8     # a config file, one key changed
    philo-dataflow --config outputs/config.yaml --output-dir outputs/again   # reproduce a run
    philo-dataflow --start presaved --presaved-model-dir outputs/adapter --output-dir outputs/re-eval
    philo-dataflow --visualize dataflow.png                 # only draw the dataflow graph
    philo-dataflow --judge-model gpt-4.1                    # also judge base vs fine-tuned (OPENAI_API_KEY)

Every input flag defaults to the library's documented default (shown here); a config file's keys are the
inputs' names, and flags and --set override them.
"""

import argparse
import contextlib
import difflib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from ..lib.artifacts import (
    ADAPTER_DIR,
    CONFIG_FILE,
    DATAFLOW_FILE,
    MANIFEST_INPUTS,
    PREVIOUS_RUN_FILES,
    completed_outputs,
    output_dir_lock,
    read_manifest,
)
from ..lib.disk_space import full_disk_line, is_out_of_space
from ..lib.inputs import (
    BY_NAME,
    DRIVER_INPUTS,
    EXAMPLE_DATA_PATH,
    INPUTS,
    JUDGE_INPUTS,
    RESPONSE_FORMATS,
    FINETUNING_METHODS,
    START_MODES,
    coerced,
    type_problem,
)
from ..lib.distributed import launched_processes, launched_rank
from ..lib.problems import InputProblems, Problem, flag
from ..lib.stopping import StopRequested, saved_checkpoint, signal_name, stop_signals_handled
from .common import PROG, SUBCOMMANDS, configure_logging

#: Nodes computed (and so validated) before any model is loaded, then handed to the full run as overrides.
DATA_NODES = ("instruction_records", "records_left_out", "train_set", "validation_set", "hold_out_set")
#: Keys a config file may hold besides the inputs: the driver's ``start`` config and run options.
RUN_KEYS = ("start", "finetuning_method", "outputs", "overwrite")
#: ``--help`` sections of the inputs table's groups.
GROUP_TITLES = {
    "data": "data and split",
    "model": "model",
    "lora": "LoRA adapter",
    "training": "training",
    "hamilton_ui": "Hamilton UI tracking",
    "generation": "generation and report",
    "judge": "LLM judge (runs only with --judge-model; see docs/judge.md)",
}
CLI_INPUTS = tuple(spec for spec in INPUTS if spec.cli)


class UserError(Exception):
    """A mistake in the command line or the files it names: one line, exit code 2."""


def _number(text: str):
    """A float flag's value; an integer stays an ``int`` (``--lora-alpha 32`` equals the default 32)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def build_parser() -> argparse.ArgumentParser:
    """The parser: run options, then one flag per input of ``lib.inputs.INPUTS``, grouped as the table is;
    every input flag defaults to None, meaning "not given" (the config file's or the library's value)."""
    commands = "\n".join(f"  {name:<9} {line}" for name, (_, line) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[1:2])
        + f"\n\ncommands (each with its own --help: {PROG} COMMAND --help):\n{commands}",
    )
    add_config_flags(parser)
    parser.add_argument("--start", choices=START_MODES, default=None,
                        help="base: train a new adapter; presaved: load --presaved-model-dir (default: base)")
    parser.add_argument("--finetuning-method", choices=FINETUNING_METHODS, default=None,
                        help="lora: train a LoRA adapter; full: train every weight and save the whole model "
                             "(default: lora; a presaved run reads it from the manifest)")
    parser.add_argument("--outputs", default=None,
                        help="comma-separated final variables to compute (default: every file of a run)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="allow writing over another run's files in --output-dir")
    parser.add_argument("--visualize", metavar="PATH", help="only draw the dataflow graph to PATH (.png/.svg) and exit")
    parser.add_argument("--no-graph", action="store_true", help=f"do not draw <output-dir>/{DATAFLOW_FILE}")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="Hamilton's cache: a re-run reuses every result whose code and inputs it has seen, "
                             "e.g. the trained weights when only generation or judge settings change "
                             "(default: $PHILO_DATAFLOW_CACHE/dataflow, that is ~/.cache/philo_dataflow/dataflow; "
                             "single-process runs only)")
    parser.add_argument("--no-cache", action="store_true", help="run every node, reading and writing no cache")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    add_input_flags(parser, CLI_INPUTS)
    return parser


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``: the layers of settings under the flags (``resolved_settings``)."""
    parser.add_argument("--config", metavar="YAML", help="a config file of input names and values, e.g. "
                        f"configs/cpu_demo.yaml or a run's <output_dir>/{CONFIG_FILE}; flags override it")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="set one input (YAML value), on top of --config; repeatable")


def add_input_flags(parser: argparse.ArgumentParser, specs: tuple) -> None:
    """One flag per input of ``specs`` (rows of ``lib.inputs.INPUTS``), in sections by the table's groups;
    each defaults to None, meaning "not given"."""
    groups = {}
    for spec in specs:
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(GROUP_TITLES[spec.group])
        text = f"{spec.help} (default: {spec.shown()})".replace("%", "%%")
        if spec.kind is bool:
            groups[spec.group].add_argument(spec.flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = _number if spec.kind is float and isinstance(spec.default, int) else spec.kind
            choices = RESPONSE_FORMATS if spec.name == "judge_response_format" else None
            groups[spec.group].add_argument(spec.flag, type=kind, default=None, choices=choices, help=text)


def _closest(key: str) -> str:
    names = [spec.name for spec in CLI_INPUTS] + list(RUN_KEYS)
    close = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; see {PROG} --help for the inputs."


def _checked_settings(settings: Any, where: str) -> tuple[dict, list]:
    """``settings`` (from a config file or ``--set``) checked against the inputs table: every key an input
    or a run key, every value of the input's type. :return: ``(settings, problems)``."""
    if not isinstance(settings, dict):
        return {}, [f"{where}: must hold a mapping of input names to values, not a {type(settings).__name__}."]
    problems = []
    for key, value in settings.items():
        if not isinstance(key, str) or (key not in RUN_KEYS and (key not in BY_NAME or not BY_NAME[key].cli)):
            problems.append(f"{where}: unknown key {key!r}{_closest(str(key))}")
        elif key == "start" and value not in START_MODES:
            problems.append(f"{where}: key 'start' must be one of {list(START_MODES)}, not {value!r}.")
        elif key == "finetuning_method" and value not in FINETUNING_METHODS:
            problems.append(f"{where}: key 'finetuning_method' must be one of {list(FINETUNING_METHODS)}, not {value!r}.")
        elif key == "overwrite" and not isinstance(value, bool):
            problems.append(f"{where}: key 'overwrite' must be true or false, not {value!r}.")
        elif key == "outputs" and not (isinstance(value, str) or (isinstance(value, list)
                                                                  and all(isinstance(v, str) for v in value))):
            problems.append(f"{where}: key 'outputs' must be a list of variable names, not {value!r}.")
        elif key in BY_NAME and type_problem(key, value):
            problems.append(f"{where}: key {key!r} {type_problem(key, value)}.")
    return {key: coerced(key, value) for key, value in settings.items()}, problems


def _config_file_settings(path: str) -> tuple[dict, list]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return {}, [f"{path}: the config file cannot be read ({getattr(error, 'strerror', None) or error}); "
                    "check --config."]
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return {}, [f"{path}: not valid YAML{where} ({getattr(error, 'problem', None) or 'syntax error'})."]
    return _checked_settings({} if settings is None else settings, path)


def _override_settings(overrides: list) -> tuple[dict, list]:
    settings, problems = {}, []
    for override in overrides:
        key, equals, text = override.partition("=")
        if not equals or not key.strip():
            problems.append(f"--set {override!r}: write KEY=VALUE, e.g. --set lora_r=8.")
            continue
        try:
            settings[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            problems.append(f"--set {override!r}: the value is not valid YAML.")
    checked, more = _checked_settings(settings, "--set")
    return checked, problems + more


def resolved_settings(args: argparse.Namespace) -> dict:
    """The run's settings: the config file's, then ``--set``, then the flags given, over the defaults.

    :return: ``{"start": ..., "finetuning_method": ... or None, "outputs": [...] or None, "overwrite": bool,
        "given": {input: value}}``;
        ``given`` holds the inputs set anywhere but the table's defaults.
    :raises InputProblems: an unreadable or invalid config file, an unknown key or a wrong type, one line
        each naming the file (or ``--set``) and the key.
    """
    problems, layers = [], []
    if args.config:
        settings, found = _config_file_settings(args.config)
        layers.append(settings)
        problems += found
    settings, found = _override_settings(args.overrides)
    layers.append(settings)
    problems += found
    if problems:
        raise InputProblems([Problem("config", line) for line in problems])
    flags = {spec.name: getattr(args, spec.name) for spec in CLI_INPUTS if getattr(args, spec.name, None) is not None}
    flags.update({key: getattr(args, key) for key in RUN_KEYS if getattr(args, key, None) is not None})
    merged = {}
    for layer in [*layers, flags]:
        merged.update(layer)
    outputs = merged.pop("outputs", None)
    if isinstance(outputs, str):
        outputs = [o.strip() for o in outputs.split(",") if o.strip()]
    return {"start": merged.pop("start", "base"), "finetuning_method": merged.pop("finetuning_method", None),
            "outputs": outputs, "overwrite": bool(merged.pop("overwrite", False)), "given": merged}


def run_inputs(start: str, given: dict) -> dict:
    """The inputs ``dr.execute`` gets: those given, the example data and embedded model for a base run,
    and for a presaved run the adapter's manifest values of ``MANIFEST_INPUTS`` not given."""
    inputs = {"output_dir": BY_NAME["output_dir"].default, **given}
    if start == "base":
        inputs.setdefault("data_path", EXAMPLE_DATA_PATH)
        inputs.setdefault("model_id", BY_NAME["model_id"].default)
        inputs.pop("presaved_model_dir", None)
        return inputs
    inputs.pop("model_id", None)  # the adapter's manifest names its base model
    presaved = inputs.get("presaved_model_dir") or str(Path(inputs["output_dir"]) / ADAPTER_DIR)
    try:
        manifest_inputs = read_manifest(presaved)["inputs"]
    except ValueError:
        manifest_inputs = {}  # the preflight reports what is wrong with the adapter directory
    for name in MANIFEST_INPUTS:
        if name != "model_id" and name not in inputs and manifest_inputs.get(name) is not None:
            inputs[name] = manifest_inputs[name]
    inputs["presaved_model_dir"] = presaved
    return inputs


def driver_config(start: str, judged: bool, finetuning_method: Optional[str], inputs: dict) -> dict:
    """The driver's config: ``start``, ``judge``, and ``finetuning_method`` and ``architecture`` read off
    the model (``is_encoder_decoder``) or the presaved manifest where not given. A model or adapter that
    cannot be read leaves the defaults: the preflight then says what is wrong with it."""
    import philo_dataflow

    config = {"start": start, "judge": judged}
    if finetuning_method is not None:
        config["finetuning_method"] = finetuning_method
    source = {"presaved_model_dir": inputs.get("presaved_model_dir")} if start == "presaved" else {
        "model_id": inputs.get("model_id"), "trust_remote_code": bool(inputs.get("trust_remote_code"))}
    try:
        resolved = philo_dataflow.resolved_config({**config, **source})
    except (ValueError, OSError):
        resolved = philo_dataflow.resolved_config(config)
    return {key: resolved[key] for key in ("start", "judge", "finetuning_method", "architecture")}


def run_config(start: str, inputs: dict, finetuning_method: str = "lora") -> dict:
    """What ``config.yaml`` records: ``start``, ``finetuning_method`` and every command-line input with its
    resolved value (the judge's settings only when the judge runs), so ``--config`` on it reproduces the
    run."""
    left_out = set() if inputs.get("judge_model") is not None else set(JUDGE_INPUTS)
    left_out.add("presaved_model_dir" if start == "base" else "model_id")  # the other start mode's input
    values = {"start": start, "finetuning_method": finetuning_method}
    for spec in CLI_INPUTS:
        if spec.name not in left_out:
            values[spec.name] = inputs.get(spec.name, None if spec.required else spec.default)
    return values


def default_cache_dir() -> str:
    """The main job's cache directory when ``--cache-dir`` is not given: ``dataflow/`` in the package's cache
    (``lib.model_sources.cache_root``: ``$PHILO_DATAFLOW_CACHE``, default ``~/.cache/philo_dataflow``)."""
    from ..lib.model_sources import cache_root

    return str(cache_root() / "dataflow")


def run_cache_dir(cache_dir: Optional[str], no_cache: bool) -> Optional[str]:
    """The cache directory the run uses: ``cache_dir`` or the default, None with ``--no-cache`` or when
    several processes run (``WORLD_SIZE`` > 1, set by torchrun and accelerate): every rank must run the
    same nodes, so that their collective operations meet."""
    if no_cache or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return cache_dir or default_cache_dir()


def _setting_problems(given: dict, outputs: list, available: set) -> list:
    """Mistakes in the command line itself, reported with the preflight's problems."""
    problems = []
    judge_settings = [name for name in JUDGE_INPUTS if name != "judge_model" and name in given]
    if judge_settings and given.get("judge_model") is None:
        problems.append(Problem("judge_model", f"{', '.join(flag(n) for n in judge_settings)} configure the LLM judge; "
                                               "add --judge-model to run it."))
    unknown = [o for o in outputs if o not in available]
    if unknown:
        problems.append(Problem("outputs", f"--outputs: unknown variable(s) {unknown}; see philo_dataflow.FINAL_VARIABLES."))
    return problems


def draw_graph(dr, outputs: list, inputs: dict, path: str) -> str:
    """Draws the nodes ``dr`` runs for ``outputs`` to ``path`` (.png/.svg; ``lib.graph.graph_style``), atomically.

    :raises UserError: Graphviz's ``dot`` is not installed.
    """
    from ..lib.graph import graph_style

    if shutil.which("dot") is None:
        raise UserError("drawing the graph needs Graphviz's `dot`: apt-get install graphviz (setup.sh does).")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = str(Path(path).with_suffix("")), Path(path).suffix.lstrip(".") or "png"
    # Rendered aside and renamed into place, like every other output: a crash leaves no half-drawn file.
    with tempfile.TemporaryDirectory(prefix=".dataflow.", dir=Path(path).parent) as staging:
        dr.visualize_execution(outputs, str(Path(staging) / "graph"), render_kwargs={"format": suffix, "view": False},
                               inputs=inputs, bypass_validation=True, deduplicate_inputs=True, **graph_style())
        os.replace(Path(staging) / f"graph.{suffix}", f"{stem}.{suffix}")
    return f"{stem}.{suffix}"


def _print_summary(result: dict, output_dir: str, seconds: float) -> None:
    print(f"\nphilo_dataflow finished in {seconds / 60:.1f} min. Outputs in {output_dir}/:")
    written = []  # the savers' paths, each once (a saver may name a path twice: "adapter_dir" and "path")
    for name, value in result.items():
        if name.startswith("saved_") or name == "save_best_models":
            for path in value.values() if isinstance(value, dict) else [value]:
                if isinstance(path, str) and path.startswith(str(Path(output_dir))) and path not in written:
                    written.append(path)
    for path in written:
        print(f"  {path}")
    metrics = result.get("run_metrics")
    if metrics is None:
        return
    from ..lib.records import left_out_line

    left_out = left_out_line(metrics["left_out"])
    if left_out:
        print(f"\nRecords: {left_out}")
    base, tuned = metrics["hold_out"]["base"], metrics["hold_out"]["finetuned"]
    diff = metrics["hold_out"]["rougeL_difference"]
    print(f"\nHold-out ({base['count']} questions)     base    fine-tuned")
    print(f"  ROUGE-L                      {base['rougeL']:.3f}   {tuned['rougeL']:.3f}")
    print(f"  answers ending on EOS        {base['eos_stop_rate']:.0%}    {tuned['eos_stop_rate']:.0%}")
    print(f"  mean answer words            {base['mean_answer_words']:.0f}      {tuned['mean_answer_words']:.0f}")
    print(f"  answers that loop            {base['loop_rate']:.0%}    {tuned['loop_rate']:.0%}"
          "   (some 4-word sequence 3+ times)")
    print(f"  ROUGE-L difference {diff['mean']:+.3f}, bootstrap 95% CI [{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}]")
    conclusion = metrics["hold_out"]["rougeL_verdict"]
    if not conclusion["conclusive"]:
        print(f"  verdict NOT CONCLUSIVE: {conclusion['reason']}")
    if conclusion["detectable_difference"] is not None:
        print(f"  smallest ROUGE-L difference these questions could detect: {conclusion['detectable_difference']:.3f} "
              f"({conclusion['confidence']:.0%} level, {conclusion['power']:.0%} power)")
    outcomes = metrics["hold_out"]["rougeL_outcomes"]
    print(f"  question by question: fine-tuned wins {outcomes['wins']}, ties {outcomes['ties']}, loses "
          f"{outcomes['losses']} (ROUGE-L difference beyond ±{outcomes['tolerance']:g})")
    print(f"  validation loss of the kept checkpoint: {metrics['validation'].get('eval_loss', float('nan')):.4f}")
    _print_judge_summary(metrics)


def _print_cache_summary(dr) -> None:
    """One line on what the cache gave: how many nodes came from it, and whether training did."""
    if dr.cache is None:
        return
    from hamilton.caching.adapter import CachingEventType

    reused = set()
    for run_id in dr.cache.run_ids[-2:]:  # the main job executes twice: the data nodes, then the rest
        for name, events in dr.cache.logs(run_id=run_id, level="debug").items():
            if any(event.event_type == CachingEventType.GET_RESULT for event in events):
                reused.add(name)
    training = "the trained weights came from it" if "trained_parameters" in reused else "training ran"
    print(f"  cache {dr.cache.result_store.path}: {len(reused)} results reused; {training} (--no-cache turns it off)")


def _print_judge_summary(metrics: dict) -> None:
    from ..lib.judge_protocol import CRITERIA

    judge = metrics.get("judge")
    if judge is None:
        print("  LLM judge: not run (no judge endpoint configured; pass --judge-model NAME, and --judge-base-url "
              "for a server other than OpenAI's).")
        return
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


def _hamilton_ui_tracker(driver_inputs: dict, config: dict, inputs: dict):
    """The Hamilton UI tracker of ``--hamilton-ui-url`` (``lib.hamilton_ui``), tagged with the run's model,
    data and switches."""
    import getpass

    from ..lib.hamilton_ui import hamilton_ui_tracker, run_tags

    project = driver_inputs.get("hamilton_ui_project") or BY_NAME["hamilton_ui_project"].default
    user = driver_inputs.get("hamilton_ui_user") or getpass.getuser()
    return hamilton_ui_tracker(driver_inputs["hamilton_ui_url"], project, user, tags=run_tags(config, inputs))


def _full_disk_line(error: BaseException, output_dir: str, since: float, dr) -> str:
    """The one line of a full disk met by the run (``lib.disk_space.full_disk_line``): the file, the bytes,
    what the run completed and kept (``lib.artifacts.completed_outputs``), and, when the trained weights
    reached Hamilton's cache, that the same command will not train again."""
    rerun = ""
    if dr is not None and dr.cache is not None:
        from hamilton.caching.adapter import CachingEventType

        stored = (CachingEventType.SET_RESULT, CachingEventType.GET_RESULT)
        if any(event.event_type in stored for run_id in dr.cache.run_ids[-2:]
               for event in dr.cache.logs(run_id=run_id, level="debug").get("trained_parameters", [])):
            overwrite = " with --overwrite" if any((Path(output_dir) / name).exists() for name in PREVIOUS_RUN_FILES) else ""
            rerun = (f": the trained weights are in the cache {dr.cache.result_store.path}, so the same "
                     f"command{overwrite} does not train again")
    return full_disk_line(error, output_dir, completed_outputs(output_dir, since), flag("output_dir"), rerun)


def _started_as(argv: list) -> list:
    """How this process was started, less its arguments ``argv``: ``sys.orig_argv``'s interpreter, its
    options and the script (``python run.py``) or module (``python -m philo_dataflow``); the console
    script's name where it is the one on the PATH. The command's name where that cannot be typed again
    (``python -c``) or ``argv`` are not the process's arguments (``main`` called in-process)."""
    if list(argv) != sys.argv[1:]:
        return [PROG]
    script = sys.argv[0]
    if Path(script).name == PROG:
        on_path = shutil.which(PROG)
        return [PROG] if on_path and Path(on_path).resolve() == Path(script).resolve() else [script]
    started = list(getattr(sys, "orig_argv", []))
    prefix = started[:len(started) - len(argv)]
    if not prefix or started[len(prefix):] != list(argv) or "-c" in prefix or any("\n" in part for part in prefix):
        return [PROG]
    return prefix


def _with_resume(argv: list, checkpoint: str) -> list:
    """``argv`` with ``--resume-from-checkpoint checkpoint`` in place of any it had."""
    option, kept, skip = flag("resume_from_checkpoint"), [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return [*kept, option, checkpoint]


def stop_message(stop: StopRequested, argv: list) -> str:
    """The one line a run stopped by a signal prints: the signal, the checkpoint training saved (if it did)
    and the command that resumes the run from it: the same command line with ``--resume-from-checkpoint
    last`` (the checkpoint's path where ``last`` would find another, newer one left by an earlier run).
    Under a launcher (several processes), the arguments to launch again, the launcher's own being unknown
    here."""
    name = signal_name(stop.signum)
    checkpoint = saved_checkpoint()
    if checkpoint is None:
        what, arguments = f"stopped by {name}, no checkpoint saved; start it again with", list(argv)
    else:
        from ..lib.trainer import LAST_CHECKPOINT, checked_resume_checkpoint  # loaded by training already

        try:
            last = checked_resume_checkpoint(str(Path(checkpoint).parent.parent), LAST_CHECKPOINT)
        except ValueError:
            last = None
        resume = LAST_CHECKPOINT if last and Path(last).resolve() == Path(checkpoint).resolve() else checkpoint
        step = checkpoint.rsplit("-", 1)[-1]
        what = f"stopped by {name}; the checkpoint of step {step} is saved in {checkpoint}; resume with"
        arguments = _with_resume(argv, resume)
    if launched_processes() > 1:
        what += " your launcher's command (torchrun, accelerate launch) as before, its arguments now"
        return f"{PROG}: {what}: {shlex.join([sys.argv[0], *arguments])}"
    return f"{PROG}: {what}: {shlex.join([*_started_as(argv), *arguments])}"


def main(argv: Optional[list] = None) -> int:
    """``philo-dataflow``: the main job; returns the exit status (2: a problem with the command line, the
    input or the output directory, or a full disk, one ``error:`` line each). The output directory is locked
    (``lib.artifacts.output_dir_lock``) from the end of the checks until the run ends.

    SIGTERM and SIGINT stop it cleanly (``lib.stopping``): during training at the end of the optimizer step,
    with a checkpoint; elsewhere at once, never in the middle of writing a file. It then prints one line,
    the checkpoint and the command that resumes from it (``stop_message``), and returns 128 + the signal's
    number (143 for SIGTERM, 130 for SIGINT). A second signal ends the process at once."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with stop_signals_handled():
        try:
            with contextlib.ExitStack() as locks:
                return _run(argv, locks)
        except StopRequested as stop:
            if launched_rank() == 0:
                print(f"\n{stop_message(stop, argv)}", file=sys.stderr, flush=True)
            return stop.exit_status


def _run(argv: list, locks: contextlib.ExitStack) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    # torch, transformers and Hamilton only now: --help and a bad flag answer without them.
    from hamilton.plugins import h_tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    import philo_dataflow

    from .. import preflight
    from ..lib.distributed import is_main_process, wait_for_everyone

    begun, dr, inputs = time.time(), None, {}
    try:
        settings = resolved_settings(args)
        start, given = settings["start"], settings["given"]
        judged = given.get("judge_model") is not None
        outputs = list(settings["outputs"] or philo_dataflow.DEFAULT_OUTPUTS)
        if judged:
            outputs += [o for o in philo_dataflow.JUDGE_OUTPUTS if o not in outputs]
        inputs = run_inputs(start, given)
        # The Hamilton UI's settings configure the driver's tracker, not a node.
        driver_inputs = {name: inputs.pop(name) for name in DRIVER_INPUTS if name in inputs}
        config = driver_config(start, judged, settings["finetuning_method"], inputs)
        dr = philo_dataflow.build_driver(config, adapters=[h_tqdm.ProgressBar("philo_dataflow")],
                                         cache_dir=run_cache_dir(args.cache_dir, args.no_cache))
        if args.visualize:
            inputs = {"data_path": given.get("data_path", EXAMPLE_DATA_PATH)}
            print(f"wrote {draw_graph(dr, outputs, inputs, args.visualize)}")
            return 0
        if settings["outputs"] is None:
            outputs += list(philo_dataflow.RUN_OUTPUTS)
            inputs["run_config"] = run_config(start, {**inputs, **driver_inputs}, config["finetuning_method"])
        # Every check that needs no model runs before anything is written, and all its problems are shown.
        problems = _setting_problems(given, outputs, {v.name for v in dr.list_available_variables()})
        problems += preflight.check_run_inputs({**inputs, **driver_inputs}, start, settings["overwrite"],
                                               config["finetuning_method"])
        if problems:
            raise InputProblems(problems)
        # With several processes (torchrun, accelerate launch) every one has checked the output directory
        # before any writes to it; from here on only the main process writes and prints.
        wait_for_everyone()
        if is_main_process():
            locks.enter_context(output_dir_lock(inputs["output_dir"], flag("output_dir")))
        graph_note = None
        if not args.no_graph and is_main_process():
            try:
                graph_note = draw_graph(dr, outputs, inputs, str(Path(inputs["output_dir"]) / DATAFLOW_FILE))
            except UserError as error:
                graph_note = f"not drawn: {error}"
        started = time.time()
        # Warnings (records left out, say) are written above the progress bars, each on its own line.
        locks.enter_context(logging_redirect_tqdm())
        # The data is loaded, checked and split before any model is loaded: a bad file fails in seconds.
        splits = dr.execute(list(DATA_NODES), inputs=inputs)
        if driver_inputs.get("hamilton_ui_url") and is_main_process():
            # A tracked run is the whole graph, data loader included, in one run of the UI. The tracker sends
            # node results from a thread every few seconds, and what is left when the process exits.
            tracker = _hamilton_ui_tracker(driver_inputs, config, inputs)
            dr = philo_dataflow.build_driver(config, adapters=[h_tqdm.ProgressBar("philo_dataflow"), tracker],
                                             cache_dir=run_cache_dir(args.cache_dir, args.no_cache))
            splits = {}
        # run_metrics (what metrics.json holds) is asked for too, so the summary is printed from it.
        summarised = [*outputs, "run_metrics"] if "saved_metrics" in outputs else outputs
        result = dr.execute(summarised, inputs=inputs, overrides=splits)
    except Exception as error:
        if args.debug:
            raise
        if is_out_of_space(error):  # a full disk, whatever wrote: one line, and what was kept
            lines = [_full_disk_line(error, inputs.get("output_dir", BY_NAME["output_dir"].default), begun, dr)]
        elif isinstance(error, (UserError, ValueError, FileNotFoundError)):
            lines = str(error).splitlines() or [type(error).__name__]
        else:
            raise
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    _print_summary(result, inputs["output_dir"], time.time() - started)
    _print_cache_summary(dr)
    if graph_note:
        print(f"  dataflow graph: {graph_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
