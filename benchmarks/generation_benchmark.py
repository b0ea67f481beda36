"""Hold-out generation speed: the library's batched greedy decoding against one prompt at a time.

Both modes call ``philo_dataflow.lib.generation.generate_answers`` (left-padded batches, KV cache, stop at
EOS) on the same hold-out questions with the same ``max_new_tokens``, each mode in its own child process
(so each peak RSS is its own). The model is the library's ``peft_model`` node: the base model wrapped
with a fresh LoRA adapter, as hold-out generation runs in the library (the untrained adapter's B
matrices are zero, so the text is the base model's). The script fails (exit code 1) unless both modes
produce identical greedy token ids for every prompt.

    python benchmarks/generation_benchmark.py                       # 32 hold-out questions, 160 new tokens
    python benchmarks/generation_benchmark.py --questions 64 --json-out generation.json
    python benchmarks/generation_benchmark.py --smoke               # tiny random model: checks the script runs
"""

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_DATA_PATH,
    REPO_ROOT,
    SMOKE_DATA_PATH,
    ChildJob,
    benchmark_parser,
    child_environment,
    fmt,
    library_state,
    load_average,
    markdown_table,
    new_report,
    peak_rss_bytes,
    run_children,
    work_directory,
    write_json,
)

logger = logging.getLogger("generation_benchmark")

MODES = ("batched", "one_at_a_time")


@dataclasses.dataclass
class GenerationSettings:
    """What both modes share; written to JSON for the children.

    :param data_path: the data file (absolute path); the library's split gives the hold-out set.
    :param questions: the first this many hold-out questions are answered.
    :param model_id: the library's ``model_id`` input.
    :param model_path: the directory or hub id it resolves to.
    :param max_new_tokens: cap on generated tokens per answer.
    :param batch_size: prompts per ``generate`` call in the batched mode (the other mode uses 1).
    :param threads: torch threads of each child.
    :param lora_r: LoRA rank of the (untrained) adapter.
    :param lora_alpha: LoRA scaling numerator.
    :param lora_dropout: dropout on the adapter input (inactive in generation).
    :param lora_target_modules: comma-separated module names, or ``all-linear``.
    :param seed: the library's ``seed`` input (split and adapter init).
    :param work_dir: where children write results and logs.
    """

    data_path: str
    questions: int
    model_id: str
    model_path: str
    max_new_tokens: int
    batch_size: int
    threads: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    seed: int
    work_dir: str


def _generate(settings: GenerationSettings, mode: str) -> dict:
    """Greedy answers to the hold-out questions in ``mode``, timed after a two-token warm-up call."""
    import philo_dataflow
    from philo_dataflow.lib.generation import generate_answers
    from philo_dataflow.lib.prompts import prompt_token_ids

    inputs = {
        "data_path": settings.data_path,
        "model_id": settings.model_id,
        "lora_r": settings.lora_r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "lora_target_modules": settings.lora_target_modules,
        "seed": settings.seed,
    }
    nodes = philo_dataflow.build_driver({"start": "base"}).execute(
        ["peft_model", "tokenizer", "prompt_format", "hold_out_set"], inputs=inputs
    )
    model, tokenizer = nodes["peft_model"], nodes["tokenizer"]
    model.eval()
    questions = nodes["hold_out_set"]["input_text"][: settings.questions]
    prompts = [prompt_token_ids(tokenizer, nodes["prompt_format"], question) for question in questions]
    batch_size = settings.batch_size if mode == "batched" else 1
    generate_answers(model, tokenizer, prompts[:1], max_new_tokens=2, batch_size=1, description="warm-up")
    started = time.perf_counter()
    generations = generate_answers(model, tokenizer, prompts, settings.max_new_tokens, batch_size, description=mode)
    seconds = time.perf_counter() - started
    new_tokens = sum(len(g["token_ids"]) for g in generations)
    return {
        "status": "ok",
        "prompts": len(prompts),
        "batch_size": batch_size,
        "prompt_tokens": sum(len(p) for p in prompts),
        "new_tokens": new_tokens,
        "generation_s": seconds,
        "new_tokens_per_s": new_tokens / seconds,
        "ended_on_eos_share": sum(g["ended_on_eos"] for g in generations) / len(generations),
        "token_ids": [g["token_ids"] for g in generations],
    }


def run_child(mode: str, settings_file: Path, result_file: Path) -> int:
    """Generates in one mode and writes its result JSON; an error is the result."""
    import torch

    settings = GenerationSettings(**json.loads(settings_file.read_text()))
    torch.set_num_threads(settings.threads)
    result: dict[str, Any] = {"variant": mode, "load_average_start": load_average(), "library": library_state()}
    try:
        result.update(_generate(settings, mode))
    except Exception as error:  # the failure is the measurement: recorded, printed, not hidden
        traceback.print_exc()
        result.update(status="failed", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    if torch.cuda.is_available():
        result["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated()
    result.update(peak_rss_bytes=peak_rss_bytes(), load_average_end=load_average())
    write_json(result_file, result)
    return 0


def compare(results: list[dict]) -> dict:
    """Speed ratio (batched / one at a time, new tokens per second) and the prompts whose greedy token
    ids differ between the modes (by index into the questions)."""
    by_mode = {r["variant"]: r for r in results}
    batched, single = by_mode.get("batched"), by_mode.get("one_at_a_time")
    if not (batched and single and batched["status"] == single["status"] == "ok"):
        return {"speedup": None, "identical": None, "differing_prompts": None}
    differing = [i for i, (a, b) in enumerate(zip(batched["token_ids"], single["token_ids"])) if a != b]
    return {
        "speedup": batched["new_tokens_per_s"] / single["new_tokens_per_s"],
        "identical": not differing and len(batched["token_ids"]) == len(single["token_ids"]),
        "differing_prompts": differing,
    }


def render_report(report: dict) -> str:
    """The markdown printed at the end."""
    s, machine = report["settings"], report["machine"]
    header = ["mode", "status", "prompts", "batch", "new tokens", "new tok/s", "generation s", "ended on EOS", "peak RSS GB"]
    rows = []
    for r in report["modes"]:
        ok = r["status"] == "ok"
        rows.append([
            f"`{r['variant']}`", r["status"], str(r.get("prompts", "—")), str(r.get("batch_size", "—")),
            str(r.get("new_tokens", "—")), fmt(r.get("new_tokens_per_s"), ".1f") if ok else "—",
            fmt(r.get("generation_s"), ".1f") if ok else "—",
            fmt(r["ended_on_eos_share"] * 100 if ok else None, ".0f", "%"),
            fmt(r["peak_rss_bytes"] / 1e9 if r.get("peak_rss_bytes") else None, ".2f"),
        ])
    comparison = report["comparison"]
    lines = [
        f"## Generation benchmark ({report['finished']})",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, {s['threads']} torch threads per mode; "
        f"torch {machine['packages']['torch']}, transformers {machine['packages']['transformers']}.",
        f"Model {s['model_id']} with an untrained LoRA adapter ({s['lora_target_modules']}, r={s['lora_r']}); "
        f"the first {s['questions']} hold-out questions of {Path(s['data_path']).name}; max_new_tokens {s['max_new_tokens']}.",
        f"Load average (1/5/15 min) at start {report['load_average_start']}, at end {report['load_average_end']}.",
        f"philo_dataflow: commit {report['library']['commit']}"
        f"{' with uncommitted changes' if report['library']['uncommitted_changes'] else ''}, "
        f"source sha256 {report['library']['source_sha256']}.",
    ]
    if report["jobs"] > 1:
        lines.append(f"**{report['jobs']} modes ran at once: timings are not comparable (smoke check only).**")
    lines += ["", markdown_table(header, rows), ""]
    for r in report["modes"]:
        if r["status"] != "ok":
            lines.append(f"- `{r['variant']}` **{r['status']}**: {r.get('message', '')}")
    if comparison["speedup"] is not None:
        lines.append(f"Speed ratio batched ÷ one at a time: **{comparison['speedup']:.2f}×** (new tokens per second).")
        total = len(report["modes"][0]["token_ids"])
        same = total - len(comparison["differing_prompts"])
        lines.append(f"Greedy token ids identical: {same}/{total} prompts"
                     + ("." if comparison["identical"] else f" — **differ** at prompts {comparison['differing_prompts'][:20]}."))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--questions", type=int, default=None, help="hold-out questions answered (default: 32; --smoke: 4)")
    parser.add_argument("--model-id", default=None, help="model_id as the library takes it (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on new tokens per answer (default: 160; --smoke: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call in the batched mode (default: the library's generation_batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per mode (default: 2; --smoke: 1)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0, the library default)")
    parser.add_argument("--lora-target-modules", default=None, help="LoRA target modules (default: the library's lora_target_modules)")
    parser.add_argument("--seed", type=int, default=42, help="seed input of the library (default: 42)")
    parser.add_argument("--jobs", type=int, default=None, help="modes run at once; timings are comparable only with 1 (default: 1; --smoke: 2)")
    parser.add_argument("--child-timeout", type=float, default=3600, help="seconds a mode may run before it counts as failed (default: 3600)")
    parser.add_argument("--work-dir", default=None, help="settings, results and logs (default: a temporary directory)")
    parser.add_argument("--json-out", default=None, help="also write every result to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a tiny random 2-layer Llama, 4 questions, 8 new tokens")
    return parser


def _settings_from_args(args: argparse.Namespace, work_dir: Path) -> GenerationSettings:
    from philo_dataflow.lib.inputs import EMBEDDED_MODEL_ID
    from philo_dataflow.lib.model_sources import resolve_model_path
    from philo_dataflow.preflight import library_defaults
    from philo_dataflow.testing import tiny_model_dir

    smoke = args.smoke
    data_path = (REPO_ROOT / (args.data_path or (SMOKE_DATA_PATH if smoke else DEFAULT_DATA_PATH))).resolve()
    questions = args.questions if args.questions is not None else (4 if smoke else 32)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (8 if smoke else 160)
    threads = args.threads if args.threads is not None else (1 if smoke else 2)
    library = library_defaults()
    batch_size = args.batch_size if args.batch_size is not None else library["generation_batch_size"]
    lora_target_modules = args.lora_target_modules or library["lora_target_modules"]
    problems = [
        f"{flag}={value}: must be at least 1"
        for flag, value in (("--questions", questions), ("--max-new-tokens", max_new_tokens),
                            ("--batch-size", batch_size), ("--threads", threads))
        if value < 1
    ]
    if not data_path.is_file():
        problems.append(f"--data-path: {data_path} does not exist")
    if problems:
        raise SystemExit("generation_benchmark: " + "; ".join(problems))
    model_id = tiny_model_dir(work_dir / "tiny-model") if smoke and args.model_id is None else (args.model_id or EMBEDDED_MODEL_ID)
    return GenerationSettings(
        data_path=str(data_path), questions=questions, model_id=model_id, model_path=resolve_model_path(model_id),
        max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target_modules=lora_target_modules,
        seed=args.seed, work_dir=str(work_dir),
    )


def main(argv: Optional[list[str]] = None) -> int:
    """Runs both modes, each in its own child process; exit code 1 if a mode failed or the greedy
    token ids differ."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work_dir = work_directory(args.work_dir, "generation-benchmark-")
    settings = _settings_from_args(args, work_dir)
    settings_file = work_dir / "settings.json"
    write_json(settings_file, dataclasses.asdict(settings))
    report, jobs = new_report(settings, args.smoke, args.jobs)
    children = [
        ChildJob(mode, run_child, settings_file, work_dir / f"{mode}.result.json", work_dir / f"{mode}.log")
        for mode in MODES
    ]
    results = run_children(children, child_environment(settings.threads, settings.model_path), jobs, args.child_timeout)
    report.update(
        modes=results,
        comparison=compare(results),
        load_average_end=load_average(),
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    print(render_report(report))
    if args.json_out:
        write_json(Path(args.json_out), report)
        print(f"\nwrote {args.json_out}; logs in {work_dir}")
    if any(r["status"] != "ok" for r in results) or not report["comparison"]["identical"]:
        print("\ngeneration benchmark failed: a mode failed or the greedy token ids differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
