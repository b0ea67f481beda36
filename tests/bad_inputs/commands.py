"""The bad-input corpus of ``run.py``'s subcommands (``chat``, ``export``, ``compare``): each case is a
command line built in the case's own temporary directory ``work`` and the problems it must report, one
entry per ``error:`` line (a substring or a tuple of substrings). Run by ``tests/test_bad_inputs.py``
through ``run.main``: exit code 2, nothing written. Mistakes that need finished runs (hold-out sets or
base models that differ) are in ``tests/test_compare.py``."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cases import Env


@dataclass(frozen=True)
class CommandCase:
    id: str
    argv: Callable[[Env, Path], list]
    expected: tuple


def _empty(work: Path) -> str:
    (work / "empty").mkdir()
    return str(work / "empty")


def _broken_manifest(work: Path) -> str:
    (work / "broken").mkdir()
    (work / "broken" / "philo_dataflow_manifest.json").write_text("{not json", encoding="utf-8")
    return str(work / "broken")


COMMAND_CASES = (
    CommandCase("chat_missing_dir", lambda env, work: ["chat", "--model-dir", str(work / "missing")],
                (("--model-dir", "missing: no such directory", "<output_dir>/adapter"),)),
    CommandCase("chat_dir_without_manifest", lambda env, work: ["chat", "--model-dir", _empty(work)],
                (("--model-dir", "holds no philo_dataflow_manifest.json"),)),
    CommandCase("chat_broken_manifest", lambda env, work: ["chat", "--model-dir", _broken_manifest(work)],
                (("--model-dir", "cannot be read as JSON"),)),
    CommandCase("chat_port_out_of_range", lambda env, work: ["chat", "--model-dir", env.adapter, "--port", "70000"],
                (("--port", "70000"),)),
    CommandCase("export_missing_dir", lambda env, work: ["export", "--model-dir", str(work / "missing")],
                (("--model-dir", "missing: no such directory"),)),
    CommandCase("export_dir_without_manifest", lambda env, work: ["export", "--model-dir", _empty(work)],
                (("--model-dir", "holds no philo_dataflow_manifest.json"),)),
    CommandCase("export_no_gguf_questions", lambda env, work: ["export", "--model-dir", env.adapter,
                                                               "--gguf-questions", "0"],
                (("--gguf-questions 0", "at least 1"),)),
    CommandCase("compare_one_run", lambda env, work: ["compare", str(Path(env.adapter).parent),
                                                      "--output-dir", str(work / "cmp")],
                (("at least two run directories", "got 1"),)),
    CommandCase("compare_same_run_twice", lambda env, work: ["compare", env.adapter, env.adapter,
                                                             "--output-dir", str(work / "cmp")],
                (("are the same run", "give each run once"),)),
    CommandCase("compare_missing_and_empty", lambda env, work: ["compare", str(work / "missing"), _empty(work),
                                                                "--output-dir", str(work / "cmp")],
                (("missing: no such directory",), ("empty: holds no adapter/philo_dataflow_manifest.json",))),
    CommandCase("compare_bad_max_new_tokens", lambda env, work: [
        "compare", env.adapter, env.other_adapter, "--max-new-tokens", "0",
        "--output-dir", str(work / "cmp")],
                # The corpus's adapters sit in no finished run: each lacks its hold-out predictions too.
                (("max_new_tokens=0", "--max-new-tokens"), ("holds no hold_out_predictions.jsonl", "--data-path"),
                 ("holds no hold_out_predictions.jsonl", "--data-path"))),
)
