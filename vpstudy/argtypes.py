"""Argument types shared by the command lines (``vpstudy`` and ``python -m vpstudy.bench.*``).

Each raises ``argparse.ArgumentTypeError``, which argparse reports in one line naming the option,
so an out-of-range value is refused before anything is loaded or written.
"""

from __future__ import annotations

import argparse

# Fewer bootstrap replicates or permutations than this give a 95% interval whose ends are the
# extreme replicates and a permutation p-value that cannot go below 0.05.
MIN_RESAMPLES = 20


def positive(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def resamples(text: str) -> int:
    """A number of bootstrap replicates or permutations (an integer >= :data:`MIN_RESAMPLES`)."""
    value = _integer(text)
    if value < MIN_RESAMPLES:
        raise argparse.ArgumentTypeError(
            f"must be >= {MIN_RESAMPLES} (fewer make the 95% interval and p-values meaningless), got {value}"
        )
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    value = _integer(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {value}")
    return value


def share(text: str) -> float:
    """A number strictly between 0 and 1 (e.g. a hold-out share)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def ratio(text: str) -> float:
    """A keep ratio or budget: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_number(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def threshold(text: str) -> str:
    """An activity threshold δ: a finite number >= 0 or ``k/Nv`` (returned as given)."""
    from .rules import Threshold, ThresholdError

    try:
        Threshold.parse(text)
    except ThresholdError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device(text: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    from .loading import ModelLoadError, resolve_device

    try:
        return str(resolve_device(text))
    except ModelLoadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def layer_list(text: str) -> list[int]:
    """Layer indices like ``0,5,17`` (or space-separated; negative ones count from the end)."""
    try:
        layers = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,1,5', got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer index, like '0,1,5'")
    return layers


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
