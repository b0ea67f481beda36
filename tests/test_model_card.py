"""The model card a run writes beside its adapter (``stages.report.model_card``, ``saved_model_card``): its
metadata and verdict equal ``metrics.json``, it names no path of the training machine (nor does
``adapter_config.json``), and its loading snippet, followed on a copy of the adapter under another HOME,
answers the hold-out questions as the run did."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from huggingface_hub import ModelCard

from philo_dataflow.lib.artifacts import ADAPTER_DIR, MANIFEST_FILE, METRICS_FILE, PREDICTIONS_JSONL_FILE
from philo_dataflow.lib.formatting import fmt
from philo_dataflow.stages import report


def _card(run_dir: str) -> str:
    return (Path(run_dir) / ADAPTER_DIR / "README.md").read_text(encoding="utf-8")


def test_the_card_carries_the_runs_verdict_and_no_machine_path(tiny_run_dir, tiny_model_dir):
    text = _card(tiny_run_dir)
    metrics = json.loads((Path(tiny_run_dir) / METRICS_FILE).read_text())
    hold_out = metrics["hold_out"]
    card = ModelCard(text)
    assert card.data.base_model == Path(tiny_model_dir).name  # a local base, by the name it had
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {"ROUGE-L F-measure, base": hold_out["base"]["rougeL"],
                       "ROUGE-L F-measure, fine-tuned": hold_out["finetuned"]["rougeL"]}
    difference = hold_out["rougeL_difference"]
    assert (f"| ROUGE-L (F-measure, 0–1) | {fmt(hold_out['base']['rougeL'])} | {fmt(hold_out['finetuned']['rougeL'])} | "
            f"{difference['mean']:+.3f} [{difference['ci95_low']:+.3f}, {difference['ci95_high']:+.3f}] |") in text
    outcomes = hold_out["rougeL_outcomes"]
    assert f"wins {outcomes['wins']}, ties {outcomes['ties']} and loses {outcomes['losses']}" in text
    for category, counts in outcomes["per_category"].items():
        assert f"| {category} | {hold_out['per_category'][category]['base']['count']} |" in text
        assert "{wins} / {ties} / {losses} |".format(**counts) in text
    assert "[More Information Needed]" not in text  # not PEFT's blank template
    adapter_config = (Path(tiny_run_dir) / ADAPTER_DIR / "adapter_config.json").read_text()
    assert json.loads(adapter_config)["base_model_name_or_path"] == Path(tiny_model_dir).name
    for machine_path in {str(Path(tiny_model_dir).parent), str(Path(tiny_run_dir).parent), os.path.expanduser("~"),
                         "/tmp/"}:
        assert machine_path not in text and machine_path not in adapter_config, machine_path


def test_the_cards_snippet_answers_as_the_run_did_on_another_machine(tiny_run_dir, tiny_model_dir, tmp_path):
    """The adapter copied elsewhere, another HOME and caches, the base model where the card says (a
    directory of its name): the snippet's ``answer`` gives the run's fine-tuned hold-out answers."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(Path(tiny_run_dir) / ADAPTER_DIR, elsewhere / "my-adapter")
    shutil.copytree(tiny_model_dir, elsewhere / Path(tiny_model_dir).name)
    code = re.search(r"```python\n(.*?)```", _card(tiny_run_dir), re.S).group(1)
    assert 'model_dir = "path/to/this/directory"' in code
    code = code.replace('"path/to/this/directory"', '"my-adapter"')
    rows = [json.loads(line) for line in (Path(tiny_run_dir) / PREDICTIONS_JSONL_FILE).read_text().splitlines()]
    code += ("\nimport json, sys\n"
             "print(json.dumps([answer(q) for q in json.loads(sys.stdin.read())]))\n")
    home = tmp_path / "home"
    home.mkdir()
    environment = {"PATH": os.environ["PATH"], "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
                   "PHILO_DATAFLOW_CACHE": str(home / "philo"), "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", code], input=json.dumps([r["question"] for r in rows]), text=True,
                             capture_output=True, cwd=elsewhere, env=environment, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    answers = json.loads(process.stdout.strip().splitlines()[-1])
    assert answers == [r["finetuned_prediction"] for r in rows]
    assert any(answers), "the run's answers should hold words, or this check is weak"


def test_a_fully_fine_tuned_models_card_loads_the_directory_itself(tiny_run_dir):
    metrics = json.loads((Path(tiny_run_dir) / METRICS_FILE).read_text())
    manifest = json.loads((Path(tiny_run_dir) / ADAPTER_DIR / MANIFEST_FILE).read_text())
    text = report.model_card(metrics, {**manifest, "finetuning_method": "full", "lora_config": None})
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "model = AutoModelForCausalLM.from_pretrained(model_dir).eval()" in code
    assert "PeftModel" not in code and "base =" not in code
    assert ModelCard(text).data.library_name == "transformers" and "full-fine-tuning" in ModelCard(text).data.tags


def test_a_judged_runs_card_carries_the_judges_results(tiny_run_dir):
    from test_report_page import _fake_judge_metrics

    metrics = json.loads((Path(tiny_run_dir) / METRICS_FILE).read_text())
    manifest = json.loads((Path(tiny_run_dir) / ADAPTER_DIR / MANIFEST_FILE).read_text())
    text = report.model_card({**metrics, "judge": _fake_judge_metrics()}, manifest)
    assert "## LLM judge" in text and "wins 67%" in text and "(2 / 1 / 0)" in text
    assert "## LLM judge" not in report.model_card(metrics, manifest)


def test_an_encoder_decoder_runs_card_prompts_the_encoder_with_the_question(tiny_run_dir):
    metrics = json.loads((Path(tiny_run_dir) / METRICS_FILE).read_text())
    manifest = json.loads((Path(tiny_run_dir) / ADAPTER_DIR / MANIFEST_FILE).read_text())
    text = report.model_card(metrics, {**manifest, "architecture": "seq2seq", "prompt_format": "plain"})
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "AutoModelForSeq2SeqLM.from_pretrained" in code and 'tokenizer(question, return_tensors="pt")' in code
    assert "tokenizer.decode(output[0], skip_special_tokens=True)" in code and "PROMPT_TEMPLATE" not in code
    assert ModelCard(text).data.pipeline_tag == "text2text-generation"
