"""``philo-dataflow export``: the merged model (LoRA merged into fp32 base weights) and its GGUF copy with an Ollama
Modelfile, written to ``<output_dir>/merged`` and checked against the adapter and each other on the run's
hold-out questions.

    philo-dataflow export --model-dir outputs/adapter                  # writes outputs/merged/
    philo-dataflow export --model-dir outputs/adapter --output-dir exports/stoic --no-gguf

The run is the presaved driver (``start="presaved"``) over the adapter directory, with the inputs its
manifest recorded (data file, split, prompt and generation settings), asked for ``EXPORT_OUTPUTS``.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from ..lib.artifacts import (
    ADAPTER_DIR,
    GGUF_CHECKED_QUESTIONS,
    GGUF_OUTTYPE,
    MANIFEST_FILE,
    MANIFEST_INPUTS,
    QUANTIZATION_TYPES,
    completed_outputs,
    output_dir_lock,
    read_manifest,
)
from ..lib.disk_space import full_disk_line, is_out_of_space
from .common import configure_logging

#: Exit status of a bad command line or bad input files (as ``philo-dataflow``'s).
USAGE_ERROR = 2


class _Refused(Exception):
    """The command line or the files it names cannot be exported: its lines go to stderr, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="philo-dataflow export", description="Merge a run's LoRA adapter into its base model (fp32), convert the "
        "merged model to GGUF with llama.cpp's converter, write an Ollama Modelfile, and check both copies "
        "against the adapter on the run's hold-out questions.")
    parser.add_argument("--model-dir", required=True, help="the 'adapter' directory a run wrote (<output_dir>/adapter)")
    parser.add_argument("--output-dir", help="where the 'merged' directory goes (default: the run's output_dir, "
                                             "the directory above --model-dir)")
    parser.add_argument("--no-gguf", action="store_true",
                        help=f"write the merged model only, no GGUF file (the GGUF file holds {GGUF_OUTTYPE} tensors)")
    parser.add_argument("--quantize", metavar="TYPES", default="",
                        help=f"also write quantized GGUF copies (model.TYPE.gguf), comma-separated llama.cpp types: "
                             f"{', '.join(QUANTIZATION_TYPES)}; each answers the whole hold-out set through llama.cpp and "
                             "is scored against the f32 file (size, tokens/s, identical answers, ROUGE-L, EOS-stop and "
                             "loop rate with paired CIs)")
    parser.add_argument("--gguf-questions", type=int, default=GGUF_CHECKED_QUESTIONS, metavar="N",
                        help=f"hold-out questions the GGUF copy re-answers with llama.cpp (default: "
                             f"{GGUF_CHECKED_QUESTIONS})")
    parser.add_argument("--debug", action="store_true", help="log at INFO and show tracebacks")
    return parser


def _inputs(model_dir: str, output_dir: Optional[str]) -> dict:
    """The presaved run's inputs: the adapter directory, the output directory, and the manifest's values of
    ``MANIFEST_INPUTS`` (as ``philo-dataflow`` fills a presaved run's)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise _Refused(f"--model-dir {model_dir}: no such directory; give the '{ADAPTER_DIR}' directory a run wrote "
                       f"(<output_dir>/{ADAPTER_DIR}).")
    if not (directory / MANIFEST_FILE).is_file():
        raise _Refused(f"--model-dir {model_dir}: holds no {MANIFEST_FILE}, so it is not a run's '{ADAPTER_DIR}' "
                       f"directory; give <output_dir>/{ADAPTER_DIR} of a finished run.")
    try:
        manifest_inputs = read_manifest(model_dir)["inputs"]
    except ValueError as error:
        raise _Refused(str(error)) from None
    inputs = {name: manifest_inputs[name] for name in MANIFEST_INPUTS
              if name != "model_id" and manifest_inputs.get(name) is not None}
    inputs["presaved_model_dir"] = model_dir
    inputs["torch_compile"] = False  # nothing trains: no compile probe, and the validation pass runs as loaded
    inputs["output_dir"] = output_dir if output_dir is not None else str(directory.resolve().parent)
    return inputs


def _problems(inputs: dict, gguf: bool, quantizations: tuple) -> list[str]:
    """What stops the export, found before any model is loaded: the preflight of a presaved run (adapter,
    base model, data file, settings, and free space for the merged model and the GGUF files:
    ``preflight.disk_space_problems``); the output directory is only checked to be writable, since the
    export adds ``merged`` to a run's directory."""
    from .. import preflight

    export = {"gguf": gguf, "quantizations": quantizations}
    return [str(problem) for problem in preflight.check_run_inputs(inputs, "presaved", overwrite=True, export=export)]


def _print_summary(result: dict, seconds: float) -> int:
    """Prints where the files are and what the checks measured; the exit status: 1 when the GGUF step
    failed, else 0."""
    report, merged_dir = result["export_report"], result["saved_merged_model"]["merged_dir"]
    merged, gguf = report["merged_model"], report["gguf"]
    print(f"\nphilo_dataflow export finished in {seconds / 60:.1f} min: {merged_dir}/")
    print(f"  merged model ({report['merge']})")
    print(f"    vs adapter: identical token ids on {merged['identical_token_ids']} of {merged['questions']} hold-out "
          f"answers ({merged['decoding']}); max |logit difference| {merged['max_abs_logit_difference']:.2e}")
    if merged["first_divergences"]:
        print(f"    warning: {len(merged['first_divergences'])} answer(s) differ from the adapter's, first at "
              + ", ".join(f"question {d['question']} token {d['position']}" for d in merged["first_divergences"][:5]))
    if gguf["status"] in ("ok", "unchecked"):
        print(f"  GGUF ({gguf['outtype']}, {gguf['architecture']}, pre-tokenizer {gguf['pre_tokenizer']}): {gguf['gguf']}")
        print(f"  Ollama: ollama create NAME -f {gguf['modelfile']}")
    if gguf["status"] == "ok":
        print(f"    vs merged model (llama-cpp-python {gguf['llama_cpp_python']}): identical greedy token ids on "
              f"{gguf['identical_token_ids']} of {gguf['questions']} questions; max |logit difference| "
              f"{gguf['max_abs_logit_difference']:.2e}")
        if gguf["first_divergences"]:
            print("    differing: " + ", ".join(f"question {d['question']} token {d['position']}"
                                                for d in gguf["first_divergences"][:5]))
    elif gguf["status"] == "failed":
        print(f"error: GGUF: {gguf['reason']}", file=sys.stderr)
    else:
        print(f"  GGUF {gguf['status']}: {gguf['reason']}")
    from ..lib.gguf_export import chat_parity_line, gguf_files_table

    print(f"  {chat_parity_line(report['chat_parity'])}")
    files = report["gguf_files"]
    if files["status"] == "ok":
        print(f"  GGUF files on {files['questions']} hold-out questions ({files['decoding']}), against the f32 file:")
        for line in gguf_files_table(files["files"]):
            print(f"    {line}")
    elif files["status"] == "failed":
        print(f"error: quantized GGUF: {files['reason']}", file=sys.stderr)
    elif files["status"] != "none":
        print(f"  quantized GGUF {files['status']}: {files.get('reason', '')}")
    print(f"  report: {result['saved_export_report']['markdown']}")
    return 1 if "failed" in (gguf["status"], files["status"]) else 0


def main(argv: list[str]) -> int:
    """``philo-dataflow export``: see the module docstring and ``--help``.

    :return: 0 when the export was written (the GGUF step may be skipped, its line says why), 1 when the
        GGUF conversion failed (the merged model is written), 2 for a bad command line or input (one
        ``error:`` line each on stderr, nothing written) or a full disk (one ``error:`` line naming the file,
        the bytes and what was kept).
    """
    args = build_parser().parse_args(argv)
    inputs, started = {}, time.time()
    configure_logging(args.debug)
    from hamilton.plugins import h_tqdm  # Hamilton, torch and the models: only once the flags are parsed

    import philo_dataflow

    try:
        if args.gguf_questions < 1:
            raise _Refused(f"--gguf-questions {args.gguf_questions}: give at least 1 (default "
                           f"{GGUF_CHECKED_QUESTIONS}), or --no-gguf for no GGUF file.")
        inputs = _inputs(args.model_dir, args.output_dir)
        from ..lib.gguf_export import quantization_problems

        quantizations = tuple(kind.strip().lower() for kind in args.quantize.split(",") if kind.strip())
        problems = _problems(inputs, not args.no_gguf, quantizations) + quantization_problems(args.quantize)
        if args.quantize and args.no_gguf:
            problems.append(f"--quantize {args.quantize} quantizes the GGUF file, which --no-gguf leaves out; drop one.")
        inputs["quantize"] = args.quantize
        if problems:
            raise _Refused("\n".join(problems))
        config = philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": args.model_dir})
        dr = philo_dataflow.build_driver(config, adapters=[h_tqdm.ProgressBar("philo_dataflow export")])
        outputs = list(philo_dataflow.EXPORT_OUTPUTS)
        if args.no_gguf:
            outputs.remove("saved_gguf_model")
            outputs.remove("saved_quantized_gguf_models")
            overrides = {"gguf_agreement": {"status": "skipped", "reason": "--no-gguf"},
                         "gguf_files_report": {"status": "none"},
                         "gguf_chat_parity": {"status": "skipped", "reason": "--no-gguf"}}
        else:
            overrides = {"gguf_checked_questions": list(range(args.gguf_questions))}
        started = time.time()
        with output_dir_lock(inputs["output_dir"]):
            result = dr.execute(outputs, inputs=inputs, overrides=overrides)
    except Exception as error:
        if args.debug:
            raise
        if is_out_of_space(error):  # a full disk, whatever wrote: one line, and what was kept
            output_dir = inputs.get("output_dir", args.output_dir or ".")
            lines = [full_disk_line(error, output_dir, completed_outputs(output_dir, started))]
        elif isinstance(error, (_Refused, ValueError, FileNotFoundError)):
            lines = str(error).splitlines() or [type(error).__name__]
        else:
            raise
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return USAGE_ERROR
    return _print_summary(result, time.time() - started)

