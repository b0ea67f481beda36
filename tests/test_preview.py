"""``philo-dataflow preview``: the data as a new run trains on it, shown before any training, with the
tokens that carry loss marked; refused (exit 2) where an answer would not teach the model to stop.
Its bad-input cases are in ``tests/bad_inputs/commands.py``; each data format's preview is in
``tests/test_data_formats.py``."""

import re
from pathlib import Path

import pytest
from conftest import EXAMPLE_DATA

from philo_dataflow import cli
from philo_dataflow.lib.supervision import BRACKETS, COLOUR, IGNORE_INDEX, marked_text, supervised_spans, supervision_problems
from philo_dataflow.testing import tree

EOS = "<|im_end|>"


def _preview(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main(["preview", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_spans_are_the_runs_of_supervised_labels():
    labels = [IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8, 9]
    assert supervised_spans(labels) == [(2, 4), (5, 8)]
    assert supervised_spans([IGNORE_INDEX] * 3) == []
    assert marked_text(lambda ids: "".join(map(str, ids)), [1, 2, 5, 6, 3, 7, 8, 9], labels, ("<", ">")) == "12<56>3<789>"


def test_a_span_without_eos_and_an_example_without_supervision_are_problems():
    eos = 9
    problems = supervision_problems("train_set", [[IGNORE_INDEX, 4, eos], [IGNORE_INDEX, 4, 5], [IGNORE_INDEX] * 2,
                                                  [IGNORE_INDEX, 4, IGNORE_INDEX, 5, eos]], [0, 1, 2, 3], eos, "</s>")
    assert len(problems) == 3
    assert problems[0].startswith("train_set record 1: its answer does not end on the EOS token '</s>'")
    assert problems[1].startswith("train_set record 2: no token carries loss")
    assert problems[2].startswith("train_set record 3: answer turn(s) 1 does not end on the EOS token")


def test_preview_of_the_example_data(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """The split, the counts and the first examples, each answer marked up to and including its EOS; no
    model weights loaded, nothing written."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the preview loaded model weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.chdir(tmp_path)
    status, out, err = _preview(capsys, "--model-id", tiny_model_dir, "--examples", "2")
    assert status == 0, err
    assert f"data {EXAMPLE_DATA}: 306 records, 306 examples" in out
    assert re.search(r"total\s+252\s+27\s+27", out)
    assert re.search(r"Stoicism\s+28\s+3\s+3", out)
    assert "near-duplicate groups (content-word Jaccard >= 0.8): 0" in out
    assert re.search(r"train\s+252 examples, +\d+ tokens \(\d+ carry loss\)", out)
    examples = out.split("\n--- ")[1:]
    assert len(examples) == 2 and examples[0].startswith("train_set record 0")
    for example in examples:
        # the prompt (system and user turns, the assistant marker) carries no loss; the answer ends on EOS
        assert example.count(BRACKETS[0]) == 1 and f"{EOS}{BRACKETS[1]}" in example
        assert example.index("<|im_start|>assistant") < example.index(BRACKETS[0])
    assert tree(tmp_path) == {}


def test_preview_colours_on_request_and_brackets_when_piped(capsys, tiny_model_dir):
    status, out, _ = _preview(capsys, "--model-id", tiny_model_dir, "--examples", "1", "--color", "always")
    assert status == 0 and COLOUR[0] in out and f"{EOS}{COLOUR[1]}" in out and BRACKETS[0] not in out
    status, out, _ = _preview(capsys, "--model-id", tiny_model_dir, "--examples", "1")  # captured: not a terminal
    assert status == 0 and COLOUR[0] not in out and BRACKETS[0] in out


def test_preview_of_a_question_template_marks_the_answer_after_it(capsys, tiny_model_dir):
    data = Path(__file__).parent / "data_formats" / "question_answer.jsonl"
    template = "### Question:\n{question}\n\n### Answer:\n"
    status, out, err = _preview(capsys, "--data-path", str(data), "--prompt-template", template, "--output-text-key",
                                "answer", "--model-id", tiny_model_dir, "--examples", "1", "--split", "hold_out")
    assert status == 0, err
    assert "prompt format template" in out
    example = out.split("\n--- ")[1]
    assert example.startswith("hold_out_set record 0")
    assert re.search(r"### Answer:\n\[\[.+" + re.escape(EOS + BRACKETS[1]), example, re.S)


@pytest.mark.parametrize("argv, message", [
    (["--max-seq-length", "24", "--overlong-policy", "error"], "--max-seq-length"),
    (["--set", "start=presaved"], "the preview shows the data a new run trains on"),
])
def test_preview_refuses_in_one_line_each(argv, message, capsys, tiny_model_dir, tmp_path):
    status, _, err = _preview(capsys, "--model-id", tiny_model_dir, *argv)
    lines = err.strip().splitlines()
    assert status == 2 and lines and all(line.startswith("error: ") for line in lines), err
    assert any(message in line for line in lines), err
