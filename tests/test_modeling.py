"""Model loading: clear errors offline, safetensors only, the embedded GGUF made trainable."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from philo_dataflow.stages.modeling import (
    base_model,
    lora_config,
    model_summary,
    peft_model__base,
    tokenizer__base,
)


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model_id='nobody/no-such-model'.*not available offline"):
        tokenizer__base("nobody/no-such-model")


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such model directory"):
        base_model(str(tmp_path / "nope"), AutoModelForCausalLM, torch.device("cpu"))


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file

    shutil.copy(f"{tiny_model_dir}/config.json", tmp_path)
    torch.save(load_file(f"{tiny_model_dir}/model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot load"):
        base_model(str(tmp_path), AutoModelForCausalLM, torch.device("cpu"))


def test_4bit_needs_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        base_model(tiny_model_dir, AutoModelForCausalLM, torch.device("cpu"), load_in_4bit=True)


def test_embedded_model_is_dense_trainable_and_summarised(embedded_model_dir):
    from philo_dataflow.lib.inputs import EMBEDDED_MODEL_ID

    model = base_model(EMBEDDED_MODEL_ID, AutoModelForCausalLM, torch.device("cpu"))
    assert getattr(model, "hf_quantizer", None) is None  # the GGUF quantizer marker is gone
    assert all(p.dtype == torch.float32 for p in model.parameters())
    peft = peft_model__base(model, lora_config(model, lora_target_modules="q_proj,v_proj", lora_layers_to_transform="all"))
    summary = model_summary(peft, torch.device("cpu"))
    assert 134_000_000 < summary["total_parameters"] < 136_000_000
    # r=16 on q (576x576) and v (576x192) in 30 layers: 16*(576+576) + 16*(576+192) per layer
    assert summary["trainable_parameters"] == 30 * (16 * (576 + 576) + 16 * (576 + 192))
    assert summary["lora_training_flops_per_token"] == 4 * summary["total_parameters"]


def test_lora_on_top_layers_only(tiny_model_dir):
    model = base_model(tiny_model_dir, AutoModelForCausalLM, torch.device("cpu"))
    layers = model.config.num_hidden_layers
    peft = peft_model__base(model, lora_config(model, lora_layers_to_transform="top:1"))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in peft.named_parameters() if p.requires_grad}
    assert adapted == {str(layers - 1)}
    summary = model_summary(peft, torch.device("cpu"))
    below = sum(p.numel() for n, p in peft.named_parameters() if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) < layers - 1)
    assert below > 0 and summary["backward_parameters"] == summary["total_parameters"] - below
    assert summary["lora_training_flops_per_token"] == 2 * summary["total_parameters"] + 2 * summary["backward_parameters"]


@pytest.mark.parametrize("spec", ["top:0", "top:99", "top:0%", "top:101%", "top:x%", "0-99", "x", "3-", ""])
def test_lora_layers_to_transform_rejects_bad_specs(tiny_model_dir, spec):
    model = base_model(tiny_model_dir, AutoModelForCausalLM, torch.device("cpu"))
    with pytest.raises(ValueError, match="lora_layers_to_transform"):
        lora_config(model, lora_layers_to_transform=spec)


@pytest.mark.parametrize("spec, expected", [("all", None), ("top:1", [1]), ("top:50%", [1]), ("top:51%", [0, 1]),
                                            ("top:100%", [0, 1]), ("0", [0]), ("0-1", [0, 1]), ("1,0", [0, 1])])
def test_lora_layers_to_transform_specs(tiny_model_dir, spec, expected):
    model = base_model(tiny_model_dir, AutoModelForCausalLM, torch.device("cpu"))  # 2 decoder layers
    assert lora_config(model, lora_layers_to_transform=spec).layers_to_transform == expected
