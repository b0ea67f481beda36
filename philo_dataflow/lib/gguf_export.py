"""GGUF export: llama.cpp's own converter (``convert_hf_to_gguf.py`` with the ``gguf-py`` it ships with),
greedy answers and logits of a GGUF file through llama-cpp-python, and the Ollama ``Modelfile`` of a
prompt format. Imports nothing of the package but its siblings.

The converter is not a PyPI package of its own; ``setup.sh`` extracts it, once, from the llama-cpp-python
sdist on PyPI (``vendor/llama.cpp``: the script, its ``conversion`` package, ``gguf-py``, ``LICENSE``) into
``CONVERTER_DIR``. The environment variable ``PHILO_GGUF_CONVERTER`` may name another copy (a llama.cpp
checkout, or the script in it). The converter runs in a subprocess of this Python with its own
``gguf-py`` first on ``PYTHONPATH``, so it never meets the ``gguf`` release installed from PyPI.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import jinja2
from transformers import PreTrainedTokenizerBase

from .artifacts import GGUF_CHECKED_QUESTIONS, GGUF_OUTTYPE, QUANTIZATION_TYPES  # noqa: F401  (the export's settings)
from .prompts import ALPACA, ALPACA_PROMPT, CHAT_TEMPLATE, TEMPLATE

logger = logging.getLogger(__name__)

#: Environment variable naming a converter directory (holding ``convert_hf_to_gguf.py`` and ``gguf-py``)
#: or the script itself.
CONVERTER_ENV = "PHILO_GGUF_CONVERTER"
#: Where ``setup.sh`` extracts the converter: ``.venv/share/llama.cpp-convert`` for the project's venv.
CONVERTER_DIR = Path(sys.prefix) / "share" / "llama.cpp-convert"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
_CHATML_START, _CHATML_END = "<|im_start|>", "<|im_end|>"
#: Go template (Ollama's ``TEMPLATE``) of a ChatML conversation ending on the assistant's turn.
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


class GGUFConversionError(RuntimeError):
    """llama.cpp's converter exited with an error; the message holds its last line."""


def converter_script() -> Optional[Path]:
    """The converter script to run: in ``$PHILO_GGUF_CONVERTER`` when set, else in ``CONVERTER_DIR``;
    None when there is none with its ``gguf-py`` beside it."""
    configured = os.environ.get(CONVERTER_ENV)
    candidate = Path(configured).expanduser() if configured else CONVERTER_DIR
    script = candidate / CONVERTER_SCRIPT if candidate.is_dir() else candidate
    if script.is_file() and (script.parent / "gguf-py" / "gguf").is_dir():
        return script
    return None


def converter_missing() -> Optional[str]:
    """One line saying why the converter cannot run here and how to get it; None when it can."""
    if converter_script() is None:
        configured = os.environ.get(CONVERTER_ENV)
        if configured:
            return (f"{CONVERTER_ENV}={configured!r} names no {CONVERTER_SCRIPT} with its gguf-py directory beside "
                    f"it; point it at a llama.cpp checkout (or at {CONVERTER_DIR}, which setup.sh fills), or unset it.")
        return (f"GGUF export needs llama.cpp's {CONVERTER_SCRIPT}, which is not in {CONVERTER_DIR}: run `bash setup.sh` "
                f"(it extracts the converter from the llama-cpp-python sdist on PyPI), or set {CONVERTER_ENV} to a "
                "llama.cpp checkout.")
    if importlib.util.find_spec("sentencepiece") is None:
        return f"llama.cpp's {CONVERTER_SCRIPT} needs sentencepiece: pip install sentencepiece (a dependency of philo_dataflow)."
    return None


def convert_to_gguf(model_dir: Path, outfile: Path, outtype: str = GGUF_OUTTYPE) -> None:
    """Converts the Hugging Face model directory ``model_dir`` to the GGUF file ``outfile`` with llama.cpp's
    converter, in a subprocess of this Python (its ``gguf-py`` first on ``PYTHONPATH``).

    :param outtype: the converter's ``--outtype`` (``f32``, ``f16``, ``bf16``, ``q8_0``).
    :raises GGUFConversionError: no converter (``converter_missing``'s line), or the converter failed (an
        architecture or pre-tokenizer it does not know, a full disk, say); the message holds the exception it
        ended on, else its last line.
    """
    script = converter_script()
    if script is None:
        raise GGUFConversionError(converter_missing())
    paths = [str(script.parent / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    environment.pop("NO_LOCAL_GGUF", None)
    command = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    logger.info("converting %s to GGUF (%s) with %s", model_dir, outtype, script)
    process = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if process.returncode != 0:
        lines = [line.strip() for line in (process.stdout + process.stderr).splitlines() if line.strip()]
        # The exception a traceback ends on, rather than a progress bar redrawn after it.
        raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
        last = (raised or lines)[-1][:300] if lines else "no output"
        raise GGUFConversionError(f"llama.cpp's {CONVERTER_SCRIPT} failed on {model_dir} (exit {process.returncode}): {last}")


def gguf_metadata(path: Path) -> dict:
    """What the converter recorded: ``architecture`` (llama.cpp's name), ``pre_tokenizer`` (the BPE
    pre-tokenizer it recognised; None for SentencePiece vocabularies) and ``tensors`` (count)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def text(key: str) -> Optional[str]:
        field = reader.fields.get(key)
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None

    return {"architecture": text("general.architecture"), "pre_tokenizer": text("tokenizer.ggml.pre"),
            "tensors": len(reader.tensors)}


def llama_cpp_missing() -> Optional[str]:
    """One line saying that llama-cpp-python (which loads a GGUF file back) is not installed; None when it is."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ("checking the GGUF file needs llama-cpp-python: pip install llama-cpp-python "
                "(`bash setup.sh --dev` builds it).")
    return None


def llama_cpp_version() -> Optional[str]:
    """The installed llama-cpp-python version; None when it is not installed."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_gguf(path: Path, n_ctx: int, seed: int):
    """``llama_cpp.Llama`` over the GGUF file, on the CPU, keeping the logits of every evaluated position,
    with its KV cache in f32: llama.cpp's default f16 cache rounds keys and values, and the check is of the
    converted weights, not of that rounding.

    :param n_ctx: context size in tokens (longest prompt + ``max_new_tokens``).
    """
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, seed=seed, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def greedy_continuation(llm, prompt: list[int], max_new_tokens: int, eos_token_id: Optional[int],
                        repeat_penalty: float = 1.0, end_ids: frozenset = frozenset()) -> list[int]:
    """llama.cpp's greedy continuation (temperature 0: its greedy sampler) of the token ids ``prompt``, fed
    as ids (no re-tokenizing), from an empty KV cache; up to and including ``eos_token_id`` (or any of
    ``end_ids``), at most ``max_new_tokens`` tokens. ``repeat_penalty`` is llama.cpp's (1.0: off)."""
    llm.reset()
    tokens: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=repeat_penalty,
                              reset=True):
        tokens.append(int(token))
        if token == eos_token_id or token in end_ids or len(tokens) >= max_new_tokens:
            break
    return tokens


def gguf_logits(llm, ids: list[int]):
    """llama.cpp's logits at every position of ``ids`` (one evaluation from an empty KV cache): a float32
    numpy array of shape (len(ids), n_vocab)."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def _chatml_default_system(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, Optional[str]]:
    """Whether the tokenizer's chat template renders ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per
    turn, ``<|im_start|>assistant\\n`` as the generation prompt), and the system prompt it adds to a
    conversation that has none (SmolLM2's does); found by rendering sample conversations."""
    def turn(role: str, content: str) -> str:
        return f"{_CHATML_START}{role}\n{content}{_CHATML_END}\n"

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    system, question, answer, follow_up = "\x01system\x01", "\x01question\x01", "\x01answer\x01", "\x01again\x01"
    try:
        full = render([{"role": "system", "content": system}, {"role": "user", "content": question},
                       {"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}])
        single = render([{"role": "user", "content": question}])
    except (jinja2.TemplateError, ValueError, TypeError):
        return False, None
    generation_prompt = f"{_CHATML_START}assistant\n"
    expected = turn("system", system) + turn("user", question) + turn("assistant", answer) + turn("user", follow_up)
    ending = turn("user", question) + generation_prompt
    if full != expected + generation_prompt or not single.endswith(ending):
        return False, None
    added = single[: -len(ending)]
    if not added:
        return True, None
    opening, closing = f"{_CHATML_START}system\n", f"{_CHATML_END}\n"
    if added.startswith(opening) and added.endswith(closing) and added.count(_CHATML_START) == 1:
        return True, added[len(opening) : -len(closing)]
    return False, None


def _go_literal(text: str) -> str:
    """``text`` as literal Go-template text: ``{{`` and ``}}`` become actions printing them."""
    return re.sub(r"\{\{|\}\}", lambda match: '{{ "' + match.group(0) + '" }}', text)


def _prompt_go_template(prompt_format: str, prompt_template: Optional[str]) -> tuple[str, list[str]]:
    """The Go template of a single-turn prompt format around ``{{ .Prompt }}``, and comment lines."""
    if prompt_format == ALPACA:
        before, _, after = ALPACA_PROMPT.partition("{instruction}")
        return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after), []
    if prompt_format == TEMPLATE and prompt_template:
        parts = list(string.Formatter().parse(prompt_template))
        fields = {field for _, field, _, _ in parts if field is not None}
        if len(fields) == 1:
            marked = "".join(literal + ("\x00" if field is not None else "") for literal, field, _, _ in parts)
            rendered = _go_literal(marked).replace("\x00", "{{ .Prompt }}")
            return rendered, [f"# the run's prompt_template, its field {{{fields.pop()}}} is the prompt"]
        return "{{ .Prompt }}", [f"# the run's prompt_template has the fields {sorted(fields)}: give the whole "
                                 "rendered prompt as the prompt"]
    return "{{ .Prompt }}", []


#: llama.cpp's ``repeat_penalty`` recommended (Modelfile, model card) where the run decoded with
#: ``no_repeat_ngram_size``, which llama.cpp and Ollama lack: on the main job's adapter its GGUF files loop in
#: about half their greedy answers, and 1.1 brings that back near the run's rate without losing ROUGE-L
#: (the measurement: docs/guide.md, "Export"); ``export --quantize`` measures it again per file.
NO_REPEAT_STAND_IN = 1.1


def modelfile_text(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, prompt_template: Optional[str], generation_settings: dict,
    gguf_name: str,
) -> str:
    """An Ollama ``Modelfile`` for the GGUF file ``gguf_name`` beside it: the prompt format the model was
    trained with as ``TEMPLATE`` (a ChatML chat template as a Go template over ``.Messages``, with its
    default system prompt as ``SYSTEM``; the alpaca prompt or a one-field ``prompt_template`` around
    ``.Prompt``), the end-of-turn token as ``stop``, and the run's decoding (temperature 0 for greedy).
    A chat template that is not ChatML gets no ``TEMPLATE``: Ollama then reads ``tokenizer.chat_template``
    from the GGUF file, which it recognises for the common model families."""
    lines = ["# Ollama Modelfile of the exported model (philo_dataflow): ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if prompt_format == CHAT_TEMPLATE:
        chatml, system = _chatml_default_system(tokenizer)
        if chatml:
            lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
            if system is not None:
                lines.append(f'SYSTEM """{system}"""')
            stops = [_CHATML_END] + [s for s in stops if s != _CHATML_END]
        else:
            lines.append("# the chat template is not ChatML: Ollama takes tokenizer.chat_template from the GGUF file")
    else:
        template, comments = _prompt_go_template(prompt_format, prompt_template)
        lines += comments
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if generation_settings.get("do_sample"):
        lines += [f"PARAMETER temperature {generation_settings['temperature']}",
                  f"PARAMETER top_p {generation_settings['top_p']}", f"PARAMETER top_k {generation_settings['top_k']}"]
    else:
        lines.append("PARAMETER temperature 0")
    if generation_settings.get("repetition_penalty", 1.0) != 1.0:
        lines.append(f"PARAMETER repeat_penalty {generation_settings['repetition_penalty']}")
    elif generation_settings.get("no_repeat_ngram_size"):
        lines += [f"# the run decoded with no_repeat_ngram_size={generation_settings['no_repeat_ngram_size']}, which "
                  f"llama.cpp and Ollama lack; repeat_penalty {NO_REPEAT_STAND_IN} keeps answers from looping instead",
                  f"PARAMETER repeat_penalty {NO_REPEAT_STAND_IN}"]
    return "\n".join(lines) + "\n"


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic bytes ``GGUF``."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_prompts(path: str, questions: list[str], contexts: list[str], templated: bool) -> dict:
    """The prompts a llama-cpp-python user sends the GGUF file at ``path``, as token ids, and its end tokens.

    Each prompt is rendered as ``Llama.create_chat_completion`` renders it: by the chat template embedded
    in the file (``tokenizer.chat_template``, llama-cpp-python's ``Jinja2ChatFormatter``) over the
    question's earlier turns (``contexts``, JSON messages) and the question, tokenized with special tokens
    (BOS added unless the template wrote it). When ``templated`` (the questions are already rendered by a
    ``prompt_template``) or the file embeds no chat template, the question text is the prompt (Alpaca's
    wording when there is no template), after BOS.

    :return: ``{"prompts": [[id, ...], ...], "prompt_format": "chat_template" | "template" | "alpaca",
        "eos": id, "end_ids": frozenset}`` (``end_ids``: llama.cpp's end-of-generation tokens,
        ``llama_vocab_is_eog``, where its chat completion stops).
    :raises ValueError: llama.cpp cannot load the file; a question with earlier turns but no chat template.
    """
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        with native_log_captured():  # a vocabulary-only context warns of a training context of 0
            vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: llama.cpp cannot load it ({str(error).splitlines()[0][:160]}); give a GGUF "
                         "model file.") from None
    try:
        eos, bos = vocab.token_eos(), vocab.token_bos()
        template = vocab.metadata.get("tokenizer.chat_template")
        prompt_format = TEMPLATE if templated else CHAT_TEMPLATE if template else ALPACA
        formatter = Jinja2ChatFormatter(template=template,
                                        eos_token=vocab._model.token_get_text(eos) if eos != -1 else "",
                                        bos_token=vocab._model.token_get_text(bos) if bos != -1 else "",
                                        stop_token_ids=[eos]) if prompt_format == CHAT_TEMPLATE else None
        prompts = []
        for number, (question, context) in enumerate(zip(questions, contexts), start=1):
            earlier = json.loads(context) if context else []
            if formatter is not None:
                rendered = formatter(messages=[*earlier, {"role": "user", "content": question}])
                prompts.append(vocab.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special,
                                              special=True))
                continue
            if earlier:
                raise ValueError(f"{path}: question {number} has earlier turns but the file embeds no chat template; "
                                 "give single-turn questions.")
            text = question if prompt_format == TEMPLATE else ALPACA_PROMPT.format(instruction=question)
            prompts.append(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        end_ids = frozenset(token for token in range(vocab.n_vocab())
                            if llama_cpp.llama_vocab_is_eog(vocab._model.vocab, token))
    finally:
        vocab.close()
    return {"prompts": prompts, "prompt_format": prompt_format, "eos": eos, "end_ids": end_ids}


def gguf_answers(path: str, questions: list[str], contexts: list[str], max_new_tokens: int, templated: bool,
                 seed: int, repeat_penalty: float = 1.0) -> tuple[list[dict], str]:
    """Greedy answers of the GGUF file at ``path`` through llama.cpp, as a llama-cpp-python user gets them:
    the prompts of ``gguf_prompts``, llama.cpp's greedy sampler with ``repeat_penalty`` (1.0: off;
    ``greedy_continuation``), up to an end-of-generation token or ``max_new_tokens``.

    :return: ``(generations, prompt_format)``: one dict per question, ``text`` (detokenized without
        special tokens, stripped), ``token_ids`` (up to and including the end token), ``ended_on_eos``;
        ``prompt_format`` is ``gguf_prompts``'.
    :raises ValueError: see ``gguf_prompts``.
    """
    import llama_cpp

    rendered = gguf_prompts(path, questions, contexts, templated)
    prompts, eos, end_ids = rendered["prompts"], rendered["eos"], rendered["end_ids"]
    n_ctx = max((len(prompt) for prompt in prompts), default=1) + max_new_tokens + 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, seed=seed, verbose=False)
    try:
        generations = []
        for prompt in prompts:
            tokens = greedy_continuation(llm, prompt, max_new_tokens, eos, repeat_penalty, end_ids)
            ended = bool(tokens) and tokens[-1] in end_ids | {eos}
            text = llm.detokenize(tokens[:-1] if ended else tokens).decode("utf-8", errors="replace")
            generations.append({"text": text.strip(), "token_ids": tokens, "ended_on_eos": ended})
    finally:
        llm.close()
    return generations, rendered["prompt_format"]


@contextlib.contextmanager
def native_log_captured():
    """Sends what native code (llama.cpp) writes to the process's stderr into a temporary file for the
    duration, so it stays off the terminal; yields a list that holds those lines, stripped, on exit."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines += [line.strip() for line in log.read().decode("utf-8", errors="replace").splitlines() if line.strip()]


def quantized_gguf_file(quantization: str) -> str:
    """The file name of a quantized copy: ``model.q4_k_m.gguf`` beside ``model.gguf``."""
    return f"model.{quantization}.gguf"


def quantization_problems(quantize: str) -> list[str]:
    """Problems of ``--quantize`` (comma-separated ``QUANTIZATION_TYPES``), one line each; none for ``""``."""
    names = [name.strip().lower() for name in quantize.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUANTIZATION_TYPES]
    if unknown:
        return [f"--quantize {quantize}: unknown type(s) {', '.join(unknown)}; use some of "
                f"{', '.join(QUANTIZATION_TYPES)} (llama.cpp's names), comma-separated."]
    return []


def quantize_gguf(source: Path, outfile: Path, quantization: str, threads: int = 0) -> None:
    """Writes ``outfile``, a ``quantization`` copy (``QUANTIZATION_TYPES``) of the GGUF file ``source``, with
    llama.cpp's own quantizer (``llama_model_quantize``, through llama-cpp-python's bindings), its log kept
    off the terminal.

    :param threads: quantizer threads (0: llama.cpp's choice).
    :raises GGUFConversionError: the quantizer failed; the message holds its last log line.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}")
    params.nthread = threads
    with native_log_captured() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), params)
    if status != 0:
        raise GGUFConversionError(f"llama.cpp's quantizer failed on {source} ({quantization}, status {status}): "
                                  f"{lines[-1][:300] if lines else 'no log'}")


def gguf_files_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of ``stages.exporting.gguf_files_report``'s files: size, speed, identical answers,
    and ROUGE-L, EOS-stop and loop rate with the paired bootstrap 95% CI of the difference against the f32
    file (and, where measured, ROUGE-L and loops with the Modelfile's ``repeat_penalty``)."""
    def cell(row: dict, key: str, percent: bool) -> str:
        value = f"{row[key]:.0%}" if percent else f"{row[key]:.3f}"
        if f"{key}_difference" not in row:
            return value
        d = row[f"{key}_difference"]
        if percent:
            return f"{value} ({d['mean'] * 100:+.0f} [{d['ci95_low'] * 100:+.0f}, {d['ci95_high'] * 100:+.0f}] points)"
        return f"{value} ({d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}])"

    penalty = next((row["with_repeat_penalty"]["repeat_penalty"] for row in rows if "with_repeat_penalty" in row), None)
    header = ["file", "size", "new tokens/s", "answers identical to f32", "ROUGE-L (vs f32)", "ends on EOS (vs f32)",
              "loops (vs f32)", *([f"ROUGE-L / loops with repeat_penalty {penalty}"] if penalty is not None else [])]
    cells = []
    for row in rows:
        penalised = row.get("with_repeat_penalty")
        extra = ([f"{penalised['rougeL']:.3f} / {penalised['loop_rate']:.0%}" if penalised else "—"]
                 if penalty is not None else [])
        cells.append([f"`{row['file']}` ({row['type']})", f"{row['bytes'] / 2**20:.0f} MiB",
                      f"{row['new_tokens_per_second']:.0f}", f"{row['identical_share']:.0%}", cell(row, "rougeL", False),
                      cell(row, "eos_stop_rate", True), cell(row, "loop_rate", True), *extra])
    return header, cells


def gguf_files_table(rows: list[dict]) -> list[str]:
    """``gguf_files_cells`` as Markdown table lines."""
    header, cells = gguf_files_cells(rows)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in cells)]


def chat_parity_line(parity: dict) -> str:
    """One line of ``stages.exporting.gguf_chat_parity``'s result."""
    if parity["status"] != "ok":
        return f"Chat template parity: {parity['status']}: {parity.get('reason', '')}"
    line = (f"Chat template parity: the GGUF file's embedded template (llama-cpp-python's chat formatter) gives "
            f"the training prompt's token ids for {parity['identical_prompts']} of {parity['questions']} hold-out "
            f"questions; llama.cpp {'stops' if parity['stops_on_end_of_turn'] else 'does NOT stop'} at the "
            f"end-of-turn token {parity['end_of_turn']!r}.")
    if parity["first_mismatches"]:
        line += " Differing: " + ", ".join(f"question {m['question']} token {m['position']}"
                                           for m in parity["first_mismatches"])
    return line
