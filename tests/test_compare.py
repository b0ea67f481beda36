"""``run.py compare`` (``commands.compare``, ``philo_dataflow.comparison``): several tiny runs and their base
model scored on one hold-out set, the answers checked against the runs' own, the refusals of bad input,
and the report page drawn in Chromium."""

import json
import shutil
from pathlib import Path

import pytest
from browser import external_requests, headless_chromium
from conftest import FAST_INPUTS
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import philo_dataflow
from philo_dataflow import comparison
from philo_dataflow.lib.artifacts import COMPARISON_ANSWERS_FILE, COMPARISON_FILE, COMPARISON_REPORT_FILE
from philo_dataflow.cli import compare
from philo_dataflow.compared_models import Model
from philo_dataflow.lib.artifacts import ADAPTER_DIR, MANIFEST_FILE, PREDICTIONS_JSONL_FILE, read_manifest

FIGURES = ("rouge-l-figure", "rouge-l-difference-figure", "loop-rate-figure")
_ALL_DRAWN = ("return Array.from(document.querySelectorAll('.plotly-graph-div'))"
              ".every(d => d._fullLayout !== undefined && d.querySelector('.main-svg') !== null)")


def _tiny_run(first_run_dir: str, output_dir: Path, **changed) -> str:
    """A run made as ``tiny_run_dir`` was (same data file, model and inputs), with ``changed`` inputs."""
    recorded = read_manifest(str(Path(first_run_dir) / ADAPTER_DIR))["inputs"]
    inputs = {**FAST_INPUTS, "data_path": recorded["data_path"], "model_id": recorded["model_id"],
              "output_dir": str(output_dir), "max_steps": 4, **changed}
    philo_dataflow.build_driver({"start": "base"}).execute(list(philo_dataflow.DEFAULT_OUTPUTS), inputs=inputs)
    return str(output_dir)


@pytest.fixture(scope="module")
def second_run_dir(tiny_run_dir, tmp_path_factory) -> str:
    """The first run's split with a 20x learning rate: its adapter answers with visible (looping) words,
    where the tiny base model answers only newlines (empty after stripping)."""
    return _tiny_run(tiny_run_dir, tmp_path_factory.mktemp("second-run") / "out", learning_rate=1e-2)


@pytest.fixture(scope="module")
def other_split_run_dir(tiny_run_dir, tmp_path_factory) -> str:
    """A run of another seed: another hold-out set."""
    return _tiny_run(tiny_run_dir, tmp_path_factory.mktemp("other-split-run") / "out", seed=7)


@pytest.fixture(scope="module")
def compared_dir(tiny_run_dir, second_run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("comparison") / "comparison"
    assert compare.main([tiny_run_dir, second_run_dir, "--output-dir", str(out)]) == 0
    return out


def _predictions(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / PREDICTIONS_JSONL_FILE).read_text().splitlines()]


def _inside(difference: dict) -> bool:
    return difference["ci95_low"] - 1e-12 <= difference["mean"] <= difference["ci95_high"] + 1e-12


def test_two_runs_are_scored_with_their_own_answers(compared_dir, tiny_run_dir, second_run_dir):
    result = json.loads((compared_dir / COMPARISON_FILE).read_text())
    rows = [json.loads(line) for line in (compared_dir / COMPARISON_ANSWERS_FILE).read_text().splitlines()]
    first, second = _predictions(tiny_run_dir), _predictions(second_run_dir)
    names = list(result["models"])
    assert len(names) == 3 and names[0] == comparison.BASE
    assert [m["run_dir"] for m in result["models"].values()] == [None, tiny_run_dir, second_run_dir]
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [(names[0], names[1]), (names[0], names[2]),
                                                           (names[1], names[2])]
    for pair in result["pairs"]:
        assert _inside(pair["rougeL_difference"]) and _inside(pair["loop_rate_difference"]), pair
    assert result["hold_out"]["questions"] == len(first) == len(rows)
    assert [r["question"] for r in rows] == [p["question"] for p in first]
    # Same greedy decoding and settings: every model gives the answers its own run gave.
    answers = {name: [r["answers"][name]["text"] for r in rows] for name in names}
    assert answers[comparison.BASE] == [p["base_prediction"] for p in first]
    assert answers[names[1]] == [p["finetuned_prediction"] for p in first]
    assert answers[names[2]] == [p["finetuned_prediction"] for p in second]
    assert all(answers[names[2]]), "the second run should answer with words, or this check is weak"
    assert [r["answers"][names[2]]["new_tokens"] for r in rows] == [p["finetuned_new_tokens"] for p in second]
    loops = result["models"][names[2]]["scores"]["loop_rate"]
    assert loops == sum(r["answers"][names[2]]["loop"] for r in rows) / len(rows)
    assert result["models"][names[2]]["settings"] == {"training.learning_rate": 1e-2}
    assert result["models"][names[1]]["settings"]["training.learning_rate"] != 1e-2
    assert result["hold_out"]["runs_split_otherwise"] == []


def test_train_data_names_the_leaked_questions_and_gives_the_verdict_without_them(tiny_run_dir, second_run_dir,
                                                                                  tmp_path, capsys):
    questions = [row["question"] for row in _predictions(tiny_run_dir)]
    reworded = questions[2].rstrip("?") + " indeed?"  # the same content words: a near duplicate
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"instruction": q, "output": "an answer"}) + "\n"
                             for q in [questions[0], questions[1], reworded, "What is the colour of the sky?"]))
    out = tmp_path / "comparison"
    assert compare.main([tiny_run_dir, second_run_dir, "--train-data", str(train), "--output-dir", str(out)]) == 0
    result = json.loads((out / COMPARISON_FILE).read_text())
    leaked = result["leakage"]
    assert (leaked["questions"], leaked["count"], leaked["threshold"]) == ([0, 1, 2], 3, 0.8)
    assert [(p["a"], p["b"]) for p in leaked["pairs_without"]] == [(p["a"], p["b"]) for p in result["pairs"]]
    for pair in leaked["pairs_without"]:
        outcomes = pair["rougeL_outcomes"]
        assert outcomes["wins"] + outcomes["ties"] + outcomes["losses"] == len(questions) - 3
        assert _inside(pair["rougeL_difference"])
    printed = capsys.readouterr().out
    assert f"3 of {len(questions)} hold-out questions have a near duplicate in {train}" in printed
    assert 'id="pairs-without-leaked"' in (out / "report.html").read_text()


def test_one_run_is_compared_with_its_base_model(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert compare.main([tiny_run_dir, "--output-dir", str(out)]) == 0
    result = json.loads((out / COMPARISON_FILE).read_text())
    rows = [json.loads(line) for line in (out / COMPARISON_ANSWERS_FILE).read_text().splitlines()]
    (label,) = [name for name in result["models"] if name != comparison.BASE]
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [(comparison.BASE, label)]
    run = _predictions(tiny_run_dir)
    assert [r["answers"][comparison.BASE]["text"] for r in rows] == [p["base_prediction"] for p in run]
    assert [r["answers"][label]["text"] for r in rows] == [p["finetuned_prediction"] for p in run]
    outcomes = result["pairs"][0]["rougeL_outcomes"]
    assert outcomes["wins"] + outcomes["ties"] + outcomes["losses"] == len(run)
    assert "Compared 1 model and its base model" in capsys.readouterr().out


def test_report_page_draws_every_figure_offline(compared_dir):
    with headless_chromium() as browser:
        browser.get((compared_dir / COMPARISON_REPORT_FILE).resolve().as_uri())
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(_ALL_DRAWN))
        for div_id in FIGURES:
            assert browser.find_element(By.CSS_SELECTOR, f"#{div_id} .main-svg"), div_id
        assert len(browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")) == 3
        rows = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
        assert len(rows) == 6
        Select(browser.find_element(By.ID, "answers-filter")).select_by_value("Stoicism")
        shown = [r.get_attribute("data-category") for r in rows if r.is_displayed()]
        assert shown and set(shown) == {"Stoicism"}
        assert external_requests(browser) == []


def test_differing_hold_out_sets_are_refused_unless_data_path(tiny_run_dir, other_split_run_dir, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert compare.main([tiny_run_dir, other_split_run_dir, "--output-dir", str(out)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert tiny_run_dir in errors[0] and other_split_run_dir in errors[0] and "--data-path" in errors[0]
    assert not out.exists()

    # Into a non-empty directory: allowed by --overwrite, which leaves the other file alone.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data_path = read_manifest(str(Path(tiny_run_dir) / ADAPTER_DIR))["inputs"]["data_path"]
    assert compare.main([tiny_run_dir, other_split_run_dir, "--data-path", data_path, "--output-dir", str(out),
                         "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    result = json.loads((out / COMPARISON_FILE).read_text())
    rows = [json.loads(line) for line in (out / COMPARISON_ANSWERS_FILE).read_text().splitlines()]
    # The first run's data file and split inputs make the first run's own hold-out set again.
    first = _predictions(tiny_run_dir)
    assert [r["question"] for r in rows] == [p["question"] for p in first]
    assert [r["answers"][comparison.BASE]["text"] for r in rows] == [p["base_prediction"] for p in first]
    assert result["hold_out"]["split_inputs"]["data_path"] == data_path
    assert result["hold_out"]["runs_split_otherwise"] == [list(result["models"])[2]]  # the seed-7 run
    assert len(result["pairs"]) == 3


def _copied_run(tiny_run_dir: str, target: Path, predictions: bool = True, **manifest_inputs) -> str:
    """A copy of the run's adapter (and, with ``predictions``, its hold-out predictions) in ``target``, its
    manifest's inputs updated with ``manifest_inputs``."""
    shutil.copytree(Path(tiny_run_dir) / ADAPTER_DIR, target / ADAPTER_DIR)
    if predictions:
        shutil.copy(Path(tiny_run_dir) / PREDICTIONS_JSONL_FILE, target / PREDICTIONS_JSONL_FILE)
    manifest_path = target / ADAPTER_DIR / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["inputs"].update(manifest_inputs)
    manifest_path.write_text(json.dumps(manifest))
    return str(target)


#: Case -> (argv of a run and a temporary directory, the fragments of each expected error line in order).
BAD_INPUTS = {
    "no run": (lambda run, tmp: [], ["compare needs a model"]),
    "missing directory": (lambda run, tmp: [run, str(tmp / "missing")], ["{tmp}/missing: no such file or directory"]),
    "no manifest": (lambda run, tmp: [run, str(tmp)], [f"{{tmp}}: holds no {MANIFEST_FILE}, adapter_config.json"]),
    "same run twice": (lambda run, tmp: [run, str(Path(run) / ADAPTER_DIR)], ["are the same model"]),
    "other base model": (lambda run, tmp: [run, _copied_run(run, tmp / "other", model_id="other/model")],
                         [("{tmp}/other was trained on base model 'other/model'", "one base model")]),
    "no hold-out predictions": (lambda run, tmp: [run, _copied_run(run, tmp / "unfinished", predictions=False)],
                                [(f"{{tmp}}/unfinished: holds no {PREDICTIONS_JSONL_FILE}", "--data-path")]),
    "output dir under a file": (lambda run, tmp: [run, _copied_run(run, tmp / "copy"), "--output-dir",
                                                  str(Path(run) / PREDICTIONS_JSONL_FILE / "x")],
                                [f"{PREDICTIONS_JSONL_FILE} is a file"]),
    "output dir holds other files": (lambda run, tmp: [run, _copied_run(run, tmp / "copy"), "--output-dir", run],
                                     [("holds other files", "--overwrite")]),
    "train data missing": (lambda run, tmp: [run, _copied_run(run, tmp / "copy"), "--train-data", str(tmp / "t.jsonl")],
                           ["--train-data {tmp}/t.jsonl: no such file; check --train-data."]),
    "settings out of range": (lambda run, tmp: [run, _copied_run(run, tmp / "copy"), "--max-new-tokens", "0",
                                                "--generation-batch-size", "0"],
                              ["--max-new-tokens", "--generation-batch-size"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_one_line_per_problem_and_writes_nothing(case, tiny_run_dir, tmp_path, capsys):
    make_argv, expected = BAD_INPUTS[case]
    argv = make_argv(tiny_run_dir, tmp_path)
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "comparison")]
    before = sorted(str(p) for p in tmp_path.rglob("*")), sorted(p.name for p in Path(tiny_run_dir).iterdir())
    assert compare.main(argv) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors and all(line.startswith("error: ") for line in errors), errors
    assert len(errors) == len(expected), errors
    for line, wanted in zip(errors, expected):
        for fragment in (wanted,) if isinstance(wanted, str) else wanted:
            assert fragment.format(tmp=tmp_path) in line, (fragment, errors)
    assert (sorted(str(p) for p in tmp_path.rglob("*")), sorted(p.name for p in Path(tiny_run_dir).iterdir())) == before


def test_scores_and_figures_of_hand_made_answers():
    hold_out = [{"question": f"q{i}", "reference": "the good life is a calm mind", "category": c}
                for i, c in enumerate(["a", "a", "b", "b"])]

    def answers(texts):
        return [{"text": t, "token_ids": [1] * len(t.split()), "ended_on_eos": bool(t)} for t in texts]

    models = {
        "base": answers(["", "a calm mind", "", "noise"]),
        "x": answers(["the good life is a calm mind"] * 4),
        "y": answers(["calm calm calm calm calm calm"] * 4),
    }
    scores = comparison.comparison_scores(hold_out, models, seed=1)
    assert scores["models"]["x"]["rougeL"] == pytest.approx(1.0)
    assert scores["models"]["y"]["loop_rate"] == 1.0 and scores["models"]["x"]["loop_rate"] == 0.0
    assert [(p["a"], p["b"]) for p in scores["pairs"]] == [("base", "x"), ("base", "y"), ("x", "y")]
    assert scores["pairs"][2]["loop_rate_difference"] == {"mean": 1.0, "ci95_low": 1.0, "ci95_high": 1.0}
    # Question by question: x beats the base on all four; y loses all four to x, by as much each time.
    assert {k: scores["pairs"][0]["rougeL_outcomes"][k] for k in ("wins", "ties", "losses")} == {
        "wins": 4, "ties": 0, "losses": 0}
    assert scores["pairs"][2]["rougeL_outcomes"]["per_category"] == {"a": {"wins": 0, "ties": 0, "losses": 2},
                                                                      "b": {"wins": 0, "ties": 0, "losses": 2}}
    lost = scores["pairs"][2]["most_changed"]["lost"]
    assert [row["question"] for row in lost] == ["q0", "q1", "q2"] and not scores["pairs"][2]["most_changed"]["won"]
    assert {(row["answer_a"], row["answer_b"]) for row in lost} == {("the good life is a calm mind", "calm " * 5 + "calm")}
    assert set(scores["per_category"]) == {"a", "b"}
    page = comparison._most_changed_html({"pairs": scores["pairs"]})
    assert 'id="most-won-0"' in page and 'id="most-lost-2"' in page and 'id="most-lost-0"' not in page
    assert "the good life is a calm mind" in page and "calm calm calm calm calm calm" in page
    result = {"models": {n: {"scores": s} for n, s in scores["models"].items()}, "pairs": scores["pairs"],
              "hold_out": {"questions": 4}}
    matrix = comparison.rouge_l_difference_figure(result).data[0]
    assert matrix.z[0][1] == pytest.approx(scores["pairs"][0]["rougeL_difference"]["mean"])
    assert matrix.z[1][0] == pytest.approx(-matrix.z[0][1])
    assert list(comparison.loop_rate_figure(result).data[0].y) == [0.0, 0.0, 1.0]


def test_run_labels_are_short_and_unique(tmp_path):
    def run(*parts):
        run_dir = tmp_path.joinpath(*parts)
        return Model(str(run_dir), "run", None, comparison.Run(run_dir, run_dir / ADAPTER_DIR, {}))

    assert comparison.model_labels([run("a", "out"), run("b", "out")]) == ["a/out", "b/out"]
    assert comparison.model_labels([run("lr-1"), run("lr-2")]) == ["lr-1", "lr-2"]
    assert comparison.model_labels([run("x", "base"), run("y")]) == ["x/base", f"{tmp_path.name}/y"]
