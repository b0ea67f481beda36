"""Export (``run.py export``): the LoRA adapter merged into fp32 base weights answers with the adapter's very
token ids (a merged model that answers differently is a known PEFT failure, peft#1388, peft#2502), the
GGUF copy made by llama.cpp's own converter answers with the merged model's ids through llama-cpp-python,
the Ollama Modelfile carries the prompt format, full fine-tuning exports the model itself, and bad input
is one line and writes nothing.

The adapter checked is the tiny run's with its LoRA B matrices made large, so that it changes the answers
(after a few tiny training steps it barely moves them, and identical ids would prove nothing)."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST_INPUTS, example_subset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import philo_dataflow
from philo_dataflow.stages import saving
from philo_dataflow.cli import export
from philo_dataflow.lib import gguf_export
from philo_dataflow.lib.scores import has_loop
from philo_dataflow.lib.generation import generate_answers
from philo_dataflow.lib.prompts import prompt_token_ids
from philo_dataflow.testing import tree

#: Largest absolute logit difference accepted between the adapter and the merged model, and between the
#: merged model and its f32 GGUF copy; both measure about 2e-7 on the tiny model (logits up to ~1).
LOGIT_TOLERANCE = 1e-5
needs_converter = pytest.mark.skipif(gguf_export.converter_missing() is not None,
                                     reason=f"no GGUF converter: {gguf_export.converter_missing()}")
needs_llama_cpp = pytest.mark.skipif(gguf_export.llama_cpp_missing() is not None, reason="no llama-cpp-python")


def _export(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def strong_run(tiny_run_dir, tmp_path_factory) -> Path:
    """A run directory holding a copy of the tiny run's adapter with LoRA B drawn from N(0, 0.1)."""
    run = tmp_path_factory.mktemp("strong-run")
    shutil.copytree(Path(tiny_run_dir) / "adapter", run / "adapter")
    weights = run / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(tensor.shape, generator=generator) * 0.1 if "lora_B" in name else tensor
               for name, tensor in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return run


@pytest.fixture(scope="module")
def lora_export(strong_run) -> dict:
    """``run.py export --model-dir <run>/adapter`` (default output dir: the run's), with its output."""
    adapter = strong_run / "adapter"
    before = tree(adapter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = _export(["--model-dir", str(adapter)])
    finally:
        torch.set_num_threads(threads)
    return {"code": code, "out": out, "err": err, "adapter_before": before, "merged": strong_run / "merged",
            "report": json.loads((strong_run / "merged" / "export_report.json").read_text())}


@pytest.fixture(scope="module")
def hold_out(strong_run, tmp_path_factory) -> dict:
    """The run's hold-out prompts (token ids), tokenizer and adapter model, made here without the export."""
    adapter = strong_run / "adapter"
    inputs = export._inputs(str(adapter), str(tmp_path_factory.mktemp("unused")))
    dr = philo_dataflow.build_driver(
        philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": str(adapter)}))
    values = dr.execute(["hold_out_set", "tokenizer", "prompt_format"], inputs=inputs)
    tokenizer = values["tokenizer"]
    prompts = [prompt_token_ids(tokenizer, values["prompt_format"], question)
               for question in values["hold_out_set"]["input_text"]]
    base_id = json.loads((adapter / "philo_dataflow_manifest.json").read_text())["inputs"]["model_id"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), str(adapter)).eval()
    return {"prompts": prompts, "tokenizer": tokenizer, "adapter_model": model,
            "max_new_tokens": inputs["max_new_tokens"]}


def _greedy_ids(model, hold_out: dict) -> list[list[int]]:
    answers = generate_answers(model, hold_out["tokenizer"], hold_out["prompts"], hold_out["max_new_tokens"], 32)
    return [answer["token_ids"] for answer in answers]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (len(ids), vocab)


def test_export_writes_a_plain_merged_model_and_leaves_the_adapter_untouched(lora_export, strong_run):
    assert lora_export["code"] == 0, lora_export["err"][-2000:]
    merged = lora_export["merged"]
    names = {path.name for path in merged.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json",
            "export_report.json", "export_report.md"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert not [name for name in names if name.startswith(".")]  # no temporary file left
    generation = json.loads((merged / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["max_new_tokens"]) == (False, FAST_INPUTS["max_new_tokens"])
    assert tree(strong_run / "adapter") == lora_export["adapter_before"]
    assert f"{merged}/" in lora_export["out"] and "identical token ids on 6 of 6" in lora_export["out"]


def test_merged_model_answers_with_the_adapters_token_ids(lora_export, hold_out):
    adapter = hold_out["adapter_model"]
    merged = AutoModelForCausalLM.from_pretrained(lora_export["merged"]).eval()  # plain transformers, no PEFT
    adapter_ids = _greedy_ids(adapter, hold_out)
    assert _greedy_ids(merged, hold_out) == adapter_ids
    with adapter.disable_adapter():
        base_ids = _greedy_ids(adapter, hold_out)
    assert sum(a != b for a, b in zip(adapter_ids, base_ids)) >= len(adapter_ids) - 1  # the adapter matters
    largest = moved = 0.0
    for prompt, answer in zip(hold_out["prompts"], adapter_ids):
        ids = prompt + answer
        adapted = _logits(adapter, ids)
        largest = max(largest, (adapted - _logits(merged, ids)).abs().max().item())
        with adapter.disable_adapter():
            moved = max(moved, (adapted - _logits(adapter, ids)).abs().max().item())
    assert largest < LOGIT_TOLERANCE < moved / 1000
    report = lora_export["report"]["merged_model"]
    assert report["identical_token_ids"] == report["questions"] == len(adapter_ids)
    assert report["first_divergences"] == [] and report["max_abs_logit_difference"] < LOGIT_TOLERANCE


def test_merging_leaves_the_adapter_model_and_its_base_weights_untouched(strong_run, tiny_model_dir, tmp_path,
                                                                        one_torch_thread):
    adapter = strong_run / "adapter"
    dr = philo_dataflow.build_driver(
        philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": str(adapter)}))
    values = dr.execute(["merged_model", "finetuned_model"], inputs=export._inputs(str(adapter), str(tmp_path)))
    tuned, merged = values["finetuned_model"], values["merged_model"]
    lora_layers = [m for m in tuned.modules() if hasattr(m, "lora_A")]
    assert lora_layers and not any(m.merged for m in lora_layers)  # the adapter model was not merged in place
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    with tuned.disable_adapter():
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in tuned.state_dict().items()
                if "lora_" not in n}
    assert base.keys() == fresh.keys() and all(torch.equal(base[n], fresh[n]) for n in fresh)
    assert not any("lora_" in n for n in merged.state_dict())
    assert not all(torch.equal(merged.state_dict()[n], fresh[n]) for n in fresh)


@needs_converter
@needs_llama_cpp
def test_gguf_copy_answers_with_the_merged_models_token_ids(lora_export, hold_out):
    import llama_cpp

    gguf = lora_export["merged"] / "model.gguf"
    assert gguf_export.gguf_metadata(gguf)["pre_tokenizer"] == "smollm"  # SmolLM2's BPE pre-tokenizer recognised
    merged = AutoModelForCausalLM.from_pretrained(lora_export["merged"]).eval()
    merged_ids = _greedy_ids(merged, hold_out)
    tokenizer, prompts = hold_out["tokenizer"], hold_out["prompts"]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        # llama.cpp's own tokenizer reads the rendered prompts as transformers does
        assert [llm.tokenize(tokenizer.decode(p).encode(), add_bos=False, special=True) for p in prompts] == prompts
        gguf_ids = [gguf_export.greedy_continuation(llm, p, hold_out["max_new_tokens"], tokenizer.eos_token_id)
                    for p in prompts]
        largest = max(
            float(abs(_logits(merged, p + a).numpy() - gguf_export.gguf_logits(llm, p + a)).max())
            for p, a in zip(prompts, merged_ids))
    finally:
        llm.close()
    assert gguf_ids == merged_ids
    assert largest < LOGIT_TOLERANCE
    report = lora_export["report"]["gguf"]
    assert (report["status"], report["outtype"], report["architecture"]) == ("ok", "f32", "llama")
    assert report["identical_token_ids"] == report["questions"] == gguf_export.GGUF_CHECKED_QUESTIONS
    assert report["max_abs_logit_difference"] < LOGIT_TOLERANCE
    assert "identical greedy token ids on 5 of 5 questions" in lora_export["out"]


@needs_converter
def test_modelfile_carries_the_chatml_template_and_its_stop_token(lora_export):
    assert (lora_export["merged"] / "Modelfile").read_text() == (
        "# Ollama Modelfile of the exported model (philo_dataflow): ollama create NAME -f Modelfile\n"
        "FROM ./model.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        "PARAMETER temperature 0\n"
        "# the run decoded with no_repeat_ngram_size=4, which llama.cpp and Ollama lack; repeat_penalty 1.1 keeps "
        "answers from looping instead\n"
        "PARAMETER repeat_penalty 1.1\n"
    )


def test_modelfile_of_the_alpaca_and_template_formats(alpaca_tokenizer):
    greedy = {"do_sample": False}
    alpaca = gguf_export.modelfile_text(alpaca_tokenizer, "alpaca", None, greedy, "model.gguf")
    assert ('TEMPLATE """Below is an instruction that describes a task. Write a response that appropriately '
            'completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n"""') in alpaca
    assert f'PARAMETER stop "{alpaca_tokenizer.eos_token}"' in alpaca
    template = gguf_export.modelfile_text(alpaca_tokenizer, "template", "### Q {{{{x}}}}:\n{question}\n### A:", greedy,
                                          "model.gguf")
    assert 'TEMPLATE """### Q {{ "{{" }}x{{ "}}" }}:\n{{ .Prompt }}\n### A:"""' in template


def test_without_a_converter_the_gguf_step_says_how_to_get_it_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_export.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(gguf_export, "CONVERTER_DIR", tmp_path / "no-converter")
    before = tree(tmp_path)
    result = saving.saved_gguf_model({"merged_dir": str(tmp_path)}, "FROM ./model.gguf\n", "causal")
    assert result["status"] == "skipped" and "run `bash setup.sh`" in result["reason"]
    assert str(tmp_path / "no-converter") in result["reason"] and "\n" not in result["reason"]
    monkeypatch.setenv(gguf_export.CONVERTER_ENV, str(tmp_path / "elsewhere"))
    reason = saving.saved_gguf_model({"merged_dir": str(tmp_path)}, "", "causal")["reason"]
    assert reason.startswith(f"{gguf_export.CONVERTER_ENV}='{tmp_path / 'elsewhere'}' names no convert_hf_to_gguf.py")
    assert tree(tmp_path) == before


@needs_converter
def test_a_model_the_converter_cannot_convert_is_one_line_and_leaves_no_file(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    (tmp_path / "merged" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    before = tree(tmp_path)
    result = saving.saved_gguf_model({"merged_dir": str(tmp_path / "merged")}, "FROM ./model.gguf\n", "causal")
    assert result["status"] == "failed" and "\n" not in result["reason"]
    assert result["reason"].startswith("llama.cpp's convert_hf_to_gguf.py failed on ") and "NoSuchForCausalLM" in result["reason"]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("make", ["missing", "no_manifest"])
def test_bad_model_dir_is_one_error_line_and_writes_nothing(tmp_path, make):
    model_dir = tmp_path / "adapter"
    if make == "no_manifest":
        model_dir.mkdir()
        (model_dir / "adapter_config.json").write_text("{}")
    before = tree(tmp_path)
    code, out, err = _export(["--model-dir", str(model_dir), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"error: --model-dir {model_dir}: ") and "<output_dir>/adapter" in line
    assert tree(tmp_path) == before


def test_gguf_questions_below_one_is_one_error_line(tmp_path):
    code, out, err = _export(["--model-dir", str(tmp_path), "--gguf-questions", "0"])
    assert (code, out, err) == (2, "", "error: --gguf-questions 0: give at least 1 (default 5), or --no-gguf for no "
                                       "GGUF file.\n")


def test_export_outputs_stay_out_of_the_default_run_and_resolve_under_every_config():
    assert set(philo_dataflow.EXPORT_OUTPUTS) == {"export_report", "saved_merged_model", "saved_gguf_model",
                                                  "saved_quantized_gguf_models", "saved_merged_model_card",
                                                  "saved_export_report"}
    assert set(philo_dataflow.EXPORT_OUTPUTS).isdisjoint(philo_dataflow.FINAL_VARIABLES)
    for start in ("base", "presaved"):
        for method in ("lora", "full"):
            dr = philo_dataflow.build_driver({"start": start, "finetuning_method": method})
            dr.validate_execution(list(philo_dataflow.EXPORT_OUTPUTS),
                                  inputs={"data_path": "d.jsonl", "presaved_model_dir": "adapter"})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_alpaca_model_dir) -> Path:
    """A finished tiny full fine-tuning run (the tiny Llama without a chat template: the alpaca prompt): its
    ``output_dir``."""
    work = tmp_path_factory.mktemp("full-run")
    data = example_subset(work / "data.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {**FAST_INPUTS, "data_path": data, "model_id": tiny_alpaca_model_dir, "output_dir": str(work / "run"),
              "learning_rate": 1e-3, "torch_compile": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        philo_dataflow.build_driver({"start": "base", "finetuning_method": "full"}).execute(
            ["save_best_models"], inputs=inputs)
    finally:
        torch.set_num_threads(threads)
    return work / "run"


def test_full_fine_tuning_exports_the_model_itself(full_run, tmp_path, one_torch_thread):
    code, out, err = _export(["--model-dir", str(full_run / "adapter"), "--output-dir", str(tmp_path),
                              "--gguf-questions", "2"])
    assert code == 0, err[-2000:]
    merged = tmp_path / "merged"
    saved, exported = load_file(full_run / "adapter" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[n], exported[n]) for n in saved)
    report = json.loads((merged / "export_report.json").read_text())
    assert (report["finetuning_method"], report["merge"]) == ("full", "the fully fine-tuned model itself")
    assert report["merged_model"]["identical_share"] == 1.0
    assert report["merged_model"]["max_abs_logit_difference"] == 0.0
    assert AutoTokenizer.from_pretrained(merged).chat_template is None
    if gguf_export.converter_missing() is None and gguf_export.llama_cpp_missing() is None:
        gguf = report["gguf"]
        assert (gguf["status"], gguf["architecture"], gguf["questions"]) == ("ok", "llama", 2)
        assert gguf["identical_token_ids"] == 2 and gguf["max_abs_logit_difference"] < LOGIT_TOLERANCE
        assert "### Instruction:\n{{ .Prompt }}\n\n### Response:" in (merged / "Modelfile").read_text()


def test_no_gguf_writes_the_merged_model_only(full_run, tmp_path, one_torch_thread):
    code, out, err = _export(["--model-dir", str(full_run / "adapter"), "--output-dir", str(tmp_path), "--no-gguf"])
    assert code == 0, err[-2000:]
    names = {path.name for path in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and not names & {"model.gguf", "Modelfile"}
    report = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert report["gguf"] == {"status": "skipped", "reason": "--no-gguf"}
    assert "GGUF skipped: --no-gguf" in out


@pytest.fixture(scope="module")
def quantized_export(strong_run, tmp_path_factory) -> dict:
    """``export --quantize q8_0,q4_k_m`` of the strong run into another output directory."""
    out = tmp_path_factory.mktemp("quantized")
    code, printed, err = _export(["--model-dir", str(strong_run / "adapter"), "--output-dir", str(out),
                                  "--quantize", "q8_0,q4_k_m", "--gguf-questions", "2"])
    return {"code": code, "out": printed, "err": err, "merged": out / "merged",
            "report": json.loads((out / "merged" / "export_report.json").read_text())}


@needs_converter
@needs_llama_cpp
def test_quantized_gguf_copies_are_made_offline_and_scored_against_the_f32_file(quantized_export, strong_run,
                                                                                tmp_path):
    from gguf import GGUFReader

    assert quantized_export["code"] == 0, quantized_export["err"][-2000:]
    merged, report = quantized_export["merged"], quantized_export["report"]["gguf_files"]
    f32 = merged / "model.gguf"
    files = {"q8_0": merged / "model.q8_0.gguf", "q4_k_m": merged / "model.q4_k_m.gguf"}
    # llama.cpp's file types: 7 is MOSTLY_Q8_0, 15 MOSTLY_Q4_K_M.
    for (name, path), file_type in zip(files.items(), (7, 15)):
        field = GGUFReader(str(path)).fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == file_type, name
        assert path.stat().st_size < f32.stat().st_size
    assert not [p for p in merged.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert report["status"] == "ok" and [row["type"] for row in report["files"]] == ["f32", "q8_0", "q4_k_m"]
    rows = {row["type"]: row for row in report["files"]}
    assert rows["f32"]["identical_share"] == 1.0 and "rougeL_difference" not in rows["f32"]
    # Read back: each file answers the run's hold-out questions again, as the report says it did.
    adapter = str(strong_run / "adapter")
    inputs = export._inputs(adapter, str(tmp_path))
    dr = philo_dataflow.build_driver(philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": adapter}))
    hold_out_set = dr.execute(["hold_out_set"], inputs=inputs)["hold_out_set"]
    questions = list(hold_out_set["input_text"])
    assert report["questions"] == len(questions)
    answers = {name: gguf_export.gguf_answers(str(path), questions, list(hold_out_set["context"]),
                                              inputs["max_new_tokens"], False, 42)[0]
               for name, path in {"f32": f32, **files}.items()}
    for name in files:
        row = rows[name]
        assert row["bytes"] == files[name].stat().st_size and row["new_tokens_per_second"] > 0
        same = sum(a["text"] == b["text"] for a, b in zip(answers[name], answers["f32"])) / len(questions)
        assert row["identical_share"] == pytest.approx(same)
        for key in ("rougeL", "eos_stop_rate", "loop_rate"):
            difference = row[f"{key}_difference"]
            assert difference["ci95_low"] - 1e-12 <= difference["mean"] <= difference["ci95_high"] + 1e-12
            assert difference["mean"] == pytest.approx(row[key] - rows["f32"][key], abs=1e-12)
    # The run decoded with no_repeat_ngram_size=4: each file answers again with the Modelfile's repeat_penalty.
    penalised, _ = gguf_export.gguf_answers(str(files["q4_k_m"]), questions, list(hold_out_set["context"]),
                                            inputs["max_new_tokens"], False, 42, gguf_export.NO_REPEAT_STAND_IN)
    with_penalty = rows["q4_k_m"]["with_repeat_penalty"]
    assert with_penalty["repeat_penalty"] == gguf_export.NO_REPEAT_STAND_IN == 1.1
    assert with_penalty["loop_rate"] == pytest.approx(sum(map(has_loop, (g["text"] for g in penalised))) / len(questions))
    assert all("with_repeat_penalty" in row for row in rows.values())
    page = (merged / "export_report.html").read_text()
    assert 'id="gguf-files"' in page and "model.q4_k_m.gguf (q4_k_m)" in page and "Chat template parity" in page
    markdown = (merged / "export_report.md").read_text()
    assert "| `model.q4_k_m.gguf` (q4_k_m) |" in markdown and "| `model.q4_k_m.gguf` (q4_k_m) |" in quantized_export["out"]


@needs_converter
@needs_llama_cpp
def test_the_gguf_chat_template_gives_the_training_prompts_and_stops_at_the_end_of_turn(lora_export, hold_out,
                                                                                      strong_run, tmp_path):
    parity = lora_export["report"]["chat_parity"]
    assert parity["status"] == "ok" and parity["first_mismatches"] == []
    assert parity["identical_prompts"] == parity["questions"] == len(hold_out["prompts"])
    assert parity["stops_on_end_of_turn"] is True and parity["end_of_turn"] == "<|im_end|>"
    # Rendered here again by the file's own template, as llama-cpp-python's chat completion renders them.
    adapter = str(strong_run / "adapter")
    dr = philo_dataflow.build_driver(philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": adapter}))
    hold_out_set = dr.execute(["hold_out_set"], inputs=export._inputs(adapter, str(tmp_path)))["hold_out_set"]
    rendered = gguf_export.gguf_prompts(str(lora_export["merged"] / "model.gguf"), list(hold_out_set["input_text"]),
                                        list(hold_out_set["context"]), False)
    assert rendered["prompts"] == hold_out["prompts"] and rendered["prompt_format"] == "chat_template"
    assert "Chat template parity" in (lora_export["merged"] / "export_report.md").read_text()


def test_chat_parity_is_not_claimed_for_a_model_trained_without_its_chat_template():
    from philo_dataflow.stages import exporting

    parity = exporting.gguf_chat_parity({"status": "ok", "gguf": "never-read.gguf"}, None, [], None, "alpaca")
    assert parity["status"] == "not_applicable" and "Alpaca prompt" in parity["reason"]
    assert "raw completion" in gguf_export.chat_parity_line(parity)


@needs_converter
@needs_llama_cpp
def test_the_merged_directory_gets_the_runs_card_with_its_own_loading_and_the_gguf_figures(quantized_export):
    from huggingface_hub import ModelCard

    text = (quantized_export["merged"] / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and {"merged", "philo_dataflow"} <= set(card.data.tags)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "AutoModelForCausalLM.from_pretrained(model_dir)" in code and "PeftModel" not in code
    assert "## Verdict" in text and "Chat template parity" in text and "PARAMETER" not in code
    assert text.index("## How to load it") < text.index("```python") < text.index("## This directory")
    assert "| `model.q8_0.gguf` (q8_0) |" in text and "repeat_penalty 1.1" in text
    assert "/tmp/" not in text


@needs_converter
@needs_llama_cpp
def test_the_export_page_opens_offline_with_the_gguf_files_table(quantized_export):
    from browser import external_requests, headless_chromium
    from selenium.webdriver.common.by import By

    with headless_chromium() as browser:
        browser.get((quantized_export["merged"] / "export_report.html").resolve().as_uri())
        rows = browser.find_elements(By.CSS_SELECTOR, "#gguf-files tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == [
            "model.gguf (f32)", "model.q8_0.gguf (q8_0)", "model.q4_k_m.gguf (q4_k_m)"]
        assert external_requests(browser) == []
