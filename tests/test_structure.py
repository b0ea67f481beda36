"""The house's structure: the exact nodes of each config, one table of inputs behind every signature
default, --help and the README, config files in and out, and imports that go one way."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST_INPUTS, REPO, cli_flags

import philo_dataflow
from philo_dataflow import cli
from philo_dataflow.cli import job as run
from philo_dataflow.lib.inputs import BY_NAME, DRIVER_INPUTS, INPUTS, REQUIRED, markdown_table

#: Every node of ``build_driver({"start": "base"})``: a helper that turns into a node shows up here.
BASE_NODES = {
    "raw_records", "raw_records.loader", "data_source", "prompt_template_in_use", "instruction_records", "records_left_out", "data_splits", "train_set", "validation_set",
    "hold_out_set",
    "near_duplicate_groups", "split_summary", "prompt_format", "tokenized_train", "tokenized_validation",
    "tokenized_hold_out", "tokenization_stats", "device", "base_model_id", "tokenizer", "base_model", "lora_config",
    "model_context_window", "max_seq_length_in_use", "hold_out_prompt_ids", "validation_prompt_ids",
    "peft_model", "model_class", "trainable_model", "base_answer_model", "generation_settings", "overlong_records",
    "model_summary", "bf16_autocast", "compile_decoder_layers", "training_args", "data_collator", "trainer",
    "resume_checkpoint_dir", "fitted_and_evaluated_trainer", "fit_trainer", "fit_trainer_eval_metrics",
    "finetuned_model", "training_log_history", "base_model_hold_out_generations",
    "finetuned_model_hold_out_generations", "hold_out_set_predictions", "finetuned_model_on_validation_set",
    "validation_predictions", "validation_references", "hold_out_set_metrics", "validation_set_metrics",
    "training_and_validation_set_metrics", "judge_results", "loss_curve_figure", "learning_rate_figure",
    "answer_length_figure", "rouge_comparison_figure",
    "run_metrics", "report_markdown", "report_html", "run_manifest", "save_best_models", "saved_hold_out_predictions",
    "saved_metrics", "saved_report", "saved_report_html", "saved_run_config", "tracked_final_metrics", "model_card",
    "saved_model_card",
} | {  # exporting (run.py export), and its files
    "merged_model", "hold_out_prompts", "merged_model_hold_out_generations", "merged_model_agreement", "ollama_modelfile",
    "gguf_checked_questions", "gguf_agreement", "export_report", "export_report_markdown", "saved_merged_model",
    "saved_gguf_model", "saved_export_report", "quantization_types", "gguf_files_report", "saved_quantized_gguf_models",
    "gguf_chat_parity", "run_model_card", "merged_model_card", "saved_merged_model_card",
    "export_report_html",
}
#: The nodes ``judge=True`` adds.
JUDGE_NODES = {
    "judge_client", "judge_cache", "resolved_judge_response_format", "judge_request", "rubric_judgments", "pairwise_judgments",
    "judge_settings", "judge_metrics", "judge_comparison_figure", "saved_judgments",
}
#: The nodes ``start="presaved"`` adds: the data loaders of the adapter's manifest and log history.
PRESAVED_NODES = {"presaved_manifest", "presaved_manifest.loader", "presaved_log_history", "presaved_log_history.loader",
                  "run_model_card.loader"}
#: The nodes only ``start="base"`` has: the one that trains.
BASE_ONLY_NODES = {"trained_parameters"}
CONFIG_KEYS = {"start", "judge", "finetuning_method", "architecture"}


def _graph(start: str, judge: bool) -> tuple[set, set]:
    variables = philo_dataflow.build_driver({"start": start, "judge": judge}).list_available_variables()
    nodes = {v.name for v in variables if not v.is_external_input}
    inputs = {v.name for v in variables if v.is_external_input} - CONFIG_KEYS
    return nodes, inputs


@pytest.mark.parametrize("start", ["base", "presaved"])
@pytest.mark.parametrize("judge", [False, True])
def test_each_config_has_exactly_its_nodes_and_only_documented_inputs(start, judge):
    nodes, inputs = _graph(start, judge)
    expected = BASE_NODES | (JUDGE_NODES if judge else set()) | (PRESAVED_NODES if start == "presaved" else BASE_ONLY_NODES)
    assert nodes == expected
    assert inputs <= set(BY_NAME), f"inputs missing from lib.inputs.INPUTS: {sorted(inputs - set(BY_NAME))}"
    assert ("presaved_model_dir" in inputs) is (start == "presaved")
    assert ("model_id" in inputs) is (start == "base")
    assert bool({n for n in inputs if n.startswith("judge_")}) is judge


#: The nodes only LoRA has: full fine-tuning trains (a copy of) the base model itself.
LORA_NODES = {"lora_config", "peft_model"}


@pytest.mark.parametrize("start", ["base", "presaved"])
@pytest.mark.parametrize("method, architecture", [("lora", "seq2seq"), ("full", "causal"), ("full", "seq2seq")])
def test_model_kinds_swap_variants_and_drop_only_the_lora_nodes(start, method, architecture):
    variables = philo_dataflow.build_driver({"start": start, "finetuning_method": method,
                                             "architecture": architecture}).list_available_variables()
    nodes = {v.name for v in variables if not v.is_external_input}
    expected = BASE_NODES | (PRESAVED_NODES if start == "presaved" else BASE_ONLY_NODES)
    assert nodes == (expected - LORA_NODES if method == "full" else expected)


def test_every_table_input_is_an_input_of_some_graph_or_of_the_driver():
    used = set().union(*(_graph(start, judge)[1] for start in ("base", "presaved") for judge in (False, True)))
    assert set(BY_NAME) - set(DRIVER_INPUTS) == used
    assert set(DRIVER_INPUTS) == {"hamilton_ui_url", "hamilton_ui_project", "hamilton_ui_user"}


def _node_functions():
    for module in philo_dataflow.MODULES:
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ == module.__name__ and not name.startswith("_"):
                yield module, name, function


def test_every_signature_default_is_the_tables_default():
    checked = 0
    for module, name, function in _node_functions():
        for parameter in inspect.signature(function).parameters.values():
            if parameter.default is inspect.Parameter.empty or parameter.name not in BY_NAME:
                continue
            spec = BY_NAME[parameter.name]
            assert not spec.required and parameter.default == spec.default and type(parameter.default) is type(spec.default), (
                f"{module.__name__}.{name}({parameter.name}={parameter.default!r}): the table says {spec.default!r}")
            checked += 1
    assert checked >= 40  # seed alone has defaults in five nodes


def test_every_defaulted_node_parameter_is_in_the_table():
    """A parameter with a default is an input, or a config switch defaulted as ``lib.switches`` says (no
    default hides a helper's argument)."""
    from philo_dataflow.lib.switches import SWITCH_DEFAULTS

    for module, name, function in _node_functions():
        for parameter in inspect.signature(function).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.name in BY_NAME or parameter.name in SWITCH_DEFAULTS, (
                    f"{module.__name__}.{name}: {parameter.name} is not in lib.inputs.INPUTS")


def test_stage_modules_define_no_helpers_but_private_ones():
    """Every public function of a stage module is a node of some config."""
    makers = {
        function for start in ("base", "presaved") for judge in (False, True) for method in ("lora", "full")
        for architecture in ("causal", "seq2seq")
        for variable in philo_dataflow.build_driver({"start": start, "judge": judge, "finetuning_method": method,
                                                     "architecture": architecture}).list_available_variables()
        for function in (variable.originating_functions or ())
    }
    for module, name, function in _node_functions():
        assert function in makers, f"{module.__name__}.{name} is public but makes no node"


def test_help_shows_every_input_with_its_default():
    text = " ".join(run.build_parser().format_help().split())
    for spec in INPUTS:
        if not spec.cli:
            assert spec.flag not in text
            continue
        assert f"{spec.flag} " in text or f"{spec.flag}," in text or f"[{spec.flag}" in text, spec.flag
        assert f"{' '.join(spec.help.split())} (default: {spec.shown()})" in text, spec.name


def test_guide_inputs_table_is_the_tables():
    guide = (REPO / "docs" / "guide.md").read_text(encoding="utf-8")
    assert markdown_table() in guide


def test_output_lists_come_from_the_tags():
    assert philo_dataflow.DEFAULT_OUTPUTS == (
        "tracked_final_metrics", "save_best_models", "saved_model_card", "saved_hold_out_predictions", "saved_metrics",
        "saved_report", "saved_report_html")
    assert philo_dataflow.JUDGE_OUTPUTS == ("saved_judgments",)
    assert philo_dataflow.RUN_OUTPUTS == ("saved_run_config",)
    assert philo_dataflow.EXPORT_OUTPUTS == ("export_report", "saved_merged_model", "saved_gguf_model",
                                             "saved_quantized_gguf_models", "saved_merged_model_card",
                                             "saved_export_report")
    assert set(philo_dataflow.DEFAULT_OUTPUTS) < set(philo_dataflow.FINAL_VARIABLES)
    assert {"hold_out_set_predictions", "training_and_validation_set_metrics", "finetuned_model_on_validation_set",
            "tokenized_hold_out", "fit_trainer"} < set(philo_dataflow.FINAL_VARIABLES)
    assert "validation_predictions" not in philo_dataflow.FINAL_VARIABLES  # tag_outputs tags one field only


def test_no_import_cycle():
    process = subprocess.run([sys.executable, str(REPO.parent / "shared" / "tools" / "import_cycles.py"),
                              "philo_dataflow"], cwd=REPO, capture_output=True, text=True)
    if "No such file" in process.stderr:
        pytest.skip("shared/tools/import_cycles.py is not beside this checkout")
    assert process.returncode == 0, process.stdout


def test_helpers_never_import_stages_or_preflight():
    """``lib/`` sits below the stages: it imports its siblings only (and ``problems`` none at all)."""
    import ast

    for path in sorted((REPO / "philo_dataflow" / "lib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports {'.' * node.level}{node.module} from above lib/"
                assert not (node.module or "").startswith("philo_dataflow"), f"{path.name} imports {node.module}"
                if path.name == "problems.py":
                    assert node.level == 0, "lib/problems.py imports nothing of the package"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("philo_dataflow") for alias in node.names), path.name


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(config):
    settings, problems = run._config_file_settings(str(config))
    assert problems == [] and settings


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_in_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_machines == 1 and loaded.distributed_type.value in ("MULTI_CPU", "MULTI_GPU", "FSDP")


def test_cpu_demo_config_is_the_defaults():
    plain = run.resolved_settings(run.build_parser().parse_args([]))
    demo = run.resolved_settings(run.build_parser().parse_args(["--config", str(REPO / "configs" / "cpu_demo.yaml")]))
    assert demo["start"] == plain["start"] == "base"
    resolved = {**{s.name: s.default for s in INPUTS if s.default is not REQUIRED}, "data_path": philo_dataflow.EXAMPLE_DATA_PATH}
    assert all(resolved[name] == value and type(resolved[name]) is type(value) for name, value in demo["given"].items())


def test_flags_and_set_override_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 4\nseed: 7\nlearning_rate: 0.001\nweight_decay: 0\n")
    args = run.build_parser().parse_args(["--config", str(config), "--set", "seed=9", "--lora-r", "2"])
    given = run.resolved_settings(args)["given"]
    assert given == {"lora_r": 2, "seed": 9, "learning_rate": 0.001, "weight_decay": 0.0}
    assert type(given["weight_decay"]) is float  # an integer for a float input is made a float


def _outputs(directory: Path) -> bytes:
    return (directory / "hold_out_predictions.jsonl").read_bytes()


@pytest.fixture(scope="module")
def config_runs(tmp_path_factory, tiny_model_dir):
    """The same tiny run three ways: flags, a config file with the same values, and the first run's
    config.yaml with another output directory."""
    from philo_dataflow.testing import example_subset

    work = tmp_path_factory.mktemp("config-runs")
    data = example_subset(work / "data.jsonl", 6, ("Stoicism", "Taoism", "Hedonism"))
    settings = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir}
    flags = cli_flags(settings)
    assert cli.main([*flags, "--output-dir", str(work / "flags"), "--no-graph"]) == 0
    (work / "run.yaml").write_text(yaml.safe_dump(settings))
    assert cli.main(["--config", str(work / "run.yaml"), "--output-dir", str(work / "config"), "--no-graph"]) == 0
    assert cli.main(["--config", str(work / "flags" / "config.yaml"), "--output-dir", str(work / "again"),
                     "--no-graph"]) == 0
    return work


def test_a_config_file_gives_the_predictions_of_the_same_flags(config_runs):
    assert _outputs(config_runs / "config") == _outputs(config_runs / "flags")


def test_a_runs_config_yaml_reproduces_it(config_runs):
    written = yaml.safe_load((config_runs / "flags" / "config.yaml").read_text())
    assert written["start"] == "base" and written["lora_r"] == 16 and written["max_steps"] == 2
    assert written["output_dir"] == str(config_runs / "flags")
    assert not any(name.startswith("judge_") for name in written)  # no judge: no judge settings
    assert _outputs(config_runs / "again") == _outputs(config_runs / "flags")
    again = yaml.safe_load((config_runs / "again" / "config.yaml").read_text())
    assert {**again, "output_dir": None} == {**written, "output_dir": None}
    metrics = json.loads((config_runs / "again" / "metrics.json").read_text())
    assert metrics["validation"]["global_step"] == 2


def test_the_stage_modules_are_the_stages_package():
    """``stages/`` holds the modules given to the drivers (the main job's and the comparison's), and only those;
    nothing else is a stage."""
    import pkgutil

    from philo_dataflow import stages

    in_package = {f"philo_dataflow.stages.{info.name}" for info in pkgutil.iter_modules(stages.__path__)}
    given = (*philo_dataflow.MODULES, *philo_dataflow.COMPARISON_MODULES)
    assert {module.__name__ for module in given} == in_package
    assert not set(philo_dataflow.MODULES) & set(philo_dataflow.COMPARISON_MODULES)


def test_trackers_and_schedulers_are_the_installed_transformers():
    """The inputs table writes them out so that ``--help`` needs no transformers import."""
    from transformers import SchedulerType
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from philo_dataflow.lib.inputs import SCHEDULERS, TRACKERS

    assert TRACKERS == tuple(INTEGRATION_TO_CALLBACK)
    assert SCHEDULERS == tuple(scheduler.value for scheduler in SchedulerType)


#: What ``--help`` must not import: it would take seconds of CPU.
HEAVY_MODULES = ("torch", "transformers", "datasets", "hamilton", "peft", "gradio", "accelerate")


@pytest.mark.parametrize("command", [[], ["preview"], ["chat"], ["export"], ["compare"]], ids=lambda c: c[0] if c else "main")
def test_help_imports_no_ml_library(command):
    probe = ("import sys\nfrom philo_dataflow.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print('IMPORTED', sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY_MODULES!r})))")
    process = subprocess.run([sys.executable, "-c", probe, *command, "--help"], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
    assert process.returncode == 0, process.stderr
    assert "usage: philo-dataflow" in process.stdout
    assert process.stdout.strip().endswith("IMPORTED []"), process.stdout[-300:]


def test_python_m_and_run_py_are_the_command():
    outputs = [subprocess.run([sys.executable, *how, "--help"], capture_output=True, text=True, timeout=60,
                              cwd=REPO).stdout for how in (["-m", "philo_dataflow"], ["run.py"])]
    assert outputs[0] == outputs[1] and "commands (each with its own --help" in outputs[0]
