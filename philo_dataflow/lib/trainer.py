"""The training machinery behind the ``training`` stage: the ``Trainer`` subclasses (one that takes no step
past the end when resumed there; under it, one whose loss is computed over supervised tokens only,
``cross_entropy``), regional compilation of the decoder layers and the eager-attention switch while
compiled, the compiler and bf16 probes, the memory-saving callback, the callback that stops training at a
signal with a checkpoint, the search for a complete checkpoint to resume from, and the removal of one cut
off by a full disk.
"""

import contextlib
import functools
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .artifacts import CHECKPOINTS_DIR, TRAINER_STATE_FILE, complete_checkpoints, is_complete_checkpoint
from .disk_space import newest_file, raise_if_out_of_space, tokenizer_bytes, training_run_bytes
from .distributed import is_main_process
from .problems import flag
from .cross_entropy import (
    LOSS_CHUNK_TOKENS,
    supervised_causal_lm_loss,
    unwrapped_causal_lm,
)
from .distributed import largest_of_every_process
from .stopping import note_checkpoint, request_stop, requested_stop

#: ``resume_from_checkpoint`` value meaning "the newest complete checkpoint in ``<output_dir>/checkpoints``".
LAST_CHECKPOINT = "last"


def has_fast_bf16(device: torch.device) -> bool:
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


@functools.cache
def compiler_problem(device_type: str) -> Optional[str]:
    """Why ``torch.compile`` cannot build and run a small forward and backward graph on ``device_type``
    (inductor's C++ backend on a CPU, triton on CUDA), or None. Probed once per process."""

    def probe(x):
        return torch.nn.functional.silu(x) * x + 1.0

    try:
        x = torch.randn(4, 8, device=device_type, requires_grad=True)
        torch.compile(probe, dynamic=True, fullgraph=True)(x).sum().backward()
    except Exception as error:  # any failure of the toolchain (no compiler, no triton...) means: do not compile
        message = str(error).strip().splitlines()
        return f"{type(error).__name__}: {message[0] if message else 'no message'}"
    return None


def torch_compile_problems(torch_compile: Optional[bool], device: torch.device) -> list[str]:
    """Why ``torch_compile=True`` cannot be honoured here: ``torch.compile`` failed to build the probe
    graph (``compiler_problem``). None (auto) and False have no problems: auto turns compilation off."""
    if torch_compile is not True:
        return []
    problem = compiler_problem(device.type)
    if problem is None:
        return []
    needs = "a C++ compiler (g++ or clang++ on the PATH, or $CXX)" if device.type == "cpu" else "triton"
    return [f"torch_compile=True, but torch.compile cannot build code on this {device.type} ({problem}): install "
            f"{needs}, or leave torch_compile unset (auto) or False (--no-torch-compile)."]


def _repeated_blocks(model: torch.nn.Module) -> list:
    """The first ``nn.ModuleList`` whose children are all of one class (a decoder's layers), or []."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


def _kernel_routed_modules(model: torch.nn.Module, layers: list) -> list:
    """The modules of ``layers`` whose class ``forward`` is the hub-kernel router of the ``kernels`` package
    (``use_kernelized_func``, on Llama's attention since transformers 5.25): a ``functools.wraps`` wrapper
    that records the module's kernel functions in a global before calling the class's own ``forward``.
    Only for a model loaded without hub kernels (``use_kernels`` false), where each of those functions is
    its plain torch fallback, so calling the own ``forward`` directly computes the same; [] otherwise."""
    if getattr(unwrapped_causal_lm(model), "use_kernels", False):
        return []
    return [module for layer in layers for module in layer.modules()
            if "_kernel_funcs" in vars(module) and hasattr(type(module).forward, "__wrapped__")]


@contextlib.contextmanager
def _compiled_decoder_layers(model: torch.nn.Module, enabled: bool = True):
    """Within the block, each decoder layer of ``model`` is compiled in place (``nn.Module.compile``,
    dynamic shapes; parameter names and the state dict stay unchanged); on exit the layers run eagerly
    again. A forward pass dynamo fails to trace runs eagerly instead (``suppress_errors``); a missing
    compiler is caught earlier, by ``compiler_problem``. Nested use leaves layers compiled by an outer
    block to it.

    Inside compiled layers, modules behind the ``kernels`` router (``_kernel_routed_modules``) call their
    own ``forward`` directly: the router writes to a global, which dynamo refuses inside activation
    checkpointing ("HOP: Unsafe side effect"), so with ``gradient_checkpointing`` each layer would break
    out of its graph (the cost, measured under transformers 5.25: ``benchmarks/README.md``)."""
    layers = [layer for layer in _repeated_blocks(model) if getattr(layer, "_compiled_call_impl", None) is None] if enabled else []
    routed = _kernel_routed_modules(model, layers) if layers else []
    try:
        for module in routed:
            module.forward = type(module).forward.__wrapped__.__get__(module)
        for layer in layers:
            layer.compile(dynamic=True)
        with torch._dynamo.config.patch(suppress_errors=True) if layers else contextlib.nullcontext():
            yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        for module in routed:
            vars(module).pop("forward", None)


#: Longest training or validation example, in tokens, up to which compiled training on a CPU uses eager
#: attention: beyond it eager attention's (batch x heads x length^2) weights cost more memory than its
#: speed is worth (measured in ``benchmarks/README.md``).
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


class StopAtSignal(TrainerCallback):
    """Ends training at the end of the optimizer step during which a stop signal came (``lib.stopping``),
    through the Trainer's own flags: ``should_save`` (its checkpoint of that step: adapter, optimizer,
    scheduler, RNG and trainer state, early-stopping counter included), ``should_log`` (the training loss
    since the last log entry, which would otherwise be lost) and ``should_training_stop``. ``Trainer.train``
    then returns as at the end of training, and the ``stop_held`` block around it raises
    ``StopRequested``. A step that evaluates anyway still does, before its checkpoint; an epoch broken off
    gets no evaluation and checkpoint of its end (those ``evaluation per epoch`` asks for), the
    uninterrupted run making none there. So the best checkpoint and early stopping are decided as in an
    uninterrupted run.

    With several processes every one asks the others at each step's end (``largest_of_every_process``, one
    integer all-reduced), so all of them stop at the same step whichever got the signal and whenever it
    arrived; with one process nothing is exchanged. Records every checkpoint saved
    (``lib.stopping.note_checkpoint``) for the stop's message.
    """

    def __init__(self):
        self._stopped_at_step = None

    def on_step_end(self, args, state, control, **kwargs):
        signum = largest_of_every_process(requested_stop() or 0, args.device)
        if signum:
            request_stop(signum)
            control.should_log = control.should_save = control.should_training_stop = True
            self._stopped_at_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer ends the epoch it broke off too, and with evaluation per epoch its flow callback then asks
        # for an evaluation and a checkpoint: an evaluation the uninterrupted run never makes, which could become
        # the best one. Only where the stop falls on the epoch's (or training's) own end are they kept.
        if (self._stopped_at_step == state.global_step and state.global_step < state.max_steps
                and not float(state.epoch).is_integer()):
            control.should_evaluate = control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        note_checkpoint(str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class ResumableTrainer(Trainer):
    """``Trainer`` that takes no step past ``max_steps`` when resumed from a checkpoint of the last step: where
    that step falls inside an epoch (fractional ``num_train_epochs``, the default 1.5, or ``max_steps``),
    ``Trainer._inner_training_loop`` (transformers 5.25) runs the epoch it lies in, skips the steps done and
    trains one more before it checks ``max_steps``: a run resumed after its training ended (stopped while
    generating or saving) took a step the uninterrupted run did not, and evaluated and kept it."""

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:
            return None  # straight to the end of training, as after an epoch's last step
        return super()._run_epoch(*args, **kwargs)


class SupervisedTokensTrainer(ResumableTrainer):
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

    def _get_train_sampler(self, train_dataset=None):
        """The ``Trainer``'s sampler, with ``group_by_length``'s mega-batches (``LengthGroupedSampler``: a
        random permutation cut into mega-batches, each sorted by length) sized by the global batch,
        ``train_batch_size x gradient_accumulation_steps x world_size``. The ``Trainer`` (transformers 5.24
        ``trainer.py`` line 1101) leaves out ``world_size``, so several processes would take the examples
        in another order than one process at the same global batch. accelerate hands consecutive
        per-device batches to the processes in turn, so every optimizer step now takes the examples one
        process takes at that global batch. Unchanged with one process."""
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``supervised_causal_lm_loss`` of the batch: its summed loss over ``num_items_in_batch`` (the
        supervised tokens of the optimizer step, across every process), times the number of data-parallel
        processes, as ``Trainer.compute_loss`` scales it.

        With several processes, ``Trainer._get_num_items_in_batch`` (transformers 5.24 ``trainer.py``
        lines 2347-2350) sums the token count over all processes when ``average_tokens_across_devices``
        (the default), so each process's loss is its share of the global mean; DDP then *averages* the
        gradients over the processes, and the logged training loss and the validation loss (whose
        ``prediction_step`` passes the count gathered the same way, line 3270) are averaged too.
        ``Trainer.compute_loss`` (lines 2207-2215) multiplies by ``num_processes // tp_size`` to undo that
        average; this override replaces it and must do the same, or the gradients, the training loss and
        the validation loss come out ``1 / num_processes`` of the single-process ones at the same global
        batch (``tests/test_distributed.py``). Under ``DataParallel`` (several GPUs, one process) the loss
        is computed here on the gathered logits, so no factor applies.
        """
        with self.accelerator.autocast():
            loss, outputs = supervised_causal_lm_loss(model, inputs, num_items_in_batch, self.loss_chunk_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.args.n_gpu <= 1:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss


def ready_for_generation(model: PeftModel) -> PeftModel:
    # Under mixed precision accelerate patches ``model.forward`` with an autocast wrapper that outlives
    # the Trainer; removed, generation runs in the weights' own precision on every machine, so a
    # presaved adapter gives the same answers wherever it is re-evaluated.
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.eval()
    model.config.use_cache = True
    return model


def raise_for_full_disk_while_checkpointing(trainer: Trainer, error: BaseException) -> None:
    """What a failed ``trainer.train()`` left of the checkpoint it was saving: when the checkpoint of the
    current step is incomplete (``lib.artifacts.is_complete_checkpoint``), it is removed (with the checkpoints
    directory, if that is left empty), and if ``error`` is a full disk this raises it as one line. Returns
    otherwise; with several processes only the main one, which writes the checkpoints, does anything.

    :raises lib.disk_space.NoSpaceLeft: naming the file being written, the bytes of a checkpoint (those of
        the newest complete one, else ``disk_space.training_run_bytes``' estimate) and the bytes free, and
        how to continue from the newest complete checkpoint, if any.
    """
    checkpoints = Path(trainer.args.output_dir)
    cut_off = checkpoints / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    if not is_main_process() or not cut_off.is_dir() or is_complete_checkpoint(cut_off):
        return
    complete = complete_checkpoints(checkpoints)
    rerun = ""
    if complete:
        needed = sum(path.stat().st_size for path in complete[-1].rglob("*") if path.is_file())
        rerun = f" with {flag('resume_from_checkpoint')} {LAST_CHECKPOINT} to continue from {complete[-1].name}"
    else:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        needed = training_run_bytes(trainable, tokenizer_bytes(trainer.processing_class), 0, 1, 1)["checkpoint"]

    def remove_cut_off() -> None:
        shutil.rmtree(cut_off, ignore_errors=True)
        if not complete:
            with contextlib.suppress(OSError):
                checkpoints.rmdir()  # only when empty

    raise_if_out_of_space(error, newest_file(cut_off) or cut_off, needed, "a checkpoint",
                          f"the cut-off {cut_off.name} was removed", rerun, where=checkpoints.parent,
                          cleanup=remove_cut_off)


def checked_resume_checkpoint(output_dir: str = "outputs", resume_from_checkpoint: Optional[str] = None) -> Optional[str]:
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
        checkpoints = Path(output_dir) / CHECKPOINTS_DIR
        complete = complete_checkpoints(checkpoints)
        if not complete:
            raise ValueError(f"resume_from_checkpoint='last': {checkpoints} holds no complete checkpoint to resume from.")
        return str(complete[-1])
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r}: no such checkpoint directory.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} has no readable {TRAINER_STATE_FILE}: the run "
            f"was stopped while saving it. Resume from an earlier checkpoint, or pass '{LAST_CHECKPOINT}' for the "
            "newest complete one."
        )
    return str(path)
