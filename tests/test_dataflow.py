"""The dataflow end to end on a tiny model: both configs, saving, presaved reproduction, generation."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_INPUTS, logits_against_base

import philo_dataflow
from philo_dataflow.lib.generation import generate_answers, token_budget_batches


@pytest.mark.parametrize("start", ["base", "presaved"])
def test_every_final_variable_resolves_under_both_configs(start):
    dr = philo_dataflow.build_driver({"start": start})
    inputs = {"data_path": "d.jsonl", "presaved_model_dir": "adapter"}
    dr.validate_execution(list(philo_dataflow.FINAL_VARIABLES), inputs=inputs)


def test_contrib_example_call_resolves_under_both_configs():
    """The reference module's README call, with our module in its place."""
    final_vars = ["save_best_models", "hold_out_set_predictions", "training_and_validation_set_metrics",
                  "finetuned_model_on_validation_set"]
    inputs = {"model_id": "some/model", "data_path": "example-support-dataset.json",
              "input_text_key": "question", "output_text_key": "gpt4_replies_target"}
    philo_dataflow.build_driver({"start": "base"}).validate_execution(final_vars, inputs=inputs)
    philo_dataflow.build_driver({"start": "presaved"}).validate_execution(
        final_vars, inputs={**inputs, "presaved_model_dir": "adapter"})


@pytest.mark.parametrize("start", ["base", "presaved"])
def test_a_driver_built_the_hamilton_way_resolves_every_final_variable(start):
    """``driver.Builder()`` with ``{"start": ...}`` and the stage modules alone: every switch left out takes
    its default inside the modules (``lib.switches``)."""
    from hamilton import driver

    dr = driver.Builder().with_config({"start": start}).with_modules(*philo_dataflow.MODULES).build()
    inputs = {"data_path": "d.jsonl", "presaved_model_dir": "adapter"}
    dr.validate_execution(list(philo_dataflow.FINAL_VARIABLES), inputs=inputs)
    from philo_dataflow.lib.switches import SWITCH_DEFAULTS

    nodes = {v.name for v in dr.list_available_variables()} - set(SWITCH_DEFAULTS)
    built = {v.name for v in philo_dataflow.build_driver({"start": start}).list_available_variables()}
    assert nodes == built - set(SWITCH_DEFAULTS)


def test_switch_parameters_default_to_the_switch_defaults():
    """A node that takes a switch's value as a parameter defaults it as the config does."""
    from philo_dataflow.lib.switches import SWITCH_DEFAULTS

    found = 0
    for module in philo_dataflow.MODULES:
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            for name, parameter in inspect.signature(fn).parameters.items():
                if name in SWITCH_DEFAULTS and fn.__module__ == module.__name__:
                    assert parameter.default == SWITCH_DEFAULTS[name], f"{fn.__name__}({name})"
                    found += 1
    assert found >= 4


def test_unknown_start_mode():
    with pytest.raises(ValueError, match="start='train'"):
        philo_dataflow.build_driver({"start": "train"})


def test_exactly_one_node_trains():
    callers = [
        name for module in philo_dataflow.MODULES for name, fn in inspect.getmembers(module, inspect.isfunction)
        if fn.__module__ == module.__name__ and ".train(" in inspect.getsource(fn)
    ]
    assert callers == ["trained_parameters__base"]
    dr = philo_dataflow.build_driver({"start": "base"})
    upstream = {n.name for n in dr.what_is_upstream_of("save_best_models", "hold_out_set_predictions")}
    assert {"trained_parameters", "fitted_and_evaluated_trainer"} <= upstream


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir):
    import json as _json

    from conftest import EXAMPLE_DATA

    work = tmp_path_factory.mktemp("run")
    rows = [_json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()]
    picked = [r for school in ("Stoicism", "Taoism", "Hedonism") for r in rows if r["school"] == school]
    data = work / "data.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in picked[::3]))
    inputs = {"data_path": str(data), "model_id": tiny_model_dir, "output_dir": str(work / "out"), **FAST_INPUTS}
    dr = philo_dataflow.build_driver({"start": "base"})
    outputs = [*philo_dataflow.DEFAULT_OUTPUTS, "finetuned_model", "training_and_validation_set_metrics",
               "finetuned_model_on_validation_set", "validation_set_metrics", "hold_out_set_predictions"]
    before = {n: p.detach().clone() for n, p in dr.execute(["peft_model"], inputs=inputs)["peft_model"].named_parameters()
              if "lora_B" in n}
    return {"inputs": inputs, "result": dr.execute(outputs, inputs=inputs), "lora_B_before": before, "work": work}


def test_the_hamilton_way_driver_gives_the_same_predictions(base_run, tmp_path):
    from hamilton import driver

    dr = driver.Builder().with_config({"start": "base"}).with_modules(*philo_dataflow.MODULES).build()
    inputs = {**base_run["inputs"], "output_dir": str(tmp_path / "out")}
    predictions = dr.execute(["hold_out_set_predictions"], inputs=inputs)["hold_out_set_predictions"]
    assert predictions == base_run["result"]["hold_out_set_predictions"]


def test_base_run_writes_every_output(base_run):
    out = Path(base_run["inputs"]["output_dir"])
    for name in ("metrics.json", "hold_out_predictions.jsonl", "hold_out_predictions.csv", "report.html",
                 "report.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/philo_dataflow_manifest.json",
                 "adapter/training_log_history.json", "adapter/tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("base", "finetuned"):
        assert set(metrics["hold_out"][model]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "eos_stop_rate"}
    assert metrics["validation"]["global_step"] == 2
    manifest = json.loads((out / "adapter/philo_dataflow_manifest.json").read_text())
    assert manifest["prompt_format"] == "chat_template"
    assert manifest["inputs"]["model_id"] == base_run["inputs"]["model_id"]
    assert len(manifest["data_sha256"]) == 64 and manifest["library_versions"]["transformers"]
    assert not list(out.glob(".*")), "temporary files left behind"
    rows = [json.loads(line) for line in (out / "hold_out_predictions.jsonl").read_text().splitlines()]
    assert {"question", "reference", "base_prediction", "finetuned_prediction"} <= set(rows[0])
    assert "validation loss" in (out / "report.html").read_text()


def test_lora_weights_moved_and_base_weights_frozen(base_run):
    # docs/pitfalls.md, "LoRA weights that never move": LoRA B starts at zero and must move after training.
    model = base_run["result"]["finetuned_model"]
    after = dict(model.named_parameters())
    moved = [n for n, before in base_run["lora_B_before"].items() if not torch.equal(before, after[n].detach())]
    assert moved and len(moved) == len(base_run["lora_B_before"])
    assert all(not p.requires_grad for n, p in after.items() if "lora_" not in n)


def test_reads_and_writes_are_hamilton_loaders_and_savers_with_their_metadata(base_run):
    """The data file is read by a ``@dataloader`` whose metadata is what the manifest records; every node
    that writes a file is a ``@datasaver`` reporting the bytes on disk."""
    import hashlib

    dr = philo_dataflow.build_driver({"start": "base", "judge": True})
    tags = {variable.name: variable.tags for variable in dr.list_available_variables()}
    assert tags["raw_records.loader"]["hamilton.data_loader.has_metadata"] is True
    writers = [name for name, value in philo_dataflow.dataflow._tagged_outputs() if value in ("default", "judge", "run")
               and name != "tracked_final_metrics"]
    assert len(writers) == 8 and all(tags[name].get("hamilton.data_saver") is True for name in writers), writers

    result, data = base_run["result"], Path(base_run["inputs"]["data_path"])
    manifest = json.loads(Path(result["save_best_models"]["adapter_dir"], "philo_dataflow_manifest.json").read_text())
    assert manifest["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    for name in ("saved_metrics", "saved_report", "saved_report_html", "saved_model_card"):
        written = Path(result[name]["path"])
        assert result[name]["bytes"] == written.stat().st_size > 0
        assert result[name]["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    adapter = result["save_best_models"]
    assert adapter["file_bytes"]["adapter_model.safetensors"] == (
        Path(adapter["adapter_dir"]) / "adapter_model.safetensors").stat().st_size
    predictions = result["saved_hold_out_predictions"]
    assert predictions["rows"] == len(result["hold_out_set_predictions"])
    assert [entry["bytes"] for entry in predictions["files"]] == [
        Path(predictions[kind]).stat().st_size for kind in ("jsonl", "csv")]


def test_presaved_reproduces_hold_out_predictions(base_run):
    inputs = {**base_run["inputs"], "presaved_model_dir": str(Path(base_run["inputs"]["output_dir"]) / "adapter"),
              "output_dir": str(base_run["work"] / "presaved")}
    inputs.pop("model_id")
    dr = philo_dataflow.build_driver({"start": "presaved"})
    result = dr.execute(["hold_out_set_predictions", "training_and_validation_set_metrics", "loss_curve_figure",
                         "save_best_models"], inputs=inputs)
    assert result["hold_out_set_predictions"] == base_run["result"]["hold_out_set_predictions"]
    loss_then = base_run["result"]["training_and_validation_set_metrics"]["validation"]["eval_loss"]
    assert result["training_and_validation_set_metrics"]["validation"]["eval_loss"] == pytest.approx(loss_then, rel=1e-5)
    assert len(result["loss_curve_figure"].data[0].x) > 0  # history read back from the adapter dir
    loaded = dr.execute(["presaved_log_history.loader"], inputs=inputs)["presaved_log_history.loader"]
    history_file = Path(inputs["presaved_model_dir"]) / "training_log_history.json"
    assert loaded[0] == json.loads(history_file.read_text()) and any("eval_loss" in entry for entry in loaded[0])
    assert loaded[1]["bytes"] == history_file.stat().st_size


def test_validation_generation_and_metrics(base_run):
    result = base_run["result"]
    predictions = result["finetuned_model_on_validation_set"]["validation_predictions"]
    assert len(predictions) == len(result["finetuned_model_on_validation_set"]["validation_references"])
    assert 0 <= result["validation_set_metrics"]["rougeL"] <= 1


def test_batched_greedy_equals_one_at_a_time(base_run, chat_tokenizer):
    # docs/pitfalls.md, "right-padded generation": left-padded batches give exactly the tokens of unbatched decoding.
    from philo_dataflow.lib.prompts import prompt_token_ids

    model = base_run["result"]["finetuned_model"]
    questions = ["What is Stoicism?", "In Taoism, what does wu wei ask of a ruler facing a crisis?", "Hedonism?",
                 "Why did Epicurus praise friendship above most pleasures, according to hedonists?"]
    prompts = [prompt_token_ids(chat_tokenizer, "chat_template", q) for q in questions]
    batched = generate_answers(model, chat_tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate_answers(model, chat_tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert [b["token_ids"] for b in batched] == [s["token_ids"] for s in single]
    longest = max(len(p) for p in prompts)
    budgeted = generate_answers(model, chat_tokenizer, prompts, max_new_tokens=12, batch_size=4,
                                token_budget=2 * (longest + 12))  # at most two rows per call
    assert [b["token_ids"] for b in budgeted] == [s["token_ids"] for s in single]


def test_token_budget_batches_keep_long_prompts_from_padding_short_ones():
    lengths = [2760, 40, 35, 2000, 50, 45]
    # 8 rows of at most 1,000 tokens each (prompt + 60 new): the two long prompts alone, the rest together.
    assert token_budget_batches(lengths, max_new_tokens=60, batch_size=8, token_budget=1000) == [[0], [3], [4, 5, 1, 2]]
    assert token_budget_batches(lengths, 60, batch_size=2, token_budget=10**6) == [[0, 3], [4, 5], [1, 2]]
    # (rows + 1) x (longest + new) is the test: 3 x (50 + 60) = 330 fits 330, a fourth row does not.
    assert token_budget_batches([50, 45, 40, 35], 60, 8, token_budget=330) == [[0, 1, 2], [3]]
    assert sorted(sum(token_budget_batches(lengths, 60, 3, 500), [])) == list(range(len(lengths)))


def test_prompt_token_budget_bounds_the_padded_prefill_without_splitting_short_prompts():
    # rows x longest prompt is the test: 2 x 3000 = 6000 fits 6000, a third row of a 3000-token batch does not.
    assert token_budget_batches([3000, 2900, 2800, 40, 30], 64, 32, token_budget=10**6, prompt_token_budget=6000) \
        == [[0, 1], [2, 3], [4]]
    # The defaults keep 32 prompts of up to 256 tokens with 160 new ones in one call, as before the prompt budget.
    assert token_budget_batches([256] * 32, 160, 32) == [list(range(32))]
    assert [len(b) for b in token_budget_batches([257] * 32, 160, 32)] == [31, 1]


def test_base_answers_come_from_the_same_weights_with_adapter_disabled(base_run, tiny_model_dir):
    logits = logits_against_base(base_run["result"]["finetuned_model"], tiny_model_dir)
    torch.testing.assert_close(logits["adapter_disabled"], logits["base"])
    assert not torch.allclose(logits["adapter_enabled"], logits["base"])
