"""Modeling: the tokenizer, the base model (a causal LM, or an encoder-decoder under config
``architecture="seq2seq"``), the model training updates (a LoRA adapter, optionally QLoRA on CUDA; or,
under config ``finetuning_method="full"``, every weight of the model) and its summary. Where a model comes from, and the checks made before loading it, are in
``lib.model_sources``.
"""

import copy
import logging
import warnings
from pathlib import Path
from typing import Union

import torch
from hamilton.function_modifiers import cache, dataloader, tag
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from ..lib.artifacts import MANIFEST_FILE, read_manifest, file_metadata
from ..lib.context_window import ContextWindow
from ..lib.distributed import launched_local_rank, launched_processes
from ..lib.inputs import EMBEDDED_MODEL_ID, raise_hyperparameter_problems
from ..lib.model_sources import (
    adapter_files,
    adapter_fit_problems,
    decoder_layer,
    from_pretrained,
    layer_indices,
    lora_target_problems,
    quantization_problems,
    refuse_pickle_weights,
    architecture_mismatch,
    context_window_of,
    is_encoder_decoder,
    resolve_model_path,
)
from ..lib.switches import when

logger = logging.getLogger(__name__)


def device() -> torch.device:
    """The device to train and generate on: the first CUDA GPU when there is one, else the CPU. With
    several processes (torchrun, accelerate launch) on CUDA, the GPU of this process's local rank
    (``cuda:LOCAL_RANK``), so that each process loads, trains and generates on its own GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", launched_local_rank()) if launched_processes() > 1 else torch.device("cuda")


@when(start="presaved")
@cache(behavior="recompute")
@dataloader()
def presaved_manifest__presaved(presaved_model_dir: str) -> tuple[dict, dict]:
    """The manifest the base run saved beside the presaved adapter (``lib.artifacts.MANIFEST_FILE``): the
    inputs it ran with, its prompt format, LoRA and Trainer settings, library versions and metrics. A
    Hamilton data loader; its metadata is the file's ``lib.artifacts.file_metadata``.

    :raises ValueError: it is missing, not JSON, or lacks ``inputs.model_id`` or ``prompt_format``.
    """
    manifest = read_manifest(presaved_model_dir)
    return manifest, file_metadata(str(Path(presaved_model_dir) / MANIFEST_FILE))


@when(start="base")
def base_model_id__base(model_id: str = EMBEDDED_MODEL_ID) -> str:
    """The id of the model to fine-tune (see the module docstring for what ``model_id`` may be)."""
    return model_id


@when(start="presaved")
def base_model_id__presaved(presaved_manifest: dict) -> str:
    """The id of the model the presaved adapter was trained on, read from its manifest."""
    return presaved_manifest["inputs"]["model_id"]


@when(start="base")
def tokenizer__base(base_model_id: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base model's tokenizer. When it has no pad token, the EOS token pads (padding is masked by
    position in the labels and attention mask, never by token id).

    :param trust_remote_code: let a model directory or hub repository run its own Python code (a
        config's ``auto_map``); off by default, since that code runs with the user's permissions.
    """
    tokenizer = from_pretrained(AutoTokenizer, base_model_id, resolve_model_path(base_model_id), trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        logger.info("pad token == EOS token: padding is masked by position, EOS stays supervised")
    return tokenizer


@when(start="presaved")
def tokenizer__presaved(presaved_model_dir: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the presaved adapter (custom tokenizer code only with ``trust_remote_code``)."""
    return AutoTokenizer.from_pretrained(presaved_model_dir, trust_remote_code=trust_remote_code)


@when(architecture="causal")
def model_class__causal() -> type:
    """The transformers auto class the base model loads with: ``AutoModelForCausalLM``."""
    return AutoModelForCausalLM


@when(architecture="seq2seq")
def model_class__seq2seq() -> type:
    """The transformers auto class the base model loads with: ``AutoModelForSeq2SeqLM`` (T5, FLAN-T5, BART)."""
    return AutoModelForSeq2SeqLM


def model_context_window(base_model_id: str, tokenizer: PreTrainedTokenizerBase,
                         trust_remote_code: bool = False) -> ContextWindow:
    """The base model's context window in tokens and where it is stated (``lib.context_window.ContextWindow``):
    the smallest position limit in its config (``max_position_embeddings``, ``n_positions``...; an
    encoder-decoder's encoder and decoder each), else ``tokenizer``'s ``model_max_length``. Read from the config
    alone, no weights loaded: the limits checked against it (``max_seq_length_in_use``, the prompts of
    ``hold_out_prompt_ids``) need no model loaded, and the preflight asks for it too.

    :raises ValueError: the config cannot be read (``lib.model_sources.from_pretrained``'s line).
    """
    return context_window_of(base_model_id, tokenizer, trust_remote_code)


def base_model(
    base_model_id: str,
    model_class: type,
    device: torch.device,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The pretrained model, on ``device``, in fp32 (or 4-bit NF4 for QLoRA).

    :param base_model_id: see ``base_model_id``.
    :param model_class: see ``model_class``.
    :param device: see ``device``.
    :param load_in_4bit: QLoRA (Dettmers et al. 2023): load the weights as 4-bit NF4 with double
        quantisation and bf16 compute through bitsandbytes; needs a CUDA GPU.
    :param gradient_checkpointing: recompute activations in the backward pass to save memory.
    :param allow_pickle: also load pickle weights (``pytorch_model.bin``) when there are no safetensors;
        off by default, since unpickling can run code.
    :param trust_remote_code: see ``tokenizer``.
    :raises ValueError: ``load_in_4bit`` without a CUDA GPU or without bitsandbytes; a model that cannot be
        found (offline or unknown id), has only pickle weights without ``allow_pickle``, or needs custom
        code without ``trust_remote_code``.
    """
    problems = quantization_problems(load_in_4bit, device)
    if problems:
        raise ValueError(problems[0])
    path = resolve_model_path(base_model_id)
    encoder_decoder = model_class is AutoModelForSeq2SeqLM
    if is_encoder_decoder(path, trust_remote_code) != encoder_decoder:
        raise ValueError(architecture_mismatch(base_model_id, not encoder_decoder))
    refuse_pickle_weights(path, f"model_id={base_model_id!r}", allow_pickle)
    loading = {"use_safetensors": None if allow_pickle else True, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # The whole 4-bit model on this process's GPU (``device``: cuda:LOCAL_RANK with several processes,
        # each holding its own copy for DDP); never "auto", which would spread it over every GPU.
        model = from_pretrained(
            model_class, base_model_id, path, quantization_config=quantization_config,
            device_map={"": device.index or 0}, **loading,
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        model = from_pretrained(model_class, base_model_id, path, dtype=torch.float32, **loading)
        model = model.to(device)
        if gradient_checkpointing:
            # transformers 5.25 renamed it (the old name warns, and goes in v6); 5.23 and 5.24 have the old one only.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            # Without this, checkpointed LoRA layers get no gradient (peft#137).
            model.enable_input_require_grads()
    return model


@when(finetuning_method="lora")
def lora_config(
    base_model: PreTrainedModel,
    lora_r: int = 16,
    lora_alpha: Union[int, float] = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: str = "all-linear",
    lora_layers_to_transform: str = "all",
) -> LoraConfig:
    """The LoRA adapter's configuration (Hu et al. 2021, via PEFT).

    :param lora_r: rank of the update matrices.
    :param lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / lora_r``.
    :param lora_dropout: dropout probability on the adapter's input (default 0: measured in
        ``benchmarks/README.md``; early stopping on validation loss guards overfitting).
    :param lora_target_modules: ``"all-linear"`` (every linear layer but the output head, as in QLoRA)
        or a comma-separated list of module names such as ``"q_proj,v_proj"``.
    :param lora_layers_to_transform: which decoder layers get adapters (PEFT ``layers_to_transform``):
        ``"all"``, ``"top:N"`` (the last N layers), ``"top:P%"`` (the last P percent of them, rounded
        up) or indices/ranges such as ``"0-3,8"``. Adapting only
        the top layers also shortens the backward pass, which stops at the lowest adapted layer.
    :raises lib.problems.InputProblems: (a ValueError) ``lora_r``, ``lora_alpha`` or ``lora_dropout`` out of
        range.
    :raises ValueError: layers or target modules the model lacks (``lora_target_problems``).
    """
    raise_hyperparameter_problems(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                  lora_target_modules=lora_target_modules,
                                  lora_layers_to_transform=lora_layers_to_transform)
    layers = layer_indices(lora_layers_to_transform, base_model.config.num_hidden_layers)
    missing = lora_target_problems(lora_target_modules, base_model)
    if missing:
        raise ValueError(missing[0])
    if lora_target_modules != "all-linear":
        targets = [name.strip() for name in lora_target_modules.split(",") if name.strip()]
    elif layers is None:
        targets = "all-linear"
    else:  # PEFT takes layers_to_transform only with named modules: the linear layers inside the decoder layers
        targets = sorted({
            name.rsplit(".", 1)[-1] for name, module in base_model.named_modules()
            if isinstance(module, torch.nn.Linear) and decoder_layer(name + ".") is not None
        })
    return LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM if base_model.config.is_encoder_decoder else TaskType.CAUSAL_LM,
    )


@when(start="base", finetuning_method="lora")
def peft_model__base(base_model: PreTrainedModel, lora_config: LoraConfig, seed: int = 42) -> PeftModel:
    """The base model wrapped with a fresh, trainable LoRA adapter (not yet trained).

    :param seed: seeds the adapter's random initialisation (LoRA A; B starts at zero). Without it the
        initialisation would come from torch's per-process random seed, and two runs with the same
        inputs would train different adapters. Sets the global RNGs (``transformers.set_seed``), as the
        Trainer does again when it is built.
    """
    set_seed(seed)
    return get_peft_model(base_model, lora_config)


@when(start="presaved", finetuning_method="lora")
def peft_model__presaved(
    base_model: PreTrainedModel, base_model_id: str, presaved_model_dir: str, device: torch.device,
    allow_pickle: bool = False,
) -> PeftModel:
    """The base model with the presaved adapter loaded (frozen, for evaluation and generation).

    :param allow_pickle: also load a pickle adapter (``adapter_model.bin``) when there is no
        ``adapter_model.safetensors``; off by default, since unpickling can run code.
    :raises ValueError: the directory holds no adapter, a damaged one, only a pickle one without
        ``allow_pickle``, or one made for another base model.
    """
    if refuse_pickle_weights(presaved_model_dir, f"presaved_model_dir={presaved_model_dir!r}", allow_pickle):
        problems = []  # an allowed pickle adapter has no safetensors header to check before loading
    else:
        problems, shapes = adapter_files(presaved_model_dir)
        if not problems:
            problems = adapter_fit_problems(shapes, base_model, presaved_model_dir, base_model_id)
    if problems:
        raise ValueError("\n".join(problems))
    try:
        with warnings.catch_warnings():
            # The saved config names the base portably (``portable_model_name``); the manifest's base is loaded.
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path. was renamed", category=UserWarning)
            model = PeftModel.from_pretrained(base_model, presaved_model_dir, is_trainable=False)
        for config in model.peft_config.values():  # in memory, the base this process loaded (PEFT checks it)
            config.base_model_name_or_path = base_model.name_or_path
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(
            f"presaved_model_dir={presaved_model_dir!r}: the adapter does not load onto the base model "
            f"({str(error).splitlines()[0][:300]})."
        ) from None
    return model.to(device)


@when(finetuning_method="lora")
def trainable_model__lora(peft_model: PeftModel) -> PreTrainedModel:
    """The model the Trainer updates: the base model with its LoRA adapter (only the adapter trains)."""
    return peft_model


@when(start="base", finetuning_method="full")
def trainable_model__full(base_model: PreTrainedModel, seed: int = 42) -> PreTrainedModel:
    """A copy of the base model with every weight trainable (full fine-tuning); ``base_model`` itself stays
    untouched for the base answers, so the process holds the weights twice.

    :param seed: see ``peft_model`` (sets the global RNGs, as the Trainer does again).
    """
    set_seed(seed)
    model = copy.deepcopy(base_model)
    model.requires_grad_(True)
    return model


@when(start="presaved", finetuning_method="full")
def trainable_model__full_presaved(
    presaved_model_dir: str, model_class: type, device: torch.device, trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The fully fine-tuned model a base run saved (safetensors, for evaluation and generation).

    :raises ValueError: the directory holds no loadable model.
    """
    refuse_pickle_weights(presaved_model_dir, f"presaved_model_dir={presaved_model_dir!r}", False)
    model = from_pretrained(model_class, presaved_model_dir, presaved_model_dir, trust_remote_code,
                            dtype=torch.float32, use_safetensors=True)
    return model.to(device)


@when(finetuning_method="lora")
def base_answer_model__lora(finetuned_model: PreTrainedModel) -> PreTrainedModel:
    """The model of the base answers: the fine-tuned model itself, generating with its adapter disabled
    (``PeftModel.disable_adapter()``), so no second copy of the weights is held."""
    return finetuned_model


@when(finetuning_method="full")
def base_answer_model__full(base_model: PreTrainedModel) -> PreTrainedModel:
    """The model of the base answers: the untouched base weights (full fine-tuning trained a copy)."""
    return base_model.eval()


@tag(output="final")
def model_summary(trainable_model: PreTrainedModel, device: torch.device) -> dict:
    """Parameter counts, memory footprint and training FLOPs per token of the adapted model.

    ``flops_per_token_forward = 2 * N`` for N total parameters, and ``lora_training_flops_per_token =
    2 * N + 2 * N_backward``: forward 2N, backward for activation gradients 2 FLOPs per parameter the
    gradient flows through, no weight gradients for the frozen base (Kaplan et al. 2020, "Scaling Laws
    for Neural Language Models", section 2.1, with the 2N weight-gradient term dropped for frozen
    weights). The gradient flows through every parameter except those of decoder layers below the
    lowest adapted layer, so ``N_backward = N`` (4N in all) when every layer is adapted. The tied
    input embedding is counted once, as the output head's matmul. Attention-score FLOPs are left out.

    :return: dict with ``total_parameters``, ``trainable_parameters``, ``trainable_share``,
        ``parameter_memory_bytes``, ``backward_parameters``, ``flops_per_token_forward``,
        ``lora_training_flops_per_token``, ``device``.
    """
    named = list(trainable_model.named_parameters())
    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    memory = sum(p.numel() * p.element_size() for _, p in named)
    adapted = [decoder_layer(n) for n, p in named if p.requires_grad and decoder_layer(n) is not None]
    lowest = min(adapted, default=0)
    below = sum(p.numel() for n, p in named if (decoder_layer(n) is not None and decoder_layer(n) < lowest))
    return {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "parameter_memory_bytes": memory,
        "backward_parameters": total - below,
        "flops_per_token_forward": 2 * total,
        "lora_training_flops_per_token": 2 * total + 2 * (total - below),
        "device": str(device),
    }
