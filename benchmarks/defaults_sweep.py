"""The sweep behind philo_dataflow's default hyperparameters (see ``docs/defaults_sweep.md``).

Each configuration is one run of the main job (``run.py``) with a few flags changed, in its own output
directory, one after another (never in parallel: on a CPU, concurrent runs slow each other and the
times would mean nothing). Afterwards every run's ``metrics.json`` is read and one markdown table is
printed: hold-out ROUGE-L base vs fine-tuned with the bootstrap 95% CI of the difference, EOS-stop
rates, mean answer words, the validation loss of the kept checkpoint, optimizer steps, and the wall
time of the whole run (loading, training, generation and saving, as a user would wait for it).

    .venv/bin/python benchmarks/defaults_sweep.py --data-path example_data/philosophy_qa.jsonl \\
        --configs defaults,top15_2ep,top15_3ep --work-dir sweeps/example --json-out sweeps/example.json
    .venv/bin/python benchmarks/defaults_sweep.py --from-json sweeps/example.json   # reprint

A configuration whose output directory already holds a ``metrics.json`` is not run again (delete the
directory to re-run it), so an interrupted sweep resumes where it stopped.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent

#: name -> extra run.py flags. ``defaults`` is the library's defaults; the others change a few of them.
CONFIGS = {
    "defaults": [],
    "fp32_2ep": ["--no-bf16", "--num-train-epochs", "2"],
    "bf16_2ep": ["--bf16", "--num-train-epochs", "2"],
    "bf16_3ep": ["--bf16", "--num-train-epochs", "3"],
    "qv_only": ["--lora-target-modules", "q_proj,v_proj"],
    "top15_2ep": ["--lora-layers-to-transform", "top:15"],
    "top15_3ep": ["--lora-layers-to-transform", "top:15", "--num-train-epochs", "3"],
    "top10_3ep": ["--lora-layers-to-transform", "top:10", "--num-train-epochs", "3"],
    "lr1e-3": ["--learning-rate", "1e-3"],
    "top15_lr1e-3": ["--lora-layers-to-transform", "top:15", "--learning-rate", "1e-3"],
    "neftune5": ["--neftune-noise-alpha", "5"],
    "r32": ["--lora-r", "32", "--lora-alpha", "64"],
    "1ep": ["--num-train-epochs", "1"],
    "seed7": ["--seed", "7"],
    # Decoding levers against loops: generation settings only, so with run.py's cache (on by default) they
    # reuse the training of the run with the same training flags and only answer again.
    "no_repeat3": ["--no-repeat-ngram-size", "3"],
    "no_repeat4": ["--no-repeat-ngram-size", "4"],
    "rep_penalty1.1": ["--repetition-penalty", "1.1"],
    "rep_penalty1.2": ["--repetition-penalty", "1.2"],
    "2ep": ["--num-train-epochs", "2"],
    "2ep_no_repeat4": ["--num-train-epochs", "2", "--no-repeat-ngram-size", "4"],
    "2ep_rep_penalty1.1": ["--num-train-epochs", "2", "--repetition-penalty", "1.1"],
    # Less training work for the 10-minute main job on a CPU without bf16 (fp32 training).
    "1.5ep": ["--num-train-epochs", "1.5"],  # the default since 2026-12-03
    "3ep": ["--num-train-epochs", "3"],  # the default before
}


def run_config(name: str, flags: list[str], data_path: str, work_dir: Path, extra: list[str]) -> dict:
    """Runs (or reads back) one configuration; returns its row."""
    output_dir = work_dir / name
    metrics_path = output_dir / "metrics.json"
    seconds_path = output_dir / "sweep_wall_seconds.txt"
    command = [sys.executable, "run.py", "--data-path", data_path, "--output-dir", str(output_dir), "--no-graph",
               *flags, *extra]
    if not metrics_path.is_file():
        started, load_before = time.time(), os.getloadavg()[0]
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        seconds = time.time() - started
        (work_dir / f"{name}.log").write_text(completed.stdout + completed.stderr)
        if completed.returncode != 0:
            return {"name": name, "flags": flags, "status": f"failed (exit {completed.returncode}; see {name}.log)"}
        seconds_path.write_text(f"{seconds:.1f} {load_before:.2f} {os.getloadavg()[0]:.2f}\n")
    seconds, load_before, load_after = (float(v) for v in seconds_path.read_text().split())
    metrics = json.loads(metrics_path.read_text())
    hold_out, validation = metrics["hold_out"], metrics["validation"]
    return {
        "name": name,
        "flags": flags,
        "status": "ok",
        "command": " ".join(command[1:]),
        "wall_s": seconds,
        "load_average_start_end": [load_before, load_after],
        "base": hold_out["base"],
        "finetuned": hold_out["finetuned"],
        "rougeL_difference": hold_out["rougeL_difference"],
        "eval_loss": validation.get("eval_loss"),
        "global_step": validation.get("global_step"),
        "train_runtime_s": validation.get("train_runtime_s"),
        "stopped_early": validation.get("stopped_early"),
    }


def _loop_rate_cell(base: dict, tuned: dict) -> str:
    """Loop rate (share of answers with some word 4-gram three or more times) of base and tuned, with the
    tuned one's Wilson 95% interval; rows of runs made before the measure existed show a dash."""
    if "loop_rate" not in tuned:
        return "—"
    interval = (f" [{tuned['loop_rate_ci95_low']:.0%}, {tuned['loop_rate_ci95_high']:.0%}]"
                if "loop_rate_ci95_low" in tuned else "")
    return f"{base['loop_rate']:.0%} → {tuned['loop_rate']:.0%}{interval}"


def render(rows: list[dict], data_path: str) -> str:
    """The markdown table of a sweep."""
    lines = [
        f"Data: `{data_path}`",
        "",
        "| config | flags | ROUGE-L base → tuned | difference [95% CI] | EOS base → tuned | words base → tuned "
        "| loop rate base → tuned [tuned 95% CI] | val loss | steps | train s | wall min | load start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | `{' '.join(r['flags'])}` | {r['status']} | | | | | | | | | |")
            continue
        b, t, d = r["base"], r["finetuned"], r["rougeL_difference"]
        lines.append(
            f"| {r['name']} | `{' '.join(r['flags']) or '(none)'}` | {b['rougeL']:.3f} → {t['rougeL']:.3f} "
            f"| {d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] "
            f"| {b['eos_stop_rate']:.0%} → {t['eos_stop_rate']:.0%} "
            f"| {b['mean_answer_words']:.0f} → {t['mean_answer_words']:.0f} | {_loop_rate_cell(b, t)} "
            f"| {r['eval_loss']:.3f} "
            f"| {r['global_step']} | {r['train_runtime_s']:.0f} | {r['wall_s'] / 60:.1f} "
            f"| {r['load_average_start_end'][0]:.1f}/{r['load_average_start_end'][1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default="example_data/philosophy_qa.jsonl")
    parser.add_argument("--configs", default="defaults", help=f"comma-separated names among: {', '.join(CONFIGS)}")
    parser.add_argument("--work-dir", default="sweeps/run", help="one output directory per configuration")
    parser.add_argument("--json-out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--from-json", default=None, help="run nothing: print the table of a --json-out file")
    args, extra = parser.parse_known_args(argv)  # unknown flags go to every run.py call
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(render(saved["rows"], saved["data_path"]))
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(run_config(name, CONFIGS[name], args.data_path, work_dir, extra))
        print(render(rows[-1:], args.data_path).splitlines()[-1], flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"data_path": args.data_path, "rows": rows}, indent=1))
    print(render(rows, args.data_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
