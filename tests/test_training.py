"""The training path's loss: supervised-only logits equal the model's own loss, and gradient accumulation
normalises by supervised tokens (PITFALLS row 13)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from philo_dataflow.tokenization import tokenize_example
from philo_dataflow.training import SupervisedTokensTrainer, data_collator, training_args

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


def test_trainer_loss_curve_matches_the_standard_trainer(tiny_model_dir, tmp_path):
    """Two optimizer steps with accumulation 2: same logged losses as transformers' own Trainer."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer

    from philo_dataflow.modeling import lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [tokenize_example(tokenizer, "chat_template", q, a, 256) for q, a in QUESTIONS * 2]
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    histories = []
    for trainer_class in (Trainer, SupervisedTokensTrainer):
        args = training_args(output_dir=str(tmp_path / trainer_class.__name__), max_steps=2, logging_steps=1,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, eval_steps=1000,
                             learning_rate=1e-2)
        args.load_best_model_at_end = False
        args.eval_strategy = "no"
        args.save_strategy = "no"
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(base, lora_config(base))
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=data_collator(tokenizer))
        trainer.train()
        histories.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(histories[0]) == 2
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)
