"""The chat page of a finished run (``philo-dataflow chat``): one question answered by the base and the fine-tuned
model side by side, streamed token by token, with the run's generation settings adjustable and, where
the run's hold-out predictions sit beside its adapter, the hold-out questions of each category offered as
examples with their reference answers.

Not a stage module: the models are loaded through the dataflow's own ``start="presaved"`` nodes
(``load_chat_models``), and the prompt is rendered by ``lib.prompts.prompt_token_ids`` with the run's
``prompt_format`` (and ``prompt_template``), exactly as in training. The page is served on the local
machine only and loads nothing from outside it: no Gradio analytics, no share link, system fonts.
"""

import contextlib
import json
import logging
import os
import re
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

# Before gradio is imported: it reads this at import, and would otherwise report usage and check its version.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .dataflow import build_driver, resolved_config  # noqa: E402
from .lib.artifacts import PREDICTIONS_JSONL_FILE  # noqa: E402
from .lib.generation import GREEDY, generation_config  # noqa: E402
from .lib.inputs import BY_NAME, DEFAULTS, hyperparameter_problems  # noqa: E402
from .lib.prompts import prompt_token_ids  # noqa: E402
from .lib.records import UNKNOWN_CATEGORY  # noqa: E402
from .lib.trainer import ready_for_generation  # noqa: E402

logger = logging.getLogger(__name__)

#: The generation settings the page shows, in its order (inputs-table names; defaults from the manifest).
SETTING_NAMES = ("max_new_tokens", *GREEDY)
#: System fonts only: Gradio's font files or Google Fonts would be a request the page does not need.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
#: The ``elem_id`` of the page's parts (the browser test finds them by it).
ELEMENT_IDS = {
    "question": "question", "ask": "ask", "base": "base-answer", "finetuned": "finetuned-answer",
    "status": "status", "category": "category", "example": "example", "reference": "reference",
}
#: First word of the status line once both answers are complete.
DONE = "Done"


@dataclass
class ChatModels:
    """What the page answers with, loaded from a run's adapter directory (``load_chat_models``).

    :param finetuned_model: the fine-tuned model (a ``PeftModel`` for a LoRA run), in eval mode.
    :param base_answer_model: the base model's answers: with LoRA the same object as ``finetuned_model``,
        generating with its adapter disabled; with full fine-tuning the untouched base weights.
    :param prompt_format: ``lib.prompts.PROMPT_FORMATS``, as in training.
    :param prompt_template: the run's ``prompt_template`` (None: none); its rendering is the question.
    :param manifest: the run's manifest (``lib.artifacts.MANIFEST_FILE``).
    :param model_dir: the adapter directory.
    """

    finetuned_model: PreTrainedModel
    base_answer_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt_format: str
    prompt_template: Optional[str]
    manifest: dict
    model_dir: str
    #: One generation at a time: with LoRA both answers come from one model, whose adapter is switched off
    #: for the base answer.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def default_settings(self) -> dict:
        """The run's generation settings (``SETTING_NAMES``, from the manifest's inputs; the inputs table's
        defaults where a manifest lacks one)."""
        recorded = self.manifest.get("inputs", {})
        return {name: DEFAULTS[name] if recorded.get(name) is None else recorded[name] for name in SETTING_NAMES}

    @property
    def seed(self) -> int:
        """The run's ``seed``: sampled answers are seeded with it, as the run's own were."""
        seed = self.manifest.get("inputs", {}).get("seed")
        return DEFAULTS["seed"] if seed is None else seed


def load_chat_models(model_dir: str) -> ChatModels:
    """The models, tokenizer and prompt format of the run whose adapter directory is ``model_dir``,
    loaded by the dataflow's ``start="presaved"`` nodes (LoRA or full fine-tuning, as its manifest says);
    no data file is read.

    :raises ValueError: the directory holds no manifest or no loadable adapter or model (the nodes'
        messages, naming ``presaved_model_dir`` and what to do).
    """
    inputs = {"presaved_model_dir": model_dir}
    driver = build_driver(resolved_config({"start": "presaved", "presaved_model_dir": model_dir}))
    loaded = driver.execute(
        ["trainable_model", "tokenizer", "prompt_format", "prompt_template_in_use", "presaved_manifest", "device"],
        inputs=inputs,
    )
    finetuned = ready_for_generation(loaded["trainable_model"])
    # ``finetuned_model`` is the trainer's output, which would evaluate on a data set first; given here,
    # ``base_answer_model`` resolves as in a run: the same model (LoRA) or the base weights loaded (full).
    overrides = {"finetuned_model": finetuned, "presaved_manifest": loaded["presaved_manifest"],
                 "device": loaded["device"]}
    base = driver.execute(["base_answer_model"], inputs=inputs, overrides=overrides)["base_answer_model"]
    return ChatModels(
        finetuned_model=finetuned, base_answer_model=base.eval(), tokenizer=loaded["tokenizer"],
        prompt_format=loaded["prompt_format"], prompt_template=loaded["prompt_template_in_use"],
        manifest=loaded["presaved_manifest"], model_dir=model_dir,
    )


def hold_out_examples(model_dir: str) -> list[dict]:
    """The hold-out questions of the run whose adapter directory is ``model_dir``, from its
    ``hold_out_predictions.jsonl`` in the directory above (``[]`` when there is none or it cannot be
    read): one dict per question with ``question`` (the rendered prompt text), ``category`` and
    ``reference``, in file order."""
    path = Path(model_dir).resolve().parent / PREDICTIONS_JSONL_FILE
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [{"question": row["question"], "category": row.get("category") or UNKNOWN_CATEGORY,
                 "reference": row.get("reference") or ""} for row in rows]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("%s cannot be read (%s): no example questions", path, error)
        return []


def categories_of(examples: list[dict]) -> list[str]:
    """The categories of ``examples`` in order of first appearance; ``[]`` when the data had none (every
    example ``"unknown"``)."""
    found = list(dict.fromkeys(example["category"] for example in examples))
    return [] if found in ([], [UNKNOWN_CATEGORY]) else found


def template_fields(prompt_template: Optional[str]) -> list[str]:
    """The record keys a ``prompt_template`` names, in order of first use (``["question"]`` without a
    template: the page's one question box)."""
    if not prompt_template:
        return ["question"]
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(prompt_template) if name))


def rendered_question(prompt_template: Optional[str], values: dict) -> str:
    """The question the model is given: ``values["question"]`` without a template, else the template
    rendered with ``values`` (empty when every value is, as loading drops such records)."""
    if not prompt_template:
        return values.get("question", "")
    return prompt_template.format_map(values) if any(values.values()) else ""


def template_values(prompt_template: Optional[str], question: str) -> Optional[dict]:
    """The values of ``template_fields`` that render to ``question`` (a hold-out question is the
    rendered template); None when ``question`` is not a rendering of the template."""
    if not prompt_template:
        return {"question": question}
    pattern, groups = "", {}
    for literal, name, _, _ in string.Formatter().parse(prompt_template):
        pattern += re.escape(literal)
        if name:
            if name in groups:
                pattern += f"(?P=g{groups[name]})"
            else:
                groups[name] = len(groups)
                pattern += f"(?P<g{groups[name]}>.*?)"
    match = re.fullmatch(pattern, question, flags=re.DOTALL)
    return {name: match.group(f"g{index}") for name, index in groups.items()} if match else None


def settings_problems(settings: dict) -> list[str]:
    """Why ``settings`` (``SETTING_NAMES`` -> value) cannot be generated with: an empty or non-integer
    value, or one outside the inputs table's rule; ``[]`` when they can."""
    problems = []
    for name in SETTING_NAMES:
        value = settings.get(name)
        if value is None:
            problems.append(f"{name} is empty; type a value.")
        elif BY_NAME[name].kind is int and not float(value).is_integer():
            problems.append(f"{name}={value!r}: must be an integer.")
    if problems:
        return problems
    return [problem.message for problem in hyperparameter_problems(_typed(settings))]


def _typed(settings: dict) -> dict:
    """``settings`` with each value of the inputs table's type (a form's numbers arrive as floats)."""
    return {name: BY_NAME[name].kind(settings[name]) for name in SETTING_NAMES}


def _prompt_ids(models: ChatModels, question: str, max_new_tokens: int) -> tuple[list[int], int]:
    """The question's prompt token ids, rendered as in training, and how many of its oldest tokens were
    cut so that prompt and answer fit the model's context (as the run's own predictions do)."""
    ids = prompt_token_ids(models.tokenizer, models.prompt_format, question)
    config = models.finetuned_model.config
    context_length = getattr(config, "max_position_embeddings", None)
    if not context_length or getattr(config, "is_encoder_decoder", False):
        return ids, 0
    room = max(context_length - max_new_tokens, 1)
    return ids[-room:], max(len(ids) - room, 0)


class _Stop(StoppingCriteria):
    """Stops generation once ``event`` is set (the page was left mid-answer)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _streamed_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int],
                     max_new_tokens: int, settings: dict, seed: int, use_adapter: bool
                     ) -> Iterator[tuple[str, Optional[dict]]]:
    """One answer as it is generated: ``(text so far, None)`` per streamed piece, then ``(text, outcome)``
    with the text decoded from the generated ids exactly as ``lib.generation.generate_answers`` decodes
    it, and ``outcome`` = ``{"new_tokens", "ended_on_eos"}``. Same decoding as ``generate_answers`` on
    one prompt: left-padded batch of one, ``generation_config(settings)``, sampling seeded with ``seed``.
    Generation runs in a thread, streamed by transformers' ``TextIteratorStreamer``; closing the iterator
    stops it after the next token."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    outcome: dict = {}
    config = generation_config(tokenizer, max_new_tokens, settings)
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": [prompt]}, padding_side="left", return_tensors="pt").to(device)  # (1, prompt_len)

    def generate() -> None:
        try:
            with torch.inference_mode():
                outcome["output"] = model.generate(**batch, generation_config=config, streamer=streamer,
                                                   stopping_criteria=StoppingCriteriaList([_Stop(stop)]))
        except BaseException as error:  # re-raised below, in the page's thread
            outcome["error"] = error
            streamer.end()

    adapter_off = model.disable_adapter() if not use_adapter and isinstance(model, PeftModel) else contextlib.nullcontext()
    with adapter_off:
        if config.do_sample:
            torch.manual_seed(seed)
        worker = threading.Thread(target=generate, name="chat-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text.strip(), None
        finally:
            stop.set()
            worker.join()
    if "error" in outcome:
        raise outcome["error"]
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    start = 1 if encoder_decoder else batch["input_ids"].shape[1]  # decoder start token / the prompt
    tokens = outcome["output"][0, start:].tolist()  # (<= max_new_tokens,)
    ended = tokenizer.eos_token_id in tokens
    tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1] if ended else tokens
    yield tokenizer.decode(tokens, skip_special_tokens=True).strip(), {"new_tokens": len(tokens), "ended_on_eos": ended}


def _outcome_text(outcome: dict) -> str:
    ending = "ended on EOS" if outcome["ended_on_eos"] else "stopped at max_new_tokens"
    return f"{outcome['new_tokens']} tokens, {ending}"


def stream_answers(models: ChatModels, question: str, settings: Optional[dict] = None) -> Iterator[tuple[str, str, str]]:
    """The base and the fine-tuned answer to ``question`` as they are generated: the base answer first,
    then the fine-tuned one (with LoRA both come from one model, which cannot generate twice at once).

    :param question: the question as the model is given it (with a prompt template, its rendering:
        ``rendered_question``); rendered with the run's prompt format as in training.
    :param settings: ``SETTING_NAMES`` -> value; missing ones are the run's (``default_settings``).
    :return: an iterator of ``(base answer so far, fine-tuned answer so far, status line)``; the last
        status line starts with ``DONE`` and the last texts equal ``lib.generation.generate_answers``'s.
    :raises ValueError: an empty question or settings out of range (``settings_problems``' lines).
    """
    settings = {**models.default_settings, **(settings or {})}
    problems = settings_problems(settings)
    if not question.strip():
        problems.insert(0, "The question is empty; type one.")
    if problems:
        raise ValueError("\n".join(problems))
    settings = _typed(settings)
    max_new_tokens = settings.pop("max_new_tokens")
    decoding = "sampled" if settings["do_sample"] else "greedy"
    with models.lock:
        prompt, cut = _prompt_ids(models, question, max_new_tokens)
        note = f" The prompt's first {cut} tokens were cut to fit the model's context." if cut else ""
        base = finetuned = ""
        for base, base_outcome in _streamed_answer(models.base_answer_model, models.tokenizer, prompt, max_new_tokens,
                                                   settings, models.seed, use_adapter=False):
            yield base, "", f"Generating the base answer ({decoding})…{note}"
        for finetuned, finetuned_outcome in _streamed_answer(models.finetuned_model, models.tokenizer, prompt,
                                                             max_new_tokens, settings, models.seed, use_adapter=True):
            yield base, finetuned, f"Generating the fine-tuned answer ({decoding})…{note}"
    yield base, finetuned, (f"{DONE} ({decoding}): base {_outcome_text(base_outcome)}; fine-tuned "
                            f"{_outcome_text(finetuned_outcome)}.{note}")


def _page_intro(models: ChatModels, examples: list[dict], fields: list[str]) -> str:
    inputs = models.manifest.get("inputs", {})
    method = models.manifest.get("finetuning_method", "lora")
    base_how = ("the same weights with the LoRA adapter disabled" if method == "lora"
                else "the untouched base weights")
    lines = [
        "# Base vs fine-tuned",
        f"Base model `{inputs.get('model_id')}`, fine-tuned ({method}) in `{models.model_dir}`. The base answer "
        f"comes from {base_how}; it is generated first, then the fine-tuned one.",
        f"The question is rendered exactly as in training (prompt format `{models.prompt_format}`"
        + (f", template `{models.prompt_template!r}`" if models.prompt_template else "") + ").",
    ]
    category_key = inputs.get("category_key") or "category"
    if models.prompt_template and category_key in fields:
        lines.append(f"This run's prompt template includes `{{{category_key}}}`: the category is part of the prompt.")
    elif categories_of(examples):
        lines.append(f"The category (`{category_key}`) only picks example questions from the run's hold-out set: "
                     "**the category is not part of the prompt**; the models see the question alone.")
    return "\n\n".join(lines)


def build_chat_app(models: ChatModels, examples: list[dict]) -> gr.Blocks:
    """The page: question (one box per template field with a prompt template), the base and the fine-tuned
    answers side by side, a status line, the generation settings (the run's, adjustable) and, with
    ``examples`` (``hold_out_examples``), a category dropdown (where the data had categories) and the
    category's hold-out questions, picking one filling the question and showing its reference answer.
    Launch it with ``launch_chat_app``."""
    fields = template_fields(models.prompt_template)
    categories = categories_of(examples)
    first_category = categories[0] if categories else None

    def examples_in(category: Optional[str]) -> list[dict]:
        return [example for example in examples if category is None or example["category"] == category]

    with gr.Blocks(title="philo_dataflow chat", analytics_enabled=False) as app:
        gr.Markdown(_page_intro(models, examples, fields), latex_delimiters=[])
        with gr.Row():
            category = gr.Dropdown(categories, value=first_category, label="Category (not part of the prompt)",
                                   elem_id=ELEMENT_IDS["category"], visible=bool(categories), scale=1)
            example = gr.Dropdown([example["question"] for example in examples_in(first_category)], value=None,
                                  type="index", label="Hold-out question (fills the question box)",
                                  elem_id=ELEMENT_IDS["example"], visible=bool(examples), scale=3)
        question_boxes = [
            gr.Textbox(label="Question" if name == "question" and not models.prompt_template else f"{{{name}}}",
                       lines=3, elem_id=ELEMENT_IDS["question"] if position == 0 else f"field-{name}",
                       placeholder="Ask something the data set is about" if position == 0 else None)
            for position, name in enumerate(fields)
        ]
        reference = gr.Textbox(label="Reference answer (hold-out set)", lines=3, interactive=False,
                               elem_id=ELEMENT_IDS["reference"], visible=bool(examples))
        ask = gr.Button("Ask both models", variant="primary", elem_id=ELEMENT_IDS["ask"])
        with gr.Row(equal_height=True):
            base = gr.Textbox(label="Base model", lines=10, interactive=False, elem_id=ELEMENT_IDS["base"])
            finetuned = gr.Textbox(label="Fine-tuned model", lines=10, interactive=False,
                                   elem_id=ELEMENT_IDS["finetuned"])
        status = gr.Markdown("Type a question and press **Ask both models**.", elem_id=ELEMENT_IDS["status"],
                             latex_delimiters=[])
        with gr.Accordion("Generation settings (the run's own; greedy unless do_sample)", open=True):
            defaults = models.default_settings
            controls = []
            with gr.Row():
                for name in SETTING_NAMES:
                    spec, elem_id = BY_NAME[name], f"setting-{name}"
                    if spec.kind is bool:
                        controls.append(gr.Checkbox(bool(defaults[name]), label=name, info=spec.help, elem_id=elem_id))
                    else:
                        controls.append(gr.Number(defaults[name], label=name, info=spec.help, elem_id=elem_id,
                                                  precision=0 if spec.kind is int else None, min_width=160))

        def answers(*values):
            field_values = dict(zip(fields, values[: len(fields)]))
            settings = dict(zip(SETTING_NAMES, values[len(fields):]))
            try:
                yield from stream_answers(models, rendered_question(models.prompt_template, field_values), settings)
            except ValueError as error:
                yield "", "", "  \n".join(str(error).splitlines())
            except Exception as error:  # the page stays up; the terminal gets the traceback
                logger.exception("generation failed")
                yield "", "", f"Generation failed: {type(error).__name__}: {error}"

        def category_picked(picked: Optional[str]):
            return gr.Dropdown(choices=[item["question"] for item in examples_in(picked)], value=None), ""

        def example_picked(category_value: Optional[str], index: Optional[int]):
            if index is None:
                return (*(gr.Textbox() for _ in fields), gr.Textbox())
            chosen = examples_in(category_value if categories else None)[index]
            values = template_values(models.prompt_template, chosen["question"])
            if values is None:
                logger.warning("hold-out question %r does not render from the prompt template", chosen["question"][:80])
                values = {}
            return (*(gr.Textbox(value=values.get(name, "")) for name in fields), chosen["reference"])

        run_inputs = [*question_boxes, *controls]
        outputs = [base, finetuned, status]
        ask.click(answers, run_inputs, outputs, concurrency_limit=1, show_progress="minimal")
        question_boxes[0].submit(answers, run_inputs, outputs, concurrency_limit=1, show_progress="minimal")
        category.change(category_picked, [category], [example, reference])
        example.change(example_picked, [category, example], [*question_boxes, reference])
        for box in question_boxes:
            box.input(lambda: "", None, [reference])  # an edited question has no reference answer
    return app


def launch_chat_app(app: gr.Blocks, host: str, port: int) -> str:
    """Starts serving ``app`` on ``host:port`` in the background until ``app.close()``: never a share link,
    no server-side rendering, no run history, the system-font ``THEME``.

    :return: the page's URL.
    :raises OSError: the port cannot be listened on.
    """
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, quiet=True, ssr_mode=False, theme=THEME,
               inbrowser=False, show_error=False, prevent_thread_lock=True,
               # run history could be sent to a Hugging Face bucket; the footer links to local pages only
               run_history=False, footer_links=["api", "settings"])
    return f"http://{host}:{port}/"
