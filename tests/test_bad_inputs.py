"""The bad-input corpus (tests/bad_inputs/cases.py): every case through the library preflight, through
``run.main`` in-process (exit code 2, one ``error:`` line per problem) and, where the dataflow checks
the same input, through ``dr.execute``; none may write anything."""

import contextlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from bad_inputs.cases import ACCEPTED, CASES, GOOD, JUDGE_MODELS, UNSET_KEY_VARIABLE, Case, Env
from bad_inputs.commands import COMMAND_CASES
from conftest import small_filesystem
from judge_servers import FaultyJudgeServer, free_port

import philo_dataflow
from philo_dataflow import cli, preflight
from philo_dataflow.lib.artifacts import MANIFEST_FILE
from philo_dataflow.testing import tree


def _save_adapter(model, tokenizer_dir: str, target: Path, model_id: str) -> str:
    """A presaved adapter directory as save_best_models lays it out (untrained: only its files matter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    peft_model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    manifest = {"inputs": {"model_id": model_id, "data_path": GOOD}, "prompt_format": "chat_template"}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(target)


#: Why ``Env.small_filesystem`` is None, when it is.
_NO_SMALL_FILESYSTEM = []


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    adapter = _save_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_model_dir, root / "adapter",
                            tiny_model_dir)
    wider = LlamaConfig.from_pretrained(tiny_model_dir, hidden_size=48, intermediate_size=96)
    other = _save_adapter(LlamaForCausalLM(wider), tiny_model_dir, root / "other-adapter", tiny_model_dir)
    with contextlib.ExitStack() as stack:
        try:
            small = str(stack.enter_context(small_filesystem(root / "small", 3 * 2**20)))
        except pytest.skip.Exception as reason:
            small = None
            _NO_SMALL_FILESYSTEM.append(str(reason))
        server = stack.enter_context(FaultyJudgeServer(listed_models=JUDGE_MODELS))
        yield Env(tiny_model=tiny_model_dir, adapter=adapter, other_adapter=other, judge_url=server.base_url,
                  closed_url=f"http://127.0.0.1:{free_port()}/v1", small_filesystem=small)


@pytest.fixture(autouse=True)
def _no_judge_key(monkeypatch):
    monkeypatch.delenv(UNSET_KEY_VARIABLE, raising=False)


def _skip_if_not_applicable(case, env: Env) -> None:
    if getattr(case, "needs_non_root", False) and os.geteuid() == 0:
        pytest.skip("running as root, which reads and writes whatever a file's permissions say")
    if getattr(case, "needs_no_cuda", False) and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    if case.needs_small_filesystem and env.small_filesystem is None:
        pytest.skip(_NO_SMALL_FILESYSTEM[0] if _NO_SMALL_FILESYSTEM else "no small filesystem")


def _inputs(case: Case, env: Env, work: Path) -> dict:
    inputs = case.inputs(env, work)
    if case.start == "base":
        inputs.setdefault("model_id", env.tiny_model)
    inputs.setdefault("output_dir", str(work / "out"))
    return inputs


def _argv(case: Case, inputs: dict) -> list:
    argv = ["--start", case.start, "--no-graph"]
    for name, value in inputs.items():
        if isinstance(value, bool):
            argv.append(preflight.flag(name) if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [preflight.flag(name), str(value)]
    return argv + (["--overwrite"] if case.overwrite else []) + list(case.cli_extra)


def _assert_matches(problems: list, expected: tuple) -> None:
    """Exactly one problem per expected entry, each holding all of that entry's substrings."""
    wanted = [(entry,) if isinstance(entry, str) else entry for entry in expected]
    assert len(problems) == len(wanted), "\n".join(problems)
    unmatched = list(problems)
    for parts in wanted:
        hit = next((problem for problem in unmatched if all(part in problem for part in parts)), None)
        assert hit is not None, f"no problem holds {parts}; problems:\n" + "\n".join(problems)
        unmatched.remove(hit)


def test_corpus_is_large_and_named_uniquely():
    ids = [case.id for case in CASES + ACCEPTED]
    assert len(CASES) >= 30 and len(set(ids)) == len(ids)
    assert max(len(case.expected) for case in CASES) >= 5  # several problems reported at once


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_fails_with_its_message_and_writes_nothing(case, env, tmp_path, capsys, monkeypatch):
    _skip_if_not_applicable(case, env)
    for name, value in case.environment:
        monkeypatch.setenv(name, value)
    inputs = _inputs(case, env, tmp_path)
    before = tree(tmp_path)

    if not case.cli_only:
        problems = preflight.check_run_inputs(inputs, case.start, case.overwrite)
        messages = [problem.message for problem in problems]
        _assert_matches(messages, case.expected)
        assert all("\n" not in message for message in messages)
        with pytest.raises(ValueError) as raised:
            preflight.preflight(inputs, case.start, case.overwrite)
        assert isinstance(raised.value, preflight.InputProblems) and str(raised.value).splitlines() == messages

    assert cli.main(_argv(case, inputs)) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), stderr
    _assert_matches([line[len("error: "):] for line in lines], case.expected)

    if env.small_filesystem:
        assert list(Path(env.small_filesystem).iterdir()) == [], "a refused run wrote files"
    if case.graph:
        first = case.expected[0]
        expected = case.graph_expected or (first if isinstance(first, str) else first[0])
        with pytest.raises(ValueError, match=re.escape(expected)):
            philo_dataflow.build_driver({"start": case.start}).execute(list(case.graph), inputs=inputs)
    assert tree(tmp_path) == before, "a failed run wrote or changed files"


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.id)
def test_odd_but_right_input_passes_the_preflight(case, env, tmp_path):
    inputs = _inputs(case, env, tmp_path)
    before = tree(tmp_path)
    assert [problem.message for problem in preflight.check_run_inputs(inputs, case.start, case.overwrite)] == []
    assert tree(tmp_path) == before


def test_bom_and_duplicates_load_as_the_plain_file():
    from bad_inputs.cases import data

    from philo_dataflow.stages.loading import instruction_records, raw_records

    plain = instruction_records(raw_records(GOOD)[0], GOOD, None)
    assert instruction_records(raw_records(data("bom.jsonl"))[0], "x", None) == plain
    assert instruction_records(raw_records(data("good_with_duplicates.jsonl"))[0], "x", None) == plain


@pytest.mark.parametrize("settings", [{"learning_rate": -1.0}, {"learning_rate": -1.0, "warmup_ratio": 2.0, "max_steps": 0}])
def test_dataflow_without_preflight_raises_the_preflights_lines_for_trainer_settings(settings, tmp_path):
    expected = [problem.message for problem in preflight.hyperparameter_problems(settings)]
    with pytest.raises(ValueError) as raised:
        philo_dataflow.build_driver({"start": "base"}).execute(["training_args"], inputs={
            "output_dir": str(tmp_path), **settings})
    assert expected and str(raised.value).splitlines() == expected


def test_trainer_node_raises_the_preflights_line_for_early_stopping_patience():
    expected = [problem.message for problem in preflight.hyperparameter_problems({"early_stopping_patience": 0})]
    placeholders = {name: None for name in ("trainable_model", "training_args", "data_collator", "tokenized_train",
                                            "tokenized_validation", "tokenizer")}
    with pytest.raises(ValueError) as raised:
        philo_dataflow.build_driver({"start": "base"}).execute(["trainer"], inputs={"early_stopping_patience": 0},
                                                               overrides=placeholders)
    assert expected and str(raised.value).splitlines() == expected


@pytest.mark.parametrize("output", ["finetuned_model_hold_out_generations", "base_model_hold_out_generations",
                                    "validation_predictions"])
def test_generation_nodes_raise_the_preflights_lines_before_generating(output):
    settings = {"max_new_tokens": 0, "generation_batch_size": -2}
    expected = [problem.message for problem in preflight.hyperparameter_problems(settings)]
    # Nothing is generated: the models, data and prompts given are placeholders the check never reaches.
    placeholders = {name: None for name in ("finetuned_model", "tokenizer", "hold_out_set", "validation_set",
                                            "hold_out_prompt_ids", "validation_prompt_ids")}
    with pytest.raises(ValueError) as raised:
        philo_dataflow.build_driver({"start": "base"}).execute(
            [output], inputs=settings, overrides={**placeholders, "prompt_format": "chat_template"})
    assert len(expected) == 2 and str(raised.value).splitlines() == expected


@pytest.mark.parametrize("case", COMMAND_CASES, ids=lambda case: case.id)
def test_bad_subcommand_input_is_one_line_per_problem_and_writes_nothing(case, env, tmp_path, capsys):
    _skip_if_not_applicable(case, env)
    argv = case.argv(env, tmp_path)
    small = Path(env.small_filesystem) if env.small_filesystem else tmp_path
    before, adapter_before, small_before = tree(tmp_path), tree(Path(env.adapter)), tree(small)
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), lines
    _assert_matches([line[len("error: "):] for line in lines], case.expected)
    assert tree(tmp_path) == before and tree(Path(env.adapter)) == adapter_before, "a refused command wrote files"
    assert tree(small) == small_before, "a refused command wrote files"
