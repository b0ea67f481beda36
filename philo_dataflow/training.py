"""Stage 5 — LoRA training with the transformers ``Trainer``.

Exactly one node, ``fitted_and_evaluated_trainer`` (``start="base"``), calls ``trainer.train()``;
saving, prediction and metrics depend on its outputs. Under ``start="presaved"`` the same names are
filled from the presaved adapter: the validation loss is recomputed, the loss history is read back.
"""

import contextlib
import functools
import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset
from hamilton.function_modifiers import config, extract_fields, hamilton_exclude
from peft import PeftModel
from transformers import (
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .cross_entropy import LOSS_CHUNK_TOKENS, supervised_causal_lm_loss, unwrapped_causal_lm

logger = logging.getLogger(__name__)

#: File beside a saved adapter holding the Trainer's log history (train and validation loss by step).
LOG_HISTORY_FILE = "training_log_history.json"
#: ``resume_from_checkpoint`` value meaning "the newest complete checkpoint in ``<output_dir>/checkpoints``".
LAST_CHECKPOINT = "last"
#: The Trainer writes this file last into a checkpoint (after adapter, optimizer, scheduler and RNG
#: states); a checkpoint without a readable one was cut off while being saved.
_TRAINER_STATE_FILE = "trainer_state.json"


def training_args(
    bf16_autocast: bool,
    output_dir: str = "outputs",
    learning_rate: float = 5e-4,
    num_train_epochs: int = 3,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 16,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.05,
    lr_scheduler_type: str = "cosine",
    weight_decay: float = 0.0,
    eval_steps: Optional[int] = None,
    logging_steps: int = 5,
    neftune_noise_alpha: Optional[float] = None,
    seed: int = 42,
) -> TrainingArguments:
    """The Trainer's arguments. Tokens per optimizer step = batch size x gradient accumulation x
    (mean) sequence length.

    :param output_dir: run directory; checkpoints go to ``<output_dir>/checkpoints``.
    :param learning_rate: peak AdamW learning rate.
    :param num_train_epochs: passes over ``train_set`` (upper bound: early stopping may end sooner).
        Default 3 (chosen in ``docs/defaults_sweep.md``): on ``example_data/`` the third epoch lowered the
        validation loss (3.263 -> 3.230; on the data's first version 3.528 -> 3.500, with the EOS-stop rate
        93% -> 100%); with bf16 autocast the main job then takes about 6 minutes on a 2-core CPU with
        AVX512-BF16.
    :param max_steps: optimizer steps to stop after; -1 means use ``num_train_epochs``.
    :param per_device_train_batch_size: examples per forward pass in training.
    :param per_device_eval_batch_size: examples per forward pass in evaluation.
    :param gradient_accumulation_steps: forward passes per optimizer step.
    :param warmup_ratio: share of all optimizer steps spent warming the learning rate up linearly.
    :param lr_scheduler_type: schedule after warm-up (``"cosine"``, ``"linear"``, ``"constant"``...).
    :param weight_decay: AdamW decoupled weight decay.
    :param eval_steps: optimizer steps between validation-loss evaluations (and checkpoints);
        None evaluates once per epoch.
    :param logging_steps: optimizer steps between training-loss log entries.
    :param neftune_noise_alpha: NEFTune embedding-noise scale (Jain et al. 2023); None disables it.
    :param bf16_autocast: see ``bf16_autocast``.
    :param seed: seeds model init, dropout and data order (``seed`` and ``data_seed``).
    :raises ValueError: a hyperparameter out of range (``preflight.hyperparameter_problems``'s lines).
    """
    from .preflight import raise_hyperparameter_problems  # imported here: preflight imports this module

    raise_hyperparameter_problems(**locals())  # every argument; those without a rule (output_dir...) pass
    strategy = "epoch" if eval_steps is None else "steps"
    return TrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_steps=warmup_ratio,
        lr_scheduler_type=lr_scheduler_type,
        weight_decay=weight_decay,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=eval_steps,
        save_steps=eval_steps,
        logging_strategy="steps",
        logging_steps=logging_steps,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=2,
        train_sampling_strategy="group_by_length",
        neftune_noise_alpha=neftune_noise_alpha,
        bf16=bf16_autocast,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def _has_fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch without the keyword
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        get_capabilities = getattr(torch.cpu, "get_capabilities", None)
        capabilities = get_capabilities() if get_capabilities else {}
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def bf16_autocast(device: torch.device, bf16: Optional[bool] = None) -> bool:
    """Whether training and validation run under bf16 autocast (matmuls in bf16, weights and optimizer
    state in fp32; generation always runs in the weights' precision).

    :param bf16: True or False forces it; None (the default) turns it on where bf16 matmuls are native:
        a CUDA GPU with bf16 (compute capability >= 8.0, without emulation) or a CPU with AVX512-BF16 or
        AMX-BF16 instructions (``torch.cpu.get_capabilities()``). Measured on a 2-core AMD EPYC with
        AVX512-BF16: the main job's training took 254 s instead of 386 s (1.52x) with validation loss
        3.528 instead of 3.525 and hold-out ROUGE-L within noise (``docs/defaults_sweep.md``). On a CPU
        without bf16 instructions a bf16 matmul is ~100x slower than fp32, so it stays off there.
    """
    return _has_fast_bf16(device) if bf16 is None else bool(bf16)


@functools.cache
def _compiler_problem(device_type: str) -> Optional[str]:
    """Why ``torch.compile`` cannot build and run a small forward and backward graph on ``device_type``
    (inductor's C++ backend on a CPU, triton on CUDA), or None. Probed once per process (about 2 s the
    first time, well under 1 s once inductor's on-disk cache holds the probe)."""

    def probe(x):
        return torch.nn.functional.silu(x) * x + 1.0

    try:
        x = torch.randn(4, 8, device=device_type, requires_grad=True)
        torch.compile(probe, dynamic=True, fullgraph=True)(x).sum().backward()
    except Exception as error:  # any failure of the toolchain (no compiler, no triton...) means: do not compile
        message = str(error).strip().splitlines()
        return f"{type(error).__name__}: {message[0] if message else 'no message'}"
    return None


@hamilton_exclude
def torch_compile_problems(torch_compile: Optional[bool], device: torch.device) -> list[str]:
    """Why ``torch_compile=True`` cannot be honoured here: ``torch.compile`` failed to build the probe
    graph (``_compiler_problem``). None (auto) and False have no problems: auto turns compilation off."""
    if torch_compile is not True:
        return []
    problem = _compiler_problem(device.type)
    if problem is None:
        return []
    needs = "a C++ compiler (g++ or clang++ on the PATH, or $CXX)" if device.type == "cpu" else "triton"
    return [f"torch_compile=True, but torch.compile cannot build code on this {device.type} ({problem}): install "
            f"{needs}, or leave torch_compile unset (auto) or False (--no-torch-compile)."]


def compile_decoder_layers(device: torch.device, torch_compile: Optional[bool] = None) -> bool:
    """Whether training compiles each decoder layer with ``torch.compile`` (PyTorch's *regional
    compilation* recipe, https://pytorch.org/tutorials/recipes/regional_compilation.html: the layers
    share one compiled graph, so compiling 30 costs about as much as compiling one).

    Only the training loop (and the validation passes inside it) runs compiled: the layers are
    restored when it returns, so generation and the final ``evaluate()`` run the model as loaded.
    Compilation uses dynamic shapes (batches of every length share the graph). On a CPU, compiled
    training also switches to eager attention when no training or validation example is longer than
    ``EAGER_ATTENTION_MAX_TOKENS`` (restored with the layers): inductor fuses its softmax, and its
    matmuls run near the peak where torch's CPU flash-attention backward does not.

    :param torch_compile: True or False forces it; None (the default) turns it on for a CPU where
        ``torch.compile`` builds and runs a small forward and backward graph (inductor's CPU backend
        needs a C++ compiler). Measured on a 2-core AMD EPYC with AVX512-BF16 (SmolLM2-135M, batch 8 of
        ~140 tokens, bf16 autocast, LoRA on q_proj,v_proj): 428 real tokens/s against 374 eager (1.14x)
        and peak RSS 2.58 GB against 3.16 in one ``benchmarks/train_benchmark.py`` run (1.19-1.21x in a
        plain process), losses equal to +-0.002. Compiling costs ~45 s the first time (the first step and
        the first validation pass) and ~10 s once inductor's on-disk cache holds the graphs, so it pays
        off from about 90 optimizer steps of this model on. With the eager-attention switch as well: 521
        against 347 tokens/s (1.50x), peak RSS 2.72 against 3.03 GB, in another run of the benchmark.
        Off by default on CUDA, where it has not been measured.
    :raises ValueError: ``torch_compile=True`` where ``torch.compile`` cannot build code
        (``torch_compile_problems``).
    """
    problems = torch_compile_problems(torch_compile, device)
    if problems:
        raise ValueError(problems[0])
    if torch_compile is None:
        return device.type == "cpu" and _compiler_problem(device.type) is None
    return bool(torch_compile)


def _repeated_blocks(model: torch.nn.Module) -> list:
    """The first ``nn.ModuleList`` whose children are all of one class (a decoder's layers), or []."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


@contextlib.contextmanager
def _compiled_decoder_layers(model: torch.nn.Module, enabled: bool = True):
    """Within the block, each decoder layer of ``model`` is compiled in place (``nn.Module.compile``,
    dynamic shapes; parameter names and the state dict stay unchanged); on exit the layers run eagerly
    again. A forward pass dynamo fails to trace runs eagerly instead (``suppress_errors``); a missing
    compiler is caught earlier, by ``_compiler_problem``. Nested use leaves layers compiled by an outer
    block to it."""
    layers = [layer for layer in _repeated_blocks(model) if getattr(layer, "_compiled_call_impl", None) is None] if enabled else []
    try:
        for layer in layers:
            layer.compile(dynamic=True)
        with torch._dynamo.config.patch(suppress_errors=True) if layers else contextlib.nullcontext():
            yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


#: Longest training or validation example, in tokens, up to which compiled training on a CPU uses eager
#: attention. Measured on a 2-core AMD EPYC with AVX512-BF16 (SmolLM2-135M, batch 8, compiled layers, bf16
#: autocast): at 256 tokens eager attention ran 541 real tokens/s against 441 for SDPA (torch's CPU
#: flash-attention kernel, whose backward runs far below the matmul peak) at peak RSS 3.11 against 2.56
#: GB; at 512 tokens both ran ~390 tokens/s and eager peaked at 5.82 GB against 3.36, its
#: batch x heads x length^2 attention weights kept per layer for the backward pass.
EAGER_ATTENTION_MAX_TOKENS = 256


def _longest_example(*datasets) -> int:
    """Tokens of the longest example in ``datasets`` (each a ``Dataset`` with ``input_ids``, a dict of
    them, or None)."""
    flat = [d for dataset in datasets for d in (dataset.values() if isinstance(dataset, dict) else [dataset]) if d is not None]
    return max((max(map(len, d["input_ids"]), default=0) for d in flat), default=0)


@contextlib.contextmanager
def _training_attention(model: torch.nn.Module, longest_example: int, compiled: bool):
    """Within the block, a model whose decoder layers are ``compiled`` on a CPU uses eager attention
    (``set_attn_implementation("eager")``) when no example is longer than ``EAGER_ATTENTION_MAX_TOKENS``;
    on exit its own attention implementation is restored, so generation is unchanged."""
    causal_lm = unwrapped_causal_lm(model)
    config = getattr(causal_lm, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    device = next(causal_lm.parameters()).device
    switch = (compiled and device.type == "cpu" and previous not in (None, "eager")
              and 0 < longest_example <= EAGER_ATTENTION_MAX_TOKENS and hasattr(causal_lm, "set_attn_implementation"))
    if switch:
        causal_lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            causal_lm.set_attn_implementation(previous)


#: Loss chunk (tokens) in the memory-saving mode (``gradient_checkpointing=True``): with activations
#: recomputed, the fused loss's chunk of logits is a visible share of the peak (``benchmarks/README.md``).
MEMORY_SAVING_LOSS_CHUNK_TOKENS = 64


class ReturnFreedMemory(TrainerCallback):
    """After every optimizer step, hands the heap memory glibc keeps freed back to the system
    (``malloc_trim(0)``, glibc's own call; a no-op where the C library has none). With activations
    recomputed the freed memory is mostly the last step's recomputed layers, which the next step
    allocates afresh; without checkpointing trimming measured slower (``benchmarks/README.md``)."""

    def __init__(self):
        import ctypes
        import ctypes.util

        try:
            self._malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            self._malloc_trim = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def data_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads each batch to its own longest example (dynamic padding, right side); labels are padded
    with -100 by position, so padding is never supervised and the EOS always is."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


class SupervisedTokensTrainer(Trainer):
    """``Trainer`` whose loss is ``supervised_causal_lm_loss``: the output head (the largest matmul of a
    small model, whose logits are its largest activation) runs only where the next token is supervised,
    fused into the loss in chunks where the architecture allows it. Autocast is entered here (the
    fused path calls the decoder directly, not the ``forward`` accelerate wraps in autocast)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, compile_decoder_layers: bool = False, loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile_decoder_layers = compile_decoder_layers
        self.loss_chunk_tokens = loss_chunk_tokens

    def train(self, *args, **kwargs):
        """``Trainer.train``, with the decoder layers compiled when ``compile_decoder_layers`` is set, and
        then on a CPU with eager attention where every example is short (``EAGER_ATTENTION_MAX_TOKENS``)."""
        longest = _longest_example(self.train_dataset, self.eval_dataset) if self.compile_decoder_layers else 0
        with _compiled_decoder_layers(self.model, self.compile_decoder_layers), \
                _training_attention(self.model, longest, self.compile_decoder_layers):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():
            loss, outputs = supervised_causal_lm_loss(model, inputs, num_items_in_batch, self.loss_chunk_tokens)
        return (loss, outputs) if return_outputs else loss


def trainer(
    peft_model: PeftModel,
    training_args: TrainingArguments,
    data_collator: DataCollatorForSeq2Seq,
    tokenized_train: Dataset,
    tokenized_validation: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    compile_decoder_layers: bool,
    early_stopping_patience: int = 2,
    gradient_checkpointing: bool = False,
) -> Trainer:
    """The Trainer (a ``SupervisedTokensTrainer``), with early stopping on validation loss; not yet trained.

    :param early_stopping_patience: evaluations without a lower validation loss before training stops;
        the checkpoint with the lowest validation loss is restored at the end.
    :raises ValueError: ``early_stopping_patience`` out of range (``preflight.hyperparameter_problems``).
    """
    from .preflight import raise_hyperparameter_problems  # imported here: preflight imports this module

    raise_hyperparameter_problems(early_stopping_patience=early_stopping_patience)
    columns = ["input_ids", "attention_mask", "labels"]
    return SupervisedTokensTrainer(
        model=peft_model,
        args=training_args,
        data_collator=data_collator,
        train_dataset=tokenized_train.select_columns(columns),
        eval_dataset=tokenized_validation.select_columns(columns),
        processing_class=tokenizer,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=early_stopping_patience)]
        + ([ReturnFreedMemory()] if gradient_checkpointing else []),
        compile_decoder_layers=compile_decoder_layers,
        loss_chunk_tokens=MEMORY_SAVING_LOSS_CHUNK_TOKENS if gradient_checkpointing else LOSS_CHUNK_TOKENS,
    )


def _ready_for_generation(model: PeftModel) -> PeftModel:
    # Under mixed precision accelerate patches ``model.forward`` with an autocast wrapper that outlives
    # the Trainer; removed, generation runs in the weights' own precision on every machine, so a
    # presaved adapter gives the same answers wherever it is re-evaluated.
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.eval()
    model.config.use_cache = True
    return model


_TRAINER_FIELDS = {
    "fit_trainer": Trainer,
    "fit_trainer_eval_metrics": dict,
    "finetuned_model": PeftModel,
    "training_log_history": list,
}


def _is_complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / _TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def resume_checkpoint_dir(output_dir: str = "outputs", resume_from_checkpoint: Optional[str] = None) -> Optional[str]:
    """The checkpoint training continues from, checked to be complete; None trains from the start.

    A Trainer checkpoint holds the adapter, optimizer, scheduler and RNG states and the trainer state
    (log history, best checkpoint, early-stopping counter), so a resumed run takes the same steps on
    the same batches as an uninterrupted one.

    :param resume_from_checkpoint: a ``checkpoints/checkpoint-N`` directory of an interrupted run, or
        ``"last"`` for the newest complete one in ``<output_dir>/checkpoints``.
    :raises ValueError: the directory does not exist or was cut off while being saved (no readable
        ``trainer_state.json``); ``"last"`` finds no complete checkpoint.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == LAST_CHECKPOINT:
        checkpoints = Path(output_dir) / "checkpoints"
        complete = [
            path for path in checkpoints.glob("checkpoint-*")
            if re.fullmatch(r"checkpoint-\d+", path.name) and _is_complete_checkpoint(path)
        ]
        if not complete:
            raise ValueError(f"resume_from_checkpoint='last': {checkpoints} holds no complete checkpoint to resume from.")
        return str(max(complete, key=lambda path: int(path.name.split("-")[1])))
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r}: no such checkpoint directory.")
    if not _is_complete_checkpoint(path):
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} has no readable {_TRAINER_STATE_FILE}: the run "
            f"was stopped while saving it. Resume from an earlier checkpoint, or pass '{LAST_CHECKPOINT}' for the "
            "newest complete one."
        )
    return str(path)


@extract_fields(_TRAINER_FIELDS)
@config.when(start="base")
def fitted_and_evaluated_trainer__base(resume_checkpoint_dir: Optional[str], trainer: Trainer) -> dict:
    """Trains (the only node that does), restores the best checkpoint, evaluates on ``validation_set``.

    Mutates ``trainer`` and its model; only this node's outputs are used downstream.

    :param resume_checkpoint_dir: the checkpoint of an interrupted run to continue from, or None.
    :return: ``fit_trainer``, ``fit_trainer_eval_metrics`` (``eval_loss`` of the kept checkpoint, its
        path, steps and epochs done, whether early stopping ended the run), ``finetuned_model``
        (ready for generation), ``training_log_history`` (the Trainer's log entries).
    """
    result = trainer.train(resume_from_checkpoint=resume_checkpoint_dir)
    eval_metrics = trainer.evaluate()
    state = trainer.state
    eval_metrics.update(
        best_model_checkpoint=state.best_model_checkpoint,
        global_step=state.global_step,
        epochs_trained=state.epoch,
        max_steps=state.max_steps,
        stopped_early=state.global_step < state.max_steps,
        train_runtime_s=result.metrics.get("train_runtime"),
        train_loss=result.training_loss,
    )
    return {
        "fit_trainer": trainer,
        "fit_trainer_eval_metrics": eval_metrics,
        "finetuned_model": _ready_for_generation(trainer.model),
        "training_log_history": list(state.log_history),
    }


@extract_fields(_TRAINER_FIELDS)
@config.when(start="presaved")
def fitted_and_evaluated_trainer__presaved(trainer: Trainer, presaved_model_dir: str) -> dict:
    """The presaved adapter, evaluated on ``validation_set`` (no training), with its saved log history."""
    eval_metrics = trainer.evaluate()
    history_path = Path(presaved_model_dir) / LOG_HISTORY_FILE
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
    return {
        "fit_trainer": trainer,
        "fit_trainer_eval_metrics": eval_metrics,
        "finetuned_model": _ready_for_generation(trainer.model),
        "training_log_history": history,
    }
