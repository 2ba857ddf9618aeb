"""Pluggable answer scoring: is a generated text a correct answer to an example?

Contract. A :class:`Scorer` is a small frozen dataclass with a registry ``name`` and

    score(generated, reference, choices=None) -> bool | None

``generated`` is the model's whole generated text; every scorer reads only its *final answer*,
:func:`vpstudy.scoring.final_answer` (the words after the last ``answer`` word, or the whole
text when there is none). ``reference`` is the example's answer; when it is None the result is
None (unscorable), otherwise a bool. ``choices`` are the example's options (used only by
:class:`MultipleChoice`). Scorers are pure and never raise on model output; malformed output is
simply wrong. ``scorer(generated, reference, choices)`` is the same as ``scorer.score(...)`` and
``scorer.score_example(generated, example)`` takes them from a :class:`~vpstudy.datasets.Example`.

Scorers (registry names in :data:`SCORERS`, built by :func:`get_scorer`):

- ``exact_match`` (:class:`ExactMatch`): :func:`vpstudy.scoring.is_correct`, unchanged.
- ``multiple_choice`` (:class:`MultipleChoice`): the option the answer picks, by letter or text.
- ``numeric_tolerance`` (:class:`NumericTolerance`): first number of the answer vs the reference.
- ``relaxed_accuracy`` (:class:`RelaxedAccuracy`): ChartQA relaxed accuracy (5% for numbers).

Numbers (:func:`parse_number`): optional sign (``-``, ``+`` or U+2212), ASCII digits with
optional thousands commas in groups of three (``1,234,567``), then optionally ``.digits``
(``-3.5``) *or* ``/digits`` for a fraction of integers (``3/4``; zero denominator is no number);
a trailing ``%`` divides by 100 (``12%`` is 0.12, as in the ChartQA metric). A number must not
follow a letter, digit, ``_``, ``.``, ``,``, ``/`` or sign (so ``d3``, ``v1.2`` and ``x-3``
have none) and must not be followed by a digit or by ``.``, ``,`` or ``/`` plus a digit (so
``1.2.3``, ``12,5`` and ``1/2/2020`` have none); letters may follow (``3rd``, ``12kg``).
Exponents and leading-dot decimals (``.5``) are not supported. Values are exact
:class:`~fractions.Fraction` s, so tolerance boundaries are exact (1.05 is within 5% of 1).
"""

from __future__ import annotations

import math
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar
from .errors import VpstudyError


if TYPE_CHECKING:
    from .datasets import Example

__all__ = [
    "SCORERS", "ExactMatch", "MultipleChoice", "NumericTolerance", "RelaxedAccuracy", "Scorer", "ScoringError",
    "final_answer", "get_scorer", "is_correct", "normalize_answer", "parse_number", "read_option",
]  # fmt: skip


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (exact-match scoring)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def final_answer(generated: str) -> str:
    """The final answer of a generated trace: the words after its last ``answer`` word, or the
    whole text when it has none (a model that answers directly)."""
    words = generated.split()
    marks = [i for i, w in enumerate(words) if normalize_answer(w) == "answer"]
    return " ".join(words[marks[-1] + 1 :]) if marks else generated


def is_correct(generated: str, reference: str | None) -> bool | None:
    """Exact match of :func:`final_answer` with the reference after :func:`normalize_answer`;
    None when the example has no reference."""
    if reference is None:
        return None
    return normalize_answer(final_answer(generated)) == normalize_answer(reference)


class ScoringError(VpstudyError):
    """An unknown scorer, an unknown setting or a bad setting value."""


class Scorer(ABC):
    """Base of all scorers: ``score`` returns None without a reference, else ``_match``'s bool."""

    name: ClassVar[str]

    def score(self, generated: str, reference: str | None, choices: Sequence[str] | None = None) -> bool | None:
        """Whether ``generated`` answers ``reference`` correctly; None when there is no reference."""
        if reference is None:
            return None
        return self._match(generated, reference, choices)

    def __call__(self, generated: str, reference: str | None, choices: Sequence[str] | None = None) -> bool | None:
        return self.score(generated, reference, choices)

    def score_example(self, generated: str, example: Example) -> bool | None:
        """:meth:`score` with the example's ``answer`` and ``choices``."""
        return self.score(generated, example.answer, example.choices)

    @abstractmethod
    def _match(self, generated: str, reference: str, choices: Sequence[str] | None) -> bool: ...


# ---------------------------------------------------------------------------------------------- numbers

_SIGNS = "+\u2212-"  # "-" last: literal inside a character class
_NUMBER = re.compile(
    rf"(?<![\w.,/{_SIGNS}])(?P<sign>[{_SIGNS}])?(?P<int>[0-9]{{1,3}}(?:,[0-9]{{3}})+|[0-9]+)"
    r"(?:\.(?P<dec>[0-9]+)|/(?P<den>[0-9]+))?(?P<pct>%)?(?![0-9]|[.,/][0-9])"
)


def parse_number(text: str, *, whole: bool = False) -> Fraction | None:
    """The first number in ``text`` (syntax in the module docstring), or None. With ``whole``,
    ``text`` stripped of surrounding white space must be exactly one number."""
    match = _NUMBER.fullmatch(text.strip()) if whole else _NUMBER.search(text)
    if match is None:
        return None
    digits = match["int"].replace(",", "")
    if match["den"] is not None:
        if int(match["den"]) == 0:
            return None
        value = Fraction(int(digits), int(match["den"]))
    else:
        value = Fraction(f"{digits}.{match['dec']}" if match["dec"] else digits)
    if match["pct"]:
        value /= 100
    return -value if match["sign"] in ("-", "\u2212") else value


def _tolerance(value: float, what: str) -> Fraction:
    """A setting that must be a finite real number >= 0, as an exact decimal fraction."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ScoringError(f"{what} must be a finite number >= 0, got {value!r}")
    return Fraction(str(value))


def _within(prediction: Fraction, target: Fraction, rel_tol: Fraction, abs_tol: Fraction) -> bool:
    return abs(prediction - target) <= max(rel_tol * abs(target), abs_tol)


# ---------------------------------------------------------------------------------------------- options

# the whole text is one label: "B", "(b)", "B.", "**B**", "option c", "Choice (C)."
_WHOLE_LABEL = re.compile(r"\W*(?:(?:option|choice)\b\W*)?([a-z])\W*", re.IGNORECASE)
_LABEL_MARKS = (
    re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])"),  # a bare capital letter: "is B", "B."
    re.compile(r"\(([a-z])\)|(?<![A-Za-z0-9])([a-z])\)", re.IGNORECASE),  # "(b)", "b)"
    re.compile(r"\b(?:option|choice)(?:\s+|\s*\()([a-z])(?![A-Za-z0-9])", re.IGNORECASE),  # "option c"
    re.compile(r"^\W*([a-z])[.:](?:\s|$)", re.IGNORECASE),  # leading "b. ..." or "b: ..."
)


def _label_index(letter: str, n_choices: int | None) -> int | None:
    index = string.ascii_uppercase.index(letter.upper())
    return index if n_choices is None or index < n_choices else None


def _text_options(norm_answer: str, norm_choices: list[str]) -> set[int]:
    """Choices whose normalised text is a whole-word span of the normalised answer, without
    those whose text is itself a span of another such choice's text ("red" inside "dark red")."""

    def inside(part: str, whole: str) -> bool:
        return f" {part} " in f" {whole} "

    found = {i for i, c in enumerate(norm_choices) if c and inside(c, norm_answer)}
    return {i for i in found if not any(norm_choices[j] != norm_choices[i] and inside(norm_choices[i], norm_choices[j])
                                        for j in found)}  # fmt: skip


def read_option(answer: str, choices: Sequence[str] | None) -> int | None:
    """The 0-based option that ``answer`` picks (see :class:`MultipleChoice`), or None when it
    picks none or is ambiguous. Without ``choices`` only letters A-Z count."""
    n = None if choices is None else len(choices)
    if whole := _WHOLE_LABEL.fullmatch(answer):
        return _label_index(whole[1], n)
    norm_answer = normalize_answer(answer)
    norm_choices = [normalize_answer(c) for c in choices or ()]
    exact = [i for i, c in enumerate(norm_choices) if c and c == norm_answer]
    if len(exact) == 1:
        return exact[0]
    unlabelled = answer
    for choice, norm in zip(choices or (), norm_choices, strict=True):
        if norm:  # a choice's own text ("Type B") mentions no label
            unlabelled = re.sub(rf"(?<!\w){re.escape(choice.strip())}(?!\w)", " ", unlabelled, flags=re.IGNORECASE)
    letters = {g for mark in _LABEL_MARKS for m in mark.finditer(unlabelled) for g in m.groups() if g}
    picked = {i for i in (_label_index(g, n) for g in letters) if i is not None}
    picked |= _text_options(norm_answer, norm_choices)
    return picked.pop() if len(picked) == 1 else None


def _reference_option(reference: str, choices: Sequence[str] | None) -> int | None:
    """The option a reference names: a lone label (``"B"``, ``"(b)"``) or one choice's text."""
    if whole := _WHOLE_LABEL.fullmatch(reference):
        return _label_index(whole[1], None if choices is None else len(choices))
    norm = normalize_answer(reference)
    named = [i for i, c in enumerate(choices or ()) if norm and normalize_answer(c) == norm]
    return named[0] if len(named) == 1 else None


# ---------------------------------------------------------------------------------------------- scorers


@dataclass(frozen=True)
class ExactMatch(Scorer):
    """Correct when ``normalize_answer(final_answer(generated)) == normalize_answer(reference)``
    (lower-case, punctuation to spaces, articles a/an/the dropped, spaces collapsed): exactly
    :func:`vpstudy.scoring.is_correct`, which it calls. ``choices`` are ignored."""

    name: ClassVar[str] = "exact_match"

    def _match(self, generated: str, reference: str, choices: Sequence[str] | None) -> bool:
        return bool(is_correct(generated, reference))


@dataclass(frozen=True)
class MultipleChoice(Scorer):
    """Correct when the final answer picks exactly one option and it is the reference's option.

    Options are labelled A, B, C, ... in ``choices`` order (any case; without ``choices`` every
    letter A-Z is a label, letters past ``len(choices)`` are not labels). The final answer
    ``fa`` picks, in this order:

    1. if ``fa`` is one label alone, optionally after ``option``/``choice`` and wrapped in
       non-word characters (``"B"``, ``"(b)"``, ``"B."``, ``"**B**"``, ``"option c"``): that one;
    2. if ``normalize_answer(fa)`` equals the normalised text of exactly one choice: that one;
    3. otherwise the set of options mentioned must have exactly one member (none or several,
       e.g. ``"A or B"``, is wrong). Mentions are labels, found after deleting the choices' own
       texts from ``fa`` (so ``"Type B"`` as a choice text is no label): a bare capital letter
       (``"is B"``), ``"(b)"``, ``"b)"``, ``"option c"``/``"choice (c)"``, a leading ``"b."`` or
       ``"b:"``; and choice texts appearing as whole words in the normalised ``fa`` (a choice
       contained in another mentioned choice's text is dropped). So ``"B. red square"`` is right
       when B is "red square" and ambiguous (wrong) when it is not. A bare lower-case letter
       mid-text (``"is b"``) is not a label; a capital ``"A"`` used as an article mid-text is.

    The reference is a lone label (as in 1) or the text of exactly one choice (after
    normalisation); a reference naming no option gives False.
    """

    name: ClassVar[str] = "multiple_choice"

    def _match(self, generated: str, reference: str, choices: Sequence[str] | None) -> bool:
        target = _reference_option(reference, choices)
        return target is not None and read_option(final_answer(generated), choices) == target


@dataclass(frozen=True)
class NumericTolerance(Scorer):
    """Correct when the reference is exactly one number (:func:`parse_number` with ``whole``),
    the final answer contains a number, and its *first* number ``p`` satisfies
    ``|p - r| <= max(rel_tol * |r|, abs_tol)`` for the reference number ``r`` (relative to the
    reference; exact arithmetic). Defaults demand equal values (``"1,000"`` == ``"1000.0"``).
    A non-numeric reference or an answer without a number is False."""

    name: ClassVar[str] = "numeric_tolerance"
    rel_tol: float = 0.0
    abs_tol: float = 0.0

    def __post_init__(self) -> None:
        _tolerance(self.rel_tol, "rel_tol")
        _tolerance(self.abs_tol, "abs_tol")

    def _match(self, generated: str, reference: str, choices: Sequence[str] | None) -> bool:
        target = parse_number(reference, whole=True)
        prediction = parse_number(final_answer(generated))
        if target is None or prediction is None:
            return False
        return _within(prediction, target, _tolerance(self.rel_tol, "rel_tol"), _tolerance(self.abs_tol, "abs_tol"))


@dataclass(frozen=True)
class RelaxedAccuracy(Scorer):
    """ChartQA relaxed accuracy. When the reference is exactly one number ``r``: correct when the
    final answer's first number ``p`` has ``|p - r| <= tolerance * |r|`` (so a zero reference
    needs ``p == 0``; no number is wrong). Otherwise :class:`ExactMatch`. ``12%`` reads 0.12 on
    both sides, as in the ChartQA metric; unlike it, the prediction is the first number of the
    final answer rather than the whole text, and a non-numeric match uses ``normalize_answer``."""

    name: ClassVar[str] = "relaxed_accuracy"
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        _tolerance(self.tolerance, "tolerance")

    def _match(self, generated: str, reference: str, choices: Sequence[str] | None) -> bool:
        if parse_number(reference, whole=True) is None:
            return ExactMatch()._match(generated, reference, choices)
        return NumericTolerance(rel_tol=self.tolerance)._match(generated, reference, choices)


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (ExactMatch, MultipleChoice, NumericTolerance, RelaxedAccuracy)
}


def get_scorer(name: str, **settings: float) -> Scorer:
    """The scorer registered as ``name`` built with ``settings`` (its dataclass fields).

    Raises :class:`ScoringError` for an unknown name, an unknown setting or a bad value."""
    if name not in SCORERS:
        raise ScoringError(f"unknown scorer {name!r} (known: {', '.join(sorted(SCORERS))})")
    cls = SCORERS[name]
    known = sorted(f.name for f in fields(cls))  # type: ignore[arg-type]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        takes = f"settings: {', '.join(known)}" if known else "it takes no settings"
        raise ScoringError(f"scorer {name!r} has no setting {unknown[0]!r} ({takes})")
    return cls(**settings)
