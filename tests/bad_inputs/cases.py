"""The bad-input corpus: each case is a run's inputs and the problems the preflight must report.

A case gives the library inputs (``inputs(env, work)``; ``tests/test_bad_inputs.py`` turns them into
``run.py`` flags too) and ``expected``: one entry per problem, each a substring or a tuple of
substrings of that problem's message. The preflight must report exactly that many problems, each
matching one entry. ``graph`` names nodes whose ``dr.execute`` must raise a ValueError holding
``graph_expected`` (default: the first entry's first substring), for checks the dataflow makes too.

Small data files lie beside this module; what cannot be kept in git as it is (invalid UTF-8, a 1 MB
record, a FIFO, unreadable files, damaged adapter directories) is made by ``inputs`` in ``work``, the
case's own temporary directory.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
GOOD_ROWS = [json.loads(line) for line in (HERE / "good.jsonl").read_text().splitlines()]
#: Models the fake judge endpoint lists.
JUDGE_MODELS = ("judge-a", "judge-b")
UNSET_KEY_VARIABLE = "PHILO_DATAFLOW_TEST_UNSET_KEY"


def data(name: str) -> str:
    return str(HERE / name)


GOOD = data("good.jsonl")


@dataclass
class Env:
    """What the cases build on (made once per test session by ``tests/test_bad_inputs.py``)."""

    tiny_model: str  # a 2-layer Llama with the embedded model's tokenizer (tests/conftest.py)
    adapter: str  # a valid presaved adapter directory made on ``tiny_model``
    other_adapter: str  # an adapter made on a Llama of another hidden size
    judge_url: str  # a loopback OpenAI-style endpoint listing JUDGE_MODELS
    closed_url: str  # a loopback URL where nothing listens
    #: a real 3 MB filesystem (``conftest.small_filesystem``), None where one cannot be mounted here
    small_filesystem: Optional[str] = None

    def adapter_copy(self, work: Path, source: Optional[str] = None) -> Path:
        target = work / "run" / "adapter"
        shutil.copytree(source or self.adapter, target)
        return target


@dataclass(frozen=True)
class Case:
    id: str
    inputs: Callable[[Env, Path], dict]
    expected: tuple
    start: str = "base"
    overwrite: bool = False
    #: run.py flags added to those made from ``inputs`` (mistakes only the command line can make)
    cli_extra: tuple = ()
    #: the mistake exists only on the command line: no library check
    cli_only: bool = False
    graph: tuple = ()
    graph_expected: Optional[str] = None
    #: root reads and writes whatever the permissions say: the case is skipped when run as root
    needs_non_root: bool = False
    needs_no_cuda: bool = False
    #: environment variables set for the case (``WORLD_SIZE`` as torchrun sets it, say)
    environment: tuple = ()
    #: the case writes to ``Env.small_filesystem``: skipped where there is none
    needs_small_filesystem: bool = False


def _with(name: str, **inputs) -> Callable[[Env, Path], dict]:
    return lambda env, work: {"data_path": data(name), **inputs}


def _good(**inputs) -> Callable[[Env, Path], dict]:
    return _with("good.jsonl", **inputs)


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _invalid_utf8(env, work):
    lines = [json.dumps(row).encode() for row in GOOD_ROWS]
    lines[3] = json.dumps({"instruction": "Que es la virtud?", "output": "X", "school": "Stoicism"}).encode().replace(
        b"Que", "Qué".encode("latin-1"))
    path = work / "invalid_utf8.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"data_path": str(path)}


def _utf16(env, work):
    path = work / "utf16.json"
    path.write_text(json.dumps(GOOD_ROWS), encoding="utf-16")
    return {"data_path": str(path)}


def _one_mb_question(env, work):
    question = "Why? " * 210_000
    return {"data_path": _write_jsonl(work / "one_mb_record.jsonl",
                                      GOOD_ROWS + [{"instruction": question, "output": "Because.", "school": "Stoicism"}]),
            "overlong_policy": "error"}


def _one_mb_answer(env, work):
    answer = "Because. " * 120_000
    return {"data_path": _write_jsonl(work / "one_mb_answer.jsonl",
                                      GOOD_ROWS + [{"instruction": "Why?", "output": answer, "school": "Stoicism"}])}


def _bom_joined(env, work):
    path = work / "joined.jsonl"
    path.write_text("".join(("\ufeff" if i == 7 else "") + json.dumps(r) + "\n" for i, r in enumerate(GOOD_ROWS)),
                    encoding="utf-8-sig")
    return {"data_path": str(path)}


def _fifo(env, work):
    path = work / "pipe.jsonl"
    os.mkfifo(path)
    return {"data_path": str(path)}


def _unreadable(env, work):
    path = work / "secret.jsonl"
    shutil.copy(GOOD, path)
    path.chmod(0)
    return {"data_path": str(path)}


def _output_dir_file(env, work):
    (work / "out").write_text("not a directory")
    return {"data_path": GOOD, "output_dir": str(work / "out")}


def _output_dir_previous_run(env, work):
    (work / "out").mkdir()
    (work / "out" / "metrics.json").write_text("{}")
    return {"data_path": GOOD, "output_dir": str(work / "out")}


def _output_dir_under_file(env, work):
    (work / "plain_file").write_text("x")
    return {"data_path": GOOD, "output_dir": str(work / "plain_file" / "out")}


def _output_dir_on_a_small_filesystem(env, work):
    """The tiny model's LoRA run (two checkpoints of 3.7 MB, mostly the tokenizer; the adapter; the report
    page, about 16 MB in all) into a directory of a 3 MB filesystem."""
    return {"data_path": GOOD, "output_dir": f"{env.small_filesystem}/{work.name}"}


def _output_dir_read_only(env, work):
    (work / "locked").mkdir()
    (work / "locked").chmod(0o555)
    return {"data_path": GOOD, "output_dir": str(work / "locked" / "out")}


def _questions_above_the_window(env, work):
    """The good records and three of one more school whose questions (about 1,800 tokens each: 300 different
    five-digit numbers) are longer than the tiny model's 1,024-token window; the hold-out and validation
    splits each get one of them."""
    import random

    rng = random.Random(0)
    long_rows = [{"instruction": f"Which of these numbers would Diogenes keep, case {i}? "
                                 + " ".join(str(rng.randint(10_000, 99_999)) for _ in range(300)),
                  "output": "None of them.", "school": "Cynicism"} for i in range(3)]
    return {"data_path": _write_jsonl(work / "questions_above_the_window.jsonl", GOOD_ROWS + long_rows)}


def _model_without_config(env, work):
    model = work / "model"
    shutil.copytree(env.tiny_model, model)
    (model / "config.json").unlink()
    return {"data_path": GOOD, "model_id": str(model)}


def _model_with_pickle_weights(env, work):
    import torch
    from safetensors.torch import load_file

    model = work / "model"
    shutil.copytree(env.tiny_model, model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return {"data_path": GOOD, "model_id": str(model)}


def _presaved(damage: Callable[[Path], None], source: str = "adapter", **inputs):
    def make(env, work):
        adapter = env.adapter_copy(work, getattr(env, source))
        damage(adapter)
        return {"data_path": GOOD, "presaved_model_dir": str(adapter), **inputs}

    return make


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda adapter: (adapter / name).unlink()


def _overwrite_with(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda adapter: (adapter / name).write_bytes(content)


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(adapter: Path) -> None:
        content = (adapter / name).read_bytes()
        (adapter / name).write_bytes(content[: len(content) // 2])

    return damage


def _presaved_own_run(env, work):
    adapter = env.adapter_copy(work)
    return {"data_path": GOOD, "presaved_model_dir": str(adapter), "output_dir": str(adapter.parent)}


def _judge(**settings):
    return lambda env, work: {"data_path": GOOD, **{k: v.format(env=env) if isinstance(v, str) else v
                                                     for k, v in settings.items()}}


#: The data files of the format tests (tests/test_data_formats.py), good ones.
DATA_FORMATS = HERE.parent / "data_formats"
QUESTION_TEMPLATE = "### Question:\n{question}\n\n### Answer:"


def _formats(name: str, **inputs) -> Callable[[Env, Path], dict]:
    return lambda env, work: {"data_path": str(DATA_FORMATS / name), **inputs}


def _saved_dataset_dict(split_names: tuple, data_path_tail: str = "") -> Callable[[Env, Path], dict]:
    """A DatasetDict of the good rows saved with save_to_disk in ``work``, its splits ``split_names``."""

    def make(env, work):
        import datasets

        bars_off = datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # stderr must hold the run's error lines only
        try:
            datasets.DatasetDict({name: datasets.Dataset.from_list(GOOD_ROWS) for name in split_names}).save_to_disk(
                str(work / "saved"))
        finally:
            if not bars_off:
                datasets.enable_progress_bars()
        return {"data_path": str(work / "saved") + data_path_tail}

    return make


ENDPOINT = "{env.judge_url}"
NOTHING_LISTENS = "{env.closed_url}"
#: Every split tokenized: a prompt too long for max_seq_length fails whichever split it landed in.
TOKENIZED = ("tokenized_train", "tokenized_validation", "tokenized_hold_out")
NO_ANSWER_TOKEN = "no answer token would be supervised"
#: The Trainer's settings are checked by the node that builds its arguments, before any model loads.
TRAINER = ("training_args",)

CASES = (
    # -- the data file: reading and parsing
    Case("empty_file", _with("empty.jsonl"), ("empty.jsonl: the file is empty",), graph=("train_set",)),
    Case("whitespace_only_file", _with("whitespace_only.json"), ("whitespace_only.json: the file is empty",)),
    Case("not_json", _with("not_json.json"), ("not_json.json: not valid JSON (",), graph=("train_set",)),
    Case("json_number", _with("number.json"), ("number.json: top-level JSON value is a int",)),
    Case("list_of_strings", _with("list_of_strings.json"),
         ("list_of_strings.json: record 0 is a str, not an object with question and answer keys "
          "(and 2 more records: 1, 2)",),
         graph=("train_set",)),
    Case("object_without_record_list", _with("object_without_records.json"),
         ("must hold exactly one list of records under a key; found 0",)),
    Case("object_with_two_record_lists", _with("two_record_lists.json"),
         ("found 2 such lists among keys ['test', 'train']",)),
    Case("jsonl_bad_line", _with("bad_jsonl_line.jsonl"), ("bad_jsonl_line.jsonl: line 4 is not valid JSON",)),
    Case("invalid_utf8", _invalid_utf8, (("invalid_utf8.jsonl: not UTF-8 text (byte 0xe9 at offset", "line 4)"),),
         graph=("train_set",)),
    Case("utf16_file", _utf16, ("utf16.json: the text is UTF-16",)),
    Case("csv_missing_column", _with("missing_column.csv"),
         ("missing_column.csv: record 0 has no key 'output' (keys present: ['instruction', 'school']) (and 14 more",)),
    Case("csv_header_only", _with("header_only.csv"), ("header_only.csv: holds no records",)),
    Case("unknown_suffix", _with("records.txt"), ("records.txt: unknown suffix '.txt'; use .json, .jsonl or .csv",)),
    Case("directory_as_data_file", lambda env, work: {"data_path": str(work)}, ("is a directory; give the path",)),
    Case("missing_data_file", lambda env, work: {"data_path": str(work / "nope.jsonl")}, ("nope.jsonl: no such file",)),
    Case("fifo_as_data_file", _fifo, ("pipe.jsonl: not a regular file",)),
    Case("unreadable_data_file", _unreadable, ("secret.jsonl: cannot be read (Permission denied)",), needs_non_root=True),
    # -- the records: keys and values
    Case("records_missing_the_answer_key", _with("missing_output_key.jsonl"),
         ("missing_output_key.jsonl: record 1 has no key 'output' (keys present: ['instruction', 'school']) "
          "(and 2 more records: 3, 12)",), graph=("train_set",)),
    Case("other_keys_than_alpaca", _with("question_answer_keys.jsonl"),
         (("record 0 has no key 'instruction' and no key 'output' (keys present: ['answer', 'question', 'school'])",
           "(and 14 more records: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)", "set input_text_key/output_text_key"),)),
    Case("configured_key_missing", _good(input_text_key="prompt", output_text_key="output"),
         (("record 0 has no key 'prompt'", "check input_text_key/output_text_key"),)),
    Case("null_values", _with("null_values.jsonl"),
         ("null_values.jsonl: no record has both a question and an answer (15 of 15 have an empty, whitespace-only "
          "or null one)",), graph=("train_set",)),
    Case("non_string_values", _with("non_string_values.jsonl"),
         ("record 0, key 'instruction' holds a int (and 1 more record: 4); it must be a string",
          "record 2, key 'output' holds a list; it must be a string")),
    Case("whitespace_only_texts", _with("whitespace_texts.jsonl"),
         ("whitespace_texts.jsonl: no record has both a question and an answer (15 of 15",)),
    # -- chat, OASST and templated records; other sources
    Case("chat_turn_without_content", _with("messages_no_content.jsonl"),
         (("messages_no_content.jsonl: record 1, key 'messages' turn 1 has no key 'content' (keys present: ['role', "
           "'text']) (and 1 more record: 3)", "each turn needs 'role' and 'content'"),), graph=("train_set",)),
    Case("chat_unknown_role", _with("messages_unknown_role.jsonl"),
         ("messages_unknown_role.jsonl: record 2, key 'messages' turn 1 has role 'bot'; use system, user or assistant",)),
    Case("chat_turns_out_of_order", _with("messages_out_of_order.jsonl"),
         (("messages_out_of_order.jsonl: record 0, key 'messages' turn 1 is 'user' after 'user' (and 1 more record: 2)",
           "turns must alternate user and assistant"),), graph=("train_set",)),
    Case("chat_without_assistant_turn", _with("messages_no_answer.jsonl"),
         ("messages_no_answer.jsonl: record 1, key 'messages' has no assistant turn; a conversation must end with the "
          "assistant's answer",)),
    Case("sharegpt_unknown_from", _with("sharegpt_unknown_from.json"),
         ("sharegpt_unknown_from.json: record 1, key 'conversations' turn 1 has from 'bing'; use system, human or gpt",)),
    Case("oasst_tree_without_prompter_root", _with("oasst_root_assistant.jsonl"),
         (("oasst_root_assistant.jsonl: record 1, message prompt (message_id 'r0') has role 'assistant', not "
           "'prompter'", "an OASST tree must start with a prompter message"),), graph=("train_set",)),
    Case("oasst_replies_not_a_list", _with("oasst_replies_not_list.jsonl"),
         ("oasst_replies_not_list.jsonl: record 0, message prompt.replies[0] (message_id 'x1'), key 'replies' holds a "
          "str; it must be a list of reply messages",)),
    Case("prompt_template_names_a_missing_key",
         _with("question_answer_keys.jsonl", prompt_template="### Question:\n{query}\n\n### Answer:",
               output_text_key="answer"),
         (("question_answer_keys.jsonl: record 0 has no key 'query' (keys present: ['answer', 'question', 'school']) "
           "(and 14 more records", "check prompt_template (--prompt-template) and output_text_key"),),
         graph=("train_set",)),
    Case("prompt_template_malformed",
         _with("question_answer_keys.jsonl", prompt_template="### Question: {question", output_text_key="answer"),
         (("prompt_template='### Question: {question' (--prompt-template) is not a valid format string (expected '}' "
           "before end of string)", "write each record key in braces"),), graph=("train_set",)),
    Case("prompt_template_without_placeholder",
         _with("question_answer_keys.jsonl", prompt_template="Answer this:", output_text_key="answer"),
         ("prompt_template='Answer this:' (--prompt-template) names no record key; put the key of the question in "
          "braces",)),
    Case("prompt_template_shows_the_answer",
         _with("question_answer_keys.jsonl", prompt_template="### Question:\n{question}\n\n### Answer:\n{answer}",
               output_text_key="answer"),
         (("prompt_template='### Question:\\n{question}\\n\\n### Answer:\\n{answer}' (--prompt-template) puts the "
           "answer key {answer} in the prompt", "name the answer's key with output_text_key (--output-text-key)"),),
         graph=("train_set",)),
    Case("prompt_template_for_chat_records", _formats("messages.jsonl", prompt_template=QUESTION_TEMPLATE),
         ("prompt_template (--prompt-template) renders question/answer records, but it holds messages records",)),
    Case("lang_for_alpaca_records", _good(lang="en"),
         ("good.jsonl: lang='en' (--lang) keeps the OASST trees of one language, but it holds alpaca records",)),
    Case("data_format_not_a_choice", _good(data_format="chat"),
         ("data_format='chat' (--data-format): must be one of ['auto', 'alpaca', 'pairs', 'messages', 'sharegpt', "
          "'oasst']; the default is 'auto'",), graph=("instruction_records",)),
    Case("data_format_not_the_files", _good(data_format="sharegpt"),
         (("good.jsonl: record 0 has no key 'conversations' (keys present: ['instruction', 'output', 'school']) (and 14 "
           "more records", "or set data_format (--data-format)"),)),
    Case("hub_dataset_not_cached", lambda env, work: {"data_path": "philo-tests/never-downloaded"},
         (("philo-tests/never-downloaded: no such local file or directory, and the Hugging Face hub dataset "
           "'philo-tests/never-downloaded' is not in the local cache and HF_HUB_OFFLINE is set",
           "download it once online"),), graph=("train_set",)),
    Case("parquet_file_not_parquet", _with("not_parquet.parquet"),
         (("not_parquet.parquet: not a Parquet file (", "magic bytes not found"),), graph=("train_set",)),
    Case("save_to_disk_split_missing", _saved_dataset_dict(("train", "test"), ":dev"),
         ("saved:dev: the DatasetDict has no split 'dev' (its splits: ['test', 'train']); name one of them after the "
          "colon",), graph=("train_set",)),
    Case("save_to_disk_without_train_split", _saved_dataset_dict(("test", "validation")),
         ("saved: the DatasetDict has no 'train' split (its splits: ['test', 'validation']); name one after a colon",)),
    # -- enough records for each split
    Case("duplicate_prompts_only", _with("duplicate_prompts_only.jsonl"),
         (("2 usable record(s) are too few to fill", "(10 record(s) repeating an earlier prompt"),
          "category 'Stoicism' (key 'school') has 1 record(s) (record 1)",
          "category 'Taoism' (key 'school') has 1 record(s) (record 0)"),
         graph=("train_set",), graph_expected="2 usable record(s) are too few to fill"),
    Case("reworded_questions_only", _with("reworded_questions_only.jsonl"),
         (("5 usable record(s) are too few to fill train_set, validation_set: the grouping joined 5 of them into 1 "
           "group(s) (largest 5), each kept whole in one split (near-duplicate conversations at "
           "near_duplicate_threshold=0.8 (--near-duplicate-threshold)", "leaving 1 group(s) in all; add records that "
           "are not rewordings of these, or raise near_duplicate_threshold to join fewer."),),
         graph=("train_set",), graph_expected="the grouping joined 5 of them into 1 group(s)"),
    Case("school_with_one_record", _with("school_with_one_record.jsonl"),
         (("category 'Cynicism' (key 'school') has 1 record(s) (record 15)", "add records, correct the label"),)),
    Case("two_records", _with("two_records.jsonl"),
         ("2 usable record(s) are too few to fill validation_set, hold_out_set",
          "category 'Stoicism' (key 'school') has 2 record(s) (record 0, 1)"),
         graph=("train_set",)),
    # -- prompts and max_seq_length
    Case("prompt_leaves_no_answer_token", _with("long_prompt.jsonl", overlong_policy="error"),
         (("long_prompt.jsonl record 15 ('Consider the following long", "max_seq_length=512: " + NO_ANSWER_TOKEN),),
         graph=TOKENIZED, graph_expected=NO_ANSWER_TOKEN),
    Case("one_mb_record", _one_mb_question, (("one_mb_record.jsonl record 15 ('Why? Why?", NO_ANSWER_TOKEN),)),
    Case("max_seq_length_below_every_prompt", _good(max_seq_length=12, overlong_policy="error"),
         (("good.jsonl: 15 of 15 prompts are max_seq_length=12 tokens or longer",
           "raise max_seq_length (--max-seq-length)"),),
         graph=TOKENIZED, graph_expected=NO_ANSWER_TOKEN),
    # -- limits checked against the model's context window (the tiny model's max_position_embeddings: 1024)
    Case("max_new_tokens_above_the_window", _good(max_new_tokens=10**9),
         (("max_new_tokens=1000000000 (--max-new-tokens): the longest prompt answered, ", " record ",
           "must fit the model's context window of 1024 tokens (max_position_embeddings in the model's config); "
           "give max_new_tokens "),), graph=("hold_out_prompt_ids",)),
    Case("presaved_max_new_tokens_above_the_window", _presaved(lambda adapter: None, max_new_tokens=10**9),
         (("max_new_tokens=1000000000 (--max-new-tokens)", "context window of 1024 tokens", "give max_new_tokens "),),
         start="presaved", graph=("validation_prompt_ids",)),
    Case("question_above_the_window", _questions_above_the_window,
         ((" record ", "its prompt is ", "which fills the model's context window of 1024 tokens (max_position_"
           "embeddings in the model's config) and leaves no room for an answer; shorten that question or leave it "
           "out of the data (--data-path)"),),
         graph=("hold_out_prompt_ids",), graph_expected="which fills the model's context window of 1024 tokens"),
    Case("overlong_policy_not_a_choice", _good(overlong_policy="truncate"),
         ("overlong_policy='truncate' (--overlong-policy): must be one of ['truncate_prompt', 'drop', 'error']",),
         graph=("tokenized_train",)),
    Case("generation_top_p_above_one", _good(do_sample=True, top_p=1.5),
         ("top_p=1.5 (--top-p): must be a number in (0, 1]",), graph=("generation_settings",)),
    Case("generation_temperature_zero", _good(do_sample=True, temperature=0.0),
         ("temperature=0.0 (--temperature): must be a number > 0",), graph=("generation_settings",)),
    Case("generation_negative_ngram_size", _good(no_repeat_ngram_size=-1),
         ("no_repeat_ngram_size=-1 (--no-repeat-ngram-size): must be an integer >= 0",),
         graph=("generation_settings",)),
    Case("max_seq_length_one", _good(max_seq_length=1), ("max_seq_length=1 (--max-seq-length): must be an integer >= 2",),
         graph=("tokenized_train",)),
    # -- hyperparameters
    Case("learning_rate_zero", _good(learning_rate=0.0), ("learning_rate=0.0",), graph=TRAINER),
    Case("learning_rate_negative", _good(learning_rate=-0.001),
         ("learning_rate=-0.001 (--learning-rate): must be a number > 0; the default is 0.0005",), graph=TRAINER),
    Case("epochs_zero", _good(num_train_epochs=0.0), ("num_train_epochs=0.0 (--num-train-epochs): must be a number > 0",),
         graph=TRAINER),
    Case("epochs_negative", _good(num_train_epochs=-2), ("num_train_epochs=-2",)),
    Case("max_steps_zero", _good(max_steps=0), ("max_steps=0 (--max-steps): must be -1 (train num_train_epochs epochs) or",),
         graph=TRAINER),
    Case("batch_size_zero", _good(per_device_train_batch_size=0), ("per_device_train_batch_size=0",), graph=TRAINER),
    Case("gradient_accumulation_zero", _good(gradient_accumulation_steps=0), ("gradient_accumulation_steps=0",),
         graph=TRAINER),
    Case("fractions_sum_to_one", _good(validation_fraction=0.5, hold_out_fraction=0.5),
         ("validation_fraction + hold_out_fraction = 1 (--validation-fraction, --hold-out-fraction): must be below 1",),
         graph=("train_set",)),
    Case("fraction_zero", _good(hold_out_fraction=0.0),
         ("hold_out_fraction=0.0 (--hold-out-fraction): must be a number in (0, 1)",),
         graph=("train_set",)),
    Case("fraction_above_one", _good(validation_fraction=1.5), ("validation_fraction=1.5",)),
    Case("seed_negative", _good(seed=-1), ("seed=-1 (--seed): must be an integer in [0, 4294967295]",)),
    Case("lora_rank_zero", _good(lora_r=0), ("lora_r=0 (--lora-r): must be an integer >= 1",), graph=("lora_config",)),
    Case("lora_alpha_negative", _good(lora_alpha=-8), ("lora_alpha=-8",), graph=("lora_config",)),
    Case("lora_dropout_one", _good(lora_dropout=1.0), ("lora_dropout=1.0 (--lora-dropout): must be a number in [0, 1)",)),
    Case("unknown_target_module", _good(lora_target_modules="qproj,v_proj"),
         ("lora_target_modules='qproj,v_proj': ['qproj'] names no linear layer of the model",), graph=("lora_config",)),
    Case("lora_layers_out_of_range", _good(lora_layers_to_transform="top:9"),
         ("lora_layers_to_transform='top:9': expected 'all', 'top:N' (the last N of the model's 2 decoder layers)",),
         graph=("lora_config",)),
    Case("unknown_scheduler", _good(lr_scheduler_type="cosinus"), ("lr_scheduler_type='cosinus'",), graph=TRAINER),
    Case("unknown_tracker", _good(report_to="tensorboard,mlfow"),
         (("report_to='tensorboard,mlfow' (--report-to): must be 'none', 'all' or comma-separated names among [",
           "'mlflow'", "'tensorboard'", "'wandb'", "the default is 'none'"),), graph=TRAINER),
    Case("tracker_not_installed", _good(report_to="tensorboard,wandb"),
         ("report_to='tensorboard,wandb' (--report-to): wandb is not installed; pip install wandb, or leave wandb out.",)),
    Case("warmup_ratio_above_one", _good(warmup_ratio=1.5), ("warmup_ratio=1.5",), graph=TRAINER),
    Case("early_stopping_patience_zero", _good(early_stopping_patience=0), ("early_stopping_patience=0",)),
    Case("max_new_tokens_zero", _good(max_new_tokens=0), ("max_new_tokens=0 (--max-new-tokens): must be an integer >= 1",)),
    Case("generation_batch_size_zero", _good(generation_batch_size=0), ("generation_batch_size=0",)),
    Case("load_in_4bit_on_cpu", _good(load_in_4bit=True), ("load_in_4bit=True needs a CUDA GPU",), needs_no_cuda=True),
    Case("resume_from_missing_checkpoint",
         lambda env, work: {"data_path": GOOD, "resume_from_checkpoint": str(work / "checkpoint-9")},
         ("checkpoint-9': no such checkpoint directory",)),
    # -- the model
    Case("unknown_hub_model_offline", _good(model_id="nobody/no-such-model"),
         (("model_id='nobody/no-such-model'", "not available offline"),), graph=("tokenizer",),
         graph_expected="not available offline"),
    Case("missing_model_directory", lambda env, work: {"data_path": GOOD, "model_id": str(work / "no-model")},
         ("no-model': no such model directory",), graph=("tokenizer",)),
    Case("missing_gguf_file", lambda env, work: {"data_path": GOOD, "model_id": str(work / "model.gguf")},
         ("model.gguf': no such GGUF file",), graph=("tokenizer",)),
    Case("model_directory_without_config", _model_without_config, ("the directory holds no config.json",)),
    Case("model_directory_with_pickle_weights", _model_with_pickle_weights,
         (("pytorch_model.bin: it is a pickle file and there are no safetensors weights",
           "Re-save the weights with save_pretrained (safetensors)", "pass allow_pickle=True (--allow-pickle)"),)),
    # -- the presaved adapter
    Case("presaved_directory_missing", lambda env, work: {"data_path": GOOD, "presaved_model_dir": str(work / "adapter")},
         (("presaved_model_dir=", "no such directory"),), start="presaved"),
    Case("presaved_adapter_weights_missing", _presaved(_unlink("adapter_model.safetensors")),
         ("no adapter_model.safetensors there (the adapter's weights)",), start="presaved", graph=("peft_model",)),
    Case("presaved_adapter_weights_garbage",
         _presaved(_overwrite_with("adapter_model.safetensors", b"not safetensors at all")),
         ("adapter_model.safetensors is corrupted (Error while deserializing header",), start="presaved",
         graph=("peft_model",)),
    Case("presaved_adapter_weights_truncated", _presaved(_truncate("adapter_model.safetensors")),
         ("adapter_model.safetensors is corrupted (",), start="presaved"),
    Case("presaved_adapter_weights_empty", _presaved(_overwrite_with("adapter_model.safetensors", b"")),
         ("adapter_model.safetensors is empty (0 bytes)",), start="presaved"),
    Case("presaved_adapter_config_not_json", _presaved(_overwrite_with("adapter_config.json", b"{r: 8")),
         ("adapter_config.json is not valid JSON",), start="presaved"),
    Case("presaved_manifest_not_json", _presaved(_overwrite_with("philo_dataflow_manifest.json", b'{"inputs": ')),
         ("philo_dataflow_manifest.json cannot be read as JSON",), start="presaved", graph=("peft_model",)),
    Case("presaved_log_history_not_a_list", _presaved(_overwrite_with("training_log_history.json", b'{"loss": 1}')),
         ("training_log_history.json is not a JSON list of log entries",), start="presaved",
         graph=("presaved_log_history",)),
    Case("presaved_manifest_missing", _presaved(_unlink("philo_dataflow_manifest.json")),
         ("holds no philo_dataflow_manifest.json; give the 'adapter' directory",), start="presaved"),
    Case("presaved_adapter_of_another_base_model", _presaved(lambda adapter: None, source="other_adapter"),
         (("the adapter was made for another base model than", "matrices do not fit"),), start="presaved",
         graph=("peft_model",)),
    Case("presaved_output_dir_is_the_adapters_run", _presaved_own_run,
         ("holds the presaved adapter's own run",), start="presaved"),
    # -- the output directory
    Case("output_dir_is_a_file", _output_dir_file, ("(--output-dir) is a file; give a directory",)),
    Case("output_dir_holds_another_run", _output_dir_previous_run,
         ("holds another run's files (metrics.json); choose a new output_dir or pass overwrite (--overwrite)",)),
    Case("output_dir_under_a_file", _output_dir_under_file, (("cannot be created:", "plain_file is a file"),)),
    Case("output_dir_not_writable", _output_dir_read_only,
         ("locked (permission denied); choose a directory you can write to",), needs_non_root=True),
    # /proc takes no new directories, even from root (the kernel says ENOENT; to others, EACCES)
    Case("output_dir_on_a_virtual_filesystem", _good(output_dir="/proc/philo_dataflow_out"),
         (("output_dir='/proc/philo_dataflow_out' (--output-dir): ", "/proc", "a directory", "you can write to"),)),
    # /sys refuses root too (EPERM)
    Case("output_dir_in_sysfs", _good(output_dir="/sys/philo_dataflow_out/run"),
         (("output_dir='/sys/philo_dataflow_out/run' (--output-dir): ", "/sys", "choose a directory you can write to"),)),
    Case("output_dir_filesystem_too_small", _output_dir_on_a_small_filesystem,
         (("(--output-dir): the run will write about", "2 checkpoints of 3.7 MB at the peak, the adapter 3.6 MB, the "
           "report page", "but its filesystem has 3,145,728 bytes (3.1 MB) free; free space there, or give an "
           "output_dir on a larger filesystem."),), needs_small_filesystem=True),
    # -- the LLM judge
    # -- the Hamilton UI
    Case("hamilton_ui_unreachable", _judge(hamilton_ui_url=NOTHING_LISTENS),
         ("(--hamilton-ui-url): no Hamilton UI answers there (",)),
    Case("judge_unreachable", _judge(judge_model="judge-a", judge_base_url=NOTHING_LISTENS),
         ("the judge endpoint cannot be reached (",)),
    Case("judge_model_not_listed", _judge(judge_model="judge-c", judge_base_url=ENDPOINT),
         (("judge_model='judge-c' (--judge-model):", "does not list it among its 2 models; did you mean"),)),
    Case("judge_key_unset", _judge(judge_model="gpt-4.1", judge_base_url="https://judge.invalid/v1",
                                   judge_api_key_env=UNSET_KEY_VARIABLE),
         (f"the environment variable {UNSET_KEY_VARIABLE} is unset or empty",)),
    Case("judge_concurrency_zero", _judge(judge_model="judge-a", judge_base_url=ENDPOINT, judge_max_concurrency=0),
         ("judge_max_concurrency=0 must be an integer >= 1",)),
    Case("judge_under_several_processes", _judge(judge_model="judge-a", judge_base_url=ENDPOINT),
         (("judge_model='judge-a' (--judge-model): the LLM judge runs in one process", "2 processes",
           "--start presaved --presaved-model-dir OUTPUT_DIR/adapter --judge-model NAME"),),
         environment=(("WORLD_SIZE", "2"),)),
    # -- mistakes only the command line can make
    Case("judge_flag_without_judge_model", _good(), ("--judge-base-url configure the LLM judge; add --judge-model",),
         cli_extra=("--judge-base-url", "http://127.0.0.1:1/v1"), cli_only=True),
    Case("unknown_output_variable", _good(), ("--outputs: unknown variable(s) ['metricz']",),
         cli_extra=("--outputs", "metricz"), cli_only=True),
    # -- config files (--config) and --set: refused before anything else is checked
    Case("config_unknown_key", _good(), ("config_unknown_key.yaml: unknown key 'lora_rank'; did you mean 'lora_r'?",),
         cli_extra=("--config", data("config_unknown_key.yaml")), cli_only=True),
    Case("config_wrong_type", _good(), ("config_wrong_type.yaml: key 'lora_r' must be an integer, not 'eight' (str).",),
         cli_extra=("--config", data("config_wrong_type.yaml")), cli_only=True),
    Case("config_not_yaml", _good(), ("config_not_yaml.yaml: not valid YAML at line 2, column 1",),
         cli_extra=("--config", data("config_not_yaml.yaml")), cli_only=True),
    Case("config_not_a_mapping", _good(), ("config_list.yaml: must hold a mapping of input names to values, not a list.",),
         cli_extra=("--config", data("config_list.yaml")), cli_only=True),
    Case("config_missing_file", _good(), ("no_such_config.yaml: the config file cannot be read (No such file or directory)",),
         cli_extra=("--config", data("no_such_config.yaml")), cli_only=True),
    Case("config_three_problems", _good(),
         ("key 'learning_rate' must be a number, not '5e-4' (str)", "key 'seed' must be an integer, not True (bool)",
          "unknown key 'max_steeps'; did you mean 'max_steps'?"),
         cli_extra=("--config", data("config_three_problems.yaml")), cli_only=True),
    Case("set_without_equals", _good(), ("--set 'lora_r': write KEY=VALUE, e.g. --set lora_r=8.",),
         cli_extra=("--set", "lora_r"), cli_only=True),
    Case("set_wrong_type", _good(), ("--set: key 'lora_r' must be an integer, not 8.5 (float).",),
         cli_extra=("--set", "lora_r=8.5"), cli_only=True),
    Case("set_unknown_key", _good(), ("--set: unknown key 'lora_rr'; did you mean 'lora_r'?",),
         cli_extra=("--set", "lora_rr=8"), cli_only=True),
    Case("config_start_unknown", _good(), ("--set: key 'start' must be one of ['base', 'presaved'], not 'train'.",),
         cli_extra=("--set", "start=train"), cli_only=True),
    # -- several problems at once: every one is reported
    Case("many_problems_at_once",
         lambda env, work: {**_output_dir_file(env, work), "data_path": data("question_answer_keys.jsonl"),
                            "learning_rate": 0, "lora_r": 0, "max_new_tokens": 0,
                            "model_id": str(work / "no-model")},
         ("learning_rate=0", "lora_r=0", "max_new_tokens=0", "(--output-dir) is a file",
          "record 0 has no key 'instruction' and no key 'output'", "no such model directory")),
)

#: Inputs that look odd but are right: the preflight must find nothing.
ACCEPTED = (
    Case("good_file", _good(), ()),
    Case("byte_order_mark_at_start", _with("bom.jsonl"), ()),
    Case("byte_order_mark_inside_joined_jsonl", _bom_joined, ()),
    Case("duplicate_prompts_are_dropped", _with("good_with_duplicates.jsonl"), ()),
    Case("one_mb_answer_is_truncated", _one_mb_answer, ()),
    Case("max_seq_length_above_the_window_is_capped", _good(max_seq_length=100_000), ()),
    Case("long_prompt_is_shortened_by_default", _with("long_prompt.jsonl"), ()),
    Case("long_prompt_is_dropped", _with("long_prompt.jsonl", overlong_policy="drop"), ()),
    Case("previous_run_with_overwrite", _output_dir_previous_run, (), overwrite=True),
    Case("presaved_adapter", _presaved(lambda adapter: None), (), start="presaved"),
    Case("judge_model_listed", _judge(judge_model="judge-b", judge_base_url=ENDPOINT), ()),
    Case("chat_messages_with_a_system_prompt", _formats("messages.jsonl"), ()),
    Case("sharegpt_conversations", _formats("sharegpt.json"), ()),
    Case("oasst_trees_in_english", _formats("oasst.trees.jsonl", lang="en"), ()),
    Case("prompt_template_over_question_answer_keys",
         _formats("question_answer.jsonl", prompt_template=QUESTION_TEMPLATE, output_text_key="answer"), ()),
    Case("save_to_disk_split_named", _saved_dataset_dict(("train", "test"), ":test"), ()),
)
