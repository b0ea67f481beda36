"""``philo-dataflow compare`` on models that are not runs of ours (``philo_dataflow.compared_models``): a LoRA
adapter trained here by TRL's ``SFTTrainer`` on a tiny model, that adapter merged into a model directory,
the merged directory converted to GGUF and answered by llama.cpp, and a run of ours with ``--hold-out all``.
Every model's answers are checked against what the model answers alone (transformers, PEFT or
llama-cpp-python's chat completion), and the refusals are one ``error:`` line each, exit 2, nothing written."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST_INPUTS
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import philo_dataflow
from philo_dataflow import comparison
from philo_dataflow.cli import compare
from philo_dataflow.lib import gguf_export
from philo_dataflow.lib.artifacts import COMPARISON_ANSWERS_FILE, COMPARISON_FILE, PREDICTIONS_JSONL_FILE
from philo_dataflow.lib.generation import GREEDY, generate_answers
from philo_dataflow.lib.prompts import prompt_token_ids
from philo_dataflow.lib.records import read_records
from philo_dataflow.testing import example_subset

MAX_NEW_TOKENS = 8
TEMPLATE = "Question: {instruction}\nAnswer:"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return example_subset(tmp_path_factory.mktemp("any-model-data") / "qa.jsonl", 10,
                          ("Stoicism", "Taoism", "Hedonism"))


@pytest.fixture(scope="module")
def trl_adapter(tiny_model_dir, data_file, tmp_path_factory) -> str:
    """A LoRA adapter trained by TRL's ``SFTTrainer`` (conversational records, a few steps at a high
    learning rate, so its answers differ from the base's), saved with its tokenizer as TRL saves it."""
    from trl import SFTConfig, SFTTrainer

    rows = read_records(data_file)
    train = Dataset.from_list([{"messages": [{"role": "user", "content": row["instruction"]},
                                             {"role": "assistant", "content": row["output"]}]} for row in rows])
    out = tmp_path_factory.mktemp("trl") / "checkpoint"
    config = SFTConfig(output_dir=str(out / "trainer"), max_steps=4, per_device_train_batch_size=4,
                       learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       bf16=False, max_length=256, seed=0)
    trainer = SFTTrainer(model=tiny_model_dir, args=config, train_dataset=train,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    return str(out)


@pytest.fixture(scope="module")
def merged_dir(trl_adapter, tiny_model_dir, tmp_path_factory) -> str:
    """The TRL adapter merged into its base (PEFT's ``merge_and_unload``), saved as a plain model directory."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, trl_adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(trl_adapter).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def gguf_file(merged_dir) -> str:
    if gguf_export.converter_missing() or gguf_export.llama_cpp_missing():
        pytest.skip(gguf_export.converter_missing() or gguf_export.llama_cpp_missing())
    out = Path(merged_dir).parent / "merged.gguf"
    gguf_export.convert_to_gguf(Path(merged_dir), out, "f32")
    return str(out)


def _compared(argv: list[str], out: Path) -> tuple[dict, list[dict]]:
    assert compare.main([*argv, "--output-dir", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    return (json.loads((out / COMPARISON_FILE).read_text()),
            [json.loads(line) for line in (out / COMPARISON_ANSWERS_FILE).read_text().splitlines()])


def _alone(model, tokenizer, questions: list[str], prompt_format: str = "chat_template",
           no_repeat_ngram_size: int = 0) -> list[str]:
    """The model's own greedy answers, made here with transformers (and PEFT) only."""
    prompts = [prompt_token_ids(tokenizer, prompt_format, question) for question in questions]
    settings = {**GREEDY, "no_repeat_ngram_size": no_repeat_ngram_size}
    return [g["text"] for g in generate_answers(model.eval(), tokenizer, prompts, MAX_NEW_TOKENS, 4, settings=settings)]


def _llama_cpp_chat(gguf: str, questions: list[str]) -> list[str]:
    """What a llama-cpp-python user gets: chat completion with the file's own template, temperature 0."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, verbose=False, seed=0)
    try:
        return [llm.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0,
                                           max_tokens=MAX_NEW_TOKENS, repeat_penalty=1.0)
                ["choices"][0]["message"]["content"].strip() for q in questions]
    finally:
        llm.close()


def _inside(difference: dict) -> bool:
    return difference["ci95_low"] - 1e-12 <= difference["mean"] <= difference["ci95_high"] + 1e-12


def test_adapter_merged_model_and_gguf_of_another_trainer_answer_as_they_do_alone(
        trl_adapter, merged_dir, gguf_file, tiny_model_dir, data_file, tmp_path, capsys):
    result, rows = _compared([trl_adapter, merged_dir, gguf_file, "--data-path", data_file, "--hold-out", "all",
                              "--no-repeat-ngram-size", "0", "--train-data", data_file], tmp_path / "cmp")
    names = list(result["models"])
    assert [result["models"][n]["kind"] for n in names] == ["base", "adapter", "model", "gguf"]
    assert result["base_model_id"] == tiny_model_dir  # read from the adapter's adapter_config.json
    records = read_records(data_file)
    questions = [row["question"] for row in rows]
    assert questions == [r["instruction"] for r in records]  # --hold-out all: every record, in file order
    answers = {name: [row["answers"][name]["text"] for row in rows] for name in names}
    tokenizer = AutoTokenizer.from_pretrained(trl_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert answers["base"] == _alone(base, tokenizer, questions)
    adapter_alone = _alone(PeftModel.from_pretrained(base, trl_adapter), tokenizer, questions)
    assert answers[names[1]] == adapter_alone
    assert any(a != b for a, b in zip(answers["base"], adapter_alone)), "the adapter should change some answers"
    assert answers[names[2]] == _alone(AutoModelForCausalLM.from_pretrained(merged_dir), tokenizer, questions)
    assert answers[names[3]] == _llama_cpp_chat(gguf_file, questions)
    assert result["models"][names[3]]["prompt_format"] == "chat_template"
    assert len(result["pairs"]) == 6
    for pair in result["pairs"]:
        assert _inside(pair["rougeL_difference"]) and _inside(pair["loop_rate_difference"]), pair
        outcomes = pair["rougeL_outcomes"]
        assert outcomes["wins"] + outcomes["ties"] + outcomes["losses"] == len(questions)
        for category, counts in outcomes["per_category"].items():
            assert sum(counts.values()) == sum(r["school"] == category for r in records)
    # Tuned on the very file it is scored on: every question leaks, and no verdict is left without them.
    assert (result["leakage"]["count"], result["leakage"]["pairs_without"]) == (len(questions), [])
    page = (tmp_path / "cmp" / "report.html").read_text()
    for number, pair in enumerate(result["pairs"]):
        for kind in ("won", "lost"):
            assert (f'id="most-{kind}-{number}"' in page) == bool(pair["most_changed"][kind])
            for row in pair["most_changed"][kind]:  # both answers, side by side
                assert {row["answer_a"], row["answer_b"]} <= {answers[pair["a"]][questions.index(row["question"])],
                                                             answers[pair["b"]][questions.index(row["question"])]}
    assert "Compared 3 models and their base model on 30 hold-out questions" in capsys.readouterr().out


def test_an_adapter_alone_is_compared_with_its_base_on_the_data_files_hold_out_split(
        trl_adapter, tiny_model_dir, data_file, tmp_path):
    result, rows = _compared([trl_adapter, "--data-path", data_file, "--prompt-template", TEMPLATE], tmp_path / "cmp")
    split = philo_dataflow.build_driver({"start": "base"}).execute(
        ["hold_out_set"], inputs={"data_path": data_file, "model_id": tiny_model_dir,
                                  "prompt_template": TEMPLATE})["hold_out_set"]
    questions = [row["question"] for row in rows]
    assert questions == list(split["input_text"]) and questions[0].startswith("Question: ")
    assert result["hold_out"]["source"].startswith(f"the hold-out split of {data_file} (default split inputs)")
    assert {entry["prompt_format"] for entry in result["models"].values()} == {"template"}
    tokenizer = AutoTokenizer.from_pretrained(trl_adapter)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trl_adapter)
    label = list(result["models"])[1]
    assert [row["answers"][label]["text"] for row in rows] == _alone(tuned, tokenizer, questions, "template", 4)


def test_a_run_of_ours_answers_every_record_with_hold_out_all(tiny_run_dir, tmp_path):
    result, rows = _compared([tiny_run_dir, "--hold-out", "all"], tmp_path / "cmp")
    data_path = json.loads((Path(tiny_run_dir) / "adapter" / "philo_dataflow_manifest.json").read_text())[
        "inputs"]["data_path"]
    assert [row["question"] for row in rows] == [r["instruction"] for r in read_records(data_path)]
    label = list(result["models"])[1]
    by_question = {row["question"]: row["answers"] for row in rows}
    own = [json.loads(line) for line in (Path(tiny_run_dir) / PREDICTIONS_JSONL_FILE).read_text().splitlines()]
    # Its own hold-out questions get the answers the run gave (its max_new_tokens is MAX_NEW_TOKENS too).
    assert FAST_INPUTS["max_new_tokens"] == MAX_NEW_TOKENS
    assert [by_question[p["question"]][label]["text"] for p in own] == [p["finetuned_prediction"] for p in own]
    assert [by_question[p["question"]]["base"]["text"] for p in own] == [p["base_prediction"] for p in own]


def _adapter_naming(trl_adapter: str, target: Path, base: str) -> str:
    shutil.copytree(trl_adapter, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (target / "adapter_config.json").write_text(json.dumps(config))
    return str(target)


#: Case -> (argv from the fixtures' paths and a temporary directory, the fragments of each error line).
REFUSALS = {
    "adapter whose base cannot be found": (
        lambda f, tmp: [_adapter_naming(f["adapter"], tmp / "moved", str(tmp / "gone")), "--data-path", f["data"]],
        [("moved: its base model", "gone", "named in its adapter_config.json", "cannot be loaded here",
          "give it with --base MODEL")]),
    "adapter of another base": (
        lambda f, tmp: [f["run"], _adapter_naming(f["adapter"], tmp / "other", f["alpaca"])],
        [("other was tuned from base model", "but the base compared is", "one base model")]),
    "merged model without a base": (
        lambda f, tmp: [f["merged"], "--data-path", f["data"]],
        [("its base model is not known", "give --base MODEL")]),
    "not a run without data": (
        lambda f, tmp: [f["adapter"]], [("is not a run of ours", "give --data-path FILE")]),
    "a file that is not GGUF": (
        lambda f, tmp: [f["data"], "--base", f["tiny"]], [("is a file but not a GGUF file",)]),
    "missing model": (
        lambda f, tmp: [str(tmp / "nowhere"), "--base", f["tiny"]], [("nowhere: no such file or directory",)]),
    "run not trained with the template": (
        lambda f, tmp: [f["run"], "--prompt-template", TEMPLATE],
        [("was trained with prompt template None, not --prompt-template",)]),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_are_one_line_each_and_write_nothing(case, trl_adapter, merged_dir, tiny_model_dir,
                                                      tiny_alpaca_model_dir, tiny_run_dir, data_file, tmp_path, capsys):
    fixtures = {"adapter": trl_adapter, "merged": merged_dir, "tiny": tiny_model_dir, "alpaca": tiny_alpaca_model_dir,
                "run": tiny_run_dir, "data": data_file}
    make_argv, expected = REFUSALS[case]
    argv = make_argv(fixtures, tmp_path) + ["--output-dir", str(tmp_path / "cmp")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    threads = torch.get_num_threads()
    assert compare.main(argv) == 2
    assert torch.get_num_threads() == threads
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == len(expected) and all(line.startswith("error: ") for line in errors), errors
    for line, fragments in zip(errors, expected):
        for fragment in fragments:
            assert fragment in line, (fragment, errors)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_labels_of_models_of_every_kind_are_short_and_unique(tmp_path):
    from philo_dataflow.compared_models import Model

    (tmp_path / "a" / "merged").mkdir(parents=True)
    (tmp_path / "b" / "merged").mkdir(parents=True)
    models = [Model(str(tmp_path / "a" / "merged"), "model"), Model(str(tmp_path / "b" / "merged"), "model"),
              Model("HuggingFaceTB/SmolLM2-135M-Instruct", "model")]
    assert comparison.model_labels(models) == ["a/merged", "b/merged", "HuggingFaceTB/SmolLM2-135M-Instruct"]


#: Small enough for the embedded 135M model, served by llama.cpp, to judge quickly (as tests/test_judging.py).
JUDGE_FLAGS = ["--judge-model", "smollm2-135m", "--judge-max-tokens", "96", "--judge-rationale-max-chars", "32",
               "--judge-max-concurrency", "2", "--judge-malformed-retries", "1", "--judge-timeout", "60"]


def test_the_judge_gives_every_pair_its_verdict_in_both_orders(tiny_run_dir, llama_server, tmp_path, capsys):
    out = tmp_path / "cmp"
    before = llama_server.chat_requests_logged()
    result, rows = _compared([tiny_run_dir, *JUDGE_FLAGS, "--judge-base-url", llama_server.base_url], out)
    label = list(result["models"])[1]
    (pair,) = result["judge"]["pairs"]
    assert (pair["a"], pair["b"], result["judge"]["model"]) == ("base", label, "smollm2-135m")
    assert [q["question"] for q in pair["per_question"]] == [row["question"] for row in rows]
    assert pair["wins"] + pair["ties"] + pair["losses"] == pair["judged"] == len(rows) - pair["failed"]
    assert pair["judged"] > 0
    for question in pair["per_question"]:
        preferred = set(question["preferred"].values())
        if question["outcome"] in ("win", "loss"):  # preferred in both orders
            assert preferred == {label if question["outcome"] == "win" else "base"}
            assert question["position_consistent"] is True
        elif question["outcome"] == "tie":
            assert question["position_consistent"] == (preferred == {"tie"})
    consistent = sum(bool(q["position_consistent"]) for q in pair["per_question"])
    assert pair["position_consistency"] == consistent / pair["judged"]
    assert llama_server.chat_requests_logged() - before >= 2 * len(rows)  # both orders, really asked
    assert f"judge smollm2-135m, {label} against base: {pair['wins']} won" in capsys.readouterr().out
    assert 'id="judge-pairs"' in (out / "report.html").read_text()


def test_the_comparison_is_a_hamilton_dataflow_that_writes_only_when_asked(trl_adapter, data_file, tmp_path):
    dr = philo_dataflow.build_comparison_driver()
    inputs = {"models": [trl_adapter], "data_path": data_file, "max_new_tokens": MAX_NEW_TOKENS,
              "output_dir": str(tmp_path / "library")}
    result = dr.execute(["comparison"], inputs=inputs)["comparison"]
    assert not (tmp_path / "library").exists()  # only saved_comparison writes
    assert {"model_generations", "comparison_hold_out_set", "compared_models"} <= {
        node.name for node in dr.what_is_upstream_of("comparison_scores")}
    written, _ = _compared([trl_adapter, "--data-path", data_file], tmp_path / "cli")
    assert written == result  # the command line is this dataflow
    saved = dr.execute(["saved_comparison"], inputs=inputs)["saved_comparison"]
    assert json.loads((tmp_path / "library" / COMPARISON_FILE).read_text()) == result
    assert saved["files"][COMPARISON_FILE]["sha256"] == hashlib.sha256(
        (tmp_path / "library" / COMPARISON_FILE).read_bytes()).hexdigest()
