"""Hamilton's cache (``build_driver(cache_dir=...)``, ``run.py --cache-dir``): a re-run that changes only an
evaluation input reuses the data and the trained weights, gives the results an uncached run gives, and
retrains when a training input, the data file or the model changes; a corrupt entry is recomputed."""

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_INPUTS, REPO, cli_flags
from hamilton.caching.adapter import CachingEventType
from safetensors.torch import load_file

import philo_dataflow
from philo_dataflow import cli
from philo_dataflow.cli import job as run
from philo_dataflow.lib import caching
from philo_dataflow.lib.artifacts import ADAPTER_DIR, PREDICTIONS_JSONL_FILE
from philo_dataflow.testing import example_subset, tiny_model_dir

#: The nodes that read or prepare the data, reused whenever the data file is unchanged.
DATA_NODES = ("instruction_records", "train_set", "hold_out_set", "tokenized_train", "tokenized_validation")


def _events(dr) -> dict:
    """``{event type: {node names}}`` of the driver's last ``execute``."""
    found = collections.defaultdict(set)
    for name, events in dr.cache.logs(run_id=dr.cache.last_run_id, level="debug").items():
        for event in events:
            found[event.event_type].add(name)
    return found


@pytest.fixture
def cached_run(tmp_path, tiny_model_dir):
    data = example_subset(tmp_path / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    base = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir, "max_steps": 4}

    def execute(name: str, cache: bool = True, **changed):
        dr = philo_dataflow.build_driver({"start": "base"}, cache_dir=str(tmp_path / "cache") if cache else None)
        started = time.perf_counter()
        dr.execute(list(philo_dataflow.DEFAULT_OUTPUTS), inputs={**base, **changed, "output_dir": str(tmp_path / name)})
        seconds = time.perf_counter() - started
        return dr, seconds, tmp_path / name

    return execute


def _predictions(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / PREDICTIONS_JSONL_FILE).read_text().splitlines()]


def _adapter_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / ADAPTER_DIR / "adapter_model.safetensors"))


def test_a_rerun_with_only_max_new_tokens_changed_trains_nothing_and_matches_an_uncached_run(cached_run):
    first, first_seconds, first_dir = cached_run("first")
    assert "trained_parameters" in _events(first)[CachingEventType.EXECUTE_NODE]
    again, again_seconds, again_dir = cached_run("again", max_new_tokens=12)
    events = _events(again)
    executed, reused = events[CachingEventType.EXECUTE_NODE], events[CachingEventType.GET_RESULT]
    print(f"\nfirst run {first_seconds:.1f} s; re-run with max_new_tokens changed {again_seconds:.1f} s "
          f"({again_seconds / first_seconds:.0%}); {len(reused)} results from the cache")
    assert "trained_parameters" not in executed and "trained_parameters" in reused
    assert set(DATA_NODES) <= reused
    assert {"base_model_hold_out_generations", "finetuned_model_hold_out_generations"} <= executed
    # Every file is written again, and says what an uncached run with the same inputs says.
    uncached, _, uncached_dir = cached_run("uncached", cache=False, max_new_tokens=12)
    assert uncached.cache is None
    assert _predictions(again_dir) == _predictions(uncached_dir)
    assert max(p["base_new_tokens"] for p in _predictions(again_dir)) > FAST_INPUTS["max_new_tokens"]
    weights, expected = _adapter_weights(again_dir), _adapter_weights(uncached_dir)
    assert weights.keys() == expected.keys() and all((weights[k] == expected[k]).all() for k in weights)
    metrics = json.loads((again_dir / "metrics.json").read_text())
    assert metrics["hold_out"] == json.loads((uncached_dir / "metrics.json").read_text())["hold_out"]


@pytest.mark.parametrize("change", ["learning_rate", "data_file", "model"])
def test_a_changed_training_input_data_file_or_model_retrains(cached_run, tmp_path, chat_tokenizer, change):
    cached_run("first")
    if change == "learning_rate":
        changed = {"learning_rate": 1e-3}
    elif change == "data_file":  # the same path, another content: one answer edited
        path = tmp_path / "small.jsonl"
        lines = path.read_text().splitlines()
        record = json.loads(lines[0])
        record["output"] = record["output"] + " Indeed."
        path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
        changed = {}
    else:  # other weights at another path
        import torch
        from transformers import AutoModelForCausalLM

        other = tiny_model_dir(tmp_path / "other-model", chat_tokenizer)
        model = AutoModelForCausalLM.from_pretrained(other)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        model.save_pretrained(other)
        changed = {"model_id": other}
    again, _, _ = cached_run("again", **changed)
    executed = _events(again)[CachingEventType.EXECUTE_NODE]
    assert "trained_parameters" in executed
    assert ("tokenized_train" in executed) is (change == "data_file")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_cache_entry_is_recomputed(cached_run, damage):
    first, _, _ = cached_run("first")
    version = first.cache.data_versions[first.cache.last_run_id]["trained_parameters"]
    entry = Path(first.cache.result_store.path) / version
    assert entry.is_file()
    entry.write_bytes(b"not a pickle" if damage == "garbage" else entry.read_bytes()[:100])
    again, _, again_dir = cached_run("again")
    events = _events(again)
    assert "trained_parameters" in events[CachingEventType.EXECUTE_NODE]
    assert (again_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    # The recomputed entry replaced the damaged one: a third run reads it.
    third, _, _ = cached_run("third")
    assert "trained_parameters" in _events(third)[CachingEventType.GET_RESULT]


def test_models_trainers_and_tokenizers_are_fingerprinted_but_never_stored(tmp_path, tiny_model_dir):
    data = example_subset(tmp_path / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    dr = philo_dataflow.build_driver({"start": "base"}, cache_dir=str(tmp_path / "cache"))
    inputs = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir, "output_dir": str(tmp_path / "out")}
    result = dr.execute([*philo_dataflow.DEFAULT_OUTPUTS, "finetuned_model"], inputs=inputs)
    versions = dr.cache.data_versions[dr.cache.last_run_id]
    stored = {path.name for path in Path(dr.cache.result_store.path).iterdir()}
    for name in ("base_model", "trainable_model", "finetuned_model", "trainer", "tokenizer"):
        assert not versions[name].startswith("<unhashable>")
        assert versions[name] not in stored
    assert versions["trained_parameters"] in stored
    # The remembered digest of the trained model (the same object as trainable_model, trained in place)
    # is that of its new weights, not the one taken before training.
    assert versions["finetuned_model"] != versions["trainable_model"]
    caching._MODULE_DIGESTS.clear()
    assert caching.hash_module(result["finetuned_model"]) == versions["finetuned_model"]


def test_run_py_reuses_the_cache_by_default_and_no_cache_turns_it_off(tmp_path, tiny_model_dir, capsys):
    data = example_subset(tmp_path / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    flags = ["--data-path", data, "--model-id", tiny_model_dir, "--no-graph", "--cache-dir", str(tmp_path / "cache")]
    flags += cli_flags(FAST_INPUTS)
    assert cli.main([*flags, "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "training ran" in out
    listed = [line.strip() for line in out.splitlines() if line.startswith(f"  {tmp_path / 'a'}")]
    assert listed == sorted(set(listed), key=listed.index) and str(tmp_path / "a" / "adapter") in listed  # each once
    # The summary is printed from the run's own results: the counts equal metrics.json's.
    outcomes = json.loads((tmp_path / "a" / "metrics.json").read_text())["hold_out"]["rougeL_outcomes"]
    assert (f"question by question: fine-tuned wins {outcomes['wins']}, ties {outcomes['ties']}, loses "
            f"{outcomes['losses']} (ROUGE-L difference beyond ±0.05)") in out
    assert cli.main([*flags, "--output-dir", str(tmp_path / "b"), "--max-new-tokens", "12"]) == 0
    assert "the trained weights came from it" in capsys.readouterr().out
    assert cli.main([*flags, "--output-dir", str(tmp_path / "c"), "--no-cache"]) == 0
    assert "results reused" not in capsys.readouterr().out


def test_a_second_process_with_another_string_hash_seed_reuses_the_training(tmp_path, tiny_model_dir):
    # The LoRA config's target_modules is a set, whose order follows PYTHONHASHSEED: the model's
    # fingerprint must not, or every new run.py process would train again.
    data = example_subset(tmp_path / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    flags = ["--data-path", data, "--model-id", tiny_model_dir, "--no-graph", "--cache-dir", str(tmp_path / "cache"),
             "--lora-target-modules", "all-linear"]
    flags += cli_flags(FAST_INPUTS)
    outputs = []
    for name, hash_seed, extra in (("a", "1", []), ("b", "2", ["--no-repeat-ngram-size", "3"])):
        process = subprocess.run([sys.executable, "run.py", *flags, "--output-dir", str(tmp_path / name), *extra],
                                 cwd=REPO, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert process.returncode == 0, process.stderr[-3000:]
        outputs.append(process.stdout)
    assert "training ran" in outputs[0]
    assert "the trained weights came from it" in outputs[1], outputs[1][-2000:]


def test_run_py_turns_the_cache_off_for_several_processes(monkeypatch, tmp_path):
    assert run.run_cache_dir(str(tmp_path), no_cache=False) == str(tmp_path)
    assert run.run_cache_dir(None, no_cache=False) == run.default_cache_dir()
    assert run.run_cache_dir(str(tmp_path), no_cache=True) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.run_cache_dir(str(tmp_path), no_cache=False) is None


def test_a_value_pickle_cannot_write_is_not_stored(tmp_path):
    import threading

    store = caching.DataResultStore(path=str(tmp_path / "results"))
    store.set("unpicklable", {"client": threading.RLock()})  # an HTTP client holds locks like this
    store.set("plain", {"rows": [1, 2]})
    assert not store.exists("unpicklable")
    assert store.get("plain") == {"rows": [1, 2]}
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == ["plain"]
