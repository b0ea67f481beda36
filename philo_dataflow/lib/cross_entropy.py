"""Causal-LM cross-entropy over the supervised tokens only, with the output head fused into the loss.

The output head (hidden x vocabulary; 576 x 49,152 for SmolLM2) makes the largest activation of a small
model: its logits, a (tokens, vocabulary) float32 tensor, plus the log-probabilities autograd keeps for
the backward pass and the gradient of both. ``chunked_linear_cross_entropy`` never holds more than
``chunk_tokens`` rows of them: it computes the loss of one chunk of tokens at a time and, since the head's
weight is frozen under LoRA, the gradient with respect to the chunk's hidden states right away
(softmax minus one-hot, times the weight), keeping only that ``(tokens, hidden)`` gradient for the
backward pass. The arithmetic is the same as ``F.cross_entropy(lm_head(hidden).float(), labels)``: the
head's matmul in the autocast dtype, the softmax in float32, the same two matmuls per token. This is the
"fused linear cross-entropy" of Liger Kernel (Hsu et al. 2024, arXiv:2410.10989) and of Cut
Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009), written in plain PyTorch so that it runs on CPU
(its memory saving is measured in ``benchmarks/README.md``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .prompts import IGNORE_INDEX

#: Rows of logits computed at once: 256 x 49,152 float32 logits are 50 MB for SmolLM2's vocabulary.
LOSS_CHUNK_TOKENS = 256

#: ``model_type``s whose ``*ForCausalLM.forward`` is ``logits = self.lm_head(self.model(...)[0])`` with no
#: scaling or soft-capping of the logits (checked in transformers 5.x: Gemma 2 soft-caps, Granite and
#: Cohere scale, so they keep the unfused path).
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3"})


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden @ weight.T + bias, labels)``, chunk by chunk; ``weight`` and
    ``bias`` receive no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, grad_enabled):
        # hidden: (tokens, hidden_size); weight: (vocab, hidden_size); bias: (vocab,) or None; labels: (tokens,)
        # ``needs_input_grad`` is True for a hidden state that requires grad even under ``torch.no_grad``
        # (evaluation), where no backward follows: the caller's grad mode decides too.
        needs_grad = ctx.needs_input_grad[0] and grad_enabled
        device_type = hidden.device.type
        # The head's matmuls run in the autocast dtype when autocast is on, as ``lm_head(hidden)`` would;
        # the weight is cast once here rather than by autocast in every chunk.
        head_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        weight = weight.to(head_dtype)
        bias = None if bias is None else bias.to(head_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            target = labels[rows]
            logits = F.linear(hidden[rows].to(head_dtype), weight, bias).float()  # (chunk, vocab)
            log_probs = torch.log_softmax(logits, dim=-1)  # (chunk, vocab)
            del logits
            loss -= log_probs.gather(1, target[:, None]).sum()
            if needs_grad:
                grad_logits = log_probs.exp_()  # softmax, in place
                grad_logits[torch.arange(target.shape[0], device=target.device), target] -= 1.0
                # Same precision as autograd through the head: logits' gradient cast to the head's dtype.
                grad_hidden[rows] = grad_logits.to(head_dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``labels``, without materialising all logits.

    :param hidden: ``(tokens, hidden_size)`` final hidden states of the positions to score.
    :param head: the frozen output projection (``nn.Linear(hidden_size, vocab)``, bias optional).
    :param labels: ``(tokens,)`` int64 next-token ids, each in ``[0, vocab)``.
    :param chunk_tokens: rows of logits computed at once; peak extra memory is about
        ``chunk_tokens x vocab x 6`` bytes.
    :return: a float32 scalar, the *sum* over tokens (divide by the number of supervised tokens).
    :raises ValueError: the head's weight or bias requires a gradient (train it with the unfused path).
    """
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("chunked_linear_cross_entropy needs a frozen output head; this one is trained.")
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_tokens, torch.is_grad_enabled())


def unwrapped_causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model``: a PEFT model's base model, or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def fusable_parts(model: nn.Module) -> Optional[tuple]:
    """``(decoder, head)`` of ``model`` (a causal LM, or a PEFT model wrapping one) when its loss can be
    fused with ``chunked_linear_cross_entropy``, else None.

    Fusable: an unwrapped model (not DDP/FSDP-wrapped: those must see their own ``forward`` called) of a
    ``FUSED_MODEL_TYPES`` architecture whose output head is a frozen ``nn.Linear`` (no LoRA on it, not
    trained as a ``modules_to_save`` copy), and not a PEFT prompt-learning model (its ``forward``
    prepends the virtual tokens).
    """
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None
    causal_lm = unwrapped_causal_lm(model)
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    decoder = getattr(causal_lm, "model", None)
    head = getattr(causal_lm, "lm_head", None)
    if decoder is None or type(head) is not nn.Linear:
        return None
    if any(parameter.requires_grad for parameter in head.parameters()):
        return None
    return decoder, head


def supervised_causal_lm_loss(
    model: torch.nn.Module, inputs: dict, num_items_in_batch=None, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple:
    """Causal-LM loss of ``model`` on a batch, computed over supervised next tokens only.

    Prompt and padding positions carry label -100 and never reach the loss, so the output head is
    applied only where the next token is supervised. Where the architecture allows it
    (``cross_entropy.fusable_parts``: Llama, Mistral, Qwen 2/3, Phi, Phi-3 with a frozen head, no DDP/FSDP
    wrapper) the head is fused into the loss (``chunked_linear_cross_entropy``) and no logits are returned;
    otherwise the model is called with a boolean ``logits_to_keep`` mask (transformers >= 5), giving
    logits of shape ``(supervised_tokens, vocab)``. Either way the loss is the same token-level
    cross-entropy as the model's own, up to float rounding (tested).

    :param inputs: ``input_ids``, ``attention_mask`` (and optionally ``position_ids``), each
        ``(batch, seq_len)``, and ``labels`` ``(batch, seq_len)`` with -100 where unsupervised.
    :param num_items_in_batch: supervised tokens across the whole gradient-accumulation step; the summed
        loss is divided by it (the transformers#34191 fix). None divides by this batch's supervised tokens.
    :return: ``(loss, outputs)``: a scalar, and a ``CausalLMOutputWithPast`` whose ``logits`` are
        ``(supervised_tokens, vocab)``, or None on the fused path.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")  # (batch, seq_len), -100 where unsupervised
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq_len): token each position predicts
    keep = next_labels != IGNORE_INDEX  # (batch, seq_len) bool
    parts = fusable_parts(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (batch, seq_len, hidden_size)
        loss = chunked_linear_cross_entropy(hidden[keep], head, next_labels[keep], chunk_tokens)
        outputs = CausalLMOutputWithPast(logits=None)
    else:
        outputs = model(**inputs, logits_to_keep=keep)  # logits: (supervised_tokens, vocab)
        loss = F.cross_entropy(outputs.logits.float(), next_labels[keep], reduction="sum")
    if num_items_in_batch is None:  # evaluation: mean over this batch's supervised tokens
        loss = loss / keep.sum().clamp(min=1)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    outputs["loss"] = loss
    return loss, outputs
