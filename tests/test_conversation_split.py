"""Chat records are compared as conversations: near-duplicate grouping, the hold-out's leakage and the
repeated-prompt check see the earlier turns and the last question, so chats that share only a generic
follow-up ("Can you say that more briefly?") stay apart, while a reworded whole conversation still groups.
A split that cannot fill every split says what the grouping joined."""

import json

import pytest

from philo_dataflow.comparison import leakage, train_questions
from philo_dataflow.lib.near_duplicates import conversation_text
from philo_dataflow.stages.loading import instruction_records, raw_records, records_left_out
from philo_dataflow.stages.splitting import SPLIT_NAMES, data_splits, split_summary

FOLLOW_UP = "Can you say that more briefly?"
#: Three first questions and answers for each of four schools, each naming its school.
FIRST_TURNS = {
    "Stoicism": [("What did the Stoics mean by virtue?", "Excellence of character, the only good for a Stoic."),
                 ("How does a Stoic face the death of a friend?", "With grief in measure, remembering the friend was lent."),
                 ("Why do Stoics practise premeditation of evils?", "Picturing losses readies the mind to meet them.")],
    "Taoism": [("What is wu wei in Taoism?", "Acting without forcing, like water around a stone."),
               ("Why does Taoism praise the uncarved block?", "Simplicity before desire shapes and divides us."),
               ("How does a Taoist read the Tao Te Ching's first line?", "The named way is not the lasting way.")],
    "Hedonism": [("What did Epicurus count as pleasure in Hedonism?", "Chiefly the absence of pain and of trouble."),
                 ("Is a hedonist always seeking parties?", "No: simple meals and friendship give steadier pleasure."),
                 ("Why do hedonists fear excess?", "Excess brings pains that outweigh its pleasures.")],
    "Buddhism": [("What is dukkha in Buddhism?", "The unsatisfactoriness that clinging brings to life."),
                 ("Why do Buddhists meditate on impermanence?", "Seeing change loosens the grip of craving."),
                 ("What is the middle way of the Buddhist path?", "Neither indulgence nor harsh self-denial.")],
}


def _message(text: str, role: str, replies: list) -> dict:
    return {"text": text, "role": role, "lang": "en", "rank": 0 if role == "assistant" else None, "deleted": False,
            "replies": replies}


def _tree(number: int, question: str, answer: str, follow_up: str, short_answer: str) -> dict:
    """An OASST tree of two turns: question, answer, follow-up, short answer."""
    return {"message_tree_id": f"tree-{number}", "tree_state": "ready_for_export", "prompt": _message(
        question, "prompter", [_message(answer, "assistant", [_message(follow_up, "prompter", [
            _message(short_answer, "assistant", [])])])])}


@pytest.fixture
def shared_follow_up(tmp_path) -> str:
    """Twelve two-turn OASST conversations on four schools, each ending with ``FOLLOW_UP``."""
    trees = [_tree(number, question, answer, FOLLOW_UP, answer.split(",")[0].split(":")[0] + ".")
             for number, (question, answer) in enumerate(turn for turns in FIRST_TURNS.values() for turn in turns)]
    path = tmp_path / "follow_up.trees.jsonl"
    path.write_text("".join(json.dumps(tree) + "\n" for tree in trees), encoding="utf-8")
    return str(path)


def _records(path: str) -> list:
    return instruction_records(raw_records(path)[0], path, None)


def test_conversation_text_is_earlier_turns_then_question_without_system():
    context = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}])
    assert conversation_text("Q2", context) == "Q1\nA1\nQ2"
    assert conversation_text("Q2", "[]") == conversation_text("Q2") == "Q2"


def test_twelve_chats_sharing_a_follow_up_fill_all_three_splits(shared_follow_up):
    records = _records(shared_follow_up)
    follow_ups = [r for r in records if r["input_text"] == FOLLOW_UP]
    assert len(follow_ups) == 12  # not one of them a repeated prompt: their earlier turns differ
    left_out = records_left_out(raw_records(shared_follow_up)[0], shared_follow_up, None)
    assert left_out["reasons"]["repeated_prompt"]["count"] == 0
    splits = data_splits(records, shared_follow_up, validation_fraction=0.2, hold_out_fraction=0.2)
    assert all(len(splits[name]) > 0 for name in SPLIT_NAMES)
    assert splits["near_duplicate_groups"]["groups"] == []  # no two conversations alike
    # every school is in every split, and each tree whole in one split
    for name in SPLIT_NAMES:
        assert set(splits[name]["category"]) == set(FIRST_TURNS)
    tree_split = {}
    for name in SPLIT_NAMES:
        for group in splits[name]["group"]:
            assert tree_split.setdefault(group, name) == name
    assert len(tree_split) == 12
    summary = split_summary(*(splits[name] for name in SPLIT_NAMES), splits["near_duplicate_groups"],
                            {name: {"prompt_truncated": [], "dropped": []} for name in SPLIT_NAMES})
    # the hold-out's follow-ups are word for word in train, but their conversations are not
    assert summary["hold_out_set"]["leakage"]["questions"] == 0


def test_a_reworded_whole_conversation_still_groups(tmp_path):
    """The same conversation, its first question reworded, is one near-duplicate group with it (and so in
    one split); only the follow-up in common is not enough."""
    question, answer = FIRST_TURNS["Stoicism"][0]
    trees = [_tree(0, question, answer, FOLLOW_UP, "The only good."),
             _tree(1, "Can you explain: " + question, answer, FOLLOW_UP, "The only good."),
             *(_tree(n + 2, q, a, FOLLOW_UP, "Briefly.") for n, (q, a) in enumerate(FIRST_TURNS["Taoism"]))]
    path = tmp_path / "reworded.trees.jsonl"
    path.write_text("".join(json.dumps(tree) + "\n" for tree in trees), encoding="utf-8")
    splits = data_splits(_records(str(path)), str(path), near_duplicate_threshold=0.8)
    groups = splits["near_duplicate_groups"]["groups"]
    assert len(groups) == 1 and len(groups[0]) == 2  # trees 0 and 1: one conversation, reworded
    assert [text.startswith(start) for text, start in zip(groups[0], (question, "Can you explain"))] == [True, True]
    assert all(text.endswith(FOLLOW_UP) for text in groups[0])
    assert {name for name in SPLIT_NAMES for group in splits[name]["group"] if group in ("tree-0", "tree-1")} \
        in ({"train_set"}, {"validation_set"}, {"hold_out_set"})


def test_identical_conversations_are_one_repeated_prompt(tmp_path):
    question, answer = FIRST_TURNS["Taoism"][0]
    chat = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                         {"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": "Do less."}]}
    other = {"messages": [{"role": "user", "content": FIRST_TURNS["Taoism"][1][0]},
                          {"role": "assistant", "content": FIRST_TURNS["Taoism"][1][1]},
                          {"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": "Stay simple."}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (chat, other, chat)), encoding="utf-8")
    assert len(_records(str(path))) == 2
    left_out = records_left_out(raw_records(str(path))[0], str(path), None)
    assert left_out["reasons"]["repeated_prompt"] == {"count": 1, "records": [2]}


def test_a_split_that_cannot_fill_names_what_the_grouping_joined(tmp_path):
    rows = [{"instruction": f"{opening} what is wu wei in Taoism?", "output": f"Answer {n}.", "school": "Taoism"}
            for n, opening in enumerate(["", "Please,", "Tell me:", "Explain:", "Say,"])]
    path = tmp_path / "reworded.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(ValueError) as raised:
        data_splits(_records(str(path)), str(path), near_duplicate_threshold=0.5)
    message = str(raised.value)
    assert "\n" not in message
    assert ("the grouping joined 5 of them into 1 group(s) (largest 5), each kept whole in one split "
            "(near-duplicate conversations at near_duplicate_threshold=0.5 (--near-duplicate-threshold)") in message
    assert "leaving 1 group(s) in all; add records that are not rewordings of these" in message


def test_compare_leakage_sees_conversations(shared_follow_up):
    """``compare --train-data``: a hold-out follow-up is leaked only when its whole conversation was trained on."""
    records = _records(shared_follow_up)
    trained = train_questions(shared_follow_up)
    assert trained == [conversation_text(r["input_text"], r["context"]) for r in records]
    hold_out = [{"question": r["input_text"], "reference": r["output_text"], "category": r["category"]}
                for r in records[:2]]
    answers = {"a": [{"text": "x", "ended_on_eos": True, "token_ids": [1]}] * 2,
               "b": [{"text": "y", "ended_on_eos": True, "token_ids": [2]}] * 2}
    other_conversation = conversation_text(FOLLOW_UP, json.dumps([{"role": "user", "content": "Who was Zeno?"},
                                                                  {"role": "assistant", "content": "A Stoic."}]))
    texts = [conversation_text(r["input_text"], r["context"]) for r in records[:1]] + [other_conversation]
    found = leakage(hold_out, answers, 42, shared_follow_up, trained, 0.8, texts)
    assert found["questions"] == [0]
