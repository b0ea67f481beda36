import csv
import json

import pytest
from conftest import EXAMPLE_DATA, SHARED_DATA

from philo_dataflow.lib.records import SCHOOLS_OF_THOUGHT
from philo_dataflow.stages.loading import instruction_records, raw_records, records_left_out
from philo_dataflow.stages.splitting import data_splits


def _load(path, **keys):
    return instruction_records(raw_records(str(path))[0], str(path), None, **keys)


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="shared phillm data not present")
def test_real_phillm_file_object_with_list_under_key():
    pairs = _load(SHARED_DATA)
    # 1035 records, 5 instructions appear twice (data README)
    assert len(pairs) == 1030
    assert all(set(p) == {"input_text", "output_text", "category", "context", "group"} for p in pairs)
    categories = {p["category"] for p in pairs}
    assert set(SCHOOLS_OF_THOUGHT) <= categories
    unknown = sum(p["category"] == "unknown" for p in pairs) / len(pairs)
    assert 0.03 < unknown < 0.12  # "about 7% of records name no school"


def test_example_data_has_30_per_school():
    pairs = _load(EXAMPLE_DATA)
    assert len(pairs) >= 270
    for school in SCHOOLS_OF_THOUGHT:
        assert sum(p["category"] == school for p in pairs) >= 30, school


def test_json_list_jsonl_and_csv_give_the_same_pairs(tmp_path):
    records = [
        {"question": "What is wu wei in Taoism?", "gpt4_replies_target": "Effortless action.", "school": "Taoism"},
        {"question": "What did the Stoics fear?", "gpt4_replies_target": "Only vice.", "school": "Stoicism"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    keys = {"input_text_key": "question", "output_text_key": "gpt4_replies_target"}
    results = [_load(tmp_path / name, **keys) for name in ("a.json", "a.jsonl", "a.csv")]
    assert results[0] == results[1] == results[2]
    assert results[0][0] == {"input_text": "What is wu wei in Taoism?", "output_text": "Effortless action.", "category": "Taoism",
                             "context": "[]", "group": ""}


def test_alpaca_input_is_appended_and_category_found_in_text(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Explain this Buddhist idea.", "input": "anatta", "output": "No fixed self."}]))
    (pair,) = _load(path)
    assert pair["input_text"] == "Explain this Buddhist idea.\n\nanatta"
    assert pair["category"] == "Buddhism"


def test_empty_pairs_dropped_and_duplicate_prompts_kept_once(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    rows = [
        {"instruction": "Q1 Stoic?", "output": "A1"},
        {"instruction": "  ", "output": "A2"},
        {"instruction": "Q3", "output": None},
        {"instruction": "q1  stoic?", "output": "another answer"},
        {"instruction": "Q4", "output": "A4"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = _load(path)
    with caplog.at_level("WARNING"):
        left_out = records_left_out(raw_records(str(path))[0], str(path), None)
    assert [p["input_text"] for p in pairs] == ["Q1 Stoic?", "Q4"]
    assert left_out["records"] == 5 and left_out["examples"] == 2
    assert {reason: (done["count"], done["records"]) for reason, done in left_out["reasons"].items()} == {
        "empty_question_or_answer": (2, [1, 2]), "repeated_prompt": (1, [3]), "trailing_user_turn": (0, []),
        "oasst_tree_without_reply": (0, []), "other_language": (0, [])}
    assert caplog.text.count("\n") == 1  # one line
    assert ("5 record(s) read, 2 example(s) kept; left out: 2 with an empty or null question or answer (records 1, 2); "
            "1 repeating an earlier prompt (same earlier turns and question) (record 3).") in caplog.text


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('[{"instruction": "q", "output": "a"}, {"prompt": "q2", "output": "b"}]', ".json",
         r"record 1 has no key 'instruction' \(keys present: \['output', 'prompt'\]\)"),
        ("not json", ".json", "not valid JSON"),
        ("42", ".json", "top-level JSON value is a int"),
        ('["a", "b"]', ".json", "record 0 is a str"),
        ("", ".jsonl", "the file is empty"),
        ('{"instruction": "q", "output": "a"}\n{oops', ".jsonl", "line 2 is not valid JSON"),
        ('[{"instruction": 5, "output": "a"}]', ".json", "record 0, key 'instruction' holds a int"),
        ("q,a\nx,y\n", ".txt", "unknown suffix"),
    ],
)
def test_bad_files_name_file_record_and_keys(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        _load(path)
    assert str(path) in str(error.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        raw_records(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="is a directory"):
        raw_records(str(tmp_path))


def test_split_is_seeded_disjoint_and_covers_every_school():
    pairs = _load(EXAMPLE_DATA)
    first = data_splits(pairs, "x")
    again = data_splits(pairs, "x")
    other_seed = data_splits(pairs, "x", seed=7)
    assert first["hold_out_set"]["input_text"] == again["hold_out_set"]["input_text"]
    assert first["hold_out_set"]["input_text"] != other_seed["hold_out_set"]["input_text"]
    prompts = [set(first[name]["input_text"]) for name in ("train_set", "validation_set", "hold_out_set")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert sum(map(len, prompts)) == len(pairs)
    assert set(first["hold_out_set"]["category"]) == set(SCHOOLS_OF_THOUGHT)
    assert 0.08 <= len(first["hold_out_set"]) / len(pairs) <= 0.12


def test_too_few_records_to_split():
    pairs = [{"input_text": "q1", "output_text": "a", "category": "x"}, {"input_text": "q2", "output_text": "a", "category": "y"}]
    with pytest.raises(ValueError, match="data.json: 2 usable record"):
        data_splits(pairs, "data.json")
