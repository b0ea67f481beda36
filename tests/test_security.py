"""Security: pickle weights and custom model code load only when asked for; names taken from the data
never become paths, and nothing is written outside the output directory; the manifest records the
data path as given; the Docker image runs as a non-root user.

API-key hygiene (a canary key never reaches outputs, logs or error text) is tested in
``test_judging.py::test_api_key_never_reaches_outputs_logs_or_errors``."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_DATA, FAST_INPUTS, REPO
from judge_servers import FaultyJudgeServer
from transformers import AutoModelForCausalLM

import philo_dataflow
from philo_dataflow.stages import modeling
from philo_dataflow.lib import model_sources
from philo_dataflow.lib.artifacts import MANIFEST_FILE
from philo_dataflow.stages.modeling import base_model, tokenizer__base

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


# --- pickle weights ------------------------------------------------------------------------------

@pytest.fixture
def pickle_model_dir(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with its weights as ``pytorch_model.bin`` (a pickle) instead of safetensors."""
    from safetensors.torch import load_file

    directory = tmp_path / "pickle-model"
    shutil.copytree(tiny_model_dir, directory)
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


def test_pickle_model_weights_load_only_with_allow_pickle(pickle_model_dir, tiny_model_dir):
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: it is a pickle file.*allow_pickle=True \(--allow-pickle\)"):
        base_model(str(pickle_model_dir), AutoModelForCausalLM, CPU)
    # The preflight says the same; transformers 5 always saves safetensors, so no safe_serialization advice.
    (message,) = model_sources.model_source_problems(str(pickle_model_dir))
    assert "allow_pickle=True (--allow-pickle)" in message and "save_pretrained" in message
    assert "safe_serialization" not in message
    loaded = base_model(str(pickle_model_dir), AutoModelForCausalLM, CPU, allow_pickle=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, got), (_, expected) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(got, expected), name


def test_pickle_adapter_loads_only_with_allow_pickle(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    adapter_dir = tmp_path / "adapter"
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    torch.nn.init.normal_(trained.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    trained.save_pretrained(adapter_dir, safe_serialization=False)  # PEFT still writes adapter_model.bin
    assert {p.name for p in adapter_dir.iterdir()} >= {"adapter_model.bin", "adapter_config.json"}
    manifest = {"inputs": {"model_id": tiny_model_dir}, "prompt_format": "chat_template"}
    (adapter_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    dr = philo_dataflow.build_driver({"start": "presaved"})
    with pytest.raises(ValueError, match=r"adapter_model\.bin: it is a pickle file.*--allow-pickle"):
        dr.execute(["peft_model"], inputs={"presaved_model_dir": str(adapter_dir)})
    loaded = dr.execute(["peft_model"], inputs={"presaved_model_dir": str(adapter_dir), "allow_pickle": True})["peft_model"]
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert torch.equal(dict(loaded.named_parameters())[name], dict(trained.named_parameters())[name])


def test_cli_re_evaluates_a_pickle_adapter_only_with_allow_pickle(tmp_path, tiny_model_dir, small_jsonl, capsys):
    """``run.py --start presaved`` on a directory holding only ``adapter_model.bin``: the preflight refuses
    it naming the flag, and accepts it with ``--allow-pickle`` (as the library's loader does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from philo_dataflow import cli

    adapter_dir = tmp_path / "adapter"
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    trained.save_pretrained(adapter_dir, safe_serialization=False)  # PEFT still writes adapter_model.bin
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter_dir)
    assert not list(adapter_dir.glob("*.safetensors"))
    manifest = {"inputs": {"model_id": tiny_model_dir, "data_path": small_jsonl, **FAST_INPUTS},
                "prompt_format": "chat_template"}
    (adapter_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    argv = ["--start", "presaved", "--presaved-model-dir", str(adapter_dir), "--output-dir", str(tmp_path / "out"),
            "--outputs", "hold_out_set_predictions", "--no-graph", "--max-new-tokens", "2"]

    assert cli.main(argv) == 2
    assert "adapter_model.bin: it is a pickle file" in capsys.readouterr().err
    assert cli.main([*argv, "--allow-pickle"]) == 0, capsys.readouterr().err


# --- custom model code -----------------------------------------------------------------------------

@pytest.fixture
def custom_code_model_dir(tmp_path, tiny_model_dir) -> Path:
    """A model directory whose config maps to its own Python module, which leaves a marker file when
    it is imported (that is, when the directory's code runs)."""
    directory = tmp_path / "custom-code-model"
    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="custom_lm", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                    "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    config.pop("architectures", None)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(tmp_path / 'custom-code-ran')!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_lm'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return directory


def test_custom_model_code_is_refused_without_trust_remote_code(custom_code_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"custom model code.*trust_remote_code=True \(--trust-remote-code\)"):
        base_model(str(custom_code_model_dir), AutoModelForCausalLM, CPU)
    assert not (tmp_path / "custom-code-ran").exists()


def test_trust_remote_code_is_off_unless_asked_and_passed_through_when_asked(tiny_model_dir, monkeypatch):
    """What ``from_pretrained`` receives (spied, so no custom code runs in the test process)."""
    received = []
    for loader in (modeling.AutoModelForCausalLM, modeling.AutoTokenizer):
        original = loader.from_pretrained.__func__

        def spy(cls, *args, _original=original, **kwargs):
            received.append((cls.__name__, kwargs.get("trust_remote_code"), kwargs.get("use_safetensors", "n/a")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(loader, "from_pretrained", classmethod(spy))
    tokenizer__base(tiny_model_dir)
    base_model(tiny_model_dir, AutoModelForCausalLM, CPU)
    assert received == [("AutoTokenizer", False, "n/a"), ("AutoModelForCausalLM", False, True)]
    received.clear()
    tokenizer__base(tiny_model_dir, trust_remote_code=True)
    base_model(tiny_model_dir, AutoModelForCausalLM, CPU, allow_pickle=True, trust_remote_code=True)
    assert received == [("AutoTokenizer", True, "n/a"), ("AutoModelForCausalLM", True, None)]


def test_cli_flags_for_pickle_and_remote_code_are_off_unless_given():
    from philo_dataflow.cli import job as run

    parser = run.build_parser()
    unset = run.run_inputs("base", run.resolved_settings(parser.parse_args([]))["given"])
    assert unset.keys().isdisjoint({"allow_pickle", "trust_remote_code"})
    given = run.run_inputs("base", run.resolved_settings(parser.parse_args(["--allow-pickle", "--trust-remote-code"]))["given"])
    assert given["allow_pickle"] is True and given["trust_remote_code"] is True


# --- names from the data never become paths -------------------------------------------------------

#: Category values that would escape the output directory if a file name were built from them.
HOSTILE_CATEGORIES = ("../../evil", "/etc/x", "a/b", "..")


def _listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def test_nothing_is_written_outside_the_output_dir_whatever_the_data_names(tmp_path, tiny_model_dir, monkeypatch):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()][:24]
    for index, row in enumerate(rows):
        row["school"] = HOSTILE_CATEGORIES[index % len(HOSTILE_CATEGORIES)]
    (work / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(work)  # relative paths, as a user gives them
    before = _listing(tmp_path)
    with FaultyJudgeServer() as server:
        inputs = {**FAST_INPUTS, "data_path": "data/qa.jsonl", "model_id": tiny_model_dir, "output_dir": "out",
                  "hold_out_fraction": 0.25, "judge_model": "ok", "judge_base_url": server.base_url,
                  "judge_response_format": "json_schema"}
        result = philo_dataflow.build_driver({"start": "base", "judge": True}).execute(
            [*philo_dataflow.DEFAULT_OUTPUTS, *philo_dataflow.JUDGE_OUTPUTS, "hold_out_set"], inputs=inputs)
    assert set(result["hold_out_set"]["category"]) == set(HOSTILE_CATEGORIES)  # they reached every stage

    new = _listing(tmp_path) - before
    assert new and all(path.startswith("work/out") for path in new), sorted(p for p in new if not p.startswith("work/out"))
    names = {Path(path).name for path in new}
    assert not [n for n in names if n in ("evil", "x", "b") or "etc" in n], names
    expected = re.compile(r"(out|adapter|checkpoints|checkpoint-\d+|judge_cache|[0-9a-f]{2}|[0-9a-f]{64}\.json"
                          r"|[\w.-]+\.(json|jsonl|csv|html|md|safetensors|jinja|bin|pt|pth))$")
    assert not [n for n in names if not expected.fullmatch(n)], sorted(n for n in names if not expected.fullmatch(n))
    # The data path is recorded as given: relative stays relative.
    manifest = json.loads((work / "out" / "adapter" / MANIFEST_FILE).read_text())
    assert manifest["inputs"]["data_path"] == "data/qa.jsonl"
    assert json.loads((work / "out" / "metrics.json").read_text())["data_path"] == "data/qa.jsonl"


# --- Docker image ------------------------------------------------------------------------------------

def test_docker_image_runs_as_a_non_root_user():
    instructions = [line.split(None, 1) for line in (REPO / "Dockerfile").read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    keywords = [parts[0].upper() for parts in instructions]
    users = [parts[1].strip() for parts in instructions if parts[0].upper() == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert max(i for i, k in enumerate(keywords) if k == "USER") < keywords.index("ENTRYPOINT")
    assert not [parts for parts in instructions if parts[0].upper() in ("ENV", "ARG") and re.search(
        r"(KEY|TOKEN|SECRET|PASSWORD)", parts[1], re.IGNORECASE)], "no credentials baked into the image"
