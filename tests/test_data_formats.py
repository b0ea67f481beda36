"""Record formats (alpaca, pairs, OpenAI messages, ShareGPT, OASST trees, prompt templates) and sources
(.parquet, save_to_disk directories, Hugging Face hub ids from the local cache), through the library's
loading nodes and through ``run.py``'s preflight and data nodes.

The hub tests build a cache in a temporary directory the way ``datasets`` 5.2 reads one offline: with
``HF_HUB_OFFLINE``, ``load_dataset("namespace/name")`` makes no request and reads the prepared Arrow files
under ``HF_DATASETS_CACHE/namespace___name/<config>/<version>/<hash>/`` (``<name>-<split>.arrow`` and
``dataset_info.json``), the files an online ``load_dataset`` leaves there; it does not read hub snapshots
(``HF_HUB_CACHE/datasets--namespace--name/snapshots/<commit>/``), which ``lib.records`` reads next.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from conftest import REPO

import philo_dataflow
from philo_dataflow import cli
from philo_dataflow import preflight
from philo_dataflow.lib.artifacts import MANIFEST_FILE
from philo_dataflow.lib.records import detected_format
from philo_dataflow.stages.loading import (
    instruction_records,
    prompt_template_in_use__base,
    prompt_template_in_use__presaved,
    raw_records,
    records_left_out,
)
from philo_dataflow.stages.splitting import data_splits

DATA = Path(__file__).resolve().parent / "data_formats"
MESSAGES, SHAREGPT, OASST = DATA / "messages.jsonl", DATA / "sharegpt.json", DATA / "oasst.trees.jsonl"
ACT_PROMPTS, QUESTION_ANSWER = DATA / "act_prompts.csv", DATA / "question_answer.jsonl"
ALPACA = Path(__file__).resolve().parent / "bad_inputs" / "good.jsonl"
QUESTION_TEMPLATE = "### Question:\n{question}\n\n### Answer:"
ACT_TEMPLATE = "<act>: {act}\n<prompt>:"
SYSTEM = {"role": "system", "content": "You are a patient tutor of ancient philosophy."}
#: The hub dataset ids the cache fixture provides, one per cache layout.
PREPARED_ID, SNAPSHOT_ID = "philo-tests/stoic_qa", "philo-tests/snapshot_qa"


def _load(path, prompt_template=None, **inputs) -> list:
    return instruction_records(raw_records(str(path))[0], str(path), prompt_template, **inputs)


def _left_out(path, prompt_template=None, **inputs) -> dict:
    """``records_left_out``'s reasons with a count, as ``{reason: (count, indices)}``."""
    summary = records_left_out(raw_records(str(path))[0], str(path), prompt_template, **inputs)
    return {reason: (done["count"], done["records"]) for reason, done in summary["reasons"].items() if done["count"]}


def _example(question, answer, category="Stoicism", context=(), group="") -> dict:
    return {"input_text": question, "output_text": answer, "category": category,
            "context": json.dumps(list(context), ensure_ascii=False), "group": group}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- chat formats


def test_messages_single_and_multi_turn_keep_the_system_prompt(caplog):
    examples = _load(MESSAGES)
    with caplog.at_level("WARNING"):
        assert _left_out(MESSAGES) == {"trailing_user_turn": (1, [3])}
    assert examples == [
        _example("What did the Stoics mean by virtue?",
                 "For the Stoics virtue is the only good: wisdom, justice, courage and moderation.", context=[SYSTEM]),
        _example("What is his dichotomy of control?",
                 "Some things are up to us, our judgements and choices; the rest is not, and a Stoic accepts it.",
                 context=[SYSTEM, _user("Who was Epictetus?"),
                          _assistant("A freed slave who taught Stoic philosophy in Nicopolis.")]),
        _example("How should a Stoic face the death of a friend?",
                 "With grief held in measure: the Stoic remembers that the friend was lent, not owned."),
        _example("Why did Marcus Aurelius write to himself?",  # its trailing user turn is dropped
                 "His Meditations were Stoic exercises, reminders to act justly each morning."),
        _example("What is a Stoic premeditation of evils?",
                 "Picturing losses in advance so that they find the mind ready when they come."),
        _example("What is wu wei in Taoism?", "Acting without forcing, like water that finds its way around the stone.",
                 category="Taoism"),
    ]
    assert "1 ending on a user turn with no answer (that turn dropped, the conversation kept) (record 3)" in caplog.text


def test_sharegpt_conversations_become_openai_roles():
    examples = _load(SHAREGPT)
    assert examples == [
        _example("What does anatta mean in Buddhism?", "Not-self: no fixed, lasting self is found in body or mind.",
                 "Buddhism", [{"role": "system", "content": "Answer as a scholar of Buddhism."}]),
        _example("Which path is that?", "The Noble Eightfold Path, from right view to right concentration.",
                 "Buddhism",  # named in an earlier turn only
                 [_user("What are the Four Noble Truths of Buddhism?"),
                  _assistant("Suffering, its arising from craving, its ceasing, and the path that leads there.")]),
        _example("Why do Buddhists meditate on impermanence?",
                 "To loosen clinging: what is seen to pass is held more lightly.", "Buddhism"),
        _example("What is the middle way in Buddhism?",
                 "A path between indulgence and harsh asceticism, as the Buddha taught after leaving both.", "Buddhism"),
    ]


def test_a_category_key_labels_chat_records_and_a_repeated_prompt_is_kept_once(tmp_path):
    turns = [_user("What is ataraxia?"), _assistant("Tranquillity of mind.")]
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": turns, "school": "Hedonism"},
        {"messages": [*turns[:1], _assistant("Another answer.")], "school": "Hedonism"},  # same prompt
        {"messages": [{"role": "system", "content": "Be brief."}, *turns], "school": "Hedonism"},  # other context
    ])
    examples = _load(path)
    assert [example["context"] for example in examples] == ["[]", json.dumps([{"role": "system", "content": "Be brief."}])]
    assert {example["category"] for example in examples} == {"Hedonism"}


# -- OASST trees


OASST_EXAMPLES = [
    _example("Is pleasure then worthless to a Stoic?",
             "Not worthless but indifferent: it neither makes a life good nor bad.",  # rank 0 was deleted
             context=[_user("What did the Stoics mean by virtue?"),
                      _assistant("For the Stoics virtue was the only good; health and wealth were indifferent.")],
             group="tree-a"),
    _example("Who taught this in Rome?", "Seneca and Epictetus, and Marcus Aurelius wrote it down for himself.",
             context=[_user("What did the Stoics mean by virtue?"),
                      _assistant("For the Stoics virtue was the only good; health and wealth were indifferent.")],
             group="tree-a"),
    _example("What is wu wei in Taoism?", "Effortless action: doing what the situation asks without strain.",
             "Taoism", group="tree-b"),  # two unranked replies: the first in file order
    _example("Was meint der Nihilismus mit dem Nichts?", "Dass es keine vorgegebenen Werte gibt.", "unknown",
             group="tree-c"),  # the school's names are English words
    _example("What did Epicurus count as pleasure in Hedonism?",
             "Above all the absence of pain in the body and of trouble in the mind.", "Hedonism",
             group="tree-d"),  # the unanswered follow-up "And pain?" is cut off
    _example("How should a Stoic face death?", "As a return of what was lent, calmly, having lived well.",
             group="tree-e"),
    _example("What is the Stoic dichotomy of control?",
             "Judgements and choices are up to us; the body, fame and fortune are not.", group="tree-f"),
]


def test_oasst_trees_follow_the_best_ranked_reply_of_every_path(caplog):
    examples = _load(OASST)
    with caplog.at_level("WARNING"):
        left_out = _left_out(OASST)
    assert examples == OASST_EXAMPLES
    assert left_out == {"oasst_tree_without_reply": (1, [6])}  # tree-g
    assert "1 OASST tree(s) whose first prompt has no assistant reply (record 6)" in caplog.text


def test_oasst_lang_keeps_the_trees_of_one_language():
    assert _load(OASST, lang="de") == [OASST_EXAMPLES[3]]
    assert _load(OASST, lang="en") == OASST_EXAMPLES[:3] + OASST_EXAMPLES[4:]
    with pytest.raises(ValueError, match=r"no OASST tree has lang='fr' \(--lang\); its trees' languages are "
                                         r"\['de', 'en'\]"):
        _load(OASST, lang="fr")


def test_oasst_bare_root_messages_in_a_json_list(tmp_path):
    trees = [tree["prompt"] for tree in _rows(OASST)[4:6]]
    path = tmp_path / "roots.json"
    path.write_text(json.dumps(trees), encoding="utf-8")
    assert detected_format(trees[0]) == "oasst"
    assert _load(path) == [{**OASST_EXAMPLES[5], "group": "e0"}, {**OASST_EXAMPLES[6], "group": "f0"}]


def test_a_split_keeps_each_oasst_tree_in_one_split():
    examples = _load(OASST, lang="en")
    splits = data_splits(examples, str(OASST), 0.2, 0.2)
    where = {}
    for name in ("train_set", "validation_set", "hold_out_set"):
        assert set(splits[name].column_names) >= {"input_text", "output_text", "category"}
        for group in splits[name]["group"]:
            where.setdefault(group, set()).add(name)
    assert sum(len(splits[name]) for name in ("train_set", "validation_set", "hold_out_set")) == len(examples)
    assert all(len(names) == 1 for names in where.values()), where


# -- prompt templates


def test_a_prompt_template_renders_the_whole_prompt():
    examples = _load(QUESTION_ANSWER, QUESTION_TEMPLATE, output_text_key="answer")
    first = _rows(QUESTION_ANSWER)[0]
    assert examples[0] == _example(f"### Question:\n{first['question']}\n\n### Answer:", first["answer"])
    assert [example["category"] for example in examples] == ["Stoicism"] * 4 + ["Taoism"]


def test_a_prompt_template_over_an_act_prompt_csv():
    examples = _load(ACT_PROMPTS, ACT_TEMPLATE, output_text_key="prompt")
    assert examples[0] == _example(
        "<act>: Stoic Philosopher\n<prompt>:",
        "I want you to act as a Stoic philosopher. Answer my worries with the dichotomy of control.")
    assert [example["category"] for example in examples] == ["Stoicism"] * 3 + ["Taoism", "Hedonism"]


@pytest.mark.parametrize("template, message", [
    ("### Question:\n{query}\n\n### Answer:",
     r"question_answer.jsonl: record 0 has no key 'query' \(keys present: \['answer', 'question'\]\) \(and 4 more "
     r"records: 1, 2, 3, 4\); check prompt_template \(--prompt-template\)"),
    ("Answer the question.", r"question_answer.jsonl: prompt_template='Answer the question.' \(--prompt-template\) "
                             r"names no record key; put the key of the question in braces"),
    ("### Question: {question", r"is not a valid format string \(expected '}' before end of string\)"),
    ("{record.question}", r"placeholder \{record.question\} reads an attribute or an index; name a plain record key, "
                          r"e.g. \{record\}"),
    ("{question[0]}", r"placeholder \{question\[0\]\} reads an attribute or an index"),
    ("{} {}", r"has the positional placeholder \{\}"),
])
def test_template_mistakes_are_one_line_naming_file_and_key(template, message):
    with pytest.raises(ValueError, match=message) as raised:
        _load(QUESTION_ANSWER, template, output_text_key="answer")
    assert len(str(raised.value).splitlines()) == 1


def test_prompt_template_in_use_comes_from_the_manifest_under_presaved(tmp_path):
    assert prompt_template_in_use__base(QUESTION_TEMPLATE) == QUESTION_TEMPLATE
    manifest = {"inputs": {"model_id": "x"}, "prompt_format": "template", "prompt_template": QUESTION_TEMPLATE}
    assert prompt_template_in_use__presaved(manifest) == QUESTION_TEMPLATE
    assert prompt_template_in_use__presaved(manifest, QUESTION_TEMPLATE) == QUESTION_TEMPLATE
    assert prompt_template_in_use__presaved({**manifest, "prompt_template": None}) is None
    with pytest.raises(ValueError, match=r"prompt_template='Q: \{question\}' \(--prompt-template\) differs from the "
                                         r"template the presaved adapter was trained with"):
        prompt_template_in_use__presaved(manifest, "Q: {question}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest))
    dr = philo_dataflow.build_driver({"start": "presaved"})
    result = dr.execute(["instruction_records"], inputs={
        "presaved_model_dir": str(adapter), "data_path": str(QUESTION_ANSWER), "output_text_key": "answer"})
    assert result["instruction_records"] == _load(QUESTION_ANSWER, QUESTION_TEMPLATE, output_text_key="answer")


# -- formats: detection, choice and mistakes


def test_auto_detects_the_format_from_the_first_record():
    assert detected_format({"messages": []}) == "messages"
    assert detected_format({"conversations": []}) == "sharegpt"
    assert detected_format({"prompt": {"text": "q", "replies": []}}) == "oasst"
    assert detected_format({"role": "prompter", "text": "q", "replies": []}) == "oasst"
    assert detected_format({"prompt": "a string prompt", "output": "x"}) == "alpaca"
    assert detected_format({"question": "q"}, "question", "answer") == "pairs"


def test_alpaca_and_pairs_records_gain_an_empty_context_and_group():
    examples = _load(ALPACA)
    assert examples and all(set(e) == {"input_text", "output_text", "category", "context", "group"} for e in examples)
    assert {(e["context"], e["group"]) for e in examples} == {("[]", "")}
    first = _rows(ALPACA)[0]
    assert examples[0] == _example(first["instruction"], first["output"], first["school"])
    assert _load(QUESTION_ANSWER, data_format="pairs", input_text_key="question", output_text_key="answer")[0] == \
        _example(_rows(QUESTION_ANSWER)[0]["question"], _rows(QUESTION_ANSWER)[0]["answer"])


@pytest.mark.parametrize("path, inputs, message", [
    (ALPACA, {"data_format": "messages"},
     r"good.jsonl: record 0 has no key 'messages' \(keys present: \['instruction', 'output', 'school'\]\) \(and 14 "
     r"more records"),
    (ALPACA, {"data_format": "oasst"}, r"good.jsonl: record 0 has no key 'prompt'"),
    (MESSAGES, {"input_text_key": "question"}, r"input_text_key/output_text_key \(--input-text-key, --output-text-key\) "
                                               r"name the question and answer keys .* messages records \(data_format "
                                               r"'auto' found them in record 0\)"),
    (SHAREGPT, {"prompt_template": "{question}"}, r"prompt_template \(--prompt-template\) renders question/answer "
                                                  r"records, but it holds sharegpt records"),
    (ALPACA, {"data_format": "alpaca", "input_text_key": "instruction"}, r"data_format='alpaca' reads the keys"),
    (ALPACA, {"lang": "en"}, r"lang='en' \(--lang\) keeps the OASST trees of one language, but it holds alpaca records"),
    (ALPACA, {"data_format": "chat"}, r"data_format='chat' \(--data-format\): must be one of \['auto', 'alpaca', "
                                      r"'pairs', 'messages', 'sharegpt', 'oasst'\]"),
])
def test_inputs_that_do_not_fit_the_format_are_refused(path, inputs, message):
    template = inputs.pop("prompt_template", None)
    with pytest.raises(ValueError, match=message):
        _load(path, template, **inputs)


def test_bad_chat_records_are_grouped_one_line_per_problem(tmp_path):
    good = [_user("What is a Stoic?"), _assistant("One who lives by reason.")]
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": good},
        {"messages": [_user("q"), {"role": "assistant"}]},
        {"messages": [{"role": "bot", "content": "hi"}]},
        {"messages": [_user("q"), {"role": "assistant", "content": ["a list"]}]},
        {"messages": [_user("q"), {"role": "assistant"}]},
        {"messages": [_user("q"), _assistant("a"), {"role": "system", "content": "late"}]},
        {"messages": "not a list"},
        {"messages": []},
        {"messages": ["a string turn"]},
        {"text": "no messages at all"},
        {"messages": [_assistant("an answer first"), _user("q")]},
    ])
    with pytest.raises(ValueError) as raised:
        _load(path)
    assert str(raised.value).splitlines() == [
        f"{path}: record 1, key 'messages' turn 1 has no key 'content' (keys present: ['role']) (and 1 more record: "
        "4); each turn needs 'role' and 'content'.",
        f"{path}: record 2, key 'messages' turn 0 has role 'bot'; use system, user or assistant.",
        f"{path}: record 3, key 'messages' turn 1, key 'content' holds a list; it must be a string.",
        f"{path}: record 5, key 'messages' turn 2 is a system message after turn 0; a system message may only open "
        "the conversation.",
        f"{path}: record 6, key 'messages' holds a str; it must be a list of turns, each {{'role': ..., 'content': ...}}.",
        f"{path}: record 7, key 'messages' holds no turns; give the conversation, or remove the record.",
        f"{path}: record 8, key 'messages' turn 0 is a str; each turn must be an object, each {{'role': ..., "
        "'content': ...}.",
        f"{path}: record 9 has no key 'messages' (keys present: ['text']); give each record its list of turns under "
        "'messages', or set data_format (--data-format).",
        f"{path}: record 10, key 'messages' turn 0 is 'assistant' as the first turn; turns must alternate user and "
        "assistant, starting with user after an optional leading system message.",
    ]


def test_bad_oasst_trees_name_the_message(tmp_path):
    tree = _rows(OASST)[4]
    path = _jsonl(tmp_path / "trees.jsonl", [
        tree,
        {**tree, "prompt": {**tree["prompt"], "role": "assistant"}},
        {**tree, "prompt": {**tree["prompt"], "replies": [{"message_id": "x", "text": "no role"}]}},
        {**tree, "prompt": {**tree["prompt"], "replies": [{**tree["prompt"]["replies"][0], "rank": "first"}]}},
        {**tree, "prompt": {**tree["prompt"], "replies": [{**tree["prompt"]["replies"][0], "role": "prompter"}]}},
        {**tree, "prompt": {**tree["prompt"], "replies": [{**tree["prompt"]["replies"][0], "role": "moderator"}]}},
        {**tree, "prompt": "a string"},
        {"message_tree_id": "no-prompt"},
        {**tree, "prompt": {**tree["prompt"], "replies": [{**tree["prompt"]["replies"][0], "replies": "none"}]}},
        {**tree, "prompt": {**tree["prompt"], "replies": [{"deleted": True, "text": 5}, "not a message"]}},
    ])
    with pytest.raises(ValueError) as raised:
        _load(path)
    assert str(raised.value).splitlines() == [
        f"{path}: record 1, message prompt (message_id 'e0') has role 'assistant', not 'prompter'; an OASST tree must "
        "start with a prompter message, the first question.",
        f"{path}: record 2, message prompt.replies[0] (message_id 'x') has no key 'role' (keys present: "
        "['message_id', 'text']); every OASST message needs 'role' ('prompter' or 'assistant') and 'text'.",
        f"{path}: record 3, message prompt.replies[0] (message_id 'e1'), key 'rank' holds 'first'; it must be an "
        "integer (0 is the best reply) or null.",
        f"{path}: record 4, message prompt.replies[0] (message_id 'e1') is a 'prompter' reply to a 'prompter' message; "
        "replies alternate: a prompter message gets assistant replies, an assistant message prompter replies.",
        f"{path}: record 5, message prompt.replies[0] (message_id 'e1') has role 'moderator'; use 'prompter' or "
        "'assistant'.",
        f"{path}: record 6, key 'prompt' holds a str; it must be the tree's root message, an object with 'role', "
        "'text' and 'replies'.",
        f"{path}: record 7 has no key 'prompt' (keys present: ['message_tree_id']); each record of an OASST trees file "
        "is a tree with its root message under 'prompt' (or a root message with 'role' and 'replies'); or set "
        "data_format (--data-format).",
        f"{path}: record 8, message prompt.replies[0] (message_id 'e1'), key 'replies' holds a str; it must be a list "
        "of reply messages.",
        f"{path}: record 9, message prompt.replies[1] is a str; every reply must be a message object with 'role', "
        "'text' and 'replies'.",
    ]


def test_preflight_reports_the_nodes_problems(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [_user("q"), {"role": "bot", "content": "a"}]},
                                            {"conversations": []}])
    with pytest.raises(ValueError) as raised:
        _load(path)
    problems, found = preflight.data_problems({**preflight.library_defaults(), "data_path": str(path)}, set())
    assert found is None and [problem.message for problem in problems] == str(raised.value).splitlines()


# -- sources: parquet, save_to_disk, the hub


def test_parquet_files_load_like_their_jsonl(tmp_path):
    for source in (MESSAGES, OASST, QUESTION_ANSWER):
        parquet = tmp_path / (source.stem + ".parquet")
        datasets.Dataset.from_list(_rows(source)).to_parquet(str(parquet))
        inputs = {"output_text_key": "answer"} if source == QUESTION_ANSWER else {}
        template = QUESTION_TEMPLATE if source == QUESTION_ANSWER else None
        assert _load(parquet, template, **inputs) == _load(source, template, **inputs), source.name


def test_save_to_disk_directories_and_their_splits(tmp_path):
    rows = _rows(MESSAGES)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "two"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[3:]),
                          "validation": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(tmp_path / "no_train"))
    expected = _load(MESSAGES)
    assert _load(tmp_path / "one") == expected
    assert _load(tmp_path / "two") == expected[:3]
    assert _load(f"{tmp_path / 'two'}:test") == expected[3:]
    with pytest.raises(ValueError, match=r"two:dev: the DatasetDict has no split 'dev' \(its splits: \['test', "
                                         r"'train'\]\); name one of them after the colon, e.g. .*two:test\.$"):
        raw_records(f"{tmp_path / 'two'}:dev")
    with pytest.raises(ValueError, match=r"no_train: the DatasetDict has no 'train' split \(its splits: \['test', "
                                         r"'validation'\]\); name one after a colon"):
        raw_records(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match=r"holds one Dataset, not a DatasetDict, so it has no splits"):
        raw_records(f"{tmp_path / 'one'}:train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: is a directory; give the path of a .json, .jsonl, .csv or .parquet "
                                         r"file, or a directory written by datasets' save_to_disk"):
        raw_records(str(tmp_path / "plain"))


def _prepared_hub_cache(datasets_cache: Path, repo_id: str, rows: list, work: Path) -> None:
    """What an online ``load_dataset(repo_id)`` leaves in ``HF_DATASETS_CACHE``: the dataset built by the
    packaged json builder under the repository's name, in ``namespace___name/default/0.0.0/<commit>/``."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    commit = "0123456789abcdef0123456789abcdef01234567"
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, hash=commit,
                   data_files={"train": str(_jsonl(work / "train.jsonl", rows))})
    builder.download_and_prepare()
    target = datasets_cache / f"{namespace}___{name}" / "default" / "0.0.0" / commit
    shutil.copytree(builder.cache_dir, target)


def _hub_snapshot(hub_cache: Path, repo_id: str, rows: list) -> None:
    """A hub snapshot as ``hf download --repo-type dataset`` leaves it: ``datasets--namespace--name/`` with
    ``refs/main`` naming the commit and its files under ``snapshots/<commit>/``."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    files = repo / "snapshots" / commit / "data"
    files.mkdir(parents=True)
    _jsonl(files / "train.jsonl", rows)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """``HF_HOME`` in a temporary directory holding ``PREPARED_ID`` in datasets' cache (the messages file)
    and ``SNAPSHOT_ID`` as a hub snapshot (the question/answer file), with the hub offline. ``datasets`` and
    ``huggingface_hub`` read their cache paths at import, so their settings are pointed there too."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    _prepared_hub_cache(home / "datasets", PREPARED_ID, _rows(MESSAGES), tmp_path)
    _hub_snapshot(home / "hub", SNAPSHOT_ID, _rows(QUESTION_ANSWER))
    return home


def test_hub_dataset_loads_offline_from_the_datasets_cache(hub_cache):
    assert _load(PREPARED_ID) == _load(MESSAGES)
    assert _load(f"{PREPARED_ID}:train") == _load(MESSAGES)
    with pytest.raises(ValueError, match=r"philo-tests/stoic_qa:test: the hub dataset 'philo-tests/stoic_qa' has no "
                                         r"split 'test' \(its splits: \['train'\]\)"):
        raw_records(f"{PREPARED_ID}:test")


def test_hub_dataset_loads_offline_from_a_hub_snapshot(hub_cache):
    before = set(hub_cache.rglob("*"))
    assert _load(SNAPSHOT_ID, QUESTION_TEMPLATE, output_text_key="answer") == \
        _load(QUESTION_ANSWER, QUESTION_TEMPLATE, output_text_key="answer")
    assert {path.suffix for path in set(hub_cache.rglob("*")) - before} <= {".lock"}  # streamed: no Arrow copy


def test_uncached_hub_dataset_offline_fails_at_once_with_one_line(hub_cache):
    started = time.monotonic()
    with pytest.raises(ValueError) as raised:
        raw_records("philo-tests/never_downloaded")
    assert time.monotonic() - started < 5  # no request, no retries
    assert str(raised.value) == (
        "philo-tests/never_downloaded: no such local file or directory, and the Hugging Face hub dataset "
        "'philo-tests/never_downloaded' is not in the local cache and HF_HUB_OFFLINE is set, so it is not available "
        "offline; download it once online (a run with network, or `hf download --repo-type dataset "
        "philo-tests/never_downloaded`), or give a local .json, .jsonl, .csv or .parquet file.")
    with pytest.raises(ValueError, match=r"^missing.jsonl: no such file; check data_path.$"):
        raw_records("missing.jsonl")  # a file name is never taken for a hub id


def test_unreachable_hub_is_asked_once_then_the_cache_is_read(hub_cache, monkeypatch):
    asked = []

    def unreachable(name, timeout):
        asked.append((name, timeout))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "dataset_info", unreachable)
    assert _load(PREPARED_ID) == _load(MESSAGES)
    with pytest.raises(ValueError, match=r"^philo-tests/other: no such local file or directory, and the Hugging Face "
                                         r"hub dataset 'philo-tests/other' is not in the local cache and the hub cannot "
                                         r"be reached \(\[Errno -2\] Name or service not known\)"):
        raw_records("philo-tests/other")
    assert asked == [(PREPARED_ID, 10), ("philo-tests/other", 10)]


# -- the command line: run.py's preflight and data nodes (no model is loaded)


def _saved_to_disk(work: Path) -> str:
    rows = json.loads(SHAREGPT.read_text(encoding="utf-8"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(work / "saved"))
    return f"{work / 'saved'}:train"


def _parquet(work: Path) -> str:
    datasets.Dataset.from_list(_rows(OASST)).to_parquet(str(work / "trees.parquet"))
    return str(work / "trees.parquet")


CLI_CASES = {
    "alpaca": (lambda work: str(ALPACA), []),
    "pairs": (lambda work: str(QUESTION_ANSWER), ["--input-text-key", "question", "--output-text-key", "answer"]),
    "messages": (lambda work: str(MESSAGES), ["--data-format", "messages"]),
    "sharegpt": (lambda work: str(SHAREGPT), []),
    "oasst": (lambda work: str(OASST), ["--lang", "en"]),
    "question_template": (lambda work: str(QUESTION_ANSWER), ["--prompt-template", QUESTION_TEMPLATE,
                                                              "--output-text-key", "answer"]),
    "act_prompt_template": (lambda work: str(ACT_PROMPTS), ["--prompt-template", ACT_TEMPLATE,
                                                            "--output-text-key", "prompt"]),
    "parquet": (_parquet, ["--lang", "en"]),
    "save_to_disk": (_saved_to_disk, []),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_run_py_checks_and_splits_each_format(case, tmp_path, tiny_model_dir, capsys):
    make, flags = CLI_CASES[case]
    argv = ["--data-path", make(tmp_path), *flags, "--model-id", tiny_model_dir, "--output-dir", str(tmp_path / "out"),
            "--outputs", "split_summary", "--no-graph"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_preview_shows_each_format_with_every_answer_ending_on_eos(case, tmp_path, tiny_model_dir, capsys):
    """``philo-dataflow preview`` on every format: each shown example's answer turns (one per turn of a
    conversation) are marked, and each ends on the EOS token; nothing is refused."""
    make, flags = CLI_CASES[case]
    argv = ["preview", "--data-path", make(tmp_path), *flags, "--model-id", tiny_model_dir, "--examples", "3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    examples = out.split("\n--- ")[1:]
    train_examples = int(re.search(r"train\s+(\d+) examples", out).group(1))
    assert len(examples) == min(3, train_examples), out[-2000:]
    for example in examples:
        assert example.count("[[") >= 1 and example.count("[[") == example.count("<|im_end|>]]"), example


def test_preview_reads_a_cached_hub_dataset(hub_cache, tiny_model_dir, capsys):
    assert cli.main(["preview", "--data-path", PREPARED_ID, "--model-id", tiny_model_dir, "--examples", "1"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"data {PREPARED_ID}: ") and out.count("<|im_end|>]]") == 1


def test_run_py_reads_a_cached_hub_dataset(hub_cache, tmp_path, tiny_model_dir, capsys):
    argv = ["--data-path", PREPARED_ID, "--model-id", tiny_model_dir, "--output-dir", str(tmp_path / "out"),
            "--outputs", "split_summary", "--no-graph"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main([*argv[:1], "philo-tests/never_downloaded", *argv[2:]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: philo-tests/never_downloaded: no such local file")


def test_run_py_in_a_fresh_process_reads_the_hub_cache_named_by_hf_home(hub_cache, tmp_path, tiny_model_dir):
    """The user's way: ``HF_HOME`` and ``HF_HUB_OFFLINE`` set before Python starts."""
    env = {**os.environ, "HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    process = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "--data-path", SNAPSHOT_ID, "--prompt-template", QUESTION_TEMPLATE,
         "--output-text-key", "answer", "--model-id", tiny_model_dir, "--output-dir", str(tmp_path / "out"),
         "--outputs", "split_summary", "--no-graph"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "error:" not in process.stderr
