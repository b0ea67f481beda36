"""docs/pitfalls.md, the tokenization rows: masked labels, EOS supervised, no double BOS, truncation, one prompt renderer."""

import pytest
from datasets import Dataset

from philo_dataflow.lib.prompts import (
    ALPACA,
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    prompt_token_ids,
    render_prompt,
    tokenize_example,
)
from philo_dataflow.tokenization import tokenized_split
from philo_dataflow.training import data_collator

QUESTION = "How would a Stoic respond to an insult?"
ANSWER = "Epictetus says it is not the insult that harms us but our judgment about it."


@pytest.fixture(params=[CHAT_TEMPLATE, ALPACA])
def tokenizer_and_format(request, chat_tokenizer, alpaca_tokenizer):
    return (chat_tokenizer if request.param == CHAT_TEMPLATE else alpaca_tokenizer), request.param


def test_prompt_is_masked_and_answer_supervised(tokenizer_and_format):
    tokenizer, fmt = tokenizer_and_format
    example = tokenize_example(tokenizer, fmt, QUESTION, ANSWER, max_seq_length=512)
    prompt = prompt_token_ids(tokenizer, fmt, QUESTION)
    n = len(prompt)
    # Row 7: the training prompt is exactly what generation is given.
    assert example["input_ids"][:n] == prompt
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    supervised = example["labels"][n:]
    assert IGNORE_INDEX not in supervised
    # Row 1: the answer ends with EOS and the EOS is the last supervised label.
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised[:-1]).strip() == ANSWER
    assert not example["truncated"]


def test_no_double_bos(chat_tokenizer):
    # Row 5: SmolLM2's BOS is <|im_start|>, which the template writes; the tokenizer must not add another.
    ids = tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, 512)["input_ids"]
    assert ids[0] == chat_tokenizer.bos_token_id
    assert ids[1] != chat_tokenizer.bos_token_id
    text = render_prompt(chat_tokenizer, CHAT_TEMPLATE, QUESTION)
    assert chat_tokenizer(text, add_special_tokens=False).input_ids == prompt_token_ids(chat_tokenizer, CHAT_TEMPLATE, QUESTION)


def test_chat_template_renders_a_generation_prompt(chat_tokenizer):
    text = render_prompt(chat_tokenizer, CHAT_TEMPLATE, QUESTION)
    assert text.endswith("<|im_start|>assistant\n") and QUESTION in text
    full = render_prompt(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER)
    assert full.startswith(text) and ANSWER in full


def test_alpaca_template_used_without_chat_template(alpaca_tokenizer):
    text = render_prompt(alpaca_tokenizer, ALPACA, QUESTION)
    assert "### Instruction:\n" + QUESTION in text and text.endswith("### Response:\n")


def test_padding_is_masked_by_position_even_when_pad_is_eos(chat_tokenizer):
    # Row 2: pad == eos here; the collator must pad labels with -100 by position and keep the EOS label.
    assert chat_tokenizer.pad_token_id == chat_tokenizer.eos_token_id
    short = tokenize_example(chat_tokenizer, CHAT_TEMPLATE, "Stoic?", "Yes.", 512)
    long = tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, 512)
    batch = data_collator(chat_tokenizer)([{k: v for k, v in e.items() if k != "truncated"} for e in (short, long)])
    n = len(short["input_ids"])
    labels = batch["labels"][0].tolist()
    assert labels[:n] == short["labels"]
    assert labels[n - 1] == chat_tokenizer.eos_token_id
    assert set(labels[n:]) == {IGNORE_INDEX}
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(labels) - n)
    # right padding for training
    assert batch["input_ids"][0, n:].tolist() == [chat_tokenizer.pad_token_id] * (len(labels) - n)


def test_truncation_is_counted_and_empty_supervision_is_an_error(chat_tokenizer):
    n_prompt = len(prompt_token_ids(chat_tokenizer, CHAT_TEMPLATE, QUESTION))
    cut = tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, max_seq_length=n_prompt + 3)
    assert cut["truncated"] and len(cut["input_ids"]) == n_prompt + 3
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3
    data = Dataset.from_dict({"input_text": ["ok?", QUESTION], "output_text": ["fine", ANSWER], "category": ["a", "b"]})
    with pytest.raises(ValueError, match=r"train_set record 1 \('How would a Stoic.*no answer token"):
        tokenized_split(data, "train_set", chat_tokenizer, CHAT_TEMPLATE, max_seq_length=n_prompt)
