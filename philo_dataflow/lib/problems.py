"""The validation vocabulary every stage shares: a ``Problem`` with a run's inputs, the ``InputProblems``
error that carries several of them, the ``Rule`` an input's values must follow, and the helpers that keep
messages about many records short. Imports nothing of the package."""

import math
from dataclasses import dataclass
from typing import Any, Optional

#: Records named in one problem message at most; the others are counted.
MAX_LISTED_RECORDS = 10


def flag(name: str) -> str:
    """The ``philo-dataflow`` flag of an input: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Problem:
    """One problem with a run's inputs.

    :param input: the input it concerns (``data_path``, ``learning_rate``...; see ``flag``).
    :param message: one line: what is wrong, where (file, record, key, input) and what to do.
    """

    input: str
    message: str

    def __str__(self) -> str:
        return self.message


class InputProblems(ValueError):
    """Every problem found with a run's inputs (``problems``, a list of ``Problem``); the message has one
    line per problem."""

    def __init__(self, problems: list):
        self.problems = list(problems)
        super().__init__("\n".join(problem.message for problem in self.problems))


def problems_of(input_name: str, error: Exception) -> list:
    """A ValueError of a stage's own check as problems of ``input_name``, one per line of its message."""
    if isinstance(error, InputProblems):
        return list(error.problems)
    return [Problem(input_name, line) for line in str(error).splitlines() if line.strip()]


@dataclass(frozen=True)
class Rule:
    """The values an input accepts.

    :param kind: ``int`` (integers only), ``float`` (any finite real number) or ``str``.
    :param low: smallest value (``low_open``: excluded), None for no bound.
    :param high: largest value (``high_open``: excluded), None for no bound.
    :param optional: None is accepted too (the input is unset, or the feature off).
    :param choices: for ``str``, the accepted values; empty accepts any non-empty string.
    """

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple = ()

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is str:
            return isinstance(value, str) and bool(value.strip()) and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        if self.kind is str:
            text = f"one of {list(self.choices)}" if self.choices else "a non-empty string"
        else:
            text = "an integer" if self.kind is int else "a number"
            low, high = (f"{bound:.15g}" if bound is not None else None for bound in (self.low, self.high))
            if low is not None and high is not None:
                text += f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            elif low is not None:
                text += f" {'>' if self.low_open else '>='} {low}"
        return text + (", or unset" if self.optional else "")


def listed(indices: list) -> str:
    """``"3, 7, 9"``: the first ``MAX_LISTED_RECORDS`` indices, then ``", ..."`` when there are more."""
    shown = ", ".join(str(index) for index in indices[:MAX_LISTED_RECORDS])
    return shown + (", ..." if len(indices) > MAX_LISTED_RECORDS else "")


def capped_lines(lines: list, noun: str = "records") -> list:
    """The first ``MAX_LISTED_RECORDS`` of ``lines`` (one problem each), then one line counting the rest."""
    if len(lines) <= MAX_LISTED_RECORDS:
        return list(lines)
    return [*lines[:MAX_LISTED_RECORDS], f"... and {len(lines) - MAX_LISTED_RECORDS} more {noun} with such a problem."]
