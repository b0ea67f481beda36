"""The training path's loss: supervised-only (and fused, chunked) output-head loss equals the model's own
loss, and gradient accumulation normalises by supervised tokens (docs/pitfalls.md, "accumulation normalisation")."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from philo_dataflow.lib import cross_entropy
from philo_dataflow.lib.cross_entropy import supervised_causal_lm_loss
from philo_dataflow.lib.prompts import tokenize_example
from philo_dataflow.lib.trainer import SupervisedTokensTrainer
from philo_dataflow.stages.training import bf16_autocast, data_collator, training_args

QUESTIONS = [
    ("What is the Stoic dichotomy of control?", "Some things are up to us, others are not."),
    ("What is wu wei?", "Effortless action in harmony with the Tao, which the Taoist sage practises daily."),
    ("Why did Epicurus value friendship?", "Friendship is the greatest means to a pleasant, untroubled life."),
    ("What does Sartre mean by bad faith?", "Denying one's freedom by pretending to be a thing."),
]


def _features(tokenizer, pairs=QUESTIONS) -> list:
    """``pairs`` tokenized with the chat template, as the Trainer's feature dicts."""
    rows = [tokenize_example(tokenizer, "chat_template", q, a, 256) for q, a in pairs]
    return [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]


@pytest.fixture
def batch_and_model(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = data_collator(tokenizer)(_features(tokenizer))  # right-padded, labels -100 on prompt and padding
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.lm_head.requires_grad_(False)  # frozen, as in every LoRA fine-tune (tied to the input embeddings)
    return batch, model, tokenizer


def _loss(model, batch, num_items_in_batch=None):
    return supervised_causal_lm_loss(model, dict(batch), num_items_in_batch)[0]


@pytest.fixture(params=["fused", "unfused"])
def loss_path(request, monkeypatch):
    """Runs a test on the fused output-head loss (the default for Llama-like models) and on the
    ``logits_to_keep`` path other architectures take."""
    if request.param == "unfused":
        monkeypatch.setattr(cross_entropy, "fusable_parts", lambda model: None)
    return request.param


def test_supervised_only_loss_equals_the_models_own_loss_and_gradients(batch_and_model, loss_path):
    batch, model, _ = batch_and_model
    assert (cross_entropy.fusable_parts(model) is not None) == (loss_path == "fused")
    expected = model(**batch).loss  # transformers' ForCausalLMLoss over full logits
    got = _loss(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _loss(model, batch).backward()
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_unfused_logits_are_only_computed_for_supervised_positions(batch_and_model, monkeypatch):
    batch, model, _ = batch_and_model
    monkeypatch.setattr(cross_entropy, "fusable_parts", lambda model: None)
    _, outputs = supervised_causal_lm_loss(model, dict(batch))
    supervised_next = (batch["labels"][:, 1:] != -100).sum().item()
    assert outputs.logits.shape == (supervised_next, model.config.vocab_size)
    assert supervised_next < batch["attention_mask"].sum().item()  # the prompts were skipped


def test_fused_loss_keeps_no_logits_for_the_backward_pass(batch_and_model):
    """The point of fusing: no (tokens, vocab) tensor is saved for backward, only (tokens, hidden) ones."""
    batch, model, _ = batch_and_model
    from peft import get_peft_model

    from philo_dataflow.stages.modeling import lora_config

    peft_model = get_peft_model(model, lora_config(model))
    assert cross_entropy.fusable_parts(peft_model) is not None
    vocab = model.config.vocab_size
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, outputs = supervised_causal_lm_loss(peft_model, dict(batch))
    assert outputs.logits is None
    assert saved_shapes and not [shape for shape in saved_shapes if len(shape) > 1 and shape[-1] == vocab]
    loss.backward()  # and LoRA still gets its gradient through the fused head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_chunked_linear_cross_entropy_equals_cross_entropy_of_the_full_logits(bias, chunk_tokens):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    expected = torch.nn.functional.cross_entropy(head(hidden), labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    got = cross_entropy.chunked_linear_cross_entropy(hidden, head, labels, chunk_tokens)
    (got_grad,) = torch.autograd.grad(got * 0.5, hidden)  # an upstream gradient other than 1 scales it
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, 0.5 * expected_grad)


def test_chunked_linear_cross_entropy_does_no_gradient_work_under_no_grad():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)  # as in evaluation: a LoRA model's hidden states
    labels = torch.randint(0, 50, (23,))
    head_matmul_flops = 2 * 23 * 16 * 50
    with FlopCounterMode(display=False) as training:
        with_grad = cross_entropy.chunked_linear_cross_entropy(hidden, head, labels, 5)
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        without_grad = cross_entropy.chunked_linear_cross_entropy(hidden, head, labels, 5)
    assert training.get_total_flops() == 2 * head_matmul_flops  # logits, then the hidden states' gradient
    assert evaluation.get_total_flops() == head_matmul_flops  # logits only
    torch.testing.assert_close(without_grad, with_grad.detach())
    assert not without_grad.requires_grad


def test_chunked_linear_cross_entropy_under_bf16_autocast_matches_autograd_through_the_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 64, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
        got = cross_entropy.chunked_linear_cross_entropy(hidden, head, labels, 16)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    (got_grad,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # same bf16 logits, float32 softmax
    torch.testing.assert_close(got_grad, expected_grad, rtol=2e-2, atol=2e-2)  # bf16 rounding of the gradient
    assert got_grad.dtype == hidden.dtype


def test_the_fused_loss_refuses_a_trained_head_and_is_skipped_where_it_does_not_apply(batch_and_model, monkeypatch):
    _, model, _ = batch_and_model
    from peft import LoraConfig, get_peft_model

    head = torch.nn.Linear(4, 8)
    with pytest.raises(ValueError, match="frozen output head"):
        cross_entropy.chunked_linear_cross_entropy(torch.randn(2, 4), head, torch.tensor([0, 1]))
    assert cross_entropy.fusable_parts(model) is not None
    wrapped = torch.nn.Sequential(model)  # stands in for a DDP/FSDP wrapper, whose forward must run
    assert cross_entropy.fusable_parts(wrapped) is None
    lora_on_head = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert cross_entropy.fusable_parts(lora_on_head) is None
    monkeypatch.setattr(model.config, "model_type", "granite")  # scales its logits after the head
    assert cross_entropy.fusable_parts(model) is None


def test_a_prompt_tuning_model_keeps_its_own_forward(tiny_model_dir):
    from peft import PromptTuningConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.lm_head.requires_grad_(False)
    prompt_tuned = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert cross_entropy.fusable_parts(prompt_tuned) is None  # its forward prepends the virtual tokens


def test_phi_output_head_with_bias_is_fused_exactly(chat_tokenizer):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=512, pad_token_id=chat_tokenizer.pad_token_id)
    model = PhiForCausalLM(config)
    assert model.lm_head.bias is not None
    model.lm_head.requires_grad_(False)
    batch = data_collator(chat_tokenizer)(_features(chat_tokenizer))
    assert cross_entropy.fusable_parts(model) is not None
    torch.testing.assert_close(_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(batch_and_model, loss_path):
    # docs/pitfalls.md, "accumulation normalisation": 1 x 4 and 4 x 1 give the same loss when normalised by supervised tokens.
    batch, model, _ = batch_and_model
    whole = _loss(model, batch)
    total_items = (batch["labels"][:, 1:] != -100).sum()
    accumulated = sum(
        _loss(model, {k: v[i : i + 1] for k, v in batch.items()}, num_items_in_batch=total_items)
        for i in range(len(QUESTIONS))
    )
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)


def _logged_losses(tiny_model_dir, output_dir, trainer_class=SupervisedTokensTrainer, bf16=False, **arguments) -> list:
    """The training loss logged at every optimizer step of a fresh LoRA adapter on the tiny model, trained
    on ``QUESTIONS`` twice with learning rate 1e-2, no evaluation and no checkpoints; ``arguments`` go to
    ``training_args``."""
    from datasets import Dataset
    from peft import get_peft_model

    from philo_dataflow.stages.modeling import lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_list(_features(tokenizer, QUESTIONS * 2))
    args = training_args(bf16, output_dir=str(output_dir), logging_steps=1, eval_steps=1000, learning_rate=1e-2,
                         **arguments)
    args.load_best_model_at_end = False
    args.eval_strategy = "no"
    args.save_strategy = "no"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, lora_config(base))
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=data_collator(tokenizer))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_loss_curve_matches_the_standard_trainer(tiny_model_dir, tmp_path):
    """Two optimizer steps with accumulation 2: same logged losses as transformers' own Trainer."""
    from transformers import Trainer

    histories = [
        _logged_losses(tiny_model_dir, tmp_path / trainer_class.__name__, trainer_class, max_steps=2,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2)
        for trainer_class in (Trainer, SupervisedTokensTrainer)
    ]
    assert len(histories[0]) == 2
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, False),
])
def test_bf16_autocast_is_on_by_default_only_on_cpus_with_bf16_instructions(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cpu = torch.device("cpu")
    assert bf16_autocast(cpu) is expected
    assert bf16_autocast(cpu, bf16=True) is True and bf16_autocast(cpu, bf16=False) is False
    assert training_args(bf16_autocast(cpu), output_dir="unused").bf16 is expected


def test_bf16_autocast_keeps_the_loss_curve_of_fp32(tiny_model_dir, tmp_path, one_torch_thread):
    """bf16 autocast (the default on CPUs with bf16 instructions) trains to the same loss curve as fp32,
    within bf16's rounding (8 mantissa bits: ~0.4% per operation); the loss must also fall."""
    fp32, bf16 = (
        _logged_losses(tiny_model_dir, tmp_path / f"bf16-{use_bf16}", bf16=use_bf16, max_steps=6,
                       per_device_train_batch_size=4)
        for use_bf16 in (False, True)
    )
    assert len(fp32) == len(bf16) == 6
    assert bf16 != fp32  # autocast really ran in bf16
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16[-1] < bf16[0]


def test_generation_after_bf16_training_runs_in_the_weights_precision(tiny_model_dir, small_jsonl, tmp_path):
    """accelerate wraps the trained model's forward in bf16 autocast; the wrapper is removed before
    generation, so answers are computed in fp32 (the same on machines with and without bf16)."""
    from conftest import FAST_INPUTS, logits_against_base

    import philo_dataflow

    inputs = {"data_path": small_jsonl, "model_id": tiny_model_dir, "output_dir": str(tmp_path / "out"),
              **FAST_INPUTS, "bf16": True}
    result = philo_dataflow.build_driver({"start": "base"}).execute(
        ["finetuned_model", "fit_trainer"], inputs=inputs)
    assert result["fit_trainer"].args.bf16
    logits = logits_against_base(result["finetuned_model"], tiny_model_dir)
    torch.testing.assert_close(logits["adapter_disabled"], logits["base"], rtol=0, atol=0)


def _compiled_training(tiny_model_dir, output_dir, compile_layers: bool) -> tuple:
    """Six logged losses of ``_logged_losses``'s recipe with ``compile_decoder_layers`` set, whether every
    decoder layer was compiled and the attention implementation at every optimizer step, and the model
    after ``train()`` returned."""
    import functools

    from transformers import TrainerCallback

    seen, trained = [], []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = model.get_base_model().model.layers
            seen.append((all(layer._compiled_call_impl is not None for layer in layers),
                         model.get_base_model().config._attn_implementation))
            trained.append(model)

    class SpiedTrainer(SupervisedTokensTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[Spy()], **kwargs)

    losses = _logged_losses(tiny_model_dir, output_dir, functools.partial(SpiedTrainer, compile_decoder_layers=compile_layers),
                            max_steps=6, per_device_train_batch_size=4)
    return losses, seen, trained[-1]


def test_compiled_decoder_layers_keep_the_loss_curve_and_are_restored_after_training(tiny_model_dir, tmp_path, one_torch_thread):
    """Regional compilation trains to eager's loss curve (fp32: up to the compiler's reordering of sums),
    really runs compiled graphs during ``train()``, and leaves the layers eager for generation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, eager_seen, _ = _compiled_training(tiny_model_dir, tmp_path / "eager", compile_layers=False)
    # Earlier tests in this process may have compiled the same graphs; dynamo would reuse them and count
    # nothing new. Forgetting every compiled frame makes this training compile (and count) its own.
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled, compiled_seen, model = _compiled_training(tiny_model_dir, tmp_path / "compiled", compile_layers=True)
    # The examples are far shorter than EAGER_ATTENTION_MAX_TOKENS: compiled training uses eager attention.
    assert eager_seen == [(False, "sdpa")] * 6 and compiled_seen == [(True, "eager")] * 6
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiler produced graphs, no fallback
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # restored for generation
    assert len(compiled) == 6 and compiled[-1] < compiled[0]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_the_compiler_probe_finds_a_broken_toolchain():
    """The probe really compiles: with inductor pointed at a C++ compiler that does not exist (and its
    on-disk cache off) it reports why, so auto mode trains eagerly and ``torch_compile=True`` is refused
    up front, not with a traceback from inside the first backward pass."""
    import torch._dynamo
    import torch._inductor.config

    from philo_dataflow.stages import training
    from philo_dataflow.lib import trainer

    trainer.compiler_problem.cache_clear()
    torch._dynamo.reset()  # forget the probe graph compiled by earlier tests, so this call must compile
    # torch's own config patch, not monkeypatch: monkeypatch's undo deleted fx_graph_cache from inductor's
    # config module, and every later compile in the process failed (found by running the files in reverse).
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}):
            cpu = torch.device("cpu")
            problem = trainer.compiler_problem("cpu")
            assert problem is not None and "C++ compiler" in problem
            assert training.compile_decoder_layers(cpu) is False
            assert training.compile_decoder_layers(cpu, torch_compile=False) is False
            with pytest.raises(ValueError, match=r"torch_compile=True, but torch.compile cannot build code on this "
                                                 r"cpu .*install a C\+\+ compiler .*--no-torch-compile"):
                training.compile_decoder_layers(cpu, torch_compile=True)
    finally:
        trainer.compiler_problem.cache_clear()
        torch._dynamo.reset()
    assert trainer.compiler_problem("cpu") is None  # the toolchain works again for the tests after this one
    trainer.compiler_problem.cache_clear()


@pytest.mark.parametrize("device_type, problem, expected", [
    ("cpu", None, True),
    ("cpu", "InvalidCxxCompiler: No working C++ compiler found", False),
    ("cuda", None, False),
])
def test_torch_compile_is_on_by_default_only_on_a_cpu_where_it_can_build_code(monkeypatch, device_type, problem, expected):
    from philo_dataflow.stages import training
    from philo_dataflow.lib import trainer

    for module in (training, trainer):
        monkeypatch.setattr(module, "compiler_problem", lambda device_type: problem)
    device = torch.device(device_type)
    assert training.compile_decoder_layers(device) is expected
    assert training.compile_decoder_layers(device, torch_compile=False) is False
    assert (training.torch_compile_problems(True, device) == []) is (problem is None)


@pytest.mark.parametrize("longest, compiled, expected", [
    (256, True, "eager"),
    (257, True, "sdpa"),
    (40, False, "sdpa"),
])
def test_compiled_cpu_training_uses_eager_attention_only_for_short_examples(tiny_model_dir, longest, compiled, expected):
    from peft import get_peft_model

    from philo_dataflow.lib.trainer import (
        EAGER_ATTENTION_MAX_TOKENS,
        _training_attention,
    )
    from philo_dataflow.stages.modeling import lora_config

    assert EAGER_ATTENTION_MAX_TOKENS == 256
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, lora_config(base))
    with _training_attention(model, longest, compiled):
        assert base.config._attn_implementation == expected
    assert base.config._attn_implementation == "sdpa"


def test_longest_example_reads_every_dataset():
    from datasets import Dataset

    from philo_dataflow.lib.trainer import _longest_example

    short, long = Dataset.from_dict({"input_ids": [[1, 2], [3]]}), Dataset.from_dict({"input_ids": [[1] * 7]})
    assert _longest_example(short, None) == 2
    assert _longest_example(short, {"a": long}) == 7


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_the_memory_saving_mode_uses_small_loss_chunks_and_returns_freed_memory(
        tiny_model_dir, small_jsonl, tmp_path, gradient_checkpointing):
    from conftest import FAST_INPUTS

    import philo_dataflow
    from philo_dataflow.lib.cross_entropy import LOSS_CHUNK_TOKENS
    from philo_dataflow.lib.trainer import (
        MEMORY_SAVING_LOSS_CHUNK_TOKENS,
        ReturnFreedMemory,
    )

    inputs = {"data_path": small_jsonl, "model_id": tiny_model_dir, "output_dir": str(tmp_path / "out"),
              **FAST_INPUTS, "gradient_checkpointing": gradient_checkpointing}
    trainer = philo_dataflow.build_driver({"start": "base"}).execute(["trainer"], inputs=inputs)["trainer"]
    trims = [c for c in trainer.callback_handler.callbacks if isinstance(c, ReturnFreedMemory)]
    assert trainer.model.is_gradient_checkpointing is gradient_checkpointing
    if not gradient_checkpointing:
        assert trainer.loss_chunk_tokens == LOSS_CHUNK_TOKENS and not trims
        return
    assert trainer.loss_chunk_tokens == MEMORY_SAVING_LOSS_CHUNK_TOKENS < LOSS_CHUNK_TOKENS
    assert len(trims) == 1
    calls = []
    trims[0]._malloc_trim = lambda pad: calls.append(pad) or 1
    trainer.train()
    assert calls == [0] * trainer.state.global_step and trainer.state.global_step == FAST_INPUTS["max_steps"]


def test_compiled_memory_saving_mode_traces_each_layer_without_a_graph_break(tiny_model_dir, small_jsonl, tmp_path):
    """Compiled layers under activation checkpointing trace whole: no graph break (with transformers 5.25
    the ``kernels`` router on Llama's attention broke every layer out of its graph, 1.75x slower on the
    embedded model), and the layers' own ``forward`` is back after training. The model is loaded without
    hub kernels, so nothing is fetched from the hub."""
    import torch._dynamo
    from conftest import FAST_INPUTS
    from torch._dynamo.utils import counters

    import philo_dataflow

    inputs = {"data_path": small_jsonl, "model_id": tiny_model_dir, "output_dir": str(tmp_path / "out"),
              **FAST_INPUTS, "gradient_checkpointing": True, "torch_compile": True}
    trainer = philo_dataflow.build_driver({"start": "base"}).execute(["trainer"], inputs=inputs)["trainer"]
    causal_lm = trainer.model.get_base_model()
    assert getattr(causal_lm, "use_kernels", False) is False
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    assert trainer.state.global_step == FAST_INPUTS["max_steps"]
    assert counters["stats"]["unique_graphs"] > 0  # compiled graphs ran
    assert dict(counters["graph_break"]) == {}
    assert not [m for m in causal_lm.modules() if "forward" in vars(m)]


def test_return_freed_memory_finds_glibcs_malloc_trim():
    import platform

    from philo_dataflow.lib.trainer import ReturnFreedMemory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    callback = ReturnFreedMemory()
    assert callback._malloc_trim is not None
    callback.on_step_end(None, None, None)  # returns memory; must not raise
