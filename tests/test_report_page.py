"""The HTML report (``report.html``) opened in real headless Chromium (``tests/browser.py``): every figure
drawn, one row per hold-out answer, the category filter, no external request, plotly.js once; answers
shown as text, never run; and the judge section of a judged run."""

import json
from pathlib import Path

import pytest
from browser import docs_screenshot, external_requests, headless_chromium, screenshot
from plotly.offline import get_plotlyjs
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_report import fake_run_metrics

from philo_dataflow.stages import plots, report
from philo_dataflow.lib import html_report
from philo_dataflow.lib.artifacts import PREDICTIONS_JSONL_FILE, REPORT_HTML_FILE
from philo_dataflow.lib.judge_protocol import CRITERIA

#: Figure div id -> traces drawn in it, on every report.
FIGURE_TRACES = {"loss-curve": 2, "learning-rate": 1, "rouge-comparison": 2, "answer-lengths": 2}
_ALL_DRAWN = ("return Array.from(document.querySelectorAll('.plotly-graph-div'))"
              ".every(d => d._fullLayout !== undefined && d.querySelector('.main-svg') !== null)")
_ROWS_SHOWN = ("return Array.from(document.querySelectorAll('#answers tbody tr'))"
               ".map(r => [r.dataset.category, r.offsetParent !== null])")


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as chromium:
        yield chromium


def _open(browser, path: Path) -> None:
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(_ALL_DRAWN))


def _traces(browser, div_id: str) -> int:
    return browser.execute_script(f"return document.getElementById({json.dumps(div_id)}).data.length")


def _colours(png: Path) -> int:
    """Distinct colours in the screenshot (a blank page has one)."""
    image = pytest.importorskip("PIL.Image").open(png).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 20))


def test_report_of_a_tiny_run_draws_every_part_offline(tiny_run_dir, browser, tmp_path):
    page = Path(tiny_run_dir) / REPORT_HTML_FILE
    text = page.read_text(encoding="utf-8")
    assert text.count(get_plotlyjs()[:200]) == 1, "plotly.js must be inlined exactly once"
    assert "<script src" not in text and "<link" not in text
    rows = [json.loads(line) for line in (Path(tiny_run_dir) / PREDICTIONS_JSONL_FILE).read_text().splitlines()]

    _open(browser, page)
    for div_id, traces in FIGURE_TRACES.items():
        assert browser.execute_script(f"return document.getElementById('{div_id}')._fullLayout !== undefined")
        assert browser.find_element(By.CSS_SELECTOR, f"#{div_id} .main-svg")
        assert _traces(browser, div_id) == traces, div_id
    assert browser.find_elements(By.ID, "judge") == []  # not judged
    for section in ("training", "hold-out", "question-by-question", "lengths-and-repetition", "splits", "model",
                    "configuration", "hold-out-answers"):
        assert browser.find_element(By.ID, section).is_displayed(), section
    assert len(browser.find_elements(By.CSS_SELECTOR, "#split-counts tbody tr")) == 3
    # Question by question: one row per category and one for all, each adding up to its questions.
    outcome_rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                    for row in browser.find_elements(By.CSS_SELECTOR, "#outcomes tbody tr")]
    categories = sorted({row["category"] for row in rows})
    assert [row[0] for row in outcome_rows] == [*categories, "all"]
    assert sum(map(int, outcome_rows[-1][1:])) == len(rows)
    assert [sum(map(int, row[1:])) for row in outcome_rows[:-1]] == [
        sum(r["category"] == category for r in rows) for category in categories]

    shown = browser.execute_script(_ROWS_SHOWN)
    assert len(shown) == len(rows) and all(visible for _, visible in shown)
    assert [category for category, _ in shown] == [row["category"] for row in rows]
    chosen = sorted({row["category"] for row in rows})[1]
    Select(browser.find_element(By.ID, "answers-filter")).select_by_value(chosen)
    shown = browser.execute_script(_ROWS_SHOWN)
    assert all(visible == (category == chosen) for category, visible in shown)
    expected = sum(row["category"] == chosen for row in rows)
    assert browser.find_element(By.ID, "answers-count").text == f"{expected} of {len(rows)} shown"
    Select(browser.find_element(By.ID, "answers-filter")).select_by_value("all")
    assert all(visible for _, visible in browser.execute_script(_ROWS_SHOWN))

    assert external_requests(browser) == []
    browser.execute_script("window.scrollTo(0, 0)")
    assert _colours(screenshot(browser, tmp_path / "report.png")) > 50
    docs_screenshot(browser, "report.png")


def test_answers_are_shown_as_text_never_run(browser, tmp_path):
    hostile = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'
    rows = [{"category": '"><b>Stoicism', "question": "Q?", "answer": hostile},
            {"category": "Taoism", "question": "Q2?", "answer": "plain"}]
    body = (html_report.answers_table(rows, [("category", "category"), ("answer", "answer")])
            + html_report.table(["header <i>"], [[hostile]], table_id="plain"))
    page = tmp_path / "hostile.html"
    page.write_text(html_report.page("<title> test", body), encoding="utf-8")

    _open(browser, page)
    assert browser.execute_script("return window.pwned === undefined")
    cells = browser.find_elements(By.CSS_SELECTOR, "#answers tbody td")
    assert [cell.text for cell in cells] == ['"><b>Stoicism', hostile, "Taoism", "plain"]
    assert browser.find_element(By.CSS_SELECTOR, "#plain tbody td").text == hostile
    assert browser.find_elements(By.CSS_SELECTOR, "td img, td script, td b") == []
    assert browser.title == "<title> test"
    Select(browser.find_element(By.ID, "answers-filter")).select_by_value('"><b>Stoicism')
    assert [visible for _, visible in browser.execute_script(_ROWS_SHOWN)] == [True, False]
    assert external_requests(browser) == []


def _fake_judge_metrics() -> dict:
    def scores(a: float, b: float, c: float, **extra) -> dict:
        return dict(zip(CRITERIA, (a, b, c)), **extra)

    return {
        "settings": {"model": "judge-x", "base_url": "http://127.0.0.1:9/v1", "prompt_version": "rubric-v3",
                     "temperature": 0, "response_format": "json_schema"},
        "calls": {"judgments": 9, "failed": 1, "replies": 8, "replies_from_cache": 2},
        "rubric": {
            "base": scores(2.5, 3.0, 2.0, judged=3, failed=0, mean_answer_words=120.0),
            "finetuned": scores(4.5, 4.0, 3.5, judged=2, failed=1, mean_answer_words=70.0),
            "finetuned_minus_base": scores(2.0, 1.0, 1.5, paired_questions=2),
            "per_school": {
                "Stoicism": {"base": scores(2.0, 3.0, 2.0, mean_answer_words=110.0),
                             "finetuned": scores(4.0, 4.0, 3.0, mean_answer_words=60.0)},
                "Hedonism": {"base": scores(3.0, 3.0, 2.0, mean_answer_words=130.0),
                             "finetuned": scores(5.0, 4.0, 4.0, mean_answer_words=80.0)},
            },
        },
        "pairwise": {"questions": 3, "judged": 3, "failed": 0, "wins": 2, "ties": 1, "losses": 0,
                     "win_rate": 2 / 3, "tie_rate": 1 / 3, "loss_rate": 0.0, "position_consistency": 2 / 3,
                     "first_position_preferred_rate": 1 / 3, "second_position_preferred_rate": 0.0,
                     "longer_answer_won_share": 0.0, "mean_answer_words": {"base": 120.0, "finetuned": 70.0}},
    }


def _fake_report_inputs(run_metrics: dict) -> dict:
    rows = [{"category": c, "question": f"Q{i}?", "reference": "R", "base_prediction": "the base answer here",
             "finetuned_prediction": "short"} for i, c in enumerate(("Stoicism", "Stoicism", "Hedonism"))]
    history = [{"step": 1, "loss": 3.0, "learning_rate": 5e-4}, {"step": 1, "eval_loss": 2.9},
               {"step": 2, "loss": 2.5, "learning_rate": 2.5e-4}, {"step": 2, "eval_loss": 2.7}]
    return {
        "run_metrics": run_metrics, "hold_out_set_predictions": rows,
        "run_manifest": {"inputs": {"model_id": "tiny", "seed": 42}, "prompt_format": "chat_template",
                         "lora_config": None, "training_args": {f"setting_{i}": i for i in range(30)}},
        "loss_curve_figure": plots.loss_curve_figure(history),
        "learning_rate_figure": plots.learning_rate_figure(history),
        "rouge_comparison_figure": plots.rouge_comparison_figure(run_metrics["hold_out"]),
        "answer_length_figure": plots.answer_length_figure(rows),
    }


def test_judge_section_of_a_judged_run(browser, tmp_path):
    judged = {**fake_run_metrics(), "judge": _fake_judge_metrics()}
    figure = plots.judge_comparison_figure(judged["judge"])
    text = report.report_html__judged(**_fake_report_inputs(judged), judge_comparison_figure=figure)
    assert '<section id="judge">' in text and 'id="judge-comparison"' in text
    assert "Judge judge-x at http://127.0.0.1:9/v1, prompt rubric-v3" in text
    assert "<td>fine-tuned − base</td><td>2.00</td><td>1.00</td><td>1.50</td><td>2 pairs</td>" in text
    assert "fine-tuned wins 67%, ties 33%, loses 0% (2 / 1 / 0). Position consistency of the judge: 67%" in text
    assert "<details><summary>training_args (30 settings)</summary>" in text
    plain = report.report_html__not_judged(**_fake_report_inputs(fake_run_metrics()))
    assert '<section id="judge">' not in plain and "judge-comparison" not in plain

    page = tmp_path / "judged.html"
    page.write_text(text, encoding="utf-8")
    _open(browser, page)
    assert _traces(browser, "judge-comparison") == 2 * len(CRITERIA) + 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#judge-per-school tbody tr")) == 4
    assert external_requests(browser) == []
