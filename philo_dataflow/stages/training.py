"""Training: LoRA or full fine-tuning with the transformers ``Trainer`` (a
``lib.trainer.SupervisedTokensTrainer``; a ``lib.trainer.ResumableTrainer``, the ``Trainer`` itself but for
resuming at the end, for encoder-decoder models).

Exactly one node, ``trained_parameters`` (``start="base"``), calls ``trainer.train()``; its result is
plain data (the trained parameters, metrics and log), so Hamilton's cache can keep it, and
``fitted_and_evaluated_trainer`` puts the parameters into the model that saving, prediction and metrics
use. Under ``start="presaved"`` the same names are filled from the presaved adapter: the validation loss is
recomputed, the loss history is read back.
"""

import json
import logging
from pathlib import Path
from typing import Optional, Union

import torch
from datasets import Dataset
from hamilton.function_modifiers import cache, dataloader, extract_fields, tag_outputs
from transformers import (
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..lib.artifacts import CHECKPOINTS_DIR, LOG_HISTORY_FILE, file_metadata
from ..lib.cross_entropy import LOSS_CHUNK_TOKENS
from ..lib.distributed import is_main_process
from ..lib.inputs import raise_hyperparameter_problems
from ..lib.prompts import IGNORE_INDEX
from ..lib.stopping import stop_held
from ..lib.switches import when
from ..lib.trackers import direct_tensorboard_to, reported_trackers, start_mlflow_run, tensorboard_dir
from ..lib.trainer import (
    MEMORY_SAVING_LOSS_CHUNK_TOKENS,
    ResumableTrainer,
    ReturnFreedMemory,
    StopAtSignal,
    SupervisedTokensTrainer,
    checked_resume_checkpoint,
    compiler_problem,
    has_fast_bf16,
    raise_for_full_disk_while_checkpointing,
    ready_for_generation,
    torch_compile_problems,
)

logger = logging.getLogger(__name__)

#: Checkpoints the Trainer keeps (``save_total_limit``; the one of the lowest validation loss is never the
#: one deleted, since ``load_best_model_at_end`` restores it).
CHECKPOINTS_KEPT = 2


@cache(behavior="recompute")  # it points TensorBoard at its directory (an environment variable): run it every time
def training_args(
    bf16_autocast: bool,
    output_dir: str = "outputs",
    learning_rate: float = 5e-4,
    num_train_epochs: Union[int, float] = 1.5,
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
    report_to: str = "none",
    tracking_dir: Optional[str] = None,
) -> TrainingArguments:
    """The Trainer's arguments. Tokens per optimizer step = batch size x gradient accumulation x
    (mean) sequence length.

    :param output_dir: run directory; checkpoints go to ``<output_dir>/checkpoints``.
    :param learning_rate: peak AdamW learning rate.
    :param num_train_epochs: passes over ``train_set``, fractions allowed (upper bound: early stopping
        may end sooner; the default 1.5 and its measurements: ``docs/defaults_sweep.md``).
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
    :param report_to: comma-separated experiment trackers the Trainer logs to (``"none"``, ``"all"``,
        ``"tensorboard"``, ``"mlflow"``, ``"wandb"``...: ``lib.inputs.TRACKERS``); ``all`` is resolved to the
        installed ones here. ``tracking.tracked_final_metrics`` logs the final metrics to the same trackers.
    :param tracking_dir: directory of the TensorBoard event files; None is ``<output_dir>/runs``. With
        TensorBoard among the trackers it is handed to the Trainer through the process's environment
        (``lib.trackers.direct_tensorboard_to``), so this node is never taken from Hamilton's cache. With
        MLflow among them, the main process starts the job's one MLflow run here
        (``lib.trackers.start_mlflow_run``); ``tracking.tracked_final_metrics`` ends it.
    :raises lib.problems.InputProblems: (a ValueError) a hyperparameter out of range or an unknown
        tracker, one line each.
    """
    raise_hyperparameter_problems(**locals())  # every argument; those without a rule (output_dir...) pass
    strategy = "epoch" if eval_steps is None else "steps"
    trackers = reported_trackers(report_to)
    if "tensorboard" in trackers:
        direct_tensorboard_to(tensorboard_dir(output_dir, tracking_dir))
    if "mlflow" in trackers and is_main_process():
        start_mlflow_run()
    return TrainingArguments(
        output_dir=str(Path(output_dir) / CHECKPOINTS_DIR),
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
        save_total_limit=CHECKPOINTS_KEPT,
        # A resumed run continues early stopping's count of evaluations without improvement, saved in every
        # checkpoint with its patience (the checkpoint's patience wins); transformers' default starts the count
        # at 0 again, so a resumed run could train longer than the uninterrupted one.
        restore_callback_states_from_checkpoint=True,
        train_sampling_strategy="group_by_length",
        neftune_noise_alpha=neftune_noise_alpha,
        bf16=bf16_autocast,
        seed=seed,
        data_seed=seed,
        report_to=trackers,
        use_cpu=not torch.cuda.is_available(),
    )


def bf16_autocast(device: torch.device, bf16: Optional[bool] = None) -> bool:
    """Whether training and validation run under bf16 autocast (matmuls in bf16, weights and optimizer
    state in fp32; generation always runs in the weights' precision).

    :param bf16: True or False forces it; None (the default) turns it on where bf16 matmuls are native:
        a CUDA GPU with bf16 (compute capability >= 8.0, without emulation) or a CPU with AVX512-BF16 or
        AMX-BF16 instructions (``torch.cpu.get_capabilities()``). On a CPU without bf16 instructions a
        bf16 matmul is far slower than fp32, so it stays off there (figures: ``benchmarks/README.md``).
    """
    return has_fast_bf16(device) if bf16 is None else bool(bf16)


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
        needs a C++ compiler); off by default on CUDA, where it has not been measured. Speed, memory and
        compile time are measured in ``benchmarks/README.md``.
    :raises ValueError: ``torch_compile=True`` where ``torch.compile`` cannot build code
        (``torch_compile_problems``).
    """
    problems = torch_compile_problems(torch_compile, device)
    if problems:
        raise ValueError(problems[0])
    if torch_compile is None:
        return device.type == "cpu" and compiler_problem(device.type) is None
    return bool(torch_compile)


#: The columns of a tokenized split the Trainer reads.
TRAINING_COLUMNS = ["input_ids", "attention_mask", "labels"]


def data_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads each batch to its own longest example (dynamic padding, right side); labels are padded
    with -100 by position, so padding is never supervised and the EOS always is."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def _trainer_arguments(model, training_args, data_collator, tokenized_train: Dataset, tokenized_validation: Dataset,
                       tokenizer, early_stopping_patience: int) -> dict:
    """The arguments both Trainers take: the model, its arguments, the splits' training columns, early
    stopping on validation loss and the stop at a signal (``lib.trainer.StopAtSignal``)."""
    raise_hyperparameter_problems(early_stopping_patience=early_stopping_patience)
    return {
        "model": model,
        "args": training_args,
        "data_collator": data_collator,
        "train_dataset": tokenized_train.select_columns(TRAINING_COLUMNS),
        "eval_dataset": tokenized_validation.select_columns(TRAINING_COLUMNS),
        "processing_class": tokenizer,
        "callbacks": [EarlyStoppingCallback(early_stopping_patience=early_stopping_patience), StopAtSignal()],
    }


@when(architecture="causal")
def trainer__causal(
    trainable_model: PreTrainedModel,
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
    :raises lib.problems.InputProblems: (a ValueError) ``early_stopping_patience`` out of range.
    """
    arguments = _trainer_arguments(trainable_model, training_args, data_collator, tokenized_train,
                                   tokenized_validation, tokenizer, early_stopping_patience)
    if gradient_checkpointing:
        arguments["callbacks"].append(ReturnFreedMemory())
    return SupervisedTokensTrainer(
        **arguments,
        compile_decoder_layers=compile_decoder_layers,
        loss_chunk_tokens=MEMORY_SAVING_LOSS_CHUNK_TOKENS if gradient_checkpointing else LOSS_CHUNK_TOKENS,
    )


@when(architecture="seq2seq")
def trainer__seq2seq(
    trainable_model: PreTrainedModel,
    training_args: TrainingArguments,
    data_collator: DataCollatorForSeq2Seq,
    tokenized_train: Dataset,
    tokenized_validation: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    early_stopping_patience: int = 2,
) -> Trainer:
    """The ``Trainer`` of an encoder-decoder model (a ``ResumableTrainer``: the model's own cross-entropy on
    the target tokens; the model shifts the labels right into the decoder's inputs), with early stopping on
    validation loss; not yet trained. (``Seq2SeqTrainer`` adds only generation inside evaluation, which the
    prediction nodes do.)

    :raises lib.problems.InputProblems: (a ValueError) ``early_stopping_patience`` out of range.
    """
    return ResumableTrainer(**_trainer_arguments(trainable_model, training_args, data_collator, tokenized_train,
                                                 tokenized_validation, tokenizer, early_stopping_patience))


@cache(behavior="recompute")
def resume_checkpoint_dir(output_dir: str = "outputs", resume_from_checkpoint: Optional[str] = None) -> Optional[str]:
    """The checkpoint training continues from, checked to be complete; None trains from the start
    (``lib.trainer.checked_resume_checkpoint``).

    :param resume_from_checkpoint: a ``checkpoints/checkpoint-N`` directory of an interrupted run, or
        ``"last"`` for the newest complete one in ``<output_dir>/checkpoints``.
    :raises ValueError: the checkpoint does not exist or is incomplete; ``"last"`` finds none.
    """
    return checked_resume_checkpoint(output_dir, resume_from_checkpoint)


@when(start="base")
def trained_parameters__base(resume_checkpoint_dir: Optional[str], trainer: Trainer) -> dict:
    """Trains (the only node that does), restores the best checkpoint, evaluates on ``validation_set``.

    The result is plain data, so Hamilton's cache (``build_driver(cache_dir=...)``) can store it: a re-run
    whose trainer (model, arguments, data, collator, callbacks: ``lib.caching.hash_trainer``) is unchanged
    reuses it instead of training. Mutates ``trainer``'s model in place.

    :param resume_checkpoint_dir: the checkpoint of an interrupted run to continue from, or None.
    :return: ``state_dict`` (the trained parameters, those with ``requires_grad``: the adapter's for LoRA,
        every weight for full fine-tuning; CPU tensors by parameter name), ``eval_metrics`` (``eval_loss`` of
        the kept checkpoint, its path, steps and epochs done, whether early stopping ended the run) and
        ``log_history`` (the Trainer's log entries).
    :raises lib.disk_space.NoSpaceLeft: (a ValueError) the disk filled up while a checkpoint was saved; the
        cut-off checkpoint is removed, the complete ones are kept
        (``lib.trainer.raise_for_full_disk_while_checkpointing``).
    :raises lib.stopping.StopRequested: a stop signal came while training (under ``philo-dataflow``'s
        handlers): training ended at that optimizer step's end with a checkpoint (``lib.trainer.StopAtSignal``).
    """
    with stop_held("this training step ends and its checkpoint is saved"):
        try:
            result = trainer.train(resume_from_checkpoint=resume_checkpoint_dir)
        except Exception as error:
            raise_for_full_disk_while_checkpointing(trainer, error)
            raise
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
    state_dict = {name: parameter.detach().cpu().clone()
                  for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    return {"state_dict": state_dict, "eval_metrics": eval_metrics, "log_history": list(state.log_history)}


_TRAINER_FIELDS = {
    "fit_trainer": Trainer,
    "fit_trainer_eval_metrics": dict,
    "finetuned_model": PreTrainedModel,
    "training_log_history": list,
}


@tag_outputs(**{name: {"output": "final"} for name in ("fit_trainer", "fit_trainer_eval_metrics", "finetuned_model")})
@extract_fields(_TRAINER_FIELDS)
@when(start="base")
def fitted_and_evaluated_trainer__base(trainer: Trainer, trained_parameters: dict) -> dict:
    """The trainer with the trained parameters in its model: those it was just trained to, or, when
    ``trained_parameters`` came from the cache, loaded into its freshly built model.

    :return: ``fit_trainer`` (its ``state`` is the training's only when it trained in this run: the log
        entries are ``training_log_history``), ``fit_trainer_eval_metrics`` (``trained_parameters``'
        ``eval_metrics``), ``finetuned_model`` (ready for generation), ``training_log_history``.
    :raises RuntimeError: ``trained_parameters`` names parameters the model lacks.
    """
    model = trainer.model
    missing, unexpected = model.load_state_dict(trained_parameters["state_dict"], strict=False)
    if unexpected:
        raise RuntimeError(f"trained_parameters holds {len(unexpected)} parameters the model lacks, e.g. {unexpected[0]}")
    return {
        "fit_trainer": trainer,
        "fit_trainer_eval_metrics": dict(trained_parameters["eval_metrics"]),
        "finetuned_model": ready_for_generation(model),
        "training_log_history": list(trained_parameters["log_history"]),
    }


@tag_outputs(**{name: {"output": "final"} for name in ("fit_trainer", "fit_trainer_eval_metrics", "finetuned_model")})
@extract_fields(_TRAINER_FIELDS)
@when(start="presaved")
def fitted_and_evaluated_trainer__presaved(trainer: Trainer, presaved_log_history: list) -> dict:
    """The presaved adapter, evaluated on ``validation_set`` (no training), with its saved log history."""
    return {
        "fit_trainer": trainer,
        "fit_trainer_eval_metrics": trainer.evaluate(),
        "finetuned_model": ready_for_generation(trainer.model),
        "training_log_history": presaved_log_history,
    }


@when(start="presaved")
@cache(behavior="recompute")
@dataloader()
def presaved_log_history__presaved(presaved_model_dir: str) -> tuple[list, dict]:
    """The Trainer's log history the base run saved beside the presaved adapter
    (``lib.artifacts.LOG_HISTORY_FILE``; an empty list where it is absent). A Hamilton data loader; its
    metadata is the file's ``lib.artifacts.file_metadata``.

    :raises ValueError: the file is there but not a JSON list.
    """
    path = Path(presaved_model_dir) / LOG_HISTORY_FILE
    if not path.is_file():
        return [], file_metadata(str(path))
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        history = error
    if not isinstance(history, list):
        raise ValueError(f"presaved_model_dir={presaved_model_dir!r}: {LOG_HISTORY_FILE} is not a JSON list of log "
                         "entries; copy the adapter directory again or delete that file.")
    return history, file_metadata(str(path))
