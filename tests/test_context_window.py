"""Limits checked against the model's context window (issue #34, item 5): ``max_new_tokens`` with the longest
prompt answered is refused above the room it leaves, naming the largest value allowed, in the preflight and in
the dataflow's own nodes alike; ``max_seq_length`` above the window is capped with one warning line. On tiny
models of a small window: a GPT-2 (learned positions, which fail past the window) and a T5 (an encoder-decoder
whose window is its tokenizer's ``model_max_length``)."""

import logging

import pytest

import philo_dataflow
from philo_dataflow import preflight
from philo_dataflow.lib.context_window import context_window
from philo_dataflow.lib.model_sources import context_window_of
from philo_dataflow.lib.prompts import render_prompt
from philo_dataflow.testing import example_subset, tiny_t5_model_dir

#: The tiny GPT-2's ``n_positions``: room for the example questions' prompts and a few dozen answer tokens.
WINDOW = 128
WINDOW_SOURCE = "max_position_embeddings in the model's config"


@pytest.fixture(scope="module")
def small_window_gpt2(tmp_path_factory, chat_tokenizer) -> str:
    """A randomly initialised 1-layer GPT-2 of ``WINDOW`` positions with the chat tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2-window")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(chat_tokenizer), n_positions=WINDOW, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=chat_tokenizer.bos_token_id, eos_token_id=chat_tokenizer.eos_token_id,
                        pad_token_id=chat_tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    chat_tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def inputs(small_window_gpt2, tmp_path) -> dict:
    data = example_subset(tmp_path / "small.jsonl", 4, ("Stoicism", "Taoism", "Hedonism"))
    return {"data_path": data, "model_id": small_window_gpt2, "output_dir": str(tmp_path / "out"), "max_new_tokens": 16}


def _longest_answered_prompt(inputs: dict) -> tuple:
    """``(split, tokens)`` of the longest hold-out or validation prompt, rendered by the tokenizer's own chat
    template."""
    result = philo_dataflow.build_driver({"start": "base"}).execute(["hold_out_set", "validation_set", "tokenizer"],
                                                                    inputs=inputs)
    tokenizer = result["tokenizer"]
    lengths = [(len(tokenizer(render_prompt(tokenizer, "chat_template", question), add_special_tokens=False).input_ids),
                split) for split in ("hold_out_set", "validation_set") for question in result[split]["input_text"]]
    tokens, split = max(lengths)
    return split, tokens


def test_max_new_tokens_is_refused_one_token_above_the_room_of_the_longest_prompt(inputs):
    split, longest = _longest_answered_prompt(inputs)
    room = WINDOW - longest
    assert room > 0
    assert preflight.check_run_inputs({**inputs, "max_new_tokens": room}) == []
    problems = preflight.check_run_inputs({**inputs, "max_new_tokens": room + 1})
    assert len(problems) == 1 and problems[0].input == "max_new_tokens"
    message = problems[0].message
    assert message.startswith(f"max_new_tokens={room + 1} (--max-new-tokens): the longest prompt answered, {split} "
                              "record ")
    assert message.endswith(f"is {longest} tokens, and prompt and answer must fit the model's context window of "
                            f"{WINDOW} tokens ({WINDOW_SOURCE}); give max_new_tokens {room} or less.")
    # the dataflow's own node refuses with the same line: library users get it without the preflight
    with pytest.raises(ValueError) as raised:
        philo_dataflow.build_driver({"start": "base"}).execute([split.replace("_set", "_prompt_ids")],
                                                               inputs={**inputs, "max_new_tokens": room + 1})
    assert str(raised.value) == message


def test_answers_at_the_largest_max_new_tokens_allowed_fit_learned_positions(inputs, small_window_gpt2):
    """GPT-2's position embeddings end at the window: the largest value the check allows answers the longest
    question to the last position without an index error, where generate itself only warns and then fails."""
    from transformers import AutoModelForCausalLM

    from philo_dataflow.lib.generation import generate_answers

    dr = philo_dataflow.build_driver({"start": "base"})
    prompts = dr.execute(["hold_out_prompt_ids"], inputs=inputs)["hold_out_prompt_ids"]
    room = WINDOW - max(map(len, prompts))
    model = AutoModelForCausalLM.from_pretrained(small_window_gpt2).eval()
    answers = dr.execute(["base_model_hold_out_generations"], inputs={**inputs, "max_new_tokens": room},
                         overrides={"base_answer_model": model})["base_model_hold_out_generations"]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert len(answers[longest]["token_ids"]) == room  # a random model never says EOS: it filled the window
    assert all(len(prompt) + len(answer["token_ids"]) <= WINDOW for prompt, answer in zip(prompts, answers))
    with pytest.raises(IndexError):  # what the refusal spares: two tokens more run past the positions
        generate_answers(model, dr.execute(["tokenizer"], inputs=inputs)["tokenizer"], [prompts[longest]], room + 2, 1)


def test_max_seq_length_above_the_window_is_capped_with_one_warning(inputs, caplog):
    assert preflight.check_run_inputs({**inputs, "max_seq_length": 4096}) == []
    dr = philo_dataflow.build_driver({"start": "base"})
    with caplog.at_level(logging.WARNING, logger="philo_dataflow"):
        result = dr.execute(["max_seq_length_in_use", "tokenization_stats", "tokenized_train", "tokenized_validation"],
                            inputs={**inputs, "max_seq_length": 4096})
    capped = [record.getMessage() for record in caplog.records if "capped" in record.getMessage()]
    assert capped == [f"max_seq_length=4096 (--max-seq-length) is above the model's context window of {WINDOW} "
                      f"tokens ({WINDOW_SOURCE}): capped to {WINDOW}."]
    assert result["max_seq_length_in_use"] == WINDOW and result["tokenization_stats"]["max_seq_length"] == WINDOW
    lengths = [len(ids) for split in ("tokenized_train", "tokenized_validation") for ids in result[split]["input_ids"]]
    assert max(lengths) == WINDOW  # some examples are longer than the window: cut to it, as to any max_seq_length
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="philo_dataflow"):
        assert dr.execute(["max_seq_length_in_use"], inputs={**inputs, "max_seq_length": WINDOW})[
            "max_seq_length_in_use"] == WINDOW
    assert not [record for record in caplog.records if "capped" in record.getMessage()]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    from philo_dataflow.testing import EXAMPLE_DATA

    texts = EXAMPLE_DATA.read_text(encoding="utf-8").splitlines()
    return tiny_t5_model_dir(tmp_path_factory.mktemp("t5-window"), texts)


def test_an_encoder_decoder_answer_must_fit_its_decoder_window(tiny_t5, tmp_path):
    from transformers import AutoTokenizer

    window = context_window_of(tiny_t5, AutoTokenizer.from_pretrained(tiny_t5))
    # T5's config states no position limit (relative positions): its tokenizer's model_max_length is the window
    assert (window.encoder_decoder, window.tokens, window.decoder_tokens) == (True, 512, 512)
    assert window.decoder_source == "the tokenizer's model_max_length"
    data = example_subset(tmp_path / "small.jsonl", 4, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {"data_path": data, "model_id": tiny_t5, "output_dir": str(tmp_path / "out")}
    assert preflight.check_run_inputs({**inputs, "max_new_tokens": 512}) == []
    problems = [problem.message for problem in preflight.check_run_inputs({**inputs, "max_new_tokens": 513})]
    assert problems == ["max_new_tokens=513 (--max-new-tokens): an answer must fit the model's decoder window of 512 "
                        "tokens (the tokenizer's model_max_length); give max_new_tokens 512 or less."]
    with pytest.raises(ValueError, match="decoder window of 512 tokens"):
        philo_dataflow.build_driver({"start": "base", "architecture": "seq2seq"}).execute(
            ["validation_prompt_ids"], inputs={**inputs, "max_new_tokens": 513})


def test_the_window_is_read_under_the_names_transformers_configs_give_it():
    from transformers import BartConfig, GPT2Config, LlamaConfig, LlavaConfig, MptConfig, T5Config

    from philo_dataflow.lib.context_window import ContextWindow

    assert context_window(GPT2Config(n_positions=64)) == ContextWindow(64, WINDOW_SOURCE)  # GPT-2's n_positions
    assert context_window(MptConfig(max_seq_len=77)) == ContextWindow(77, "max_seq_len in the model's config")
    assert context_window(LlavaConfig(text_config=LlamaConfig(max_position_embeddings=333).to_dict())).tokens == 333
    bart = context_window(BartConfig(max_position_embeddings=100))
    assert (bart.encoder_decoder, bart.tokens, bart.decoder_tokens) == (True, 100, 100)
    assert context_window(T5Config()).tokens is None  # neither the config nor a tokenizer says: nothing is checked


def test_the_config_comes_before_the_tokenizer(chat_tokenizer, small_window_gpt2):
    """The config's limit is the model's; a tokenizer's ``model_max_length`` only fills in where the config has
    none (SmolLM2's tokenizer leaves it unset: transformers' 1e30)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_window_gpt2, model_max_length=4 * WINDOW)
    assert context_window_of(small_window_gpt2, tokenizer).tokens == WINDOW
    assert chat_tokenizer.model_max_length > 10**20
    from transformers import LlamaConfig

    assert context_window(LlamaConfig(), chat_tokenizer).tokens == LlamaConfig().max_position_embeddings
