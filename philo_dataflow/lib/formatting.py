"""Number and text formatting shared by the reports."""

import math
from typing import Optional


def fmt(value: Optional[float], digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``"n/a"`` for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def pct(value: float) -> str:
    """``value`` (a share, 0–1) as a whole percentage; ``"n/a"`` for NaN."""
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(text.split())
