"""Mixed-precision helpers of the training path (not Hamilton nodes).

Under autocast every frozen ``nn.Linear`` weight is cast from float32 to the autocast dtype in every
forward pass, and autograd keeps that cast copy alive until the backward pass. ``frozen_weights_in``
casts each frozen weight once for the whole of training instead, keeping the float32 original aside and
putting it back afterwards, so the matmuls are bit-for-bit those autocast would run (the same
round-to-nearest cast of the same float32 values; tested), the per-step casts disappear, and generation
after training still runs on the untouched float32 weights.
"""

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Holds every frozen ``nn.Linear`` weight (and bias) of ``model`` in ``dtype`` inside the block.

    LoRA's own ``lora_A``/``lora_B`` layers are trained, so they stay float32 (the optimizer updates
    them); quantized layers (bitsandbytes ``Linear4bit``) are not ``nn.Linear`` and are left alone. A
    weight shared by several modules (tied input and output embeddings) gets one copy per ``nn.Linear``
    that uses it; the other modules keep the original. The originals are restored on exit, also when
    the block raises.

    Memory: the ``dtype`` copies exist for the whole block (2 bytes per frozen parameter for bf16); in
    exchange, no per-forward cast copies are made or kept for the backward pass.

    :return: (as the context value) the number of weights and biases held in ``dtype``.
    """
    originals: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            if type(module) is not nn.Linear:
                continue
            for name in ("weight", "bias"):
                parameter = getattr(module, name)
                if parameter is None or parameter.requires_grad or parameter.dtype == dtype:
                    continue
                originals.append((module, name, parameter))
                setattr(module, name, nn.Parameter(parameter.detach().to(dtype), requires_grad=False))
        yield len(originals)
    finally:
        for module, name, parameter in reversed(originals):
            setattr(module, name, parameter)


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in ``model``; transformers 5 renamed the
    attribute ``is_gradient_checkpointing`` to ``is_activation_checkpointing``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False
