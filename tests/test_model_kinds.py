"""Other model kinds than a decoder-only model with LoRA: an encoder-decoder (a tiny FLAN-T5-style T5,
config ``architecture="seq2seq"``) and full fine-tuning (a tiny GPT-NeoX, pythia's architecture, config
``finetuning_method="full"``). Each trains, saves, and re-answers the hold-out questions identically from
its saved output under ``start="presaved"``."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_DATA, FAST_INPUTS, example_subset
from safetensors import safe_open

import philo_dataflow
from philo_dataflow.testing import tiny_neox_model_dir, tiny_t5_model_dir

#: The generations compared between the base and the presaved run (token ids, not only decoded text).
GENERATIONS = ("base_model_hold_out_generations", "finetuned_model_hold_out_generations")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()]
    return tiny_t5_model_dir(tmp_path_factory.mktemp("tiny-t5"), [r["instruction"] for r in rows] +
                             [r["output"] for r in rows])


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, alpaca_tokenizer) -> str:
    return tiny_neox_model_dir(tmp_path_factory.mktemp("tiny-neox"), alpaca_tokenizer)


def _base_then_presaved(work: Path, model_dir: str, config: dict, extra_inputs: dict = None) -> tuple:
    data = example_subset(work / "data.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {"data_path": data, "model_id": model_dir, "output_dir": str(work / "base"), **FAST_INPUTS,
              **(extra_inputs or {})}
    outputs = [*philo_dataflow.DEFAULT_OUTPUTS, *GENERATIONS, "hold_out_set_predictions", "model_summary"]
    base = philo_dataflow.build_driver(
        philo_dataflow.resolved_config({"start": "base", "model_id": model_dir, **config})).execute(outputs, inputs=inputs)
    adapter = str(work / "base" / "adapter")
    presaved_inputs = {**inputs, "presaved_model_dir": adapter, "output_dir": str(work / "presaved")}
    presaved_inputs.pop("model_id")
    presaved_dr = philo_dataflow.build_driver(
        philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": adapter}))
    presaved = presaved_dr.execute([*GENERATIONS, "hold_out_set_predictions"], inputs=presaved_inputs)
    return base, presaved, Path(adapter)


def test_resolved_config_reads_the_architecture_off_the_model_and_build_driver_reads_no_file(t5_dir, tiny_model_dir):
    assert philo_dataflow.resolved_config({"model_id": t5_dir})["architecture"] == "seq2seq"
    assert philo_dataflow.resolved_config({"model_id": tiny_model_dir}) == {
        "start": "base", "judge": False, "finetuning_method": "lora", "architecture": "causal"}
    with pytest.raises(ValueError, match="config key 'model_id' names a model: build_driver reads no file"):
        philo_dataflow.build_driver({"model_id": t5_dir})
    with pytest.raises(ValueError, match="config finetuning_method='qlora'"):
        philo_dataflow.build_driver({"finetuning_method": "qlora"})


@pytest.mark.parametrize("config", [
    {"architecture": "seq2seq"}, {"architecture": "seq2seq", "finetuning_method": "full"},
    {"finetuning_method": "full"},
])
@pytest.mark.parametrize("start", ["base", "presaved"])
def test_every_final_variable_resolves(config, start):
    dr = philo_dataflow.build_driver({"start": start, **config})
    dr.validate_execution(list(philo_dataflow.FINAL_VARIABLES),
                          inputs={"data_path": "d.jsonl", "presaved_model_dir": "adapter"})


def test_the_causal_graph_refuses_an_encoder_decoder_model_with_the_fix(t5_dir, tmp_path):
    dr = philo_dataflow.build_driver({"start": "base", "architecture": "causal"})
    with pytest.raises(ValueError, match="is an encoder-decoder model .*architecture='seq2seq'"):
        dr.execute(["base_model"], inputs={"model_id": t5_dir})


def test_seq2seq_lora_trains_saves_and_presaved_reanswers_identically(t5_dir, tmp_path, one_torch_thread):
    base, presaved, adapter = _base_then_presaved(tmp_path, t5_dir, {})
    manifest = json.loads((adapter / "philo_dataflow_manifest.json").read_text())
    assert (manifest["architecture"], manifest["finetuning_method"], manifest["prompt_format"]) == ("seq2seq", "lora", "plain")
    assert manifest["lora_config"]["task_type"] == "SEQ_2_SEQ_LM"
    # LoRA sits on T5's own attention names (q, k, v, o), in the encoder and the decoder
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    for part in ("encoder", "decoder"):
        for projection in ("q", "k", "v", "o"):
            assert any(f"{part}." in n and f"SelfAttention.{projection}.lora_A" in n for n in names), (part, projection)
    assert base["model_summary"]["trainable_share"] < 0.5
    for name in GENERATIONS:
        assert [g["token_ids"] for g in presaved[name]] == [g["token_ids"] for g in base[name]]
        # the decoder start token is not part of an answer: an answer that did not stop has max_new_tokens
        assert all(len(g["token_ids"]) == FAST_INPUTS["max_new_tokens"] for g in base[name] if not g["ended_on_eos"])
    assert presaved["hold_out_set_predictions"] == base["hold_out_set_predictions"]


def test_full_fine_tuning_saves_the_whole_model_and_keeps_base_answers_from_the_base_weights(neox_dir, tmp_path,
                                                                                          one_torch_thread):
    base, presaved, saved = _base_then_presaved(tmp_path, neox_dir, {"finetuning_method": "full"},
                                                {"learning_rate": 1e-3})
    assert (saved / "model.safetensors").is_file() and not (saved / "adapter_config.json").exists()
    manifest = json.loads((saved / "philo_dataflow_manifest.json").read_text())
    assert (manifest["finetuning_method"], manifest["lora_config"], manifest["prompt_format"]) == ("full", None, "alpaca")
    assert base["model_summary"]["trainable_share"] == 1.0
    # every weight moved; the base answers come from the untouched base weights
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(neox_dir)
    tuned = AutoModelForCausalLM.from_pretrained(saved)
    moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert len(moved) == len(list(tuned.named_parameters()))
    for name in GENERATIONS:
        assert [g["token_ids"] for g in presaved[name]] == [g["token_ids"] for g in base[name]]
    assert presaved["hold_out_set_predictions"] == base["hold_out_set_predictions"]
