"""``precision.frozen_weights_in``: frozen weights held in bf16 give bit-for-bit the matmuls autocast
runs, and the float32 originals come back, also after an error."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from philo_dataflow.modeling import lora_config
from philo_dataflow.precision import activation_checkpointing_on, frozen_weights_in


@pytest.fixture
def peft_model(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return get_peft_model(base, lora_config(base))


def _loss_and_lora_grads(model):
    model.zero_grad()
    input_ids = torch.arange(3, 40).reshape(1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_frozen_bf16_weights_give_exactly_the_autocast_loss_and_gradients(peft_model):
    expected_loss, expected_grads = _loss_and_lora_grads(peft_model)
    with frozen_weights_in(peft_model, torch.bfloat16) as held:
        assert held > 0
        loss, grads = _loss_and_lora_grads(peft_model)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_frozen_weights_are_held_in_bf16_inside_and_the_originals_return_after_an_error(peft_model):
    before = dict(peft_model.named_parameters())
    causal_lm = peft_model.get_base_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        with frozen_weights_in(peft_model, torch.bfloat16):
            inside = dict(peft_model.named_parameters())
            raise RuntimeError("interrupted")
    frozen_linear = "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"
    lora = "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    assert inside[frozen_linear].dtype == torch.bfloat16
    assert inside[lora] is before[lora]  # trained: left in float32
    assert "base_model.model.model.embed_tokens.weight" in inside  # the embedding is not a Linear: untouched
    after = dict(peft_model.named_parameters())
    assert all(after[name] is parameter for name, parameter in before.items())
    assert causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight


def test_activation_checkpointing_is_read_from_the_model(peft_model):
    assert not activation_checkpointing_on(peft_model)
    peft_model.gradient_checkpointing_enable()
    assert activation_checkpointing_on(peft_model)
