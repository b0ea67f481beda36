"""Hold-out generation speed: the library's batched greedy decoding against fixed-count batches, one
prompt at a time, and llama.cpp.

Modes, each in its own child process (so each peak RSS is its own), on the same prompts with the same
``max_new_tokens``:

- ``batched``: ``philo_dataflow.lib.generation.generate_answers`` as the library calls it (prompts sorted
  by length, batched by count and by the token budgets ``TOKEN_BUDGET`` and ``PROMPT_TOKEN_BUDGET``,
  left-padded, KV cache, stop at EOS);
- ``fixed_count``: the same with no token budgets, batches of ``--batch-size`` prompts whatever their
  length (the library's path before the budget);
- ``one_at_a_time``: the same with batches of one;
- ``llama_cpp``: llama-cpp-python on the same weights converted to an f32 GGUF file by llama.cpp's own
  converter (``lib.gguf_export``), one prompt after another (its high-level API decodes one sequence),
  greedy, f32 KV cache, the prompts fed as token ids. Not run with ``--smoke``, nor where llama-cpp-python
  or the converter is missing (the row says why).

The model is the library's ``peft_model`` node: the base model wrapped with a fresh LoRA adapter, as
hold-out generation runs in the library (the untrained adapter's B matrices are zero, so the text is the
base model's, and the GGUF copy of the base weights is the same model). The script fails (exit code 1)
unless the three transformers modes produce identical greedy token ids for every prompt; llama.cpp's
agreement (prompts with identical ids, and the share of answers' tokens before the first difference) is
reported, not required: its kernels round differently, and a greedy near-tie can flip.

``--long-prompts`` builds prompts like support threads of very different lengths: question ``i`` of
``n`` is preceded by ``round(32 * (i / (n - 1)) ** 3)`` earlier answers of the data as the thread so far,
so most prompts are short and a few reach ~2,300 tokens (``--questions 39 --max-new-tokens 64`` mimics the
Dagster hold-out, where one fixed batch of 32 took 583 s).

    python benchmarks/generation_benchmark.py                       # 32 hold-out questions, 160 new tokens
    python benchmarks/generation_benchmark.py --long-prompts --questions 39 --max-new-tokens 64
    python benchmarks/generation_benchmark.py --modes batched,llama_cpp --json-out generation.json
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

MODES = ("batched", "fixed_count", "one_at_a_time", "llama_cpp")
#: The modes whose greedy token ids must be identical (all of them transformers on the same weights).
EXACT_MODES = ("batched", "fixed_count", "one_at_a_time")
#: Earlier answers before the last of ``--long-prompts``' questions (the longest thread).
LONG_PROMPT_MAX_CONTEXT_ANSWERS = 32


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
    :param long_prompts: prompts with a thread of earlier answers before the question (module docstring).
    :param gguf_path: the f32 GGUF copy of the model for ``llama_cpp`` (None: that mode is not run).
    :param no_repeat_ngram_size: generation setting of the transformers modes (0: off, plain greedy).
    :param repetition_penalty: generation setting of every mode (llama.cpp's ``repeat_penalty``; 1.0: off).
    :param token_budget: most tokens per ``generate`` call of ``batched`` (None: the library's ``TOKEN_BUDGET``).
    :param prompt_token_budget: most padded prompt tokens per call of ``batched`` (None: ``PROMPT_TOKEN_BUDGET``).
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
    long_prompts: bool = False
    gguf_path: Optional[str] = None
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    token_budget: Optional[int] = None
    prompt_token_budget: Optional[int] = None


def long_prompt_questions(questions: list[str], answers: list[str], count: int) -> list[str]:
    """``count`` questions, each after a thread of earlier ``answers``: question ``i`` gets
    ``round(LONG_PROMPT_MAX_CONTEXT_ANSWERS * (i / (count - 1)) ** 3)`` of them (cycled), so the lengths
    spread from a bare question to a long thread."""
    result = []
    for i in range(count):
        share = (i / (count - 1)) ** 3 if count > 1 else 0.0
        context = [answers[(i + j) % len(answers)] for j in range(round(LONG_PROMPT_MAX_CONTEXT_ANSWERS * share))]
        thread = "".join(f"Earlier reply: {answer}\n\n" for answer in context)
        result.append(f"{thread}{questions[i % len(questions)]}")
    return result


def _prompts(settings: GenerationSettings, with_model: bool = True):
    """The model (None unless ``with_model``: llama.cpp loads its own copy, so its peak RSS is its own),
    tokenizer and token ids of the prompts (the library's nodes)."""
    import philo_dataflow
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
    wanted = ["tokenizer", "prompt_format", "hold_out_set", "train_set"] + (["peft_model"] if with_model else [])
    nodes = philo_dataflow.build_driver({"start": "base"}).execute(wanted, inputs=inputs)
    model, tokenizer = nodes.get("peft_model"), nodes["tokenizer"]
    if model is not None:
        model.eval()
    questions = list(nodes["hold_out_set"]["input_text"])
    if settings.long_prompts:
        questions = long_prompt_questions(questions, list(nodes["train_set"]["output_text"]), settings.questions)
    questions = questions[: settings.questions]
    prompts = [prompt_token_ids(tokenizer, nodes["prompt_format"], question) for question in questions]
    return model, tokenizer, prompts


def _llama_cpp_answers(settings: GenerationSettings, prompts: list[list[int]], eos_token_id: int
                       ) -> tuple[list[list[int]], float]:
    """llama.cpp's greedy answers to ``prompts`` over the GGUF copy and their seconds (after a
    two-token warm-up)."""
    import llama_cpp
    from philo_dataflow.lib.gguf_export import greedy_continuation

    llm = llama_cpp.Llama(model_path=settings.gguf_path, n_ctx=max(map(len, prompts)) + settings.max_new_tokens,
                          n_batch=512, n_threads=settings.threads, n_threads_batch=settings.threads, seed=settings.seed,
                          logits_all=False, verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    greedy_continuation(llm, prompts[0], 2, eos_token_id, settings.repetition_penalty)
    started = time.perf_counter()
    answers = [greedy_continuation(llm, prompt, settings.max_new_tokens, eos_token_id, settings.repetition_penalty)
               for prompt in prompts]
    return answers, time.perf_counter() - started


def _generate(settings: GenerationSettings, mode: str) -> dict:
    """Greedy answers to the prompts in ``mode``, timed after a two-token warm-up call."""
    from philo_dataflow.lib.generation import PROMPT_TOKEN_BUDGET, TOKEN_BUDGET, generate_answers, token_budget_batches

    model, tokenizer, prompts = _prompts(settings, with_model=mode != "llama_cpp")
    batch_size = 1 if mode == "one_at_a_time" else settings.batch_size
    # fixed_count: budgets no batch reaches, so batches are formed by count alone.
    budgets = ((settings.token_budget or TOKEN_BUDGET, settings.prompt_token_budget or PROMPT_TOKEN_BUDGET)
               if mode != "fixed_count" else (2 ** 62, 2 ** 62))
    batches = token_budget_batches([len(p) for p in prompts], settings.max_new_tokens, batch_size, *budgets)
    if mode == "llama_cpp":
        token_ids, seconds = _llama_cpp_answers(settings, prompts, tokenizer.eos_token_id)
        ended = [bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in token_ids]
        batches = [[i] for i in range(len(prompts))]
    else:
        generate_answers(model, tokenizer, prompts[:1], max_new_tokens=2, batch_size=1, description="warm-up")
        started = time.perf_counter()
        decoding = {"no_repeat_ngram_size": settings.no_repeat_ngram_size,
                    "repetition_penalty": settings.repetition_penalty}
        generations = generate_answers(model, tokenizer, prompts, settings.max_new_tokens, batch_size,
                                       description=mode, settings=decoding, token_budget=budgets[0],
                                       prompt_token_budget=budgets[1])
        seconds = time.perf_counter() - started
        token_ids, ended = [g["token_ids"] for g in generations], [g["ended_on_eos"] for g in generations]
    new_tokens = sum(len(ids) for ids in token_ids)
    return {
        "status": "ok",
        "prompts": len(prompts),
        "batch_size": batch_size,
        "batches": len(batches),
        "padded_tokens": sum(len(b) * (max(len(prompts[i]) for i in b) + settings.max_new_tokens) for b in batches),
        "prompt_tokens": sum(len(p) for p in prompts),
        "longest_prompt_tokens": max(len(p) for p in prompts),
        "new_tokens": new_tokens,
        "generation_s": seconds,
        "new_tokens_per_s": new_tokens / seconds,
        "ended_on_eos_share": sum(ended) / len(ended),
        "token_ids": token_ids,
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


def _agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Prompts whose ids differ from ``reference`` (by index), and the share of the reference's tokens
    that come before each answer's first difference."""
    differing = [i for i, (a, b) in enumerate(zip(reference, other)) if a != b]
    common = 0
    for a, b in zip(reference, other):
        prefix = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common += prefix
    total = sum(len(a) for a in reference)
    return {"identical": not differing and len(reference) == len(other), "differing_prompts": differing,
            "shared_prefix_share": common / total if total else 1.0}


def compare(results: list[dict]) -> dict:
    """Every mode's time ratio against ``batched`` (seconds of the mode ÷ seconds of ``batched``, so above
    1 means ``batched`` is faster) and its token ids' agreement with ``batched``; ``identical``: whether
    every ``EXACT_MODES`` mode that ran agrees with ``batched`` on every prompt (None unless ``batched``
    and another exact mode ran)."""
    ok = {r["variant"]: r for r in results if r["status"] == "ok"}
    batched = ok.get("batched")
    if batched is None:
        return {"speedup": None, "identical": None, "differing_prompts": None, "modes": {}}
    modes = {}
    for name, r in ok.items():
        if name != "batched":
            modes[name] = {"batched_speedup": r["generation_s"] / batched["generation_s"],
                           **_agreement(batched["token_ids"], r["token_ids"])}
    exact = [name for name in EXACT_MODES if name in modes]
    single = modes.get("one_at_a_time")
    return {
        "speedup": single["batched_speedup"] if single else None,
        "identical": all(modes[name]["identical"] for name in exact) if exact else None,
        "differing_prompts": sorted({i for name in exact for i in modes[name]["differing_prompts"]}),
        "modes": modes,
    }


def render_report(report: dict) -> str:
    """The markdown printed at the end."""
    s, machine = report["settings"], report["machine"]
    comparison = report["comparison"]
    header = ["mode", "status", "prompts", "batches", "padded tokens", "new tokens", "new tok/s", "generation s",
              "batched is × faster", "ids as batched", "ended on EOS", "peak RSS GB"]
    rows = []
    for r in report["modes"]:
        ok = r["status"] == "ok"
        versus = comparison["modes"].get(r["variant"])
        agreement = ("—" if versus is None else
                     f"{r['prompts'] - len(versus['differing_prompts'])}/{r['prompts']} "
                     f"({versus['shared_prefix_share']:.0%} of tokens)")
        rows.append([
            f"`{r['variant']}`", r["status"], str(r.get("prompts", "—")), str(r.get("batches", "—")),
            str(r.get("padded_tokens", "—")), str(r.get("new_tokens", "—")),
            fmt(r.get("new_tokens_per_s"), ".1f") if ok else "—", fmt(r.get("generation_s"), ".1f") if ok else "—",
            fmt(versus["batched_speedup"], ".2f", "×") if versus else ("1.00×" if r["variant"] == "batched" and ok else "—"),
            agreement if r["variant"] != "batched" else "—",
            fmt(r["ended_on_eos_share"] * 100 if ok else None, ".0f", "%"),
            fmt(r["peak_rss_bytes"] / 1e9 if r.get("peak_rss_bytes") else None, ".2f"),
        ])
    lines = [
        f"## Generation benchmark ({report['finished']})",
        "",
        f"Machine: {machine['cpu_model']} ({', '.join(machine.get('simd', [])) or 'no SIMD flags read'}), "
        f"{machine['logical_cpus']} logical CPUs, {s['threads']} threads per mode; "
        f"torch {machine['packages']['torch']}, transformers {machine['packages']['transformers']}.",
        f"Model {s['model_id']} with an untrained LoRA adapter ({s['lora_target_modules']}, r={s['lora_r']}); "
        f"the first {s['questions']} hold-out questions of {Path(s['data_path']).name}"
        f"{' after threads of earlier answers (--long-prompts)' if s.get('long_prompts') else ''}; "
        f"max_new_tokens {s['max_new_tokens']}, batch size {s['batch_size']}, token budget {report.get('token_budget', '—')}, "
        f"prompt token budget {report.get('prompt_token_budget', '—')}; "
        f"greedy, no_repeat_ngram_size {s.get('no_repeat_ngram_size', 0)}, repetition_penalty {s.get('repetition_penalty', 1.0)}.",
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
        lines.append(f"Speed ratio batched ÷ one at a time: **{comparison['speedup']:.2f}×** (same new tokens, so "
                     "the ratio of seconds).")
    for name, versus in comparison["modes"].items():
        lines.append(f"- batched against `{name}`: {versus['batched_speedup']:.2f}× faster; greedy token ids "
                     + ("identical on every prompt." if versus["identical"] else
                        f"differ at prompts {versus['differing_prompts'][:20]} "
                        f"({versus['shared_prefix_share']:.1%} of batched's tokens come before a difference)."))
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
    parser.add_argument("--modes", default=None, help=f"comma-separated modes among {', '.join(MODES)} (default: all; --smoke: all but llama_cpp)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="generation setting of the transformers modes (default: 0, off; llama.cpp has no such sampler, so its mode is left out)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="generation setting of every mode (default: 1.0, off)")
    parser.add_argument("--token-budget", type=int, default=None, help="most tokens per generate call in the batched mode, counted as rows x (longest prompt + max_new_tokens) (default: the library's TOKEN_BUDGET)")
    parser.add_argument("--prompt-token-budget", type=int, default=None, help="most padded prompt tokens per generate call in the batched mode, counted as rows x longest prompt (default: the library's PROMPT_TOKEN_BUDGET)")
    parser.add_argument("--long-prompts", action="store_true", help="prompts after threads of earlier answers, up to ~2,300 tokens (module docstring)")
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
                            ("--batch-size", batch_size), ("--threads", threads), ("--token-budget", args.token_budget),
                            ("--prompt-token-budget", args.prompt_token_budget))
        if value is not None and value < 1
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
        seed=args.seed, work_dir=str(work_dir), long_prompts=args.long_prompts,
        no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=args.repetition_penalty,
        token_budget=args.token_budget, prompt_token_budget=args.prompt_token_budget,
    )


def _modes(args: argparse.Namespace) -> list[str]:
    """The modes to run, in ``MODES`` order."""
    if args.modes is None:
        return [m for m in MODES if not (args.smoke and m == "llama_cpp")]
    names = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = sorted(names - set(MODES))
    if unknown or not names:
        raise SystemExit(f"generation_benchmark: --modes {args.modes!r}: unknown {unknown}; known: {', '.join(MODES)}")
    return [m for m in MODES if m in names]


def _gguf_copy(settings: GenerationSettings) -> tuple[Optional[str], Optional[str]]:
    """The f32 GGUF copy of the model in the work directory (converted once), or None and why not."""
    from philo_dataflow.lib import gguf_export

    missing = gguf_export.converter_missing() or gguf_export.llama_cpp_missing()
    if missing:
        return None, missing
    path = Path(settings.work_dir) / "model-f32.gguf"
    if not path.is_file():
        try:
            gguf_export.convert_to_gguf(Path(settings.model_path), path, "f32")
        except gguf_export.GGUFConversionError as error:
            return None, str(error)
    return str(path), None


def main(argv: Optional[list[str]] = None) -> int:
    """Runs both modes, each in its own child process; exit code 1 if a mode failed or the greedy
    token ids differ."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work_dir = work_directory(args.work_dir, "generation-benchmark-")
    settings = _settings_from_args(args, work_dir)
    modes = _modes(args)
    refused = []
    if "llama_cpp" in modes:
        settings.gguf_path, why = (None, "llama.cpp has no no-repeat-n-gram sampler (--no-repeat-ngram-size)") \
            if settings.no_repeat_ngram_size else _gguf_copy(settings)
        if why:
            modes.remove("llama_cpp")
            refused.append({"variant": "llama_cpp", "status": "not run", "message": why})
    settings_file = work_dir / "settings.json"
    write_json(settings_file, dataclasses.asdict(settings))
    report, jobs = new_report(settings, args.smoke, args.jobs)
    children = [
        ChildJob(mode, run_child, settings_file, work_dir / f"{mode}.result.json", work_dir / f"{mode}.log")
        for mode in modes
    ]
    results = run_children(children, child_environment(settings.threads, settings.model_path), jobs, args.child_timeout)
    results += refused
    from philo_dataflow.lib.generation import PROMPT_TOKEN_BUDGET, TOKEN_BUDGET
    report.update(
        token_budget=settings.token_budget or TOKEN_BUDGET,
        prompt_token_budget=settings.prompt_token_budget or PROMPT_TOKEN_BUDGET,
        modes=results,
        comparison=compare(results),
        load_average_end=load_average(),
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    print(render_report(report))
    if args.json_out:
        write_json(Path(args.json_out), report)
        print(f"\nwrote {args.json_out}; logs in {work_dir}")
    if any(r["status"] == "failed" for r in results) or report["comparison"]["identical"] is False:
        print("\ngeneration benchmark failed: a mode failed or the greedy token ids of the transformers modes differ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
