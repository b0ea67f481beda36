"""The chat page (``run.py chat``) in real headless Chromium: served by its own command in a subprocess on
the tiny LoRA run, asked one question, its two streamed answers checked against the library's own
generation, a hold-out example picked by category, and no request leaving 127.0.0.1. Bad input is one
``error:`` line and exit code 2."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import docs_screenshot, external_requests, headless_chromium, screenshot
from conftest import REPO
from judge_servers import free_port, stop_process

#: Bound on every wait for the page (server start, answers).
WAIT_S = 90
QUESTION = "What is the good life?"
#: Greedy decoding that forbids repeating a token: the tiny random model's plain greedy answer is newlines
#: only, which strip to nothing; with this it is deterministic gibberish in both panes.
SETTINGS = {"no_repeat_ngram_size": 1}


def _serve(model_dir: str, port: int, log_path: Path) -> subprocess.Popen:
    """``run.py chat``'s entry point in a subprocess, as a user starts it."""
    command = [sys.executable, "-c", "import sys; from philo_dataflow.cli import chat; sys.exit(chat.main(sys.argv[1:]))",
               "--model-dir", model_dir, "--port", str(port)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_served(server: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the chat server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the chat page did not answer within {WAIT_S} s:\n{log_path.read_text()[-3000:]}")


def _expected_answers(model_dir: str, questions: list[str]) -> list[tuple[str, str]]:
    """The base and fine-tuned answers to each question by ``lib.generation.generate_answers`` (the run's own
    prediction code) with the run's max_new_tokens and ``SETTINGS``, from the models loaded directly with PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from philo_dataflow.lib.generation import GREEDY, generate_answers
    from philo_dataflow.lib.prompts import prompt_token_ids

    manifest = json.loads((Path(model_dir) / "philo_dataflow_manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(manifest["inputs"]["model_id"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, model_dir).eval()
    prompts = [prompt_token_ids(tokenizer, manifest["prompt_format"], question) for question in questions]
    settings = {**{name: manifest["inputs"][name] for name in GREEDY}, **SETTINGS}
    assert not settings["do_sample"]
    max_new_tokens = manifest["inputs"]["max_new_tokens"]
    with model.disable_adapter():
        base_answers = generate_answers(model, tokenizer, prompts, max_new_tokens, 1, settings=settings)
    finetuned_answers = generate_answers(model, tokenizer, prompts, max_new_tokens, 1, settings=settings)
    return [(b["text"], f["text"]) for b, f in zip(base_answers, finetuned_answers)]


def _answers_when_done(browser) -> tuple:
    """The two panes' texts once the status line says both answers are complete, else None."""
    if not browser.find_element("css selector", "#status").text.startswith("Done"):
        return None
    return _text_of(browser, "base-answer"), _text_of(browser, "finetuned-answer")


def _text_of(browser, elem_id: str) -> str:
    return browser.find_element("css selector", f"#{elem_id} textarea").get_attribute("value")


def _replace_value(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text, Keys.TAB)


def _choose(browser, elem_id: str, option_text: str) -> None:
    """Opens the Gradio dropdown ``elem_id`` and clicks its option ``option_text``."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element("css selector", f"#{elem_id} input").click()
    option = WebDriverWait(browser, 10).until(lambda b: next(
        (item for item in b.find_elements("css selector", f"#{elem_id} [role=option], ul.options [role=option]")
         if item.text.strip() == option_text), None))
    option.click()


def test_chat_page_streams_both_answers_and_offers_hold_out_examples(tiny_run_dir, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir = str(Path(tiny_run_dir) / "adapter")
    port, log_path = free_port(), tmp_path / "chat_server.log"
    hold_out = [json.loads(line) for line in (Path(tiny_run_dir) / "hold_out_predictions.jsonl").read_text().splitlines()]
    category = hold_out[-1]["category"]  # not the dropdown's first: picking it changes the listed questions
    example = next(row for row in hold_out if row["category"] == category)
    server = _serve(model_dir, port, log_path)
    try:
        typed, picked = _expected_answers(model_dir, [QUESTION, example["question"]])  # while the server starts
        assert all(typed) and all(picked)
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(server, url, log_path)
        with headless_chromium() as browser:
            browser.get(url)
            wait = WebDriverWait(browser, WAIT_S)
            question = wait.until(lambda b: b.find_element("css selector", "#question textarea"))
            assert "the category is not part of the prompt" in browser.find_element("tag name", "body").text
            assert browser.find_element("css selector", "#setting-max_new_tokens input").get_attribute("value") == "8"
            for name, value in SETTINGS.items():
                _replace_value(browser.find_element("css selector", f"#setting-{name} input"), str(value))

            question.send_keys(QUESTION)
            browser.find_element("css selector", "#ask").click()
            assert wait.until(_answers_when_done) == typed, browser.find_element("css selector", "#status").text

            _choose(browser, "category", category)
            _choose(browser, "example", example["question"])
            wait.until(lambda b: _text_of(b, "question") == example["question"])
            assert _text_of(browser, "reference") == example["reference"]
            browser.find_element("css selector", "#ask").click()
            wait.until(lambda b: _answers_when_done(b) == picked)

            assert external_requests(browser) == []
            screenshot(browser, tmp_path / "chat.png")
            docs_screenshot(browser, "chat.png")
    finally:
        stop_process(server)


def test_full_finetuning_run_streams_base_then_finetuned_answer(tiny_run_dir, tiny_model_dir, tmp_path):
    """A full fine-tuning run (its manifest says so; here the tiny model with perturbed weights) gets its
    base answers from the base model loaded separately; the answers stream, the base one first, and end
    equal to ``generate_answers``'."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from philo_dataflow import chat
    from philo_dataflow.lib.generation import GREEDY, generate_answers
    from philo_dataflow.lib.prompts import prompt_token_ids

    adapter = Path(tiny_run_dir) / "adapter"
    model_dir = tmp_path / "adapter"
    torch.manual_seed(1)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tuned.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (adapter / name).is_file():
            shutil.copy(adapter / name, model_dir / name)
    manifest = json.loads((adapter / "philo_dataflow_manifest.json").read_text())
    manifest["finetuning_method"] = "full"
    manifest.pop("lora_config", None)
    (model_dir / "philo_dataflow_manifest.json").write_text(json.dumps(manifest))

    models = chat.load_chat_models(str(model_dir))
    assert models.base_answer_model is not models.finetuned_model
    assert type(models.finetuned_model).__name__ == "LlamaForCausalLM"
    steps = list(chat.stream_answers(models, QUESTION, SETTINGS))
    base_only = [base for base, finetuned, _ in steps if not finetuned]
    assert len(set(base_only)) > 2, steps  # streamed in pieces, the base answer first
    assert steps[-1][2].startswith(chat.DONE)

    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = prompt_token_ids(models.tokenizer, manifest["prompt_format"], QUESTION)
    settings = {**{name: manifest["inputs"][name] for name in GREEDY}, **SETTINGS}
    expected = tuple(generate_answers(model, models.tokenizer, [prompt], manifest["inputs"]["max_new_tokens"], 1,
                                      settings=settings)[0]["text"] for model in (fresh_base, tuned))
    assert steps[-1][:2] == expected and expected[0] != expected[1]

    with pytest.raises(ValueError, match="empty"):
        next(chat.stream_answers(models, "  ", SETTINGS))
    with pytest.raises(ValueError, match="temperature"):
        next(chat.stream_answers(models, QUESTION, {"temperature": 0.0}))


def test_prompt_template_fields_round_trip():
    from philo_dataflow import chat

    template = "### Question:\n{question}\n\n### School: {school}\n\n### Answer:"
    values = {"question": "What is the Tao?\nSay it briefly.", "school": "Taoism"}
    assert chat.template_fields(template) == ["question", "school"]
    assert chat.template_values(template, chat.rendered_question(template, values)) == values
    assert chat.template_values(template, "What is the Tao?") is None
    assert chat.rendered_question(None, {"question": "Why?"}) == "Why?"
    assert chat.template_fields(None) == ["question"]


@pytest.mark.parametrize("case", ["missing directory", "directory without manifest", "port in use"])
def test_bad_input_is_one_error_line(case, tiny_run_dir, tmp_path, capsys):
    import socket

    from philo_dataflow.cli import chat

    model_dir, flag = {"missing directory": (tmp_path / "nowhere", "--model-dir"),
                       "directory without manifest": (tmp_path, "--model-dir"),
                       "port in use": (Path(tiny_run_dir) / "adapter", "--port")}[case]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert chat.main(["--model-dir", str(model_dir), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    named = str(port) if flag == "--port" else str(model_dir)
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} ") and named in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
