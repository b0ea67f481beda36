"""Comparing: fine-tuned models of any trainer and their base model answering one hold-out set, scored by the
main job's own scoring (``lib.scores.verdict``), optionally judged pair by pair by the main job's judge node,
and written as ``comparison.json``, ``answers.jsonl`` and ``report.html``. The nodes of the comparison
driver (``comparison.build_comparison_driver``), which ``philo-dataflow compare`` executes; not a module of
the main job's driver.

Inputs: ``models`` (paths or hub ids, ``compared_models.KINDS``), and optionally ``base``, ``data_path``,
``hold_out`` (``"split"`` or ``"all"``), ``prompt_template``, ``max_new_tokens``, ``generation_batch_size``,
``no_repeat_ngram_size``, ``seed``, ``train_data``, ``judge_inputs`` and ``output_dir``::

    dr = philo_dataflow.build_comparison_driver()
    result = dr.execute(["comparison"], inputs={"models": ["outputs", "trl-out/checkpoint-500"]})
"""

import json
import logging
from pathlib import Path
from typing import Optional

from datasets import Dataset
from hamilton.function_modifiers import datasaver, extract_fields, tag

from .. import comparison as compare_lib
from ..compared_models import TRANSFORMERS_DECODING, Model, answers_of, base_and_problems, hf_answers, model_of
from ..lib.artifacts import (
    COMPARISON_ANSWERS_FILE,
    COMPARISON_FILE,
    COMPARISON_REPORT_FILE,
    PREDICTIONS_JSONL_FILE,
    file_metadata,
    write_text_atomically,
)
from ..lib.inputs import DEFAULTS
from ..lib.near_duplicates import conversation_text
from ..lib.scores import TIE_TOLERANCE

logger = logging.getLogger(__name__)


def compared_models(models: list[str]) -> list[Model]:
    """What each of ``models`` is (``compared_models.model_of``: a run, an adapter, a model, a GGUF file).

    :raises ValueError: one line per model that is not there or of no known kind.
    """
    found, problems = [], []
    for path in models:
        try:
            found.append(model_of(path))
        except ValueError as error:
            problems.append(str(error))
    if problems or not found:
        raise ValueError("\n".join(problems) or "models is empty: give at least one model to compare.")
    return found


def comparison_base_model_id(compared_models: list[Model], base: Optional[str] = None) -> str:
    """The base model the models are compared with: ``base``, else the first model's own base
    (``compared_models.base_and_problems``).

    :raises ValueError: no base known, a base that cannot be loaded here, models of different bases.
    """
    found, problems = base_and_problems(compared_models, base)
    if problems:
        raise ValueError("\n".join(problems))
    return found


def model_labels(compared_models: list[Model]) -> list[str]:
    """A short, unique name per model (``comparison.model_labels``), in the order given."""
    return compare_lib.model_labels(compared_models)


@extract_fields({"comparison_hold_out_set": Dataset, "hold_out_source": str, "hold_out_data_path": Optional[str]})
def comparison_hold_out(
    compared_models: list[Model],
    comparison_base_model_id: str,
    data_path: Optional[str] = None,
    hold_out: str = "split",
    prompt_template: Optional[str] = None,
) -> dict:
    """The questions every model answers: the first run's own hold-out set (its ``hold_out_predictions.jsonl``,
    rebuilt with the questions' earlier turns when its data file is unchanged); with ``data_path``, that
    file's hold-out split under the first run's split inputs (the defaults when the first model is not a
    run); with ``hold_out="all"``, every usable record of ``data_path`` (or of the first run's data file).

    :return: ``comparison_hold_out_set`` (a ``Dataset`` with ``splitting.SPLIT_COLUMNS``), ``hold_out_source``
        (where the questions come from, for the record) and ``hold_out_data_path`` (the file split, None for
        a run's own hold-out set).
    :raises ValueError: ``hold_out`` not ``split`` or ``all``; no data file where one is needed; the data
        file's or the predictions' problems.
    """
    if hold_out not in ("split", "all"):
        raise ValueError(f"hold_out={hold_out!r} (--hold-out): use 'split' or 'all'.")
    whole = hold_out == "all"
    first = compared_models[0].run
    path = data_path or (first.manifest["inputs"].get("data_path") if first is not None and whole else None)
    if path is not None:
        hold_out_set = compare_lib.data_hold_out_set(first, path, whole, comparison_base_model_id, prompt_template)
        split = f"split inputs of {first.run_dir}" if first is not None else "default split inputs"
        source = f"every record of {path}" if whole else f"the hold-out split of {path} ({split})"
        return {"comparison_hold_out_set": hold_out_set, "hold_out_source": source, "hold_out_data_path": path}
    if first is None:
        raise ValueError(f"{compared_models[0].path} is not a run of ours, so it has no hold-out set to reuse: give "
                         "--data-path FILE (its hold-out split is answered; --hold-out all answers every record).")
    rows = compare_lib.predicted_hold_out(first)
    return {"comparison_hold_out_set": compare_lib.predicted_hold_out_set(first, rows),
            "hold_out_source": str(first.run_dir / PREDICTIONS_JSONL_FILE), "hold_out_data_path": None}


def hold_out_questions(comparison_hold_out_set: Dataset) -> list[dict]:
    """One ``{"question", "reference", "category"}`` per hold-out question, in order."""
    return [{"question": q, "reference": r, "category": c} for q, r, c in zip(
        comparison_hold_out_set["input_text"], comparison_hold_out_set["output_text"],
        comparison_hold_out_set["category"])]


def comparison_max_new_tokens(compared_models: list[Model], max_new_tokens: Optional[int] = None) -> int:
    """Cap on generated tokens per answer: ``max_new_tokens``, else the first run's, else the default."""
    if max_new_tokens is not None:
        return max_new_tokens
    first = compared_models[0].run
    recorded = first.manifest["inputs"].get("max_new_tokens") if first is not None else None
    return recorded or DEFAULTS["max_new_tokens"]


def comparison_decoding(no_repeat_ngram_size: int = 4) -> dict:
    """How transformers models decode: ``comparison.COMPARE_DECODING`` (greedy, the run defaults') with
    ``no_repeat_ngram_size`` (0: plain greedy, as llama.cpp decodes a GGUF file)."""
    return {**compare_lib.COMPARE_DECODING, "no_repeat_ngram_size": no_repeat_ngram_size}


def comparison_generation(
    comparison_max_new_tokens: int, comparison_decoding: dict, generation_batch_size: int = 32,
    prompt_template: Optional[str] = None,
) -> dict:
    """How every model answers, as ``comparison.json`` records it: ``max_new_tokens``, ``generation_batch_size``
    (questions per batched ``generate`` call), ``settings`` (``comparison_decoding``) and, when given,
    ``prompt_template``."""
    return {"max_new_tokens": comparison_max_new_tokens, "generation_batch_size": generation_batch_size,
            "settings": comparison_decoding, **({"prompt_template": prompt_template} if prompt_template else {})}


def model_generations(
    compared_models: list[Model],
    model_labels: list[str],
    comparison_base_model_id: str,
    comparison_hold_out_set: Dataset,
    comparison_generation: dict,
    seed: int = 42,
) -> dict:
    """Every model's answers to every hold-out question, the base model's first: a run through the presaved
    dataflow (``comparison.model_answers``; when it is the first model, its adapter disabled gives the base
    answers, as in its own run), any other model by ``compared_models.answers_of``; the base model, when
    the first model is not a run, by ``compared_models.hf_answers``. One model is loaded at a time.

    :return: ``{"answers": {name: [generation, ...]}, "answering": {name: {"prompt_format", "decoding"}}}``;
        a generation is ``lib.generation.generate_answers``' dict; names are ``comparison.BASE`` and
        ``model_labels``.
    :raises ValueError: a model that cannot be loaded or answer.
    """
    generation = comparison_generation
    inputs = {"max_new_tokens": generation["max_new_tokens"], "generation_batch_size": generation["generation_batch_size"],
              **generation["settings"],
              **({"prompt_template": generation["prompt_template"]} if "prompt_template" in generation else {})}
    answers, answering = {}, {}
    if compared_models[0].run is None:
        logger.info("answering with the base model %s", comparison_base_model_id)
        answers[compare_lib.BASE], prompt_format = hf_answers(comparison_base_model_id, None, comparison_hold_out_set,
                                                              inputs)
        answering[compare_lib.BASE] = {"prompt_format": prompt_format, "decoding": TRANSFORMERS_DECODING}
    for index, (label, model) in enumerate(zip(model_labels, compared_models)):
        logger.info("answering with %s (%s, %s)", label, model.kind, model.path)
        if model.run is None:
            answers[label], answering[label] = answers_of(model, comparison_base_model_id, comparison_hold_out_set,
                                                          inputs, seed)
            continue
        generations = compare_lib.model_answers(model.run, comparison_hold_out_set, generation["max_new_tokens"],
                                                generation["generation_batch_size"], with_base=index == 0,
                                                decoding=generation["settings"])
        trained = {"prompt_format": model.run.manifest.get("prompt_format"), "decoding": TRANSFORMERS_DECODING}
        if index == 0:
            answers[compare_lib.BASE], answering[compare_lib.BASE] = generations[compare_lib.BASE], dict(trained)
        answers[label], answering[label] = generations["finetuned"], trained
    base = compare_lib.BASE
    return {"answers": {base: answers.pop(base), **answers}, "answering": {base: answering.pop(base), **answering}}


def comparison_scores(hold_out_questions: list[dict], model_generations: dict, seed: int = 42) -> dict:
    """Every model's scores and every pair's differences (``comparison.comparison_scores``, that is
    ``lib.scores.verdict``, with ``TIE_TOLERANCE``)."""
    return compare_lib.comparison_scores(hold_out_questions, model_generations["answers"], seed)


def comparison_leakage(
    hold_out_questions: list[dict],
    comparison_hold_out_set: Dataset,
    model_generations: dict,
    compared_models: list[Model],
    seed: int = 42,
    train_data: Optional[str] = None,
) -> Optional[dict]:
    """With ``train_data`` (the data the models were tuned on), the hold-out questions with an exact or near
    duplicate in it and every pair's verdict without them (``comparison.leakage``, at the first run's
    ``near_duplicate_threshold``, else the default), each question compared by its conversation (earlier
    turns and question, ``lib.near_duplicates.conversation_text``); None without.

    :raises ValueError: ``train_data`` cannot be read or holds no question/answer records.
    """
    if train_data is None:
        return None
    first = compared_models[0].run
    threshold = (first.manifest["inputs"] if first is not None else {}).get(
        "near_duplicate_threshold", DEFAULTS["near_duplicate_threshold"])
    conversations = [conversation_text(question, context) for question, context in
                     zip(comparison_hold_out_set["input_text"], comparison_hold_out_set["context"])]
    return compare_lib.leakage(hold_out_questions, model_generations["answers"], seed, train_data,
                               compare_lib.train_questions(train_data), threshold, conversations)


def comparison_judgments(
    hold_out_questions: list[dict], model_generations: dict, judge_inputs: Optional[dict] = None,
) -> Optional[dict]:
    """With ``judge_inputs`` naming a ``judge_model`` (the main job's judge inputs, ``lib.inputs.JUDGE_INPUTS``,
    and ``output_dir``, home of the default judge cache), the judge's pairwise verdict on every pair
    (``comparison.judged_pairs``); None without.

    :return: ``{"model": judge_model, "pairs": [...]}`` or None.
    """
    if not judge_inputs or not judge_inputs.get("judge_model"):
        return None
    return {"model": judge_inputs["judge_model"],
            "pairs": compare_lib.judged_pairs(hold_out_questions, model_generations["answers"], judge_inputs)}


@tag(output="final")
def comparison(
    compared_models: list[Model],
    model_labels: list[str],
    comparison_base_model_id: str,
    hold_out_questions: list[dict],
    hold_out_source: str,
    hold_out_data_path: Optional[str],
    model_generations: dict,
    comparison_scores: dict,
    comparison_leakage: Optional[dict],
    comparison_judgments: Optional[dict],
    comparison_generation: dict,
    seed: int = 42,
) -> dict:
    """The content of ``comparison.json``: the base model id, the hold-out set (source, size, split inputs,
    the runs that split otherwise), the generation settings, per model its kind, path, prompt format,
    decoding, the training settings the runs differ in and the scores, every pair's differences, the
    per-category scores, and ``leakage`` and ``judge`` when asked for. NaN and infinite values become None.
    """
    runs = [(label, model.run) for label, model in zip(model_labels, compared_models) if model.run is not None]
    first_run = compared_models[0].run
    split_otherwise = ([runs[i][0] for i in compare_lib.runs_split_otherwise([run for _, run in runs],
                                                                             hold_out_data_path)]
                       if hold_out_data_path and runs else [])
    settings = compare_lib.differing_settings(dict(runs))
    entries = {compare_lib.BASE: {"kind": compare_lib.BASE, "model_id": comparison_base_model_id, "run_dir": None}}
    for label, model in zip(model_labels, compared_models):
        entry = {"kind": model.kind, "path": model.path, "run_dir": None}
        if model.run is not None:
            entry.update({"run_dir": str(model.run.run_dir), "adapter_dir": str(model.run.adapter_dir),
                          "finetuning_method": model.run.manifest.get("finetuning_method", "lora"),
                          "settings": settings[label]})
        entries[label] = entry
    for name, entry in entries.items():
        entry.update(model_generations["answering"][name])
        entry["scores"] = comparison_scores["models"][name]
    result = {
        "base_model_id": comparison_base_model_id,
        "hold_out": {"source": hold_out_source, "questions": len(hold_out_questions),
                     "split_inputs": {**(compare_lib.split_inputs(first_run) if first_run else {}),
                                      **({"data_path": hold_out_data_path} if hold_out_data_path else {})},
                     "runs_split_otherwise": split_otherwise},
        "generation": comparison_generation,
        "seed": seed,
        "tie_tolerance": TIE_TOLERANCE,
        "models": entries,
        "pairs": comparison_scores["pairs"],
        "per_category": comparison_scores["per_category"],
    }
    if comparison_leakage is not None:
        result["leakage"] = comparison_leakage
    if comparison_judgments is not None:
        result["judge"] = comparison_judgments
    return compare_lib.json_ready(result)


def comparison_answer_rows(hold_out_questions: list[dict], model_generations: dict, comparison_scores: dict) -> list[dict]:
    """The rows of ``answers.jsonl`` (``comparison.answer_rows``): every model's answer to each question."""
    return compare_lib.json_ready(compare_lib.answer_rows(hold_out_questions, model_generations["answers"],
                                                          comparison_scores))


def comparison_report_html(comparison: dict, comparison_answer_rows: list[dict]) -> str:
    """The comparison's page (``comparison.report_html``)."""
    return compare_lib.report_html(comparison, comparison_answer_rows)


@datasaver()
def saved_comparison(
    comparison: dict, comparison_answer_rows: list[dict], comparison_report_html: str, output_dir: str = "comparison",
) -> dict:
    """Writes ``answers.jsonl``, ``report.html`` and, last (it marks a finished comparison),
    ``comparison.json`` into ``output_dir``, each atomically. A Hamilton data saver.

    :return: ``{"paths": [...], "files": {name: lib.artifacts.file_metadata}}``.
    """
    out = Path(output_dir)
    answers = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in comparison_answer_rows)
    paths = [write_text_atomically(out / COMPARISON_ANSWERS_FILE, answers),
             write_text_atomically(out / COMPARISON_REPORT_FILE, comparison_report_html),
             write_text_atomically(out / COMPARISON_FILE, json.dumps(comparison, indent=2, allow_nan=False))]
    return {"paths": paths, "files": {Path(path).name: file_metadata(path) for path in paths}}
