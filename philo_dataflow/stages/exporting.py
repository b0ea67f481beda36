"""Exporting: the fine-tuned model as one plain model (the LoRA adapter merged into its base weights) and
as a GGUF file for llama.cpp and Ollama, each checked against the model it came from on the hold-out
questions. Not part of ``DEFAULT_OUTPUTS``: ``philo-dataflow export`` asks for ``EXPORT_OUTPUTS`` of a presaved run.

The checks: the share of hold-out questions whose answers have identical token ids, where the first
differing token sits, and the largest absolute logit difference over prompt and answer tokens (one fp32
forward pass per question). A merged model that answers differently from its adapter is a known PEFT
failure (peft#1388, peft#2502), and merging into a quantised base loses accuracy, so the merge goes into
a freshly loaded fp32 copy of the base model. The files are written by ``saving``
(``saved_merged_model``, ``saved_gguf_model``, ``saved_export_report``).
"""

import copy
import html
import time
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset
from hamilton.function_modifiers import tag
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..lib import html_report
from ..lib.artifacts import GGUF_FILE, library_versions
from ..lib.generation import GREEDY, answer_columns, generate_answers
from ..lib.gguf_export import (
    GGUF_CHECKED_QUESTIONS,
    GGUF_OUTTYPE,
    NO_REPEAT_STAND_IN,
    gguf_answers,
    gguf_files_cells,
    chat_parity_line,
    gguf_logits,
    gguf_prompts,
    greedy_continuation,
    llama_cpp_missing,
    llama_cpp_version,
    load_gguf,
    gguf_files_table,
    modelfile_text,
    quantization_problems,
)
from ..lib.model_sources import from_pretrained, refuse_pickle_weights, resolve_model_path
from ..lib.prompts import CHAT_TEMPLATE, question_prompt_ids
from ..lib.scores import mean, verdict
from ..lib.switches import when


@when(finetuning_method="lora")
def merged_model__lora(
    finetuned_model: PreTrainedModel,
    base_model_id: str,
    model_class: type,
    device: torch.device,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The fine-tuned LoRA adapter merged (PEFT ``merge_and_unload``, ``W + scale * B @ A``) into a fresh
    fp32 copy of the base model, on ``device``: a plain transformers model without PEFT layers.

    ``finetuned_model`` shares its base weights with the base answers (its adapter disabled) and may sit on
    a 4-bit base under QLoRA, so it is left untouched: the base model is loaded again in fp32 and the
    adapter's weights are copied onto it.

    :raises ValueError: the base model cannot be loaded (see ``base_model``), or the adapter's weights do not
        fit the fresh copy.
    """
    path = resolve_model_path(base_model_id)
    refuse_pickle_weights(path, f"model_id={base_model_id!r}", allow_pickle)
    fresh = from_pretrained(model_class, base_model_id, path, trust_remote_code, dtype=torch.float32,
                            use_safetensors=None if allow_pickle else True)
    adapter_config = copy.deepcopy(finetuned_model.peft_config[finetuned_model.active_adapter])
    adapter_config.inference_mode = True
    with torch.random.fork_rng(devices=[]):  # the LoRA initialisation, overwritten next, draws no global RNG state
        wrapped = get_peft_model(fresh, adapter_config)
    loaded = set_peft_model_state_dict(wrapped, get_peft_model_state_dict(finetuned_model))
    missing = [name for name in loaded.missing_keys if "lora_" in name]
    if loaded.unexpected_keys or missing:
        raise ValueError(f"the adapter's weights do not fit a fresh copy of {base_model_id!r}: "
                         f"{(loaded.unexpected_keys or missing)[:3]}")
    return wrapped.merge_and_unload(safe_merge=True).to(device).eval()


@when(finetuning_method="full")
def merged_model__full(finetuned_model: PreTrainedModel) -> PreTrainedModel:
    """The fully fine-tuned model itself: it has no adapter to merge."""
    return finetuned_model


def hold_out_prompts(
    hold_out_set: Dataset,
    finetuned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    max_new_tokens: int = 160,
) -> list[list[int]]:
    """Token ids of each hold-out question's prompt, as ``finetuned_model_hold_out_generations`` answered
    it (``prediction``'s prompts, overlong ones cut the same way)."""
    return question_prompt_ids(hold_out_set, finetuned_model, tokenizer, prompt_format, max_new_tokens)


def merged_model_hold_out_generations(
    hold_out_prompts: list[list[int]],
    merged_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation_settings: dict,
    max_new_tokens: int = 160,
    generation_batch_size: int = 32,
    seed: int = 42,
) -> list[dict]:
    """The merged model's answers to the hold-out questions, decoded as the adapter's were (greedy unless
    ``generation_settings`` sample; same batches, same seed); see ``generate_answers`` for each dict."""
    return generate_answers(merged_model, tokenizer, hold_out_prompts, max_new_tokens, generation_batch_size,
                            "merged on hold-out", generation_settings, seed)


def _first_divergence(reference: list[int], other: list[int]) -> Optional[int]:
    """Index of the first token where two id sequences differ (a shorter one differs where it ends); None
    when they are identical."""
    if reference == other:
        return None
    return next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))


def _token_agreement(references: list[list[int]], others: list[list[int]], questions: list[int]) -> dict:
    """``questions`` (their count), ``identical_token_ids`` (questions answered with the very same ids),
    ``identical_share`` and ``first_divergences`` (``{"question", "position"}`` of each other one)."""
    divergences = [{"question": q, "position": _first_divergence(a, b)}
                   for q, a, b in zip(questions, references, others) if a != b]
    identical = len(questions) - len(divergences)
    return {"questions": len(questions), "identical_token_ids": identical,
            "identical_share": identical / len(questions) if questions else None, "first_divergences": divergences}


def _logits(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """fp32 logits of one teacher-forced sequence, shape (positions, vocab): a decoder-only model reads
    ``prompt + answer`` (len(prompt) + len(answer) positions); an encoder-decoder reads ``prompt`` and
    decodes the decoder start token then ``answer`` (1 + len(answer) positions)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        if getattr(model.config, "is_encoder_decoder", False):
            decoder = [model.config.decoder_start_token_id, *answer]
            output = model(input_ids=torch.tensor([prompt], device=device),
                           decoder_input_ids=torch.tensor([decoder], device=device))
        else:
            output = model(input_ids=torch.tensor([prompt + answer], device=device))  # (1, positions)
    return output.logits[0].float()  # (positions, vocab)


def merged_model_agreement(
    hold_out_prompts: list[list[int]],
    finetuned_model_hold_out_generations: list[dict],
    merged_model_hold_out_generations: list[dict],
    finetuned_model: PreTrainedModel,
    merged_model: PreTrainedModel,
    generation_settings: dict,
) -> dict:
    """How the merged model's hold-out answers agree with the adapter's (``finetuned_model``, adapter on).

    :return: ``questions``, ``identical_token_ids``, ``identical_share``, ``first_divergences`` (question
        index and token position of each answer that differs), ``max_abs_logit_difference`` (over every
        position of prompt + adapter answer, one fp32 forward pass per question, both models),
        ``logit_positions`` (positions compared) and ``decoding`` (``"greedy"`` or ``"sampled"``).
    """
    questions = list(range(len(hold_out_prompts)))
    agreement = _token_agreement([g["token_ids"] for g in finetuned_model_hold_out_generations],
                                 [g["token_ids"] for g in merged_model_hold_out_generations], questions)
    largest, positions = 0.0, 0
    for prompt, answer in zip(hold_out_prompts, finetuned_model_hold_out_generations):
        adapter = _logits(finetuned_model, prompt, answer["token_ids"])
        merged = _logits(merged_model, prompt, answer["token_ids"])
        largest = max(largest, (adapter - merged).abs().max().item())
        positions += adapter.shape[0]
    return {**agreement, "max_abs_logit_difference": largest, "logit_positions": positions,
            "decoding": "sampled" if generation_settings["do_sample"] else "greedy"}


def ollama_modelfile(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, prompt_template_in_use: Optional[str],
    generation_settings: dict,
) -> str:
    """The Ollama ``Modelfile`` written beside the GGUF file: ``FROM ./model.gguf``, the prompt format the
    model was trained with as its ``TEMPLATE`` (ChatML as a Go template over ``.Messages``), ``stop`` on
    the end-of-turn token, the run's decoding (see ``lib.gguf_export.modelfile_text``)."""
    return modelfile_text(tokenizer, prompt_format, prompt_template_in_use, generation_settings, GGUF_FILE)


def gguf_checked_questions(hold_out_set: Dataset) -> list[int]:
    """Positions in ``hold_out_set`` of the questions the GGUF copy re-answers: the first
    ``GGUF_CHECKED_QUESTIONS`` (5); ``philo-dataflow export --gguf-questions N`` overrides this node with the
    first N."""
    return list(range(min(GGUF_CHECKED_QUESTIONS, len(hold_out_set))))


def _is_plain_greedy(generation_settings: dict) -> bool:
    return all(generation_settings.get(name) == value for name, value in GREEDY.items())


def gguf_agreement(
    saved_gguf_model: dict,
    gguf_checked_questions: list[int],
    hold_out_prompts: list[list[int]],
    merged_model_hold_out_generations: list[dict],
    merged_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation_settings: dict,
    max_new_tokens: int = 160,
    seed: int = 42,
) -> dict:
    """How the GGUF file, loaded back with llama-cpp-python, agrees with the merged model: greedy answers
    (llama.cpp's greedy sampler, fed the very same prompt token ids) to the ``gguf_checked_questions``,
    and the logits over prompt + merged answer. The merged model's answers are its hold-out generations
    when those were plain greedy, else its plain greedy answers to these questions.

    ``philo-dataflow export --no-gguf`` overrides this node with ``{"status": "skipped", ...}``, so no conversion runs.

    :return: ``saved_gguf_model``'s fields (``status``, ``gguf``, ``outtype``...) and, when ``status`` is
        ``"ok"``: ``questions``, ``identical_token_ids``, ``identical_share``, ``first_divergences``,
        ``max_abs_logit_difference``, ``llama_cpp_python``. ``status`` ``"unchecked"`` (with ``reason``):
        the file was written but llama-cpp-python is not installed.
    """
    if saved_gguf_model["status"] != "ok":
        return dict(saved_gguf_model)
    missing = llama_cpp_missing()
    if missing:
        return {**saved_gguf_model, "status": "unchecked", "reason": missing}
    questions = [q for q in gguf_checked_questions if 0 <= q < len(hold_out_prompts)]
    prompts = [hold_out_prompts[q] for q in questions]
    if _is_plain_greedy(generation_settings):
        references = [merged_model_hold_out_generations[q]["token_ids"] for q in questions]
    else:
        references = [g["token_ids"] for g in generate_answers(
            merged_model, tokenizer, prompts, max_new_tokens, len(prompts) or 1, "merged, greedy", None, seed)]
    n_ctx = max((len(prompt) for prompt in prompts), default=1) + max_new_tokens + 1
    llm = load_gguf(saved_gguf_model["gguf"], n_ctx, seed)
    try:
        answers = [greedy_continuation(llm, prompt, max_new_tokens, tokenizer.eos_token_id) for prompt in prompts]
        largest = 0.0
        for prompt, reference in zip(prompts, references):
            ours = _logits(merged_model, prompt, reference).cpu().numpy()  # (positions, vocab)
            theirs = gguf_logits(llm, prompt + reference)  # (positions, n_vocab)
            vocab = min(ours.shape[1], theirs.shape[1])
            largest = max(largest, float(abs(ours[:, :vocab] - theirs[:, :vocab]).max()))
    finally:
        llm.close()
    return {**saved_gguf_model, **_token_agreement(references, answers, questions),
            "max_abs_logit_difference": largest, "decoding": "greedy", "llama_cpp_python": llama_cpp_version()}


def gguf_chat_parity(
    saved_gguf_model: dict,
    hold_out_set: Dataset,
    hold_out_prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
) -> dict:
    """Whether a llama.cpp user who sends a hold-out question through the GGUF file's embedded chat template
    (``lib.gguf_export.gguf_prompts``: rendered and tokenized as llama-cpp-python's chat completion does)
    gives the model the prompt it was trained on (``hold_out_prompts``, token for token), and whether
    llama.cpp stops at the tokenizer's end-of-turn token (the EOS the training supervised).

    :return: ``{"status": "ok", "questions", "identical_prompts", "first_mismatches": [{"question",
        "position"}, ...] (the first 5), "end_of_turn" (token text), "stops_on_end_of_turn"}``;
        ``{"status": "not_applicable", "reason"}`` when the model was not trained on its chat template
        (``prompt_format`` alpaca or template: the reason says how to prompt it); the GGUF step's own
        status and reason when it wrote no file.
    """
    if saved_gguf_model["status"] != "ok":
        return {key: saved_gguf_model[key] for key in ("status", "reason") if key in saved_gguf_model}
    if prompt_format != CHAT_TEMPLATE:
        how = ("the Alpaca prompt (lib.prompts.ALPACA_PROMPT) as raw text" if prompt_format == "alpaca" else
               "its prompt_template rendered as raw text (see the run's config.yaml)")
        return {"status": "not_applicable",
                "reason": f"the model was trained on {prompt_format} prompts, not a chat template: send it {how} "
                          "(a raw completion, not a chat completion)."}
    rendered = gguf_prompts(saved_gguf_model["gguf"], list(hold_out_set["input_text"]), list(hold_out_set["context"]),
                            False)
    mismatches = [{"question": index, "position": _first_divergence(ours, theirs)}
                  for index, (ours, theirs) in enumerate(zip(hold_out_prompts, rendered["prompts"])) if ours != theirs]
    eos = tokenizer.eos_token_id
    return {"status": "ok", "questions": len(hold_out_prompts),
            "identical_prompts": len(hold_out_prompts) - len(mismatches), "first_mismatches": mismatches[:5],
            "end_of_turn": tokenizer.eos_token, "stops_on_end_of_turn": eos in rendered["end_ids"]}


def quantization_types(quantize: str = "") -> list[str]:
    """The quantized GGUF copies to make (``philo-dataflow export --quantize q8_0,q4_k_m``): llama.cpp's type
    names (``lib.gguf_export.QUANTIZATION_TYPES``), each once, in the order given; empty for none.

    :raises ValueError: an unknown type (one line naming the types there are).
    """
    problems = quantization_problems(quantize)
    if problems:
        raise ValueError(problems[0])
    return list(dict.fromkeys(name.strip().lower() for name in quantize.split(",") if name.strip()))


def gguf_files_report(
    saved_gguf_model: dict,
    saved_quantized_gguf_models: dict,
    hold_out_set: Dataset,
    prompt_template_in_use: Optional[str],
    generation_settings: dict,
    max_new_tokens: int = 160,
    seed: int = 42,
) -> dict:
    """What each quantized GGUF copy costs: the f32 file and every quantized one answer the whole hold-out set
    through llama.cpp (``lib.gguf_export.gguf_answers``: the chat template embedded in the file, greedy, no
    repeat penalty, as a llama-cpp-python chat completion answers), and each quantized file is scored
    against the f32 file by ``lib.scores.verdict``: the same decoder on both sides, so the differences are
    the quantization's alone (the f32 file's own agreement with the merged model is ``gguf_agreement``).

    :return: ``{"status": "ok", "decoding", "questions", "files": [...]}``, one entry per file (f32 first):
        ``type``, ``file`` (name), ``bytes``, ``new_tokens_per_second`` (llama.cpp on this machine, prompt
        processing included), ``identical_share`` (answers identical to the f32 file's), ``rougeL``,
        ``eos_stop_rate``, ``loop_rate`` and, for quantized files, ``rougeL_difference``,
        ``eos_stop_rate_difference`` and ``loop_rate_difference`` against the f32 file (``{"mean",
        "ci95_low", "ci95_high"}``, paired bootstrap 95% CI); and, where the run decoded with
        ``no_repeat_ngram_size`` (which llama.cpp lacks), ``with_repeat_penalty``: ``{"repeat_penalty",
        "rougeL", "eos_stop_rate", "loop_rate"}`` of the same file answering with llama.cpp's
        ``repeat_penalty`` ``lib.gguf_export.NO_REPEAT_STAND_IN``, the Modelfile's; or ``{"status": "none"}`` when no quantized
        copy was asked for, ``{"status": "skipped" | "failed", "reason"}`` when there is none.
    """
    if saved_quantized_gguf_models["status"] != "ok":
        return {key: saved_quantized_gguf_models[key] for key in ("status", "reason") if key in saved_quantized_gguf_models}
    files = {GGUF_OUTTYPE: {"path": saved_gguf_model["gguf"], "bytes": saved_gguf_model["bytes"]},
             **saved_quantized_gguf_models["files"]}
    questions, contexts = list(hold_out_set["input_text"]), list(hold_out_set["context"])
    answers, speed = {}, {}
    for name, written in files.items():
        started = time.perf_counter()
        generations, _ = gguf_answers(written["path"], questions, contexts, max_new_tokens,
                                      bool(prompt_template_in_use), seed)
        speed[name] = sum(len(g["token_ids"]) for g in generations) / max(time.perf_counter() - started, 1e-9)
        answers[name] = generations
    references, categories = list(hold_out_set["output_text"]), list(hold_out_set["category"])
    scored = verdict(references, categories, {name: answer_columns(gens) for name, gens in answers.items()}, seed)
    against_f32 = {pair["b"]: pair for pair in scored["pairs"] if pair["a"] == GGUF_OUTTYPE}
    penalised = {}
    if generation_settings.get("no_repeat_ngram_size") and generation_settings.get("repetition_penalty", 1.0) == 1.0:
        for name, written in files.items():
            generations, _ = gguf_answers(written["path"], questions, contexts, max_new_tokens,
                                          bool(prompt_template_in_use), seed, NO_REPEAT_STAND_IN)
            summary = verdict(references, categories, {name: answer_columns(generations)}, seed)["models"][name]
            penalised[name] = {"repeat_penalty": NO_REPEAT_STAND_IN,
                               **{key: summary[key] for key in ("rougeL", "eos_stop_rate", "loop_rate")}}
    rows = []
    for name, written in files.items():
        summary = scored["models"][name]
        row = {"type": name, "file": Path(written["path"]).name, "bytes": written["bytes"],
               "new_tokens_per_second": speed[name],
               "identical_share": mean([float(a["text"] == b["text"]) for a, b in zip(answers[name], answers[GGUF_OUTTYPE])]),
               **{key: summary[key] for key in ("rougeL", "eos_stop_rate", "loop_rate")}}
        if name in against_f32:
            row.update({f"{key}_difference": against_f32[name][f"{key}_difference"]
                        for key in ("rougeL", "eos_stop_rate", "loop_rate")})
        if name in penalised:
            row["with_repeat_penalty"] = penalised[name]
        rows.append(row)
    return {"status": "ok", "decoding": "llama.cpp greedy, no repeat penalty, the file's chat template",
            "questions": len(questions), "files": rows}


@tag(output="export")
def export_report(
    merged_model_agreement: dict, gguf_agreement: dict, gguf_files_report: dict, gguf_chat_parity: dict,
    base_model_id: str, finetuning_method: str = "lora",
) -> dict:
    """What ``export_report.json`` records: the base model, how the merged model was made, its agreement
    with the adapter (``merged_model_agreement``), the GGUF file's with the merged model
    (``gguf_agreement``), the quantized copies' figures (``gguf_files_report``), the chat template's parity
    with the training prompts (``gguf_chat_parity``) and the library versions."""
    merge = ("the fully fine-tuned model itself" if finetuning_method == "full" else
             "LoRA adapter merged (PEFT merge_and_unload) into a fresh fp32 copy of the base model")
    versions = {**library_versions(), "llama_cpp_python": llama_cpp_version()}
    return {"base_model_id": base_model_id, "finetuning_method": finetuning_method, "merge": merge,
            "merged_model": merged_model_agreement, "gguf": gguf_agreement, "gguf_files": gguf_files_report,
            "chat_parity": gguf_chat_parity,
            "library_versions": versions}


def _agreement_line(agreement: dict, against: str) -> str:
    return (f"{agreement['identical_token_ids']} of {agreement['questions']} hold-out answers have token ids "
            f"identical to the {against}'s ({agreement['decoding']}); largest absolute logit difference "
            f"{agreement['max_abs_logit_difference']:.2e}.")


def export_report_markdown(export_report: dict) -> str:
    """``export_report.md``: the export's two checks, in a few lines."""
    merged, gguf = export_report["merged_model"], export_report["gguf"]
    lines = ["# Export", "", f"Base model `{export_report['base_model_id']}`; merged model: {export_report['merge']}.",
             "", f"- Merged model vs adapter: {_agreement_line(merged, 'adapter')}"]
    for divergence in merged["first_divergences"]:
        lines.append(f"  - question {divergence['question']}: first differing token at position {divergence['position']}")
    if gguf["status"] == "ok":
        lines.append(f"- GGUF `{GGUF_FILE}` ({gguf['outtype']}, llama-cpp-python {gguf['llama_cpp_python']}) vs "
                     f"merged model: {_agreement_line(gguf, 'merged model')}")
        for divergence in gguf["first_divergences"]:
            lines.append(f"  - question {divergence['question']}: first differing token at position "
                         f"{divergence['position']}")
        lines.append("- Ollama: `ollama create NAME -f Modelfile` in this directory.")
    else:
        lines.append(f"- GGUF: {gguf['status']}: {gguf.get('reason', '')}")
    lines.append(f"- {chat_parity_line(export_report['chat_parity'])}")
    files = export_report.get("gguf_files", {"status": "none"})
    if files["status"] == "ok":
        lines += ["", f"## GGUF files ({files['questions']} hold-out questions; {files['decoding']})", "",
                  *gguf_files_table(files["files"])]
    elif files["status"] != "none":
        lines.append(f"- Quantized GGUF files: {files['status']}: {files.get('reason', '')}")
    return "\n".join(lines) + "\n"


def export_report_html(export_report: dict, export_report_markdown: str) -> str:
    """``export_report.html``: the export's report as one offline page (``lib.html_report``): the checks of
    ``export_report_markdown`` and the GGUF files' table (``lib.gguf_export.gguf_files_cells``)."""
    items = [line[2:] for line in export_report_markdown.splitlines() if line.startswith("- ")]
    body = "<h1>Export</h1>\n" + "<ul>\n" + "".join(f"<li>{html.escape(item)}</li>\n" for item in items) + "</ul>\n"
    files = export_report.get("gguf_files", {"status": "none"})
    if files["status"] == "ok":
        header, cells = gguf_files_cells(files["files"])
        body += html_report.section(
            "GGUF files", f"<p>{html.escape(str(files['questions']))} hold-out questions; "
                          f"{html.escape(files['decoding'])}; differences against the f32 file with paired bootstrap "
                          "95% CIs.</p>\n" + html_report.table(header, [[c.replace("`", "") for c in row] for row in cells],
                                                                table_id="gguf-files"), "gguf-files-section")
    return html_report.page("philo_dataflow export", body)
