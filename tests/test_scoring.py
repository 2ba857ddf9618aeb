"""Answer scorers: hand-built cases per scorer, agreement with ``collect.is_correct``, registry."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from vpstudy.collect import is_correct
from vpstudy.datasets import Example
from vpstudy.scoring import (
    SCORERS,
    ExactMatch,
    MultipleChoice,
    NumericTolerance,
    RelaxedAccuracy,
    Scorer,
    ScoringError,
    get_scorer,
    parse_number,
    read_option,
)

EVAL_SET = Path(__file__).resolve().parents[1] / "data" / "organism-eval" / "data.jsonl"
CHOICES = ["blue ring", "green ring", "red square", "dark red"]


@pytest.mark.parametrize("scorer", [cls() for cls in SCORERS.values()], ids=list(SCORERS))
def test_missing_reference_is_none(scorer: Scorer) -> None:
    assert scorer.score("answer red square", None) is None
    assert scorer("answer 3", None, CHOICES) is None


def test_score_example_and_call() -> None:
    example = Example(id="0", question="q", answer="B", choices=CHOICES, extra={}, source="x:line 1",
                      image_ref="x.png", root=Path("."))  # fmt: skip
    assert MultipleChoice().score_example("answer (b)", example) is True
    assert MultipleChoice()("answer (b)", "B", CHOICES) is True


# ---------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("purple ring at d2 ; right is d3 ; d3 is red square ; answer red square", "red square", True),
        ("answer: The Red Square.", "red square", True),  # case, punctuation, article
        ("Answer red, square!", "red square", True),
        ("red square", "red square", True),  # no "answer" word: the whole text
        ("answer blue square ; answer red square", "red square", True),  # the last "answer" counts
        ("answer red square ; answer blue square", "red square", False),
        ("the answer is red square", "red square", False),  # "is red square"
        ("answer red", "red square", False),
        ("answer 2", "2.0", False),  # no numeric reading
    ],
)  # fmt: skip
def test_exact_match(generated: str, reference: str, expected: bool) -> None:
    assert ExactMatch().score(generated, reference) is expected
    assert is_correct(generated, reference) is expected


def _eval_records() -> list[dict]:
    with EVAL_SET.open() as f:
        return [json.loads(line) for line in f]


def test_exact_match_agrees_with_is_correct_on_eval_set() -> None:
    records = _eval_records()
    assert len(records) > 100
    exact = ExactMatch()
    others = sorted({r["answer"] for r in records})
    for k, r in enumerate(records):
        trace, answer = r["trace"], r["answer"]
        assert exact(trace, answer) is True, r["id"]
        wrong = others[(others.index(answer) + 1) % len(others)]
        perturbed = [
            trace.upper(), trace + " .", trace.rsplit("answer", 1)[0] + "answer " + wrong, trace + " ; answer",
            trace.replace("answer", "answers"), f"the {trace}", trace.rsplit(" ", 1)[0],
        ]  # fmt: skip
        for text in perturbed:
            for reference in (answer, wrong, None):
                assert exact(text, reference) is is_correct(text, reference), (r["id"], text, reference)
        if k >= 100:
            break


def test_relaxed_accuracy_accepts_every_eval_trace() -> None:
    relaxed = RelaxedAccuracy()
    assert all(relaxed(r["trace"], r["answer"]) for r in _eval_records())


# ---------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)), ("-3.5", Fraction(-7, 2)), ("\u22127", -7),
        ("+2", 2), ("12%", Fraction(12, 100)), ("3/4", Fraction(3, 4)), ("about $12kg", 12), ("3rd", 3),
        ("12.", 12), ("1, 2, 3", 1), ("10-20", 10), ("007", 7),
        ("d3", None), ("x-3", None), ("1.2.3", None), ("12,5", None), ("1/2/2020", None), (".5", None),
        ("3/0", None), ("none", None), ("", None),
    ],
)  # fmt: skip
def test_parse_number(text: str, value: Fraction | int | None) -> None:
    assert parse_number(text) == value


def test_parse_number_whole() -> None:
    assert parse_number(" -1,000.25 ", whole=True) == Fraction(-4001, 4)
    assert parse_number("12 apples", whole=True) is None
    assert parse_number("d3", whole=True) is None


@pytest.mark.parametrize(
    ("scorer", "generated", "reference", "expected"),
    [
        (NumericTolerance(), "count 1,234 ; answer 1,234", "1234", True),
        (NumericTolerance(), "answer 1000.0", "1,000", True),
        (NumericTolerance(), "answer -3.5 degrees", "-3.50", True),
        (NumericTolerance(), "answer 3.5", "-3.5", False),
        (NumericTolerance(), "answer 12%", "0.12", True),
        (NumericTolerance(), "answer 12%", "12", False),  # percent means hundredths
        (NumericTolerance(), "answer 3/4", "0.75", True),
        (NumericTolerance(), "answer 2 or 3", "3", False),  # the first number counts
        (NumericTolerance(), "answer two", "2", False),
        (NumericTolerance(), "answer 2", "two", False),  # non-numeric reference
        (NumericTolerance(), "answer d3", "3", False),
        (NumericTolerance(rel_tol=0.1), "answer 109", "100", True),
        (NumericTolerance(rel_tol=0.1), "answer 111", "100", False),
        (NumericTolerance(abs_tol=1), "answer 0.5", "0", True),
        (NumericTolerance(rel_tol=0.01, abs_tol=2), "answer 102", "100", True),  # the larger bound
    ],
)  # fmt: skip
def test_numeric_tolerance(scorer: NumericTolerance, generated: str, reference: str, expected: bool) -> None:
    assert scorer(generated, reference) is expected


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("answer 105", "100", True), ("answer 95", "100", True),  # exactly 5%: in
        ("answer 1.05", "1", True), ("answer 0.95", "1", True),  # exact arithmetic at the boundary
        ("answer 105.01", "100", False), ("answer 94.99", "100", False),  # just over: out
        ("answer -105", "-100", True), ("answer 105", "-100", False),
        ("answer 0", "0", True), ("answer 0.0", "0", True), ("answer 0.001", "0", False),  # zero target
        ("answer 12%", "12%", True), ("answer 12", "12%", False),
        ("answer 2019", "2020", True),  # relaxed accuracy's known leniency on years
        ("answer about 100 people", "100", True), ("answer none", "100", False),
        ("answer The Red Square.", "red square", True), ("answer red", "red square", False),  # exact match
        ("answer d3", "d3", True), ("answer d4", "d3", False),
    ],
)  # fmt: skip
def test_relaxed_accuracy(generated: str, reference: str, expected: bool) -> None:
    assert RelaxedAccuracy()(generated, reference) is expected


def test_relaxed_accuracy_tolerance_setting() -> None:
    assert RelaxedAccuracy(tolerance=0.1)("answer 110", "100") is True
    assert RelaxedAccuracy(tolerance=0)("answer 100.5", "100") is False


# ---------------------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("answer", "option"),
    [
        ("B", 1), ("b", 1), ("(b)", 1), ("B.", 1), ("**C**", 2), ("option c", 2), ("Choice (C).", 2), ("[D]", 3),
        ("is B", 1), ("I pick (c) here", 2), ("it is c) red", 2), ("go with option a", 0), ("c: red square", 2),
        ("C. red square", 2), ("red square", 2), ("The Red Square.", 2), ("A red square", 2), ("it is a green ring", 1),
        ("it is dark red", 3),  # "red" inside "dark red" is not a second mention
        ("B. red square", None), ("A or B", None), ("(a) and (c)", None), ("blue ring or green ring", None),
        ("is b", None), ("E", None), ("I", None), ("nothing", None), ("", None),
    ],
)  # fmt: skip
def test_read_option(answer: str, option: int | None) -> None:
    assert read_option(answer, CHOICES) == option


def test_read_option_choice_text_is_not_a_label() -> None:
    assert read_option("Type B is right", ["Type B", "Type A"]) == 0
    assert read_option("I think B", None) is None  # without choices "I" is a label too


@pytest.mark.parametrize(
    ("generated", "reference", "choices", "expected"),
    [
        ("reasoning ; answer (b)", "B", CHOICES, True),
        ("answer B", "green ring", CHOICES, True),  # reference as choice text
        ("answer green ring", "B", CHOICES, True),
        ("answer: option B.", "(b)", CHOICES, True),
        ("answer C", "B", CHOICES, False),
        ("answer A or B", "B", CHOICES, False),  # ambiguous
        ("answer B", "B", None, True), ("answer b)", "b", None, True), ("answer B", "C", None, False),
        ("answer B", "purple ring", CHOICES, False),  # reference names no option
        ("answer green ring", "green ring", None, False),  # text needs choices
    ],
)  # fmt: skip
def test_multiple_choice(generated: str, reference: str, choices: list[str] | None, expected: bool) -> None:
    assert MultipleChoice()(generated, reference, choices) is expected


# ---------------------------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert set(SCORERS) == {"exact_match", "multiple_choice", "numeric_tolerance", "relaxed_accuracy"}
    assert all(cls.name == name for name, cls in SCORERS.items())
    assert get_scorer("relaxed_accuracy") == RelaxedAccuracy(tolerance=0.05)
    assert get_scorer("numeric_tolerance", rel_tol=0.1) == NumericTolerance(rel_tol=0.1)
    with pytest.raises(AttributeError):
        get_scorer("relaxed_accuracy").tolerance = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("bleu", {}, "unknown scorer 'bleu' (known: exact_match, multiple_choice, numeric_tolerance, relaxed_accuracy)"),
        ("numeric_tolerance", {"tol": 1}, "scorer 'numeric_tolerance' has no setting 'tol' (settings: abs_tol, rel_tol)"),
        ("exact_match", {"tolerance": 1}, "scorer 'exact_match' has no setting 'tolerance' (it takes no settings)"),
        ("relaxed_accuracy", {"tolerance": -0.1}, "tolerance must be a finite number >= 0, got -0.1"),
        ("numeric_tolerance", {"rel_tol": "0.1"}, "rel_tol must be a finite number >= 0, got '0.1'"),
        ("numeric_tolerance", {"abs_tol": float("nan")}, "abs_tol must be a finite number >= 0, got nan"),
    ],
)  # fmt: skip
def test_registry_errors(name: str, settings: dict, message: str) -> None:
    with pytest.raises(ScoringError) as error:
        get_scorer(name, **settings)
    assert str(error.value) == message
    assert isinstance(error.value, ValueError)
