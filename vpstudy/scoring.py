"""Pluggable answer scoring: how well does a generated text answer an example?

Contract. A :class:`Scorer` is a small frozen dataclass with a registry ``name`` and

    value(generated, reference, choices=None, *, thinking=False) -> float | None
    score(generated, reference, choices=None, *, thinking=False) -> bool | None

``value`` is the per-sample metric in [0, 1]: 1.0 or 0.0 for the yes/no scorers, a fraction for
the graded ones (VQA accuracy, ANLS). ``score`` is whether the value is full credit (== 1).
``reference`` is the example's answer, a sequence of reference answers (the several human
answers of TextVQA, DocVQA, InfoVQA), or None, which gives None (unscorable). ``choices`` are
the example's options. ``scorer(...)`` is ``scorer.score(...)``; :meth:`Scorer.score_example`
and :meth:`Scorer.value_example` take the references and choices from a
:class:`~vpstudy.datasets.Example` (a benchmark example's ``answers`` when it has them).
Scorers are pure and never raise on model output; malformed output is simply wrong.

Reasoning traces. Every scorer reads :func:`answer_text`: the text after the last ``</think>``
(Qwen3-VL-Thinking and similar models reason inside ``<think>...</think>`` first). A trace cut
before its ``</think>`` (it opened ``<think>``, or the prompt did: ``thinking=True``, see
:func:`opens_think`) has no answer and scores 0. :class:`LLMJudge` scores nothing (value None):
its benchmarks are graded by an LLM judge outside vpstudy.

Scorers (registry names in :data:`SCORERS`, built by :func:`get_scorer`). The first four read
vpstudy's *final answer*, :func:`final_answer` (the words after the last ``answer`` word, or the
whole text); the benchmark scorers read the whole answer text, as their reference
implementations (lmms-eval, VLMEvalKit, the benchmarks' own code) do:

- ``exact_match`` (:class:`ExactMatch`): :func:`vpstudy.scoring.is_correct`, unchanged.
- ``multiple_choice`` (:class:`MultipleChoice`): the option the answer picks, by letter or text.
- ``numeric_tolerance`` (:class:`NumericTolerance`): first number of the answer vs the reference.
- ``relaxed_accuracy`` (:class:`RelaxedAccuracy`): relaxed accuracy on the final answer's first number.
- ``chartqa_relaxed`` (:class:`ChartQARelaxed`): ChartQA's relaxed correctness (5%), as lmms-eval and
  VLMEvalKit compute it.
- ``vqa_accuracy`` (:class:`VQAAccuracy`): VQA accuracy, min(1, matches/3) averaged over the
  leave-one-out subsets of the human answers, after the EvalAI answer normalisation.
- ``anls`` (:class:`ANLS`): average normalised Levenshtein similarity, threshold 0.5.
- ``mcq_letter`` (:class:`MCQLetter`): lmms-eval's multiple-choice letter extraction (MMStar,
  RealWorldQA); a reference that is not a letter needs the lower-cased answer itself.
- ``mathvista`` (:class:`MathVistaRule`): MathVista's rule-based answer extraction and normalisation.
- ``llm_judge`` (:class:`LLMJudge`): judged outside vpstudy (MMVet, MIA-Bench, CharXiv); value None.

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
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import VpstudyError

if TYPE_CHECKING:
    from .datasets import Example

__all__ = [
    "ANLS",
    "SCORERS",
    "ChartQARelaxed",
    "ExactMatch",
    "LLMJudge",
    "MCQLetter",
    "MathVistaRule",
    "MultipleChoice",
    "NumericTolerance",
    "RelaxedAccuracy",
    "Scorer",
    "ScoringError",
    "VQAAccuracy",
    "anls",
    "answer_text",
    "chartqa_relaxed_correctness",
    "evalai_normalize",
    "example_references",
    "extract_mcq_letter",
    "final_answer",
    "get_scorer",
    "is_correct",
    "levenshtein",
    "mathvista_extract",
    "normalize_answer",
    "opens_think",
    "parse_number",
    "read_option",
    "vqa_accuracy",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_think(prompt: str) -> bool:
    """Whether ``prompt`` leaves a ``<think>`` block open (its last ``<think>`` has no ``</think>``
    after it), as the generation prompt of a thinking model's chat template does: the generated
    text then starts inside the reasoning trace."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def answer_text(generated: str, *, thinking: bool = False) -> str | None:
    """The answer part of a generated text: what follows its last ``</think>``.

    Without ``</think>`` the whole text is the answer, unless the trace is still reasoning: it
    opened ``<think>`` itself, or ``thinking`` says the prompt opened it (:func:`opens_think`).
    Such a trace, cut before ``</think>`` (e.g. by ``max_new_tokens``), has no answer: None.
    A ``<think>`` reopened after the last ``</think>`` is cut too."""
    close = generated.rfind(THINK_CLOSE)
    if generated.rfind(THINK_OPEN) > close:
        return None
    if close >= 0:
        return generated[close + len(THINK_CLOSE) :].strip()
    return None if thinking else generated


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (exact-match scoring)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def final_answer(generated: str) -> str:
    """The final answer of a generated trace: the words after the last ``answer`` word of its
    :func:`answer_text`, or that whole text when it has none (a model that answers directly).
    A reasoning trace cut before ``</think>`` has the empty final answer."""
    text = answer_text(generated)
    if text is None:
        return ""
    words = text.split()
    marks = [i for i, w in enumerate(words) if normalize_answer(w) == "answer"]
    return " ".join(words[marks[-1] + 1 :]) if marks else text


def is_correct(generated: str, reference: str | None) -> bool | None:
    """Exact match of :func:`final_answer` with the reference after :func:`normalize_answer`;
    None when the example has no reference, False for a trace cut before ``</think>``."""
    if reference is None:
        return None
    if answer_text(generated) is None:
        return False
    return normalize_answer(final_answer(generated)) == normalize_answer(reference)


class ScoringError(VpstudyError):
    """An unknown scorer, an unknown setting or a bad setting value."""


Reference = str | Sequence[str] | None


def _references(reference: Reference) -> list[str] | None:
    """The reference answers as a non-empty list, or None (unscorable)."""
    if reference is None:
        return None
    if isinstance(reference, str):
        return [reference]
    refs = [str(r) for r in reference if r is not None]
    return refs or None


def example_references(example: Example) -> str | list[str] | None:
    """An example's reference answers: a benchmark example's ``answers`` (all human answers)
    when it has them, else its ``answer``."""
    answers = getattr(example, "answers", None)
    return list(answers) if answers else example.answer


class Scorer(ABC):
    """Base of all scorers (see the module docstring for the contract).

    Subclasses implement ``_value(text, references, choices)`` on the answer text of a
    scorable example, or, for yes/no scorers, ``_match(text, reference, choices)`` per
    reference (the value is then 1.0 when any reference matches)."""

    name: ClassVar[str]
    graded: ClassVar[bool] = False  # values between 0 and 1, not only 0 or 1
    judged: ClassVar[bool] = False  # scored by an LLM judge outside vpstudy (its value is always None)

    def value(
        self, generated: str, reference: Reference, choices: Sequence[str] | None = None, *, thinking: bool = False
    ) -> float | None:
        """The metric in [0, 1] of ``generated`` against ``reference``; None without a reference
        (or for a judged scorer); 0.0 for a reasoning trace cut before ``</think>``."""
        refs = _references(reference)
        if refs is None:
            return None
        text = answer_text(generated, thinking=thinking)
        if text is None:
            return 0.0
        return float(self._value(text, refs, choices))

    def score(
        self, generated: str, reference: Reference, choices: Sequence[str] | None = None, *, thinking: bool = False
    ) -> bool | None:
        """Whether ``generated`` earns full credit (value 1); None when there is no value."""
        value = self.value(generated, reference, choices, thinking=thinking)
        return None if value is None else value >= 1.0

    def __call__(
        self, generated: str, reference: Reference, choices: Sequence[str] | None = None, *, thinking: bool = False
    ) -> bool | None:
        """:meth:`score`: a scorer is called like a ``(generated, reference) -> bool | None`` function."""
        return self.score(generated, reference, choices, thinking=thinking)

    def value_example(self, generated: str, example: Example, *, thinking: bool = False) -> float | None:
        """:meth:`value` with the example's references (:func:`example_references`) and choices."""
        return self.value(generated, example_references(example), example.choices, thinking=thinking)

    def score_example(self, generated: str, example: Example, *, thinking: bool = False) -> bool | None:
        """:meth:`score` with the example's references and choices."""
        value = self.value_example(generated, example, thinking=thinking)
        return None if value is None else value >= 1.0

    def _value(self, text: str, references: list[str], choices: Sequence[str] | None) -> float:
        return float(any(self._match(text, r, choices) for r in references))

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        raise NotImplementedError(f"{type(self).__name__} implements neither _value nor _match")


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
    return {
        i
        for i in found
        if not any(norm_choices[j] != norm_choices[i] and inside(norm_choices[i], norm_choices[j]) for j in found)
    }


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

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        return bool(is_correct(text, reference))


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

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        target = _reference_option(reference, choices)
        return target is not None and read_option(final_answer(text), choices) == target


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

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        target = parse_number(reference, whole=True)
        prediction = parse_number(final_answer(text))
        if target is None or prediction is None:
            return False
        return _within(prediction, target, _tolerance(self.rel_tol, "rel_tol"), _tolerance(self.abs_tol, "abs_tol"))


@dataclass(frozen=True)
class RelaxedAccuracy(Scorer):
    """Relaxed accuracy on vpstudy's final answer. When the reference is exactly one number
    ``r``: correct when the final answer's first number ``p`` has ``|p - r| <= tolerance * |r|``
    (so a zero reference needs ``p == 0``; no number is wrong). Otherwise :class:`ExactMatch`.
    ``12%`` reads 0.12 on both sides. For ChartQA as the benchmark scores it (the whole answer
    must be the number) use :class:`ChartQARelaxed`."""

    name: ClassVar[str] = "relaxed_accuracy"
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        _tolerance(self.tolerance, "tolerance")

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        if parse_number(reference, whole=True) is None:
            return ExactMatch()._match(text, reference, choices)
        return NumericTolerance(rel_tol=self.tolerance)._match(text, reference, choices)


# ---------------------------------------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    """``float(text)``, with a trailing ``%`` dividing by 100; None when Python cannot parse it."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def chartqa_relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness (Masry et al. 2022, §5.1; the function lmms-eval's
    ``chartqa/utils.py`` and VLMEvalKit's ``utils/vqa_eval.py`` share, from pix2struct): when
    both strings parse as Python floats (``12%`` is 0.12) and the target is non-zero, correct
    when ``|p - t| / |t| <= max_relative_change``; otherwise the lower-cased strings must be
    equal (so a zero target needs the same string, ``"0"`` is not ``"0.0"``)."""
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


@dataclass(frozen=True)
class ChartQARelaxed(Scorer):
    """ChartQA relaxed accuracy as the toolkits compute it: the whole answer text, stripped,
    against each reference with :func:`chartqa_relaxed_correctness` (``tolerance`` = 5%);
    correct when any reference matches (VLMEvalKit's max over references)."""

    name: ClassVar[str] = "chartqa_relaxed"
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        _tolerance(self.tolerance, "tolerance")

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        return chartqa_relaxed_correctness(text.strip(), reference, self.tolerance)


# ---------------------------------------------------------------------------------------------- VQA accuracy

# The EvalAI answer normalisation of the VQA challenge, as lmms-eval's EvalAIAnswerProcessor
# (``_task_utils/vqa_eval_metric.py``, from facebookresearch/mmf) and VLMEvalKit's ``process_answer``
# apply it. Contractions map the apostrophe-less spellings to the canonical ones.
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in (
        "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
        "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
        "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
        "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
        "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't "
        "mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've "
        "neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at "
        "'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've "
        "shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
        "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's "
        "someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll "
        "someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've "
        "somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've "
        "therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
        "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've "
        "werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd "
        "wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's "
        "whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't "
        "wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll "
        "yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've "
        "you'dve:you'd've youll:you'll youre:you're youve:you've"
    ).split()
)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_PUNCTUATIONS = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def evalai_normalize(answer: str) -> str:
    r"""The EvalAI VQA answer normalisation: lower-case; drop ``,`` and ``?``; ``'s`` -> `` 's``;
    new lines and tabs to spaces; each punctuation mark in ``; / [ ] " { } ( ) = + \ _ - > < @ `
    , ? !`` deleted where it touches a space (or the text has a comma between digits) and replaced
    by a space elsewhere; periods not followed by a digit deleted; number words zero-ten (and
    "none") to digits; articles dropped; contractions restored (``dont`` -> ``don't``)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original, out = text, text
    for mark in _PUNCTUATIONS:
        touches = f"{mark} " in original or f" {mark}" in original
        out = out.replace(mark, "" if touches or _COMMA_BETWEEN_DIGITS.search(original) else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (usually 10), both normalised
    by :func:`evalai_normalize`: for each answer left out, min(1, matches among the others / 3),
    averaged over the answers (the official VQA evaluation's mean over the 9-answer subsets)."""
    prediction = evalai_normalize(prediction)
    normalized = [evalai_normalize(a) for a in answers]
    accuracies = []
    for i in range(len(normalized)):
        matches = sum(1 for j, a in enumerate(normalized) if j != i and a == prediction)
        accuracies.append(min(1.0, matches / 3))
    return sum(accuracies) / len(accuracies)


@dataclass(frozen=True)
class VQAAccuracy(Scorer):
    """TextVQA's VQA accuracy (:func:`vqa_accuracy`) of the whole answer text against every
    human answer of the example (lmms-eval ``textvqa/utils.py``, VLMEvalKit ``vqa_eval.py``)."""

    name: ClassVar[str] = "vqa_accuracy"
    graded: ClassVar[bool] = True

    def _value(self, text: str, references: list[str], choices: Sequence[str] | None) -> float:
        return vqa_accuracy(text, references)


# ---------------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """The Levenshtein edit distance (insertions, deletions, substitutions of one character)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        current = [j]
        for i, ca in enumerate(a, start=1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one question (Biten et al. 2019): with
    prediction and each answer lower-cased, stripped and their white space collapsed,
    ``NL = levenshtein / max(len)``; the score is ``max(1 - NL)`` over the answers, or 0 when
    that is below ``1 - threshold``. Like the DocVQA evaluation scripts, lmms-eval and VLMEvalKit,
    ``NL == threshold`` still scores (0.5 at the default); unlike lmms-eval and VLMEvalKit, the
    length is that of the normalised strings (they divide by the raw lengths)."""

    def norm(s: str) -> str:
        return " ".join(s.strip().lower().split())

    pred = norm(prediction)
    best = 0.0
    for answer in answers:
        gt = norm(answer)
        length = max(len(gt), len(pred))
        best = max(best, 1.0 - (levenshtein(gt, pred) / length if length else 0.0))
    return best if best >= 1.0 - threshold else 0.0


@dataclass(frozen=True)
class ANLS(Scorer):
    """DocVQA and InfoVQA's ANLS (:func:`anls`, ``threshold`` 0.5) of the whole answer text."""

    name: ClassVar[str] = "anls"
    graded: ClassVar[bool] = True
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if _tolerance(self.threshold, "threshold") > 1:
            raise ScoringError(f"threshold must be in [0, 1], got {self.threshold!r}")

    def _value(self, text: str, references: list[str], choices: Sequence[str] | None) -> float:
        return anls(text, references, self.threshold)


# ---------------------------------------------------------------------------------------------- MCQ letters

_ANSWER_PHRASES = (
    "the answer is",
    "answer is",
    "the correct answer is",
    "correct answer is",
    "the best answer is",
    "best answer is",
    "the correct option is",
    "correct option is",
    "the best option is",
    "best option is",
    "the choice is",
    "choice is",
    "the correct choice is",
    "correct choice is",
    "i choose",
    "i select",
    "i pick",
    "my answer is",
    "my choice is",
    "옵션",
    "정답은",
    "답은",
    "답:",
    "答案是",
    "答案为",
    "选",
    "答えは",
)
# higher wins; within a format the later position wins
_FORMAT_PRIORITY = {
    "start": 10,
    "end": 9,
    "phrase": 7,
    "parentheses": 6,
    "period": 5,
    "colon": 4,
    "right_paren": 3,
    "space": 2,
    "fallback": 0,
}


def extract_mcq_letter(response: str, letters: Sequence[str] = "ABCD") -> str:
    """The option letter a free-form answer gives, or ``""``: lmms-eval's ``extract_mcq_answer``
    (``tasks/_task_utils/mcq_extract.py``), which MMStar and RealWorldQA score with.

    The text is stripped of white space and of ``, . ! ? ; : ' "`` at both ends and padded with
    one space. Candidates, each with the position of its last occurrence: ``(X)``
    (parentheses), ``X.`` (period), ``X:`` (colon), ``X)`` (right paren), ``X `` (space); an
    answer phrase ("the answer is", "i choose", ...) followed later by ``X`` (phrase, first
    ``X`` after the first phrase occurrence); the text starting with ``X`` not followed by a
    letter (start) or ending with ``X`` not preceded by one (end); and only when there is no
    candidate, any ``X`` at all (fallback). The candidate of the highest-priority format wins
    (start > end > phrase > parentheses > period > colon > right paren > space > fallback), the
    later position breaking ties. Letters are matched case-sensitively."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates: list[tuple[str, int, str]] = []
    for fmt, pattern in (
        ("parentheses", "({})"),
        ("period", "{}."),
        ("colon", "{}:"),
        ("right_paren", "{})"),
        ("space", "{} "),
    ):
        for letter in letters:
            if pattern.format(letter) in text:
                candidates.append((letter, text.rfind(pattern.format(letter)), fmt))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for letter in letters:
                found = text.find(letter, at + len(phrase))
                if found != -1:
                    candidates.append((letter, found, "phrase"))
    stripped = text.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((letter, 0, "start"))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((letter, len(text) - 1, "end"))
    if not candidates:
        candidates = [(letter, text.rfind(letter), "fallback") for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda c: (_FORMAT_PRIORITY[c[2]], c[1]))[0]


@dataclass(frozen=True)
class MCQLetter(Scorer):
    """Multiple choice as lmms-eval scores MMStar and RealWorldQA. A reference that is one of
    the option letters (after stripping; upper-cased): correct when :func:`extract_mcq_letter`
    of the answer text, over ``letters``, gives it. Any other reference (RealWorldQA's open
    questions, e.g. ``"0"``, ``"Downhill"``): correct when the answer, lower-cased, stripped and
    without a trailing ``.``, equals the lower-cased reference."""

    name: ClassVar[str] = "mcq_letter"
    letters: str = "ABCD"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.letters, str)
            or not self.letters
            or not all(c in string.ascii_uppercase for c in self.letters)
        ):
            raise ScoringError(f"letters must be capital letters A-Z, got {self.letters!r}")

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        target = reference.strip()
        if target.upper() in self.letters and len(target) == 1:
            return extract_mcq_letter(text, self.letters) == target.upper()
        return text.lower().strip().rstrip(".") == target.lower()


# ---------------------------------------------------------------------------------------------- MathVista

_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LAST_LIST = re.compile(r"\[[^\[\]]*\]")


def mathvista_extract(response: str, *, question_type: str, answer_type: str, choices: Sequence[str] | None) -> str:
    """MathVista's answer extraction without its LLM step.

    The rules of the official ``evaluation/extract_answer.py`` (lupantech/MathVista), in order:
    an empty response gives ``""``; a multiple-choice response that is one of the choices is
    itself; an ``integer`` answer that ``int()`` parses, a ``float`` one that ``float()``
    parses; ``The answer is "X".`` gives X. Where the official code then asks an LLM, vpstudy
    applies fixed rules instead: multiple choice, the option letter :func:`extract_mcq_letter`
    finds over the choices' letters, else the response itself (which :func:`mathvista_normalize`
    reads as ``(x)`` or maps to the nearest choice); integer and float, the last number of the
    response (``""`` if none); list, the last ``[...]`` (``""`` if none); text, the response."""
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    if quoted := re.search(r'The answer is "(.*)"\.', response):
        return quoted[1]
    if question_type == "multi_choice" and choices:
        return extract_mcq_letter(response, string.ascii_uppercase[: len(choices)]) or response
    if answer_type in ("integer", "float"):
        numbers = _LAST_NUMBER.findall(response.replace(",", ""))
        return numbers[-1] if numbers else ""
    if answer_type == "list":
        lists = _LAST_LIST.findall(response)
        return lists[-1] if lists else ""
    return response


def mathvista_normalize(
    extraction: str, *, question_type: str, answer_type: str, choices: Sequence[str] | None, precision: int
) -> str | None:
    """The official ``normalize_extracted_answer`` (``evaluation/calculate_score.py``): multiple
    choice maps ``(X)`` or a letter ``X`` to that choice's text and anything else to the choice
    with the smallest Levenshtein distance (so an empty extraction still picks one); integer
    ``str(int(float(x)))``; float ``str(round(float(x), precision))``; list ``str(x)``; a number
    that does not parse is None."""
    if question_type == "multi_choice" and choices:
        extraction = extraction.strip()
        if letter := re.findall(r"\(([a-zA-Z])\)", extraction):
            extraction = letter[0].upper()
        letters = list(string.ascii_uppercase[: len(choices)])
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [levenshtein(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), precision))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def _decimals(reference: str) -> int:
    return len(reference.split(".", 1)[1]) if "." in reference else 0


@dataclass(frozen=True)
class MathVistaRule(Scorer):
    """MathVista accuracy with rule-based extraction: :func:`mathvista_extract` of the answer
    text, :func:`mathvista_normalize`, then equality with the reference string (the official
    ``safe_equal``). The problem's ``question_type``, ``answer_type`` and ``precision`` come
    from the example (:meth:`value_example`); without them (:meth:`value`) they are inferred:
    multi_choice when there are choices, else integer, float (precision = the reference's
    decimals), list (``[...]``) or text by the reference's form."""

    name: ClassVar[str] = "mathvista"

    def value_example(self, generated: str, example: Example, *, thinking: bool = False) -> float | None:
        """:meth:`value` with the example's problem metadata (its ``extra``) when it has it."""
        extra = example.extra
        if "question_type" not in extra or "answer_type" not in extra:
            return super().value_example(generated, example, thinking=thinking)
        refs = _references(example_references(example))
        if refs is None:
            return None
        text = answer_text(generated, thinking=thinking)
        if text is None:
            return 0.0
        precision = extra.get("precision")
        precision = int(precision) if isinstance(precision, int | float) and math.isfinite(precision) else 0
        question_type, answer_type = str(extra["question_type"]), str(extra["answer_type"])
        return float(
            any(
                self._equal(
                    text,
                    r,
                    question_type=question_type,
                    answer_type=answer_type,
                    choices=example.choices,
                    precision=precision,
                )
                for r in refs
            )
        )

    def _match(self, text: str, reference: str, choices: Sequence[str] | None) -> bool:
        if choices:
            question_type, answer_type, precision = "multi_choice", "text", 0
        elif parse_number(reference, whole=True) is not None and "." not in reference:
            question_type, answer_type, precision = "free_form", "integer", 0
        elif _to_float(reference) is not None:
            question_type, answer_type, precision = "free_form", "float", _decimals(reference)
        elif reference.startswith("["):
            question_type, answer_type, precision = "free_form", "list", 0
        else:
            question_type, answer_type, precision = "free_form", "text", 0
        return self._equal(
            text, reference, question_type=question_type, answer_type=answer_type, choices=choices, precision=precision
        )

    @staticmethod
    def _equal(
        text: str,
        reference: str,
        *,
        question_type: str,
        answer_type: str,
        choices: Sequence[str] | None,
        precision: int,
    ) -> bool:
        extraction = mathvista_extract(
            text.strip(), question_type=question_type, answer_type=answer_type, choices=choices
        )
        prediction = mathvista_normalize(
            extraction, question_type=question_type, answer_type=answer_type, choices=choices, precision=precision
        )
        return prediction == reference


# ---------------------------------------------------------------------------------------------- LLM judge


@dataclass(frozen=True)
class LLMJudge(Scorer):
    """Benchmarks an LLM judge scores (MMVet, MIA-Bench, CharXiv reasoning): vpstudy computes no
    score (value and score are None); the benchmark adapter exports the predictions in the
    format the judge reads (:mod:`vpstudy.benchmarks`)."""

    name: ClassVar[str] = "llm_judge"
    judged: ClassVar[bool] = True

    def value(
        self, generated: str, reference: Reference, choices: Sequence[str] | None = None, *, thinking: bool = False
    ) -> None:
        """Always None: the score is the judge's, not vpstudy's."""
        return None


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        ExactMatch,
        MultipleChoice,
        NumericTolerance,
        RelaxedAccuracy,
        ChartQARelaxed,
        VQAAccuracy,
        ANLS,
        MCQLetter,
        MathVistaRule,
        LLMJudge,
    )
}


def get_scorer(name: str, **settings: Any) -> Scorer:
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
