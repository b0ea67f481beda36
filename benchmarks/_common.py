"""Helpers shared by ``train_benchmark.py`` and ``generation_benchmark.py``.

Each benchmark runs its variants in child processes of one invocation, so that every variant's peak
resident set size is its own. The parent writes the shared settings to a JSON file, starts one child per
variant (see ``run_children``), and reads back the result JSON each child writes. A child that dies
without a result (out of memory, a crash) becomes a failure row, never a silent gap.
"""

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

#: The repository root (the benchmarks import the working tree's ``philo_dataflow``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Default data file, relative to the repository root (the phillm Q&A set, alpaca keys under "data").
DEFAULT_DATA_PATH = "../shared/data/phillm/main_data.json"
#: Data of ``--smoke`` runs: the example file shipped in the repository.
SMOKE_DATA_PATH = "example_data/philosophy_qa.jsonl"
#: Packages whose versions are recorded with every result.
RECORDED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "apache-hamilton")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process image only.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux carries it across ``fork`` +
    ``execve``, so a child would report its parent's peak when that is higher. Elsewhere ``ru_maxrss``
    (kilobytes on Linux/BSD, bytes on macOS) is the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (runnable processes), rounded; other work on the machine
    shows up here and slows every variant."""
    return [round(value, 2) for value in os.getloadavg()]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions of ``RECORDED_PACKAGES`` (None for one that is missing)."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def library_state() -> dict:
    """Which ``philo_dataflow`` code ran: the git commit, whether the package has uncommitted changes,
    and a SHA-256 over its source files (it changes with any edit, committed or not). Read-only git."""
    package = REPO_ROOT / "philo_dataflow"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):  # lib/ and commands/ too
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*arguments: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changes = git("status", "--porcelain", "--", "philo_dataflow")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": None if changes is None else bool(changes),
        "source_sha256": digest.hexdigest()[:16],
    }


def machine_info(threads: int) -> dict:
    """What the numbers were measured on: CPU model, logical CPUs, SIMD features that decide the
    matmul peak, memory, the torch thread count used, Python and package versions."""
    import psutil

    flags = _cpu_flags()
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "simd": sorted(flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": threads,
        "python": platform.python_version(),
        "packages": package_versions(),
    }


#: Modules every child needs, imported once by the fork server so that children start in a second
#: instead of re-importing them (seconds each). TRL is left out: only the TRL variants import it, so it
#: does not add to the other variants' memory.
PRELOADED_MODULES = ("torch", "transformers", "peft", "datasets", "philo_dataflow")
#: Seconds between samples of the load average while a child runs.
LOAD_SAMPLE_S = 10.0


def child_environment(threads: int, model_path: str) -> dict[str, str]:
    """Environment variables of the children: ``threads`` OpenMP/MKL threads, no tokenizer thread
    pool, and no hub access when the model is a local directory."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if os.path.isdir(model_path) and "HF_HUB_OFFLINE" not in os.environ:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@dataclasses.dataclass
class ChildJob:
    """One variant to run in its own process.

    :param name: the variant's name.
    :param target: the function the child runs, ``target(name, settings_file, result_file)``; it must be
        importable (a module-level function) and write the result JSON to ``result_file``.
    :param settings_file: the shared settings JSON.
    :param result_file: where the child writes its result JSON.
    :param log_file: the child's stdout and stderr.
    """

    name: str
    target: Callable[[str, Path, Path], Any]
    settings_file: Path
    result_file: Path
    log_file: Path


def _child_main(job: ChildJob) -> None:
    """Entry point of a child process: output to the job's log file, then the job's target."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(job.log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    job.target(job.name, job.settings_file, job.result_file)
    sys.stdout.flush()
    sys.stderr.flush()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _collect(job: ChildJob, exitcode: Optional[int], seconds: float, timeout_s: float, loads: list[float]) -> dict:
    load_mean = round(sum(loads) / len(loads), 2) if loads else None
    if job.result_file.is_file():
        result = json.loads(job.result_file.read_text())
        result.update(process_wall_s=round(seconds, 1), load_average_1min_mean=load_mean)
        return result
    reason = f"timed out after {timeout_s:.0f} s" if exitcode is None else f"exit code {exitcode}"
    logger.error("%s: %s without a result; last lines of %s:\n%s", job.name, reason, job.log_file, _log_tail(job.log_file))
    return {
        "variant": job.name,
        "status": "failed",
        "message": f"child process ended ({reason}) without a result; see {job.log_file}",
        "log_tail": _log_tail(job.log_file),
        "process_wall_s": round(seconds, 1),
        "load_average_1min_mean": load_mean,
    }


def run_children(jobs: list[ChildJob], env: dict[str, str], parallel: int, timeout_s: float) -> list[dict]:
    """Runs each job in its own process, at most ``parallel`` at a time (1 for comparable timings), and
    returns their results in job order.

    Children are forked from a ``multiprocessing`` fork server that has imported ``PRELOADED_MODULES``
    and nothing else (no tensor has been computed there, so no OpenMP pool is forked). A child's peak RSS
    therefore starts from the fork server's resident imports, as a fresh interpreter's would after the
    same imports, and never includes this (parent) process's memory. ``env`` is set in ``os.environ``
    before the fork server starts, so every child sees it. A child that exits without writing its result,
    or runs past ``timeout_s`` seconds (it is killed), yields ``{"variant", "status": "failed",
    "message", "log_tail"}``. Every result gets ``process_wall_s`` and ``load_average_1min_mean``, the
    mean of the 1-minute load average sampled every ``LOAD_SAMPLE_S`` seconds while the child ran.
    """
    import multiprocessing

    os.environ.update(env)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *PRELOADED_MODULES])
    pending, running, results = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            logger.info("starting %s (log: %s)", job.name, job.log_file)
            process = context.Process(target=_child_main, args=(job,), name=f"benchmark-{job.name}")
            started = time.perf_counter()
            process.start()
            running.append((job, process, started, []))
        time.sleep(0.2)
        for entry in list(running):
            job, process, started, loads = entry
            if time.perf_counter() - started >= len(loads) * LOAD_SAMPLE_S:
                loads.append(os.getloadavg()[0])
            elapsed = time.perf_counter() - started
            timed_out = False
            if process.is_alive():
                if elapsed <= timeout_s:
                    continue
                process.kill()
                timed_out = True
            process.join()
            running.remove(entry)
            results[job.name] = _collect(job, None if timed_out else process.exitcode, elapsed, timeout_s, loads)
            logger.info("%s finished: %s in %.0f s", job.name, results[job.name]["status"], elapsed)
    return [results[job.name] for job in jobs]


def write_json(path: Path, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def work_directory(given: Optional[str], prefix: str) -> Path:
    """``given`` (created if needed) or a fresh temporary directory for settings, results and logs."""
    if given:
        path = Path(given).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=prefix))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec``, or an em dash when it is missing."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the option every benchmark has (``--data-path``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=None, help=f"data file, relative to the repository root (default: "
                                                          f"{DEFAULT_DATA_PATH}; --smoke: {SMOKE_DATA_PATH})")
    return parser


def new_report(settings: Any, smoke: bool, jobs: Optional[int]) -> tuple[dict, int]:
    """The start of a benchmark's report: its settings, the machine, the library, and the children run at
    once (``jobs``; default 2 for ``--smoke``, else 1, so timed children never share the machine).

    :return: ``(report, jobs)``.
    """
    jobs = jobs if jobs is not None else (2 if smoke else 1)
    report = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "machine": machine_info(settings.threads),
        "library": library_state(),
        "jobs": jobs,
        "load_average_start": load_average(),
    }
    return report, jobs
