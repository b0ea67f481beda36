"""The benchmark scripts keep working: a ``--smoke`` run of each (tiny random model, a few records,
two optimizer steps) as a subprocess, checked for one row per variant and computed ratios.

Both scripts run at once to keep the test short; their timings mean nothing here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from philo_dataflow.lib import gguf_export

REPO = Path(__file__).resolve().parent.parent
TRAIN_VARIANTS = ("ours", "ours_gradient_checkpointing", "ours_uncompiled", "ours_gradient_checkpointing_uncompiled", "trl_default", "trl_padding_free", "trl_packing", "pad_to_max_length")
#: Seconds either smoke run may take before the test fails (each takes well under a minute on a quiet
#: two-core machine).
TIMEOUT_S = 300


def _start(script: str, json_out: Path, work_dir: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--json-out", str(json_out),
               "--work-dir", str(work_dir), *flags]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_and_generation_benchmarks_smoke(tmp_path):
    train = _start("train_benchmark.py", tmp_path / "train.json", tmp_path / "train")
    generation = _start("generation_benchmark.py", tmp_path / "generation.json", tmp_path / "generation")
    train_output, _ = train.communicate(timeout=TIMEOUT_S)
    generation_output, _ = generation.communicate(timeout=TIMEOUT_S)
    assert train.returncode == 0, train_output[-4000:]
    assert generation.returncode == 0, generation_output[-4000:]

    report = json.loads((tmp_path / "train.json").read_text())
    results = {r["variant"]: r for r in report["variants"]}
    assert set(results) == set(TRAIN_VARIANTS)
    for name, result in results.items():
        assert f"| `{name}` | {result['status']} |" in train_output, name
        # A peer may refuse its configuration (recorded with its message); nothing may crash.
        assert result["status"] in ("ok", "refused"), (name, result.get("message"))
        assert result["peak_rss_bytes"] > 0
        if result["status"] == "refused":
            assert result["message"]
            continue
        assert result["real_tokens_per_s"] > 0 and 0 <= result["padding_share"] < 1
        assert result["speedup_of_ours"] > 0 and result["rss_ratio_ours"] > 0
        assert result["real_tokens_per_s_median_step"] > 0 and result["speedup_of_ours_median_step"] > 0
        assert 0 < result["cpu_share"] <= 1.5
    assert results["ours"]["status"] == "ok"
    import torch

    from philo_dataflow.stages.training import compile_decoder_layers

    assert results["ours"]["settings"]["compiled_decoder_layers"] is compile_decoder_layers(torch.device("cpu"))
    assert results["ours_uncompiled"]["settings"]["compiled_decoder_layers"] is False
    assert results["ours_uncompiled"]["settings"]["attn_implementation_in_training"] == "sdpa"
    assert results["ours_gradient_checkpointing_uncompiled"]["settings"]["compiled_decoder_layers"] is False
    # The smoke records are short: compiled training switches to eager attention for them.
    expected = "eager" if results["ours"]["settings"]["compiled_decoder_layers"] else "sdpa"
    assert results["ours"]["settings"]["attn_implementation_in_training"] == expected
    assert results["ours"]["speedup_of_ours"] == 1.0
    assert results["pad_to_max_length"]["padding_share"] > results["ours"]["padding_share"]
    mfu = report["model_flops_utilisation"]
    assert mfu["flops_per_token"] == 4 * mfu["total_parameters"]
    assert 0 < mfu["mfu"] and report["matmul_gflops"]["float32"] > 0
    assert "Model-FLOPs utilisation of `ours`" in train_output

    generation_report = json.loads((tmp_path / "generation.json").read_text())
    modes = {r["variant"]: r for r in generation_report["modes"]}
    assert set(modes) == {"batched", "fixed_count", "one_at_a_time"}  # --smoke leaves llama.cpp out
    assert all(m["status"] == "ok" and m["new_tokens_per_s"] > 0 and m["peak_rss_bytes"] > 0 for m in modes.values())
    assert generation_report["comparison"]["identical"] is True
    assert generation_report["comparison"]["speedup"] > 0
    assert modes["one_at_a_time"]["batches"] == modes["one_at_a_time"]["prompts"] == 4
    assert modes["batched"]["batches"] == modes["fixed_count"]["batches"] == 1  # 4 short prompts: one batch either way
    assert "Speed ratio batched ÷ one at a time" in generation_output


@pytest.mark.skipif(gguf_export.llama_cpp_missing() is not None or gguf_export.converter_missing() is not None,
                    reason="no llama-cpp-python or GGUF converter")
def test_generation_benchmark_long_prompts_token_budget_and_llama_cpp_row(tmp_path):
    process = _start("generation_benchmark.py", tmp_path / "long.json", tmp_path / "long",
                     "--long-prompts", "--questions", "6", "--modes", "batched,fixed_count,llama_cpp")
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "long.json").read_text())
    modes = {r["variant"]: r for r in report["modes"]}
    assert set(modes) == {"batched", "fixed_count", "llama_cpp"} and all(m["status"] == "ok" for m in modes.values())
    # The thread before the last question makes it far longer than the first.
    assert modes["batched"]["longest_prompt_tokens"] > 2000
    # The budget splits the 6 prompts (fixed count: one batch of all 6), padding fewer tokens, same answers.
    assert modes["fixed_count"]["batches"] == 1 and modes["batched"]["batches"] > 1
    assert modes["batched"]["padded_tokens"] < modes["fixed_count"]["padded_tokens"]
    assert report["comparison"]["modes"]["fixed_count"]["identical"] is True
    # llama.cpp answered every prompt with as many tokens (no EOS in 8 tokens of a random model).
    versus = report["comparison"]["modes"]["llama_cpp"]
    assert 0 <= versus["shared_prefix_share"] <= 1 and modes["llama_cpp"]["new_tokens"] == modes["batched"]["new_tokens"]
    assert "batched against `llama_cpp`" in output


def test_long_prompt_questions_spread_from_bare_question_to_long_thread():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from generation_benchmark import LONG_PROMPT_MAX_CONTEXT_ANSWERS, long_prompt_questions

    questions = long_prompt_questions(["Q1?", "Q2?"], ["answer one", "answer two", "answer three"], 5)
    assert questions[0] == "Q1?"  # no thread before the first
    assert [q.count("Earlier reply:") for q in questions] == [
        round(LONG_PROMPT_MAX_CONTEXT_ANSWERS * (i / 4) ** 3) for i in range(5)]
    assert questions[-1].endswith("Q1?") and questions[1].endswith("Q2?")


def _answer_style_rows(*paths: str) -> dict:
    """``benchmarks/answer_style.py`` run as a user runs it: its table's row of each file, as numbers."""
    process = subprocess.run([sys.executable, str(REPO / "benchmarks" / "answer_style.py"), *paths], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    rows = {}
    for line in process.stdout.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = {"records": int(cells[1]), "answer_vs_question": float(cells[2]),
                                     "answer_vs_same_school_answer": float(cells[3]), "words": float(cells[4]),
                                     "common_openings": cells[5]}
    return rows


def test_answer_style_measures_restating_and_shared_wording(tmp_path):
    questions = ["What does Stoicism say about anger?", "What does Stoicism say about grief?",
                 "What does Taoism say about water?"]
    restating = ["Stoicism says that anger is a brief madness.", "Stoicism says that grief is a judgment.",
                 "Taoism says that water is soft yet strong."]
    elsewhere = ["Seneca called it brief madness.", "Epictetus wrote of loss.", "Laozi praised the yielding."]

    def write(name, answers):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"instruction": q, "output": a, "school": q.split()[2]}) + "\n"
                                for q, a in zip(questions, answers)))
        return str(path)

    direct_path, indirect_path = write("direct.jsonl", restating), write("indirect.jsonl", elsewhere)
    rows = _answer_style_rows(direct_path, indirect_path)
    direct, indirect = rows[direct_path], rows[indirect_path]
    assert direct["records"] == indirect["records"] == 3
    assert direct["answer_vs_question"] > 0.35 > 0.1 > indirect["answer_vs_question"]
    # The two Stoic answers share "Stoicism says that ... is a"; Taoism has no second answer to compare.
    assert direct["answer_vs_same_school_answer"] > indirect["answer_vs_same_school_answer"]
    assert direct["words"] == round((8 + 7 + 8) / 3, 1)
    assert direct["common_openings"].startswith("'Stoicism says' 2")


def test_qlora_benchmark_is_refused_in_one_line_without_cuda(tmp_path):
    """``--load-in-4bit`` (QLoRA, the GPU path) is refused before any variant starts where there is no
    CUDA GPU, naming the flag; on a GPU machine it trains every variant on the 4-bit base model."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA GPU is present: the QLoRA benchmark would run")
    process = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_benchmark.py"), "--smoke", "--load-in-4bit",
                              "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert process.returncode != 0
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_benchmark: --load-in-4bit: load_in_4bit=True needs a CUDA GPU")
    assert "Traceback" not in process.stderr
