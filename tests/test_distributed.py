"""Several processes (torchrun): ``run.py`` under ``torch.distributed.run --nproc-per-node 2`` on the CPU
(gloo) against one process at the same global batch, the sharded generation gathered in order, and a stop
signal to one process stopping both at the same step.

The two runs train the tiny Llama of ``conftest.py`` for 6 optimizer steps of 4 examples, 2 processes x 2
examples against 1 process x 4, on 24 training examples: one epoch of full batches (at an epoch's end
accelerate fills a process's short batch with repeated examples, its ``even_batches``). Both take the same
examples at every step (``SupervisedTokensTrainer._get_train_sampler``). The 6 validation examples are
evaluated one per process and forward pass, so no process's last validation batch is filled with repeated
examples; at the default ``per_device_eval_batch_size`` (16) it is, and the validation losses of this
run differ by 0.054.

Measured on this run: the validation loss (``metrics.json`` ``validation.eval_loss``) differs by 8.4e-05,
the first logged training loss by 0 (the later ones by at most 1.4e-05). Without the world-size factor of
``SupervisedTokensTrainer.compute_loss`` both losses of the two-process run are half the single-process
ones (5.41 against 10.81).
"""

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from philo_dataflow.lib.artifacts import ADAPTER_DIR, LOG_HISTORY_FILE, METRICS_FILE, PREDICTIONS_JSONL_FILE
from philo_dataflow.lib.distributed import in_original_order, sharded_map
from philo_dataflow.lib.trackers import RUNS_DIR
from philo_dataflow.testing import example_subset

#: |two processes - one process| allowed of ``validation.eval_loss`` (measured: 8.4e-05).
VALIDATION_LOSS_TOLERANCE = 1e-3
#: ... of the first logged training loss (measured: 0); the world-size bug halves it.
FIRST_TRAIN_LOSS_TOLERANCE = 1e-3
SUMMARY_LINE = "philo_dataflow finished in"


def _environment() -> dict:
    # PYTHONPATH: a script written elsewhere (a hook) imports this checkout's package, as run.py does.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` (a script and its arguments) under torchrun with 2 processes on this machine."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_environment())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """The same run in two processes (2 examples each) and in one (4 examples): ``{"ddp": ..., "single": ...}``,
    each ``{"out": Path, "process": CompletedProcess}``, and ``"flags"``, the flags both share."""
    work = tmp_path_factory.mktemp("distributed")
    data = example_subset(work / "data.jsonl", 12, ("Stoicism", "Taoism", "Hedonism"))
    common = ["--model-id", tiny_model_dir, "--data-path", data, "--no-graph", "--max-steps", "6",
              "--eval-steps", "3", "--logging-steps", "1", "--max-new-tokens", "8", "--max-seq-length", "256",
              "--hold-out-fraction", "0.2", "--validation-fraction", "0.2", "--per-device-eval-batch-size", "1",
              "--seed", "7", "--report-to", "tensorboard"]
    ddp = _torchrun(str(REPO / "run.py"), *common, "--per-device-train-batch-size", "2",
                    "--output-dir", str(work / "ddp"))
    single = subprocess.run([sys.executable, str(REPO / "run.py"), *common, "--per-device-train-batch-size", "4",
                             "--no-cache", "--output-dir", str(work / "single")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=_environment())
    return {"ddp": {"out": work / "ddp", "process": ddp}, "single": {"out": work / "single", "process": single},
            "flags": common}


def _listing(out: Path) -> list:
    """Every path under ``out`` but the Trainer's checkpoints and the TensorBoard event files (named by
    time, host and process), relative."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.relative_to(out).parts[0] not in ("checkpoints", RUNS_DIR))


def _event_files(out: Path) -> list:
    return sorted((out / RUNS_DIR).glob("events.out.tfevents.*"))


def _metrics(out: Path) -> dict:
    return json.loads((out / METRICS_FILE).read_text())


def _train_losses(out: Path) -> list:
    history = json.loads((out / ADAPTER_DIR / LOG_HISTORY_FILE).read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


def test_two_processes_write_one_set_of_outputs(runs):
    ddp, single = runs["ddp"], runs["single"]
    for run in (ddp, single):
        assert run["process"].returncode == 0, run["process"].stderr[-3000:]
    # The same files as one process writes, each once: no second adapter, no temporary file left behind.
    assert _listing(ddp["out"]) == _listing(single["out"])
    assert not [name for name in _listing(ddp["out"]) if Path(name).name.startswith(".")]
    rows = [json.loads(line) for line in (ddp["out"] / PREDICTIONS_JSONL_FILE).read_text().splitlines()]
    single_rows = [json.loads(line) for line in (single["out"] / PREDICTIONS_JSONL_FILE).read_text().splitlines()]
    assert len(rows) == _metrics(ddp["out"])["splits"]["hold_out_set"]["total"] == 6
    assert len({row["question"] for row in rows}) == len(rows)
    assert [row["question"] for row in rows] == [row["question"] for row in single_rows]
    # The base model is untouched by training: its sharded, gathered answers are the single process's.
    for key in ("base_prediction", "base_new_tokens", "base_ended_on_eos"):
        assert [row[key] for row in rows] == [row[key] for row in single_rows], key
    assert ddp["process"].stdout.count(SUMMARY_LINE) == 1
    # One process logs to TensorBoard, as with one process: the Trainer's event file of training, the one its
    # closing evaluate() opens after training closed the first, and the final metrics'.
    assert len(_event_files(ddp["out"])) == len(_event_files(single["out"])) == 3


def test_two_processes_train_as_one_at_the_same_global_batch(runs):
    ddp, single = runs["ddp"]["out"], runs["single"]["out"]
    assert _metrics(ddp)["validation"]["global_step"] == _metrics(single)["validation"]["global_step"] == 6
    first, first_single = _train_losses(ddp)[0], _train_losses(single)[0]
    assert abs(first - first_single) <= FIRST_TRAIN_LOSS_TOLERANCE, (first, first_single)
    # Every step takes the examples one process takes (the sampler's groups are sized by the global batch).
    losses, losses_single = _train_losses(ddp), _train_losses(single)
    assert len(losses) == len(losses_single) == 6
    assert max(abs(a - b) for a, b in zip(losses, losses_single)) <= FIRST_TRAIN_LOSS_TOLERANCE, (losses, losses_single)
    loss, loss_single = _metrics(ddp)["validation"]["eval_loss"], _metrics(single)["validation"]["eval_loss"]
    assert abs(loss - loss_single) <= VALIDATION_LOSS_TOLERANCE, (loss, loss_single)


#: run.py, sending SIGTERM to the second process only, in its second optimizer step.
SIGNAL_ONE_PROCESS = textwrap.dedent("""
    import os, signal, sys
    from transformers import Trainer

    training_step = Trainer.training_step

    def training_step_that_signals(self, *args, **kwargs):
        if self.state.global_step == 1 and os.environ["RANK"] == "1" and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, *args, **kwargs)

    Trainer.training_step = training_step_that_signals
    from philo_dataflow import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_signal_to_one_process_stops_both_at_its_step_and_resuming_gives_the_same_adapter(runs, tmp_path):
    """Each process handles the signal the launcher passes on (torchrun sends it to every one); here only the
    second gets it, and the first, which did not, stops at the same step (``lib.trainer.StopAtSignal``:
    they agree at each step's end), saves the checkpoint and prints the one line. Relaunched with the
    arguments it names, the run ends with the uninterrupted two-process run's adapter, byte for byte."""
    script = tmp_path / "signal_one_process.py"
    script.write_text(SIGNAL_ONE_PROCESS)
    out = tmp_path / "stopped"
    stopped = _torchrun(str(script), *runs["flags"], "--per-device-train-batch-size", "2", "--output-dir", str(out))
    assert stopped.returncode != 0
    checkpoint = out / "checkpoints" / "checkpoint-2"
    announced = (f"philo-dataflow: stopped by SIGTERM; the checkpoint of step 2 is saved in {checkpoint}; resume with "
                 "your launcher's command (torchrun, accelerate launch) as before, its arguments now: ")
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("philo-dataflow: stopped by")]
    assert len(lines) == 1 and lines[0].startswith(announced), stopped.stderr[-3000:]
    assert "exitcode  : 143" in stopped.stderr  # the first process's status: 128 + SIGTERM
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / ADAPTER_DIR).exists()

    arguments = shlex.split(lines[0][len(announced):])
    assert arguments[0] == str(script) and arguments[-2:] == ["--resume-from-checkpoint", "last"]
    resumed = _torchrun(*arguments)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = [(run / ADAPTER_DIR / "adapter_model.safetensors").read_bytes() for run in (out, runs["ddp"]["out"])]
    assert weights[0] == weights[1]


SHARDED_GENERATION = textwrap.dedent("""
    import sys

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from philo_dataflow.lib.distributed import is_main_process, num_processes, process_state, sharded_map
    from philo_dataflow.lib.generation import generate_answers
    from philo_dataflow.lib.prompts import question_prompt_ids
    from philo_dataflow.stages.prediction import _generations

    rank = process_state().process_index
    assert num_processes() == 2
    assert sharded_map(list(range(7)), lambda shard: [(item, rank) for item in shard]) == [(i, i % 2) for i in range(7)]
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    torch.manual_seed(0)  # the same weights in both processes; large ones, so each prompt gets its own answer
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    questions = Dataset.from_dict({"input_text": [f"What did school {i} say about virtue? " * (1 + i % 3)
                                                  for i in range(7)]})
    prompts = question_prompt_ids(questions, model, tokenizer, "chat_template", 6)
    answers = _generations(prompts, model, tokenizer, 6, 2, True, "sharded", {}, 42)
    alone = generate_answers(model, tokenizer, prompts, 6, 2)  # what one process answers
    assert answers == alone, (answers, alone)
    assert len({tuple(answer["token_ids"]) for answer in alone}) > 1
    if is_main_process():
        print("SHARDED-GENERATION-OK")
""")


def test_sharded_generation_gathers_every_answer_in_order(tmp_path, tiny_model_dir):
    script = tmp_path / "sharded_generation.py"
    script.write_text(SHARDED_GENERATION)
    process = _torchrun(str(script), tiny_model_dir, timeout=180)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("SHARDED-GENERATION-OK") == 1


def test_sharded_results_are_put_back_in_item_order():
    assert in_original_order([[0, 2, 4], [1, 3]], 5) == [0, 1, 2, 3, 4]
    assert in_original_order([["a"], [], []], 1) == ["a"]
    with pytest.raises(ValueError, match="do not cover 5 items"):
        in_original_order([[0, 2], [1, 3]], 5)
    assert sharded_map([3, 1, 2], lambda items: [item * 10 for item in items]) == [30, 10, 20]  # one process
