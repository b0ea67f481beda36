"""The training path's loss: supervised-only logits equal the model's own loss, and gradient accumulation
normalises by supervised tokens (PITFALLS row 13)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from philo_dataflow.tokenization import tokenize_example
from philo_dataflow.training import SupervisedTokensTrainer, bf16_autocast, data_collator, training_args

QUESTIONS = [
    ("What is the Stoic dichotomy of control?", "Some things are up to us, others are not."),
    ("What is wu wei?", "Effortless action in harmony with the Tao, which the Taoist sage practises daily."),
    ("Why did Epicurus value friendship?", "Friendship is the greatest means to a pleasant, untroubled life."),
    ("What does Sartre mean by bad faith?", "Denying one's freedom by pretending to be a thing."),
]


@pytest.fixture
def batch_and_model(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [tokenize_example(tokenizer, "chat_template", q, a, 256) for q, a in QUESTIONS]
    features = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]
    batch = data_collator(tokenizer)(features)  # right-padded, labels -100 on prompt and padding
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return batch, model, tokenizer


def _loss(trainer_like, model, batch, num_items_in_batch=None):
    return SupervisedTokensTrainer.compute_loss(trainer_like, model, dict(batch), num_items_in_batch=num_items_in_batch)


def test_supervised_only_logits_give_the_models_own_loss(batch_and_model):
    batch, model, _ = batch_and_model
    expected = model(**batch).loss  # transformers' ForCausalLMLoss over full logits
    got = _loss(None, model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the gradients agree too
    model.zero_grad()
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    _loss(None, model, batch).backward()
    for g_expected, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, g_expected, rtol=1e-4, atol=1e-6)


def test_logits_are_only_computed_for_supervised_positions(batch_and_model):
    batch, model, _ = batch_and_model
    _, outputs = SupervisedTokensTrainer.compute_loss(None, model, dict(batch), return_outputs=True)
    supervised_next = (batch["labels"][:, 1:] != -100).sum().item()
    assert outputs.logits.shape == (supervised_next, model.config.vocab_size)
    assert supervised_next < batch["attention_mask"].sum().item()  # the prompts were skipped


def test_gradient_accumulation_matches_one_big_batch(batch_and_model):
    # PITFALLS row 13: 1 x 4 and 4 x 1 give the same loss when normalised by supervised tokens.
    batch, model, _ = batch_and_model
    whole = _loss(None, model, batch)
    total_items = (batch["labels"][:, 1:] != -100).sum()
    accumulated = sum(
        _loss(None, model, {k: v[i : i + 1] for k, v in batch.items()}, num_items_in_batch=total_items)
        for i in range(len(QUESTIONS))
    )
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)


def _logged_losses(tiny_model_dir, output_dir, trainer_class=SupervisedTokensTrainer, bf16=False, **arguments) -> list:
    """The training loss logged at every optimizer step of a fresh LoRA adapter on the tiny model, trained
    on ``QUESTIONS`` twice with learning rate 1e-2, no evaluation and no checkpoints; ``arguments`` go to
    ``training_args``."""
    from datasets import Dataset
    from peft import get_peft_model

    from philo_dataflow.modeling import lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [tokenize_example(tokenizer, "chat_template", q, a, 256) for q, a in QUESTIONS * 2]
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
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
    import philo_dataflow
    from conftest import FAST_INPUTS, logits_against_base

    inputs = {"data_path": small_jsonl, "model_id": tiny_model_dir, "output_dir": str(tmp_path / "out"),
              **FAST_INPUTS, "bf16": True}
    result = philo_dataflow.build_driver({"start": "base"}).execute(
        ["finetuned_model", "fit_trainer"], inputs=inputs)
    assert result["fit_trainer"].args.bf16
    logits = logits_against_base(result["finetuned_model"], tiny_model_dir)
    torch.testing.assert_close(logits["adapter_disabled"], logits["base"], rtol=0, atol=0)
