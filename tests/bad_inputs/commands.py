"""The bad-input corpus of ``philo-dataflow``'s subcommands (``preview``, ``chat``, ``export``, ``compare``): each case is a
command line built in the case's own temporary directory ``work`` and the problems it must report, one
entry per ``error:`` line (a substring or a tuple of substrings). Run by ``tests/test_bad_inputs.py``
through ``run.main``: exit code 2, nothing written. Mistakes that need finished runs (hold-out sets or
base models that differ) are in ``tests/test_compare.py``."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cases import GOOD_ROWS, Env, _write_jsonl, data


@dataclass(frozen=True)
class CommandCase:
    id: str
    argv: Callable[[Env, Path], list]
    expected: tuple
    #: the case writes to ``Env.small_filesystem``: skipped where there is none
    needs_small_filesystem: bool = False


def _empty(work: Path) -> str:
    (work / "empty").mkdir()
    return str(work / "empty")


def _broken_manifest(work: Path) -> str:
    (work / "broken").mkdir()
    (work / "broken" / "philo_dataflow_manifest.json").write_text("{not json", encoding="utf-8")
    return str(work / "broken")


#: Locks held by the cases for the rest of the session (a lock goes with its open file).
_HELD_LOCKS = []


def _locked(work: Path) -> str:
    """A directory whose lock (``lib.artifacts.output_dir_lock``) another holder has: an open descriptor of
    this process, which ``flock`` treats as another holder."""
    import fcntl
    import os

    (work / "busy").mkdir()
    descriptor = os.open(work / "busy", os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD_LOCKS.append(descriptor)
    return str(work / "busy")


def _one_long_answer(work: Path) -> str:
    """The good records and one more whose answer (~400 tokens) cannot fit ``--max-seq-length 128``."""
    long_answer = {"instruction": "Why does Seneca write letters?", "output": "Because. " * 200, "school": "Stoicism"}
    return _write_jsonl(work / "one_long_answer.jsonl", GOOD_ROWS + [long_answer])


COMMAND_CASES = (
    CommandCase("preview_template_shows_the_answer", lambda env, work: [
        "preview", "--data-path", data("question_answer_keys.jsonl"), "--model-id", env.tiny_model,
        "--prompt-template", "### Question:\n{question}\n\n### Answer:\n{answer}", "--output-text-key", "answer"],
                (("(--prompt-template) puts the answer key {answer} in the prompt",
                  "name the answer's key with output_text_key (--output-text-key)"),)),
    CommandCase("preview_answer_cut_before_eos", lambda env, work: [
        "preview", "--data-path", _one_long_answer(work), "--model-id", env.tiny_model, "--max-seq-length", "128"],
                (("record", "does not end on the EOS token '<|im_end|>'", "raise --max-seq-length"),)),
    CommandCase("preview_negative_examples", lambda env, work: [
        "preview", "--data-path", data("good.jsonl"), "--model-id", env.tiny_model, "--examples", "-1"],
                ("--examples must be 0 or more",)),
    CommandCase("preview_bad_data_file", lambda env, work: [
        "preview", "--data-path", data("bad_jsonl_line.jsonl"), "--model-id", env.tiny_model],
                ("bad_jsonl_line.jsonl: line 4 is not valid JSON",)),
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
    CommandCase("export_unknown_quantization", lambda env, work: ["export", "--model-dir", env.adapter,
                                                                   "--quantize", "q8_0,q3_x"],
                (("--quantize q8_0,q3_x: unknown type(s) q3_x", "q4_k_m"),)),
    CommandCase("export_filesystem_too_small", lambda env, work: [
        "export", "--model-dir", env.adapter, "--quantize", "q8_0", "--output-dir", f"{env.small_filesystem}/{work.name}"],
                (("(--output-dir): the export will write about", "the merged model 9.9 MB, the f32 GGUF copy 6.4 MB, "
                  "q8_0 1.7 MB, the report page", "but its filesystem has 3,145,728 bytes (3.1 MB) free"),),
                needs_small_filesystem=True),
    CommandCase("export_quantize_without_gguf", lambda env, work: ["export", "--model-dir", env.adapter,
                                                                    "--quantize", "q8_0", "--no-gguf"],
                (("--quantize q8_0 quantizes the GGUF file", "--no-gguf"),)),
    CommandCase("compare_no_run", lambda env, work: ["compare", "--output-dir", str(work / "cmp")],
                (("compare needs a model", "one model is compared with its base model"),)),
    CommandCase("compare_same_run_twice", lambda env, work: ["compare", env.adapter, env.adapter,
                                                             "--output-dir", str(work / "cmp")],
                (("are the same model", "give each model once"),)),
    CommandCase("compare_missing_and_empty", lambda env, work: ["compare", str(work / "missing"), _empty(work),
                                                                "--output-dir", str(work / "cmp")],
                (("missing: no such file or directory",),
                 ("empty: holds no philo_dataflow_manifest.json, adapter_config.json or config.json",))),
    CommandCase("compare_not_a_gguf_file", lambda env, work: [
        "compare", data("good.jsonl"), "--base", env.tiny_model, "--output-dir", str(work / "cmp")],
                (("good.jsonl: is a file but not a GGUF file", "a PEFT adapter directory"),)),
    CommandCase("compare_model_dir_without_base", lambda env, work: [
        "compare", env.tiny_model, "--data-path", data("good.jsonl"), "--output-dir", str(work / "cmp")],
                (("its base model is not known", "give --base MODEL"),)),
    CommandCase("compare_hold_out_all_without_data", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--hold-out", "all", "--output-dir", str(work / "cmp")],
                (("--hold-out all needs the data file", "--data-path FILE"),)),
    CommandCase("compare_base_not_here", lambda env, work: [
        "compare", env.tiny_model, "--base", str(work / "no-base"), "--data-path", data("good.jsonl"),
        "--output-dir", str(work / "cmp")],
                (("--base", "no-base", "cannot be loaded here", "no such model directory"),)),
    CommandCase("compare_negative_no_repeat_ngram_size", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"),
        "--no-repeat-ngram-size", "-1", "--output-dir", str(work / "cmp")],
                (("no_repeat_ngram_size=-1", "--no-repeat-ngram-size"),)),
    CommandCase("compare_judge_unreachable", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"),
        "--judge-model", "judge-a", "--judge-base-url", env.closed_url, "--output-dir", str(work / "cmp")],
                ("the judge endpoint cannot be reached (",)),
    CommandCase("compare_judge_model_not_listed", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"),
        "--judge-model", "judge-c", "--judge-base-url", env.judge_url, "--output-dir", str(work / "cmp")],
                (("judge_model='judge-c' (--judge-model):", "does not list it"),)),
    CommandCase("compare_output_dir_locked", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"), "--overwrite",
        "--output-dir", _locked(work)],
                (("busy: another run is writing there (pid ", "wait for it to end, or give another --output-dir"),)),
    CommandCase("export_output_dir_on_a_virtual_filesystem", lambda env, work: [
        "export", "--model-dir", env.adapter, "--no-gguf", "--output-dir", "/proc/philo_dataflow_out"],
                (("output_dir='/proc/philo_dataflow_out' (--output-dir): ", "/proc", "you can write to"),)),
    CommandCase("compare_output_dir_on_a_virtual_filesystem", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"),
        "--output-dir", "/proc/philo_dataflow_out"],
                (("--output-dir /proc/philo_dataflow_out: ", "/proc", "you can write to"),)),
    CommandCase("compare_max_new_tokens_above_the_window", lambda env, work: [
        "compare", env.tiny_model, "--base", env.tiny_model, "--data-path", data("good.jsonl"),
        "--max-new-tokens", "1000000000", "--output-dir", str(work / "cmp")],
                (("max_new_tokens=1000000000 (--max-new-tokens)", "context window of 1024 tokens",
                  "give max_new_tokens "),)),
    CommandCase("compare_bad_max_new_tokens", lambda env, work: [
        "compare", env.adapter, env.other_adapter, "--max-new-tokens", "0",
        "--output-dir", str(work / "cmp")],
                # The corpus's adapters sit in no finished run: each lacks its hold-out predictions too.
                (("max_new_tokens=0", "--max-new-tokens"), ("holds no hold_out_predictions.jsonl", "--data-path"),
                 ("holds no hold_out_predictions.jsonl", "--data-path"))),
)
