"""docs/pitfalls.md, the tokenization rows: masked labels, EOS supervised, no double BOS, truncation, one prompt renderer."""

import json

import pytest
from datasets import Dataset

from philo_dataflow.lib.prompts import (
    ALPACA,
    CHAT_TEMPLATE,
    ANSWER_SHARE,
    IGNORE_INDEX,
    TEMPLATE,
    OverlongExample,
    prompt_token_ids,
    render_prompt,
    tokenize_example,
)
from philo_dataflow.stages.tokenization import overlong_records
from philo_dataflow.stages.tokenization import tokenized_split__causal as tokenized_split
from philo_dataflow.stages.training import data_collator

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
        tokenized_split(data, "train_set", chat_tokenizer, CHAT_TEMPLATE, None, max_seq_length_in_use=n_prompt,
                        overlong_policy="error")


# -- conversations: every assistant turn supervised, the rest masked, the system prompt kept

SYSTEM = "You answer as a Stoic philosopher."
HISTORY = json.dumps([
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is in our power?"},
    {"role": "assistant", "content": "Our judgments, impulses and desires."},
])


def _supervised_text(tokenizer, example) -> list[str]:
    """The supervised spans of an example, decoded, in order."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([tokenizer.decode(current)] if current else [])


def test_multi_turn_supervises_each_assistant_turn_and_keeps_the_system_prompt(chat_tokenizer):
    example = tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, 512, context=HISTORY)
    assert _supervised_text(chat_tokenizer, example) == [
        "Our judgments, impulses and desires.<|im_end|>", ANSWER + "<|im_end|>"]
    whole = chat_tokenizer.decode(example["input_ids"])
    assert whole.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    # the model sees exactly the render of the whole conversation (the final newline dropped)
    messages = [*json.loads(HISTORY), {"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    assert whole == chat_tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
    # generation sees the same prefix as training did
    prompt = prompt_token_ids(chat_tokenizer, CHAT_TEMPLATE, QUESTION, HISTORY)
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][len(prompt) - 1] == IGNORE_INDEX and example["labels"][len(prompt)] != IGNORE_INDEX


def test_single_turn_is_the_multi_turn_path_with_no_history(chat_tokenizer):
    assert tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, 512, context="[]") == \
        tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, ANSWER, 512)


def test_a_conversation_without_a_chat_template_is_refused(alpaca_tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        tokenize_example(alpaca_tokenizer, ALPACA, QUESTION, ANSWER, 512, context=HISTORY)


def test_template_prompt_is_passed_through_with_one_bos(alpaca_tokenizer):
    prompt = "### Question:\nWhat is virtue?\n\n### Answer:"
    text = render_prompt(alpaca_tokenizer, TEMPLATE, prompt, " Knowledge of the good.")
    bos = alpaca_tokenizer.bos_token if alpaca_tokenizer("x").input_ids[:1] == [alpaca_tokenizer.bos_token_id] else ""
    assert text == bos + prompt + " Knowledge of the good."


# -- over-long examples

LONG_QUESTION = "Consider this: " + "the view from above shows how small our worries are, " * 60 + "so what follows?"


@pytest.mark.parametrize("fmt", [CHAT_TEMPLATE, TEMPLATE])
def test_truncate_prompt_shortens_the_question_and_keeps_the_markers_and_the_answer_share(fmt, chat_tokenizer):
    template = "### Question:\n{question}\n\n### Answer:"
    question = template.format(question=LONG_QUESTION) if fmt == TEMPLATE else LONG_QUESTION
    answer = "Nothing troubles us but our opinions. " * 30
    example = tokenize_example(chat_tokenizer, fmt, question, answer, 256, overlong_policy="truncate_prompt",
                               prompt_template=template)
    assert example["prompt_truncated"] and len(example["input_ids"]) == 256
    supervised = sum(label != IGNORE_INDEX for label in example["labels"])
    assert supervised == int(ANSWER_SHARE * 256)  # the answer keeps its share, cut at the end
    text = chat_tokenizer.decode(example["input_ids"])
    assert text.count("the view from above") < LONG_QUESTION.count("the view from above")
    if fmt == TEMPLATE:
        assert "\n\n### Answer:Nothing troubles" in text
    else:
        assert "<|im_end|>\n<|im_start|>assistant\nNothing troubles" in text


def test_short_prompts_keep_todays_answer_cut_under_every_policy(chat_tokenizer):
    n_prompt = len(prompt_token_ids(chat_tokenizer, CHAT_TEMPLATE, QUESTION))
    answer, budget = ANSWER * 8, 2 * n_prompt  # the prompt is half the budget: the answer keeps the other half
    examples = [tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, answer, budget, overlong_policy=policy)
                for policy in ("error", "truncate_prompt")]
    assert examples[0] == examples[1] and examples[0]["truncated"] and not examples[0]["prompt_truncated"]
    assert len(examples[0]["input_ids"]) == budget
    with pytest.raises(OverlongExample):
        tokenize_example(chat_tokenizer, CHAT_TEMPLATE, QUESTION, answer, budget, overlong_policy="drop")


def test_tokenized_split_drops_or_shortens_and_reports_the_indices(chat_tokenizer):
    data = Dataset.from_dict({"input_text": ["ok?", LONG_QUESTION, "fine?"], "output_text": ["yes", ANSWER, "no"],
                              "category": ["a", "b", "a"], "context": ["[]"] * 3})
    dropped = tokenized_split(data, "train_set", chat_tokenizer, CHAT_TEMPLATE, None, max_seq_length_in_use=128,
                              overlong_policy="drop")
    assert dropped["record_index"] == [0, 2]
    shortened = tokenized_split(data, "train_set", chat_tokenizer, CHAT_TEMPLATE, None, max_seq_length_in_use=128,
                                overlong_policy="truncate_prompt")
    assert shortened["record_index"] == [0, 1, 2] and shortened["prompt_truncated"] == [False, True, False]
    summary = overlong_records(data, data, data, dropped, shortened, shortened, "drop")
    assert summary["train_set"] == {"prompt_truncated": [], "dropped": [1]}
    assert summary["validation_set"] == {"prompt_truncated": [1], "dropped": []}
