"""Training throughput and memory of philo_dataflow's LoRA training path against its peers.

One invocation trains every variant, each in its own child process (so its peak RSS is its own), on the
same records, model, LoRA configuration, batch size, max_seq_length and number of optimizer steps, with
the same optimizer hyperparameters (read from the library's ``training_args`` node):

- ``ours``: the library's own ``trainer`` node, built by the Hamilton driver, then ``.train()``;
- ``trl_default``: TRL's ``SFTTrainer`` with its defaults for prompt-completion data;
- ``trl_padding_free``: the same with ``padding_free=True``;
- ``trl_packing``: the same with ``packing=True``;
- ``pad_to_max_length``: the reference Hamilton module's approach, every example padded to
  ``max_seq_length``, plain ``Trainer``.

Per variant it reports real (non-padding) tokens per second over the timed steps (every optimizer step
but the first, which carries one-off warm-up costs), the padding share, peak RSS, the training loss of
the last steps, and ratios against ``ours``. It also measures the fp32 (and bf16) matmul peak on the same
threads and prints our model-FLOPs utilisation.

    python benchmarks/train_benchmark.py                          # the defaults (10-20 minutes)
    python benchmarks/train_benchmark.py --json-out results.json --variants ours,trl_default
    python benchmarks/train_benchmark.py --smoke                  # tiny random model: checks the script runs
"""

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_DATA_PATH,
    REPO_ROOT,
    SMOKE_DATA_PATH,
    ChildJob,
    benchmark_parser,
    child_environment,
    fmt,
    library_state,
    load_average,
    markdown_table,
    new_report,
    peak_rss_bytes,
    run_children,
    work_directory,
    write_json,
)

logger = logging.getLogger("train_benchmark")

VARIANTS = ("ours", "ours_gradient_checkpointing", "ours_uncompiled", "ours_gradient_checkpointing_uncompiled", "trl_default", "trl_padding_free", "trl_packing", "pad_to_max_length")
#: ``eval_steps`` given to the library so that no evaluation falls inside the measured steps.
NO_EVAL_STEPS = 10**9
#: Logged training losses averaged into "loss after the steps".
LAST_LOSSES = 5
#: Keywords of warnings worth showing beside a variant's row (attention and padding-free caveats).
NOTABLE_WARNING_WORDS = ("padding-free", "padding_free", "flash", "packing", "position_ids", "cross-contamination")


@dataclasses.dataclass
class TrainSettings:
    """What every variant shares; written to JSON for the children.

    :param data_path: the data file (absolute path).
    :param records: question/answer pairs used for training: the first ones after the library's
        normalisation (``instruction_records``).
    :param validation_records: the pairs after those, given to the library as ``validation_set`` (it
        evaluates once after training; no variant trains on them).
    :param model_id: the library's ``model_id`` input (a hub id, a directory, or the embedded model).
    :param model_path: the directory or hub id it resolves to.
    :param batch_size: examples (rows, for packing) per optimizer step; no gradient accumulation.
    :param max_seq_length: tokens per example at most (the row length for packing and padding).
    :param steps: optimizer steps trained; the first is left out of the timing.
    :param threads: torch threads of each child.
    :param lora_r: LoRA rank.
    :param lora_alpha: LoRA scaling numerator.
    :param lora_dropout: dropout on the adapter input.
    :param lora_target_modules: comma-separated module names, or ``all-linear``.
    :param lora_layers_to_transform: decoder layers with adapters: ``all``, ``top:N`` or indices.
    :param learning_rate: peak learning rate; None takes the library's default.
    :param seed: the library's ``seed`` input (model init, data order).
    :param trl_precision: ``match`` trains TRL in the library's precision; ``trl-default`` leaves
        TRL's own default (bf16 autocast when fp16 is off).
    :param work_dir: where children write checkpoints, results and logs.
    :param load_in_4bit: QLoRA: the library's ``load_in_4bit`` input, so every variant trains the same
        4-bit NF4 base model (``base_model``/``peft_model`` nodes); CUDA with bitsandbytes only.
    :param bf16: the library's ``bf16`` input (None: its auto); TRL follows it under ``trl_precision`` match.
    """

    data_path: str
    records: int
    validation_records: int
    model_id: str
    model_path: str
    batch_size: int
    max_seq_length: int
    steps: int
    threads: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    lora_layers_to_transform: str
    learning_rate: Optional[float]
    seed: int
    trl_precision: str
    work_dir: str
    load_in_4bit: bool = False
    bf16: Optional[bool] = None


class Refused(Exception):
    """A variant's library refused its configuration before training (recorded as the result)."""


# --------------------------------------------------------------------------------------------------
# Child side: one variant per process.
# --------------------------------------------------------------------------------------------------


def _step_meter_class() -> type:
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        """Times optimizer steps and counts the tokens fed to the model in each.

        The trainer's ``training_step`` is wrapped to count, per batch it trains on, the positions fed
        (``input_ids.numel()``) and the real tokens (the sum of ``attention_mask``, or every position
        when there is no mask, as in padding-free batches); this sees every batch whatever the trainer's
        loss calls (the model's ``forward``, or its decoder and head separately). ``on_step_end`` closes
        a step. The timed window runs from the end of the first step to the end of the last, so it
        includes batch collation and logging of every timed step but not model loading, the first
        (warm-up) step, nor the evaluation and saving that follow the last step.
        """

        def __init__(self) -> None:
            self.step_end_times: list[float] = []
            self.step_end_cpu_times: list[float] = []
            self.step_real_tokens: list[int] = []
            self.step_positions: list[int] = []
            self.losses: list[float] = []
            self.attention_in_training: set = set()  # the model's attention implementation at each step's end
            self._real = 0
            self._positions = 0

        def attach(self, trainer: Any) -> None:
            """Registers the callback and wraps ``trainer.training_step`` to count each batch's tokens."""
            trainer.add_callback(self)
            training_step = trainer.training_step

            def counted_training_step(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
                self._count(inputs)
                return training_step(model, inputs, *args, **kwargs)

            trainer.training_step = counted_training_step

        def _count(self, inputs: dict) -> None:
            input_ids = inputs.get("input_ids")  # (batch, seq_len)
            if input_ids is None:
                return
            positions = input_ids.numel()
            mask = inputs.get("attention_mask")  # (batch, seq_len) or None when padding-free
            self._positions += positions
            self._real += int(mask.sum()) if mask is not None and mask.dim() == 2 else positions

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            config = getattr(kwargs.get("model"), "config", None)
            self.attention_in_training.add(str(getattr(config, "_attn_implementation", None)))
            self.step_end_times.append(time.perf_counter())
            self.step_end_cpu_times.append(time.process_time())
            self.step_real_tokens.append(self._real)
            self.step_positions.append(self._positions)
            self._real = self._positions = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def summary(self, threads: int) -> dict:
            """Throughput over steps 2..N, padding share, losses, and the share of ``threads`` cores the
            process actually ran on in the timed window (CPU seconds / (seconds x threads); well under 1
            means other processes took the cores); needs two steps or more."""
            steps = len(self.step_end_times)
            if steps < 2:
                raise RuntimeError(f"only {steps} optimizer step(s) ran; the timing needs at least 2.")
            timed_s = self.step_end_times[-1] - self.step_end_times[0]
            real, positions = sum(self.step_real_tokens[1:]), sum(self.step_positions[1:])
            last = self.losses[-LAST_LOSSES:]
            return {
                "optimizer_steps": steps,
                "timed_steps": steps - 1,
                "timed_s": timed_s,
                "cpu_share": (self.step_end_cpu_times[-1] - self.step_end_cpu_times[0]) / (timed_s * threads),
                "real_tokens_timed": real,
                "positions_timed": positions,
                "real_tokens_per_s": real / timed_s,
                "padding_share": 1 - real / positions if positions else 0.0,
                "real_tokens_all_steps": sum(self.step_real_tokens),
                "step_s": [b - a for a, b in zip(self.step_end_times, self.step_end_times[1:])],
                "step_real_tokens": self.step_real_tokens,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": sum(last) / len(last) if last else None,
                "losses": self.losses,
            }

    return StepMeter


class _WarningRecorder(logging.Handler):
    """Collects distinct warnings of the transformers/TRL/PEFT loggers and of ``warnings.warn``."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, message: str) -> None:
        message = " ".join(str(message).split())[:400]
        if message not in self.messages:
            self.messages.append(message)


def _splits(settings: TrainSettings) -> tuple:
    """``(train_set, validation_set)`` as the library's split nodes produce them (columns
    ``splitting.SPLIT_COLUMNS``), from the first ``records`` (+ ``validation_records``) pairs."""
    from datasets import Dataset

    from philo_dataflow.lib.records import read_records
    from philo_dataflow.stages.loading import instruction_records
    from philo_dataflow.stages.splitting import SPLIT_COLUMNS

    pairs = instruction_records(read_records(settings.data_path), settings.data_path, None)
    end = settings.records + settings.validation_records

    def as_split(rows: list[dict]) -> Dataset:
        return Dataset.from_dict({column: [row[column] for row in rows] for column in SPLIT_COLUMNS})

    return as_split(pairs[: settings.records]), as_split(pairs[settings.records : end])


def _library_nodes(settings: TrainSettings, names: list[str], output_dir: Path, **extra_inputs: Any) -> dict:
    """The library's nodes ``names``, computed by its Hamilton driver (``start="base"``) with the
    benchmark's records in place of the split and the shared settings (and ``extra_inputs``) as inputs."""
    import philo_dataflow

    train_set, validation_set = _splits(settings)
    inputs = {
        "model_id": settings.model_id,
        "max_seq_length": settings.max_seq_length,
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "eval_steps": NO_EVAL_STEPS,
        "logging_steps": 1,
        "output_dir": str(output_dir),
        "lora_r": settings.lora_r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "lora_target_modules": settings.lora_target_modules,
        "lora_layers_to_transform": settings.lora_layers_to_transform,
        "load_in_4bit": settings.load_in_4bit,
        "seed": settings.seed,
        **extra_inputs,
    }
    if settings.bf16 is not None:
        inputs["bf16"] = settings.bf16
    if settings.learning_rate is not None:
        inputs["learning_rate"] = settings.learning_rate
    driver = philo_dataflow.build_driver({"start": "base"})
    overrides = {"train_set": train_set, "validation_set": validation_set}
    return {**driver.execute(names, inputs=inputs, overrides=overrides), "train_set": train_set}


#: Optimizer and schedule fields every variant copies from the library's ``training_args``.
_SHARED_ARGUMENTS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "data_seed", "use_cpu",
)


def _shared_arguments(library_args: Any, match_precision: bool = True) -> dict:
    shared = {name: getattr(library_args, name) for name in _SHARED_ARGUMENTS}
    if match_precision:
        shared.update(bf16=library_args.bf16, fp16=library_args.fp16)
    return shared


def _describe(trainer: Any) -> dict:
    """The trainer's settings that decide speed and memory, as it will train."""
    args = trainer.args
    return {
        "trainer": type(trainer).__name__,
        "data_collator": type(trainer.data_collator).__name__,
        "train_rows": len(trainer.train_dataset),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": args.max_steps,
        "train_sampling_strategy": str(getattr(args, "train_sampling_strategy", "random")),
        "gradient_checkpointing": bool(args.gradient_checkpointing or _checkpointing_on(trainer.model)),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "optim": str(args.optim),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "compiled_decoder_layers": bool(getattr(trainer, "compile_decoder_layers", False)),
    }


def _checkpointing_on(model: Any) -> bool:
    """Whether activation checkpointing is on in ``model`` (the library turns it on in the model, not
    through ``TrainingArguments``); transformers 5 renamed the attribute."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


def _train(trainer: Any) -> dict:
    """Trains with the step meter attached; returns its summary, the settings and ``train_s``."""
    import torch

    meter = _step_meter_class()()
    meter.attach(trainer)
    description = _describe(trainer)
    started = time.perf_counter()
    trainer.train()
    summary = meter.summary(torch.get_num_threads())
    description["attn_implementation_in_training"] = ",".join(sorted(meter.attention_in_training))
    if not summary["real_tokens_per_s"]:
        raise RuntimeError("the step meter counted no tokens: the trainer never called training_step with input_ids")
    return {"status": "ok", **summary, "train_s": time.perf_counter() - started, "settings": description}


def _ours(settings: TrainSettings, output_dir: Path, **extra_inputs: Any) -> dict:
    nodes = _library_nodes(settings, ["trainer", "model_summary"], output_dir, **extra_inputs)
    result = _train(nodes["trainer"])
    result["model_summary"] = nodes["model_summary"]
    return result


def _trl_dataset(train_set: Any, tokenizer: Any, prompt_format: str) -> Any:
    """The records as a TRL prompt-completion dataset: chat messages when the library uses the chat
    template (TRL then applies it), else the library's rendered prompt and the answer as text."""
    from datasets import Dataset

    from philo_dataflow.lib.prompts import CHAT_TEMPLATE, render_prompt

    questions, answers = train_set["input_text"], train_set["output_text"]
    if prompt_format == CHAT_TEMPLATE:
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": q}] for q in questions],
            "completion": [[{"role": "assistant", "content": a}] for a in answers],
        })
    return Dataset.from_dict({"prompt": [render_prompt(tokenizer, prompt_format, q) for q in questions], "completion": answers})


def _trl(settings: TrainSettings, output_dir: Path, **options: Any) -> dict:
    from trl import SFTConfig, SFTTrainer

    nodes = _library_nodes(settings, ["base_model", "lora_config", "tokenizer", "prompt_format", "training_args"], output_dir)
    match = settings.trl_precision == "match"
    max_length = settings.max_seq_length
    notes = []
    if options.get("padding_free") and not options.get("packing"):
        # TRL 1.16 refuses padding_free without packing unless max_length is None (it does not truncate);
        # the number of longer examples is reported below.
        max_length = None
        notes.append("max_length=None (TRL requires it for padding_free without packing)")
    try:
        config = SFTConfig(
            output_dir=str(output_dir / "checkpoints"),
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=1,
            max_steps=settings.steps,
            max_length=max_length,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            **_shared_arguments(nodes["training_args"], match_precision=match),
            **options,
        )
        trainer = SFTTrainer(
            model=nodes["base_model"],
            args=config,
            train_dataset=_trl_dataset(nodes["train_set"], nodes["tokenizer"], nodes["prompt_format"]),
            processing_class=nodes["tokenizer"],
            peft_config=nodes["lora_config"],
        )
    except (ValueError, NotImplementedError, ImportError, TypeError) as error:
        raise Refused(f"{type(error).__name__}: {error}") from error
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    too_long = sum(length > settings.max_seq_length for length in lengths)
    if max_length is None:
        notes.append(f"{too_long} example(s) longer than max_seq_length={settings.max_seq_length}")
    result = _train(trainer)
    result["settings"]["trl_options"] = options
    result["notes"] = notes
    return result


def _pad_to_max_length(settings: TrainSettings, output_dir: Path) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    nodes = _library_nodes(settings, ["peft_model", "tokenized_train", "tokenizer", "training_args"], output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_steps=settings.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        **_shared_arguments(nodes["training_args"]),
    )
    collator = DataCollatorForSeq2Seq(
        nodes["tokenizer"], padding="max_length", max_length=settings.max_seq_length, label_pad_token_id=-100
    )
    train_dataset = nodes["tokenized_train"].select_columns(["input_ids", "attention_mask", "labels"])
    return _train(Trainer(model=nodes["peft_model"], args=args, data_collator=collator, train_dataset=train_dataset))


_RUNNERS: dict[str, Callable[..., dict]] = {
    "ours": _ours,
    "ours_gradient_checkpointing": lambda settings, output_dir: _ours(settings, output_dir, gradient_checkpointing=True),
    "ours_uncompiled": lambda settings, output_dir: _ours(settings, output_dir, torch_compile=False),
    "ours_gradient_checkpointing_uncompiled": lambda settings, output_dir: _ours(
        settings, output_dir, gradient_checkpointing=True, torch_compile=False),
    "trl_default": _trl,
    "trl_padding_free": lambda settings, output_dir: _trl(settings, output_dir, padding_free=True),
    "trl_packing": lambda settings, output_dir: _trl(settings, output_dir, packing=True),
    "pad_to_max_length": _pad_to_max_length,
}


def run_child(variant: str, settings_file: Path, result_file: Path) -> int:
    """Trains one variant and writes its result JSON; a refusal or an error is the result."""
    import torch

    settings = TrainSettings(**json.loads(settings_file.read_text()))
    torch.set_num_threads(settings.threads)
    recorder = _WarningRecorder()
    for name in ("transformers", "trl", "peft", "accelerate"):
        logging.getLogger(name).addHandler(recorder)
    result: dict[str, Any] = {"variant": variant, "load_average_start": load_average(), "library": library_state()}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result.update(_RUNNERS[variant](settings, Path(settings.work_dir) / variant))
        except Refused as refusal:
            result.update(status="refused", message=str(refusal))
        except Exception as error:  # the failure is the measurement: recorded, printed, not hidden
            traceback.print_exc()
            result.update(status="failed", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    for warning in caught:
        recorder.add(f"{warning.category.__name__}: {warning.message}")
    if torch.cuda.is_available():
        result["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated()
    result.update(
        peak_rss_bytes=peak_rss_bytes(),
        child_s=time.perf_counter() - started,
        load_average_end=load_average(),
        warnings=recorder.messages,
    )
    write_json(result_file, result)
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side: settings, matmul peak, children, table.
# --------------------------------------------------------------------------------------------------


def matmul_peak_gflops(dtype_name: str, size: int, repeats: int, threads: int, device: str = "cpu") -> float:
    """Best-of-``repeats`` throughput of ``torch.mm`` on two ``size`` x ``size`` matrices, in GFLOP/s
    (2 * size**3 floating-point operations per product), on ``threads`` torch threads (CPU) or on
    ``device``."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)  # (size, size)
    b = torch.randn(size, size, device=device).to(dtype)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def _matmul_device() -> str:
    from philo_dataflow.stages.modeling import device

    return str(device())


def _measure_matmul(threads: int, smoke: bool) -> dict:
    """fp32 and bf16 matmul peaks on the device the library trains on (its ``device`` node)."""
    target = _matmul_device()
    if target.startswith("cuda"):
        return {dtype: matmul_peak_gflops(dtype, 8192, 10, threads, target) for dtype in ("float32", "bfloat16")}
    fp32 = matmul_peak_gflops("float32", 512 if smoke else 2048, 3 if smoke else 10, threads)
    bf16 = matmul_peak_gflops("bfloat16", 128 if smoke else 1024, 2 if smoke else 3, threads)
    if not smoke and bf16 > 0.25 * fp32:
        # Native bf16 (AVX512-BF16/AMX): measure it as fp32 is measured. A smaller product reads lower
        # (154 vs 187 GFLOP/s for 1024 vs 2048 here) and would flatter the bf16 MFU.
        bf16 = max(bf16, matmul_peak_gflops("bfloat16", 2048, 10, threads))
    return {"float32": fp32, "bfloat16": bf16}


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--records", type=int, default=None, help="question/answer pairs to train on (default: 256; --smoke: 16)")
    parser.add_argument("--validation-records", type=int, default=8, help="pairs after those given to the library as validation_set (default: 8)")
    parser.add_argument("--model-id", default=None, help="model_id as the library takes it (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default: 8; --smoke: 2)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens per example at most (default: 512; --smoke: 256)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant, first untimed (default: 30; --smoke: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per variant (default: 2; --smoke: 1)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0, the library default)")
    parser.add_argument("--lora-layers-to-transform", default="all", help="decoder layers with adapters, every variant: all, top:N or indices (default: all)")
    parser.add_argument("--lora-target-modules", default="q_proj,v_proj", help="LoRA target modules, comma-separated or all-linear (default: q_proj,v_proj)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the library's)")
    parser.add_argument("--seed", type=int, default=42, help="seed input of the library (default: 42)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: every variant trains the library's 4-bit NF4 base model (CUDA with bitsandbytes only)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the library's bf16 input for every variant: --no-bf16 trains in fp32 where bf16 is native, as a CPU "
                             "without it does (with benchmarks/avx2_emulation.sh) (default: the library's auto)")
    parser.add_argument("--trl-precision", choices=("match", "trl-default"), default="match",
                        help="match: TRL trains in the library's precision; trl-default: TRL's own (bf16 autocast) (default: match)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=None, help="variants run at once; timings are comparable only with 1 (default: 1; --smoke: 2)")
    parser.add_argument("--child-timeout", type=float, default=7200, help="seconds a variant may run before it counts as failed (default: 7200)")
    parser.add_argument("--work-dir", default=None, help="settings, results, logs and checkpoints (default: a temporary directory)")
    parser.add_argument("--json-out", default=None, help="also write every result to this JSON file")
    parser.add_argument("--from-json", default=None, help="run nothing: print the report of a --json-out file again")
    parser.add_argument("--smoke", action="store_true", help="a tiny random 2-layer Llama on 16 records for 2 steps: checks the script works")
    return parser


def _settings_from_args(args: argparse.Namespace, work_dir: Path) -> TrainSettings:
    """The shared settings, after checking every flag (all problems reported at once)."""
    from philo_dataflow.lib.inputs import EMBEDDED_MODEL_ID
    from philo_dataflow.lib.model_sources import resolve_model_path
    from philo_dataflow.lib.records import read_records
    from philo_dataflow.stages.loading import instruction_records
    from philo_dataflow.testing import tiny_model_dir

    smoke = args.smoke
    data_path = (REPO_ROOT / (args.data_path or (SMOKE_DATA_PATH if smoke else DEFAULT_DATA_PATH))).resolve()
    records = args.records if args.records is not None else (16 if smoke else 256)
    steps = args.steps if args.steps is not None else (2 if smoke else 30)
    threads = args.threads if args.threads is not None else (1 if smoke else 2)
    batch_size = args.batch_size if args.batch_size is not None else (2 if smoke else 8)
    max_seq_length = args.max_seq_length if args.max_seq_length is not None else (256 if smoke else 512)
    problems = []
    for flag, value, minimum in (("--records", records, 1), ("--validation-records", args.validation_records, 1),
                                 ("--batch-size", batch_size, 1), ("--max-seq-length", max_seq_length, 16),
                                 ("--steps", steps, 2), ("--threads", threads, 1), ("--lora-r", args.lora_r, 1)):
        if value < minimum:
            problems.append(f"{flag}={value}: must be at least {minimum}")
    unknown = [v for v in args.variants.split(",") if v.strip() not in VARIANTS]
    if unknown:
        problems.append(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "ours" not in [v.strip() for v in args.variants.split(",")]:
        logger.warning("--variants without ours: no ratios and no model-FLOPs utilisation will be printed")
    if not data_path.is_file():
        problems.append(f"--data-path: {data_path} does not exist")
    else:
        pairs = len(instruction_records(read_records(str(data_path)), str(data_path), None))
        if pairs < records + args.validation_records:
            problems.append(f"--records {records} + --validation-records {args.validation_records}: {data_path} has only {pairs} pairs")
    if args.load_in_4bit:
        from philo_dataflow.lib.model_sources import quantization_problems
        from philo_dataflow.stages.modeling import device

        problems += [f"--load-in-4bit: {line}" for line in quantization_problems(True, device())]
    if problems:
        raise SystemExit("train_benchmark: " + "; ".join(problems))
    if smoke and args.model_id is None:
        model_id = tiny_model_dir(work_dir / "tiny-model")
    else:
        model_id = args.model_id or EMBEDDED_MODEL_ID
    return TrainSettings(
        data_path=str(data_path), records=records, validation_records=args.validation_records,
        model_id=model_id, model_path=resolve_model_path(model_id), batch_size=batch_size,
        max_seq_length=max_seq_length, steps=steps, threads=threads, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target_modules=args.lora_target_modules,
        lora_layers_to_transform=args.lora_layers_to_transform,
        learning_rate=args.learning_rate, seed=args.seed, trl_precision=args.trl_precision, work_dir=str(work_dir),
        load_in_4bit=args.load_in_4bit, bf16=args.bf16,
    )


def _median_step_rate(result: dict) -> float:
    """Median over the timed steps of (real tokens of the step / seconds of the step): a rate that
    steps slowed by other processes on the machine barely move, unlike the timed-window mean."""
    rates = sorted(tokens / seconds for tokens, seconds in zip(result["step_real_tokens"][1:], result["step_s"]))
    middle = len(rates) // 2
    return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2


def _add_ratios(results: list[dict]) -> Optional[dict]:
    """Adds to each successful variant ``real_tokens_per_s_median_step``, ``speedup_of_ours`` (ours
    tokens/s / variant tokens/s, timed window), ``speedup_of_ours_median_step`` (the same for the
    median-step rates) and ``rss_ratio_ours`` (ours peak RSS / variant peak RSS); returns ours' result
    (None if it failed)."""
    for result in results:
        if result["status"] == "ok":
            result["real_tokens_per_s_median_step"] = _median_step_rate(result)
    ours = next((r for r in results if r["variant"] == "ours" and r["status"] == "ok"), None)
    for result in results:
        if ours is not None and result["status"] == "ok":
            result["speedup_of_ours"] = ours["real_tokens_per_s"] / result["real_tokens_per_s"]
            result["speedup_of_ours_median_step"] = (
                ours["real_tokens_per_s_median_step"] / result["real_tokens_per_s_median_step"]
            )
            result["rss_ratio_ours"] = ours["peak_rss_bytes"] / result["peak_rss_bytes"]
    return ours


def _model_flops_utilisation(ours: Optional[dict], matmul: dict) -> Optional[dict]:
    """Ours' model-FLOPs utilisation against the matmul peak of the precision it trained in."""
    if ours is None:
        return None
    summary = ours["model_summary"]
    precision = ours["settings"]["precision"]
    peak = matmul["bfloat16" if precision == "bf16" else "float32"]
    achieved = ours["real_tokens_per_s"] * summary["lora_training_flops_per_token"] / 1e9
    achieved_median_step = ours["real_tokens_per_s_median_step"] * summary["lora_training_flops_per_token"] / 1e9
    return {
        "precision": precision,
        "total_parameters": summary["total_parameters"],
        "flops_per_token": summary["lora_training_flops_per_token"],
        "achieved_gflops": achieved,
        "peak_gflops": peak,
        "mfu": achieved / peak,
        "mfu_median_step": achieved_median_step / peak,
    }


def _notes(result: dict) -> str:
    if result["status"] != "ok":
        return f"**{result['status']}**: {result.get('message', '')}"
    s = result["settings"]
    parts = [
        f"{s['trainer']} + {s['data_collator']}", f"sampler {s['train_sampling_strategy']}",
        f"{s['precision']}", f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"decoder layers {'compiled' if s.get('compiled_decoder_layers') else 'eager'}",
        f"attention {s.get('attn_implementation_in_training') or s.get('attn_implementation')} in training",
        f"{s['train_rows']} train rows", f"{result['real_tokens_all_steps']} real tokens in {result['optimizer_steps']} steps",
    ]
    if result.get("peak_cuda_memory_bytes"):
        parts.append(f"peak CUDA memory {result['peak_cuda_memory_bytes'] / 1e9:.2f} GB")
    parts += result.get("notes", [])
    notable = [w for w in result.get("warnings", []) if any(k in w.lower() for k in NOTABLE_WARNING_WORDS)]
    parts += [f"warning: {w[:200]}" for w in notable[:2]]
    return "; ".join(parts)


def render_report(report: dict) -> str:
    """The markdown printed at the end: settings, the table, notes, matmul peak and utilisation."""
    s, machine, results = report["settings"], report["machine"], report["variants"]
    header = ["variant", "status", "real tok/s", "median-step tok/s", "padding", "peak RSS GB",
              f"loss (last {LAST_LOSSES})", "timed s", "CPU share", "train s", "process s",
              "ours ÷ variant tok/s", "(median step)", "ours ÷ variant RSS"]
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append([
            f"`{r['variant']}`", r["status"], fmt(r.get("real_tokens_per_s"), ".0f") if ok else "—",
            fmt(r.get("real_tokens_per_s_median_step"), ".0f") if ok else "—",
            fmt(r["padding_share"] * 100 if ok else None, ".1f", "%"),
            fmt(r["peak_rss_bytes"] / 1e9 if r.get("peak_rss_bytes") else None, ".2f"),
            fmt(r.get("loss_last"), ".3f") if ok else "—", fmt(r.get("timed_s"), ".1f") if ok else "—",
            fmt(r["cpu_share"] * 100 if ok and "cpu_share" in r else None, ".0f", "%"),
            fmt(r.get("train_s"), ".1f") if ok else "—", fmt(r.get("process_wall_s"), ".0f"),
            fmt(r.get("speedup_of_ours"), ".2f", "×"), fmt(r.get("speedup_of_ours_median_step"), ".2f", "×"),
            fmt(r.get("rss_ratio_ours"), ".2f"),
        ])
    lines = [
        f"## Training benchmark ({report['finished']})",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs ({', '.join(machine['simd'])}), "
        f"{machine['memory_gib']} GiB; {s['threads']} torch threads per variant; "
        f"torch {machine['packages']['torch']}, transformers {machine['packages']['transformers']}, "
        f"peft {machine['packages']['peft']}, trl {machine['packages']['trl']}.",
        f"Model {s['model_id']}; {s['records']} records of {Path(s['data_path']).name}; batch {s['batch_size']}, "
        f"max_seq_length {s['max_seq_length']}, {s['steps']} optimizer steps (first untimed); LoRA r={s['lora_r']}, "
        f"alpha={s['lora_alpha']}, dropout={s['lora_dropout']}, targets {s['lora_target_modules']}, layers {s.get('lora_layers_to_transform', 'all')}{', 4-bit NF4 base (QLoRA)' if s.get('load_in_4bit') else ''}; "
        f"TRL precision: {s['trl_precision']}.",
        f"Load average (1/5/15 min) at start {report['load_average_start']}, at end {report['load_average_end']}.",
        f"philo_dataflow: commit {report['library']['commit']}"
        f"{' with uncommitted changes' if report['library']['uncommitted_changes'] else ''}, "
        f"source sha256 {report['library']['source_sha256']}.",
    ]
    changed = [r["variant"] for r in results if r.get("library", report["library"]) != report["library"]]
    if changed:
        lines.append(f"**The library's source changed during the run** (variants {', '.join(changed)} saw other code).")
    if report["jobs"] > 1:
        lines.append(f"**{report['jobs']} variants ran at once: timings are not comparable (smoke check only).**")
    lines += ["", markdown_table(header, rows), "", "Per variant:"]
    for r in results:
        lines.append(f"- `{r['variant']}`: {_notes(r)} (load average {r.get('load_average_start')} → "
                     f"{r.get('load_average_end')}, 1-min mean while it ran {fmt(r.get('load_average_1min_mean'), '.2f')})")
    matmul = report["matmul_gflops"]
    lines += [
        "",
        f"Matmul peak ({report.get('matmul_device', 'cpu')}, {s['threads']} CPU threads): fp32 {matmul['float32']:.0f} GFLOP/s (best of start "
        f"{report['matmul_start']['float32']:.0f} and end {report['matmul_end']['float32']:.0f}); "
        f"bf16 {matmul['bfloat16']:.1f} GFLOP/s.",
    ]
    mfu = report["model_flops_utilisation"]
    if mfu:
        lines.append(
            f"Model-FLOPs utilisation of `ours` ({mfu['precision']}): {report['ours_tokens_per_s']:.0f} tok/s × "
            f"{mfu['flops_per_token'] / 1e6:.0f}M FLOPs/token (2N + 2N_backward, N = {mfu['total_parameters'] / 1e6:.1f}M) "
            f"= {mfu['achieved_gflops']:.1f} GFLOP/s "
            f"= **{mfu['mfu']:.1%}** of the {mfu['precision']} matmul peak ({mfu['peak_gflops']:.0f} GFLOP/s); "
            f"at the median-step rate {mfu['mfu_median_step']:.1%}."
        )
    else:
        lines.append("Model-FLOPs utilisation: not computed (`ours` did not run successfully).")
    return "\n".join(lines)


def _derive(report: dict) -> None:
    """Adds the figures computed from the measurements (ratios, median-step rates, utilisation)."""
    ours = _add_ratios(report["variants"])
    report["ours_tokens_per_s"] = ours["real_tokens_per_s"] if ours else None
    report["model_flops_utilisation"] = _model_flops_utilisation(ours, report["matmul_gflops"])


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark: every variant in its own child process, then the report."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        _derive(report)
        print(render_report(report))
        if args.json_out:
            write_json(Path(args.json_out), report)
        return 0
    work_dir = work_directory(args.work_dir, "train-benchmark-")
    settings = _settings_from_args(args, work_dir)
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))  # each once
    settings_file = work_dir / "settings.json"
    write_json(settings_file, dataclasses.asdict(settings))
    report, jobs = new_report(settings, args.smoke, args.jobs)
    logger.info("work directory %s; load average %s", work_dir, report["load_average_start"])
    report["matmul_start"] = _measure_matmul(settings.threads, args.smoke)
    report["matmul_device"] = _matmul_device()
    children = [
        ChildJob(name, run_child, settings_file, work_dir / f"{name}.result.json", work_dir / f"{name}.log")
        for name in variants
    ]
    results = run_children(children, child_environment(settings.threads, settings.model_path), jobs, args.child_timeout)
    report["matmul_end"] = _measure_matmul(settings.threads, args.smoke)
    report["matmul_gflops"] = {k: max(report["matmul_start"][k], report["matmul_end"][k]) for k in report["matmul_start"]}
    report.update(
        variants=results, load_average_end=load_average(), finished=datetime.datetime.now().isoformat(timespec="seconds")
    )
    _derive(report)
    print(render_report(report))
    if args.json_out:
        write_json(Path(args.json_out), report)
        print(f"\nwrote {args.json_out}; logs and checkpoints in {work_dir}")
    failed = [r["variant"] for r in results if r["status"] == "failed"]
    if failed:
        print(f"\nfailed variants: {', '.join(failed)} (logs in {work_dir})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
