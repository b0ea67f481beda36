"""The report states what issue 6 asks of it: ROUGE-L with the CI, EOS rates, lengths, the kept
checkpoint's validation loss, and the balance of the categories per split with per-category ROUGE-L."""

from philo_dataflow.stages.report import report_markdown


def _summary(rouge_l: float, eos: float, words: float, count: int) -> dict:
    return {"rouge1": rouge_l + 0.1, "rouge2": rouge_l / 4, "rougeL": rouge_l, "rougeLsum": rouge_l + 0.05,
            "eos_stop_rate": eos, "mean_answer_words": words, "mean_new_tokens": words * 1.3,
            "loop_rate": 1 - eos, "distinct_1": 0.5 + eos / 4, "distinct_2": 0.6 + eos / 4, "count": count}


def fake_run_metrics() -> dict:
    """A ``run_metrics`` of three hold-out questions in two categories, not judged."""
    return {
        "created": "2026-11-25T00:00:00+00:00", "model_id": "tiny", "data_path": "data.jsonl",
        "validation": {"eval_loss": 2.6693, "global_step": 206, "stopped_early": False},
        "hold_out": {
            "base": _summary(0.161, 0.04, 120.0, 3), "finetuned": _summary(0.221, 1.0, 70.0, 3),
            "rougeL_difference": {"mean": 0.06, "ci95_low": 0.051, "ci95_high": 0.067},
            "repetition_difference": {"loop_rate": {"mean": -0.96, "ci95_low": -1.0, "ci95_high": -0.667},
                                      "distinct_1": {"mean": 0.24, "ci95_low": 0.1, "ci95_high": 0.3},
                                      "distinct_2": {"mean": 0.24, "ci95_low": float("nan"), "ci95_high": 0.3}},
            "per_category": {"Stoicism": {"base": _summary(0.15, 0.0, 100, 2), "finetuned": _summary(0.2, 1.0, 60, 2)},
                             "Hedonism": {"base": _summary(0.17, 0.0, 100, 1), "finetuned": _summary(0.25, 1.0, 60, 1)}},
            "rougeL_outcomes": {"tolerance": 0.05, "wins": 2, "ties": 1, "losses": 0,
                                "per_category": {"Hedonism": {"wins": 1, "ties": 0, "losses": 0},
                                                 "Stoicism": {"wins": 1, "ties": 1, "losses": 0}}},
            "most_changed": {"won": [{"question": "What is apatheia?", "category": "Stoicism", "reference": "Freedom.",
                                      "base_prediction": "A cheese.", "finetuned_prediction": "Freedom from passion.",
                                      "base_rougeL": 0.0, "finetuned_rougeL": 0.5, "rougeL_difference": 0.5}],
                             "lost": []},
        },
        "model_summary": {"trainable_parameters": 10, "total_parameters": 100},
        "splits": {"train_set": {"total": 14, "per_category": {"Stoicism": 9, "Hedonism": 4, "Taoism": 1}},
                   "validation_set": {"total": 2, "per_category": {"Stoicism": 1, "Hedonism": 1}},
                   "hold_out_set": {"total": 3, "per_category": {"Stoicism": 2, "Hedonism": 1}}},
        "generation_settings": {"do_sample": True, "temperature": 0.7, "top_p": 0.7, "top_k": 50,
                                "repetition_penalty": 1.0, "no_repeat_ngram_size": 4},
        "overlong": {"policy": "truncate_prompt", "train_set": {"prompt_truncated": [3, 8], "dropped": []},
                     "validation_set": {"prompt_truncated": [], "dropped": []},
                     "hold_out_set": {"prompt_truncated": [], "dropped": []}},
    }


def test_report_states_comparison_and_category_balance():
    run_metrics = fake_run_metrics()
    rows = [{"category": "Stoicism", "question": "Q?", "reference": "R", "base_prediction": "B",
             "finetuned_prediction": "F"}]
    text = report_markdown(run_metrics, rows)
    assert "**better than**" in text and "0.060 (bootstrap 95% CI 0.051 to 0.067)" in text
    assert "| base | 0.261 | 0.040 | 0.161 | 0.211 | 0.04 | 120.0 | 156.0 | 0.96 | 0.510 | 0.610 |" in text
    assert "| fine-tuned | 0.321 | 0.055 | 0.221 | 0.271 | 1.00 | 70.0 | 91.0 | 0.00 | 0.750 | 0.850 |" in text
    assert ("Repetition, fine-tuned minus base (paired bootstrap 95% CI): loop rate -0.960 (-1.000 to -0.667), "
            "distinct-1 +0.240 (+0.100 to +0.300), distinct-2 +0.240 (n/a to +0.300).") in text
    assert "some word 4-gram occurs 3 or more times" in text
    assert ("Question by question (a ROUGE-L difference beyond ±0.05 decides): the fine-tuned answer wins 2, ties 1 "
            "and loses 0 of 3 questions.") in text
    assert "## Questions the fine-tuned model won by most" in text and "lost by most" not in text
    assert "**Q (Stoicism, ROUGE-L 0.000 → 0.500):** What is apatheia?" in text
    assert "- *fine-tuned:* Freedom from passion." in text
    assert "| category | train_set | validation_set | hold_out_set | base ROUGE-L | fine-tuned ROUGE-L | difference |" in text
    assert "| Hedonism | 4 | 1 | 1 | 0.170 | 0.250 | +0.080 |" in text
    assert "| Stoicism | 9 | 1 | 2 | 0.150 | 0.200 | +0.050 |" in text
    assert "| Taoism | 1 | 0 | 0 | — | — | — |" in text  # a category with no hold-out question still shows its counts
    assert "Validation loss of the kept checkpoint: 2.6693 (steps 206" in text
    assert "Answers sampled (seeded): temperature 0.7, top-p 0.7, top-k 50, no repeated 4-grams." in text
    assert ("Examples above max_seq_length (overlong_policy 'truncate_prompt'): train_set: 2 question(s) shortened, "
            "0 dropped. The hold-out answers were generated from the whole questions.") in text
