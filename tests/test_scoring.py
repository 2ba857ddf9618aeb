"""Answer scorers: hand-built cases per scorer, agreement with ``collect.is_correct`` and, for the
benchmark metrics, with independent implementations of their definitions; reasoning traces; registry."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vpstudy.collect import is_correct
from vpstudy.datasets import Example
from vpstudy.scoring import (
    ANLS,
    SCORERS,
    ChartQARelaxed,
    ExactMatch,
    LLMJudge,
    MathVistaRule,
    MCQLetter,
    MultipleChoice,
    NumericTolerance,
    RelaxedAccuracy,
    Scorer,
    ScoringError,
    VQAAccuracy,
    anls,
    answer_text,
    chartqa_relaxed_correctness,
    evalai_normalize,
    extract_mcq_letter,
    final_answer,
    get_scorer,
    levenshtein,
    mathvista_extract,
    opens_think,
    parse_number,
    read_option,
    vqa_accuracy,
)

EVAL_SET = Path(__file__).resolve().parents[1] / "data" / "organism-eval" / "data.jsonl"
CHOICES = ["blue ring", "green ring", "red square", "dark red"]


@pytest.mark.parametrize("scorer", [cls() for cls in SCORERS.values()], ids=list(SCORERS))
def test_missing_reference_is_none(scorer: Scorer) -> None:
    assert scorer.score("answer red square", None) is None
    assert scorer("answer 3", None, CHOICES) is None
    assert scorer.value("answer 3", [], CHOICES) is None  # no reference answers at all


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
    assert set(SCORERS) == {"exact_match", "multiple_choice", "numeric_tolerance", "relaxed_accuracy",
                            "chartqa_relaxed", "vqa_accuracy", "anls", "mcq_letter", "mathvista", "llm_judge"}
    assert all(cls.name == name for name, cls in SCORERS.items())
    assert get_scorer("relaxed_accuracy") == RelaxedAccuracy(tolerance=0.05)
    assert get_scorer("numeric_tolerance", rel_tol=0.1) == NumericTolerance(rel_tol=0.1)
    with pytest.raises(AttributeError):
        get_scorer("relaxed_accuracy").tolerance = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("bleu", {}, "unknown scorer 'bleu' (known: anls, chartqa_relaxed, exact_match, llm_judge, mathvista, "
                     "mcq_letter, multiple_choice, numeric_tolerance, relaxed_accuracy, vqa_accuracy)"),
        ("anls", {"threshold": 1.5}, "threshold must be in [0, 1], got 1.5"),
        ("mcq_letter", {"letters": "ab"}, "letters must be capital letters A-Z, got 'ab'"),
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


# ---------------------------------------------------------------------------------------------- reasoning traces


@pytest.mark.parametrize(
    ("generated", "thinking", "answer"),
    [
        ("<think>the square is red</think>\n\nred", False, "red"),
        ("<think>a</think> blue <think>b</think> red", False, "red"),  # the last </think> counts
        ("reasoning only, the prompt opened it</think> red", True, "red"),
        ("<think>still reasoning about red", False, None),  # cut before </think>: no answer
        ("still reasoning about red", True, None),  # the prompt opened <think>: cut too
        ("<think>a</think> red <think>again", False, None),  # reopened and cut
        ("red", False, "red"),  # a model that does not reason
    ],
)  # fmt: skip
def test_answer_text(generated: str, thinking: bool, answer: str | None) -> None:
    assert answer_text(generated, thinking=thinking) == answer


def test_opens_think() -> None:
    assert opens_think("<|im_start|>assistant\n<think>\n") is True
    assert opens_think("<|im_start|>assistant\n") is False
    assert opens_think("<think>x</think> USER: q ASSISTANT:") is False


@pytest.mark.parametrize("scorer", [cls() for cls in SCORERS.values() if not cls.judged], ids=lambda s: s.name)
def test_every_scorer_reads_after_the_last_think_and_gives_a_cut_trace_nothing(scorer: Scorer) -> None:
    reference, choices = ("B", ["3/11", "8/11", "6/11", "3/5"]) if scorer.name in ("multiple_choice", "mcq_letter") \
        else ("12", None)  # fmt: skip
    answer = reference
    if scorer.name == "vqa_accuracy":  # full credit needs 3 matching answers besides the one left out
        reference = [reference] * 4
    assert scorer.value(answer, reference, choices) == 1.0
    assert scorer.value(f"<think>maybe 7, or C</think>{answer}", reference, choices) == 1.0
    assert scorer.value(f"maybe 7</think> {answer}", reference, choices, thinking=True) == 1.0
    assert scorer.value(f"<think>{answer} {answer}", reference, choices) == 0.0  # cut: no answer
    assert scorer.score(answer, reference, choices, thinking=True) is False  # the prompt opened <think>: cut
    assert scorer.value(f"<think>{answer}</think>7", reference, choices) == 0.0  # only the answer counts


def test_final_answer_and_is_correct_read_after_think() -> None:
    assert final_answer("<think>answer blue</think> answer red") == "red"
    assert final_answer("<think>answer blue") == ""
    assert is_correct("<think>answer blue</think> answer red", "red") is True
    assert is_correct("<think>answer red", "red") is False
    assert is_correct("<think>answer red", None) is None


def test_score_example_uses_a_benchmark_example_s_answers() -> None:
    from vpstudy.benchmarks import BenchmarkExample

    example = BenchmarkExample(id="0", question="q", answer="red", choices=None, extra={}, source="x:row 0",
                               image_ref=b"", root=Path("."), benchmark="textvqa",
                               answers=["red"] * 2 + ["crimson"] * 8)  # fmt: skip
    assert VQAAccuracy().value_example("Crimson", example) == 1.0  # every answer counts, not only the first
    assert VQAAccuracy().value_example("red", example) == pytest.approx(0.6)
    assert VQAAccuracy().score_example("red", example) is False  # partial credit is not full credit
    assert ExactMatch().score_example("crimson", example) is True  # yes/no scorers: any reference


# ---------------------------------------------------------------------------------------------- ChartQA


def reference_relaxed_correctness(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's definition (Masry et al. 2022, §5.1, after Methani et al. 2020), written here
    independently: numeric answers within 5% of a non-zero gold number are correct (a percent
    sign means hundredths); anything else needs the same lower-cased string."""

    def number(s: str) -> float | None:
        percent = s.endswith("%")
        try:
            value = float(s[:-1] if percent else s)
        except ValueError:
            return None
        return value / 100 if percent else value

    p, t = number(prediction), number(target)
    if p is None or t is None or t == 0:
        return prediction.lower() == target.lower()
    return abs(p - t) <= tolerance * abs(t) * (1 + 1e-12)


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("105", "100", True), ("94.9", "100", False), ("  95 ", "100", True),  # stripped, then 5% either way
        ("12%", "0.12", True), ("12", "0.12", False),
        ("0", "0", True), ("0.0", "0", False),  # a zero target needs the same string (the toolkits' rule)
        ("Yes", "yes", True), ("yes.", "yes", False), ("The answer is 100", "100", False),  # the whole answer
        ("1e2", "100", True), ("1,000", "1000", False),  # Python float() syntax, as in the reference code
        ("<think>maybe 50</think>101", "100", True),
    ],
)  # fmt: skip
def test_chartqa_relaxed(generated: str, reference: str, expected: bool) -> None:
    assert ChartQARelaxed()(generated, reference) is expected


def test_chartqa_relaxed_agrees_with_the_definition_on_random_answers() -> None:
    rng = np.random.default_rng(0)
    pool = ["0", "0.0", "100", "104.9", "105", "105.1", "95", "-100", "12%", "0.12", "7", "abc", "ABC", "1e2",
            "3.5", "3.675", "3.3249", "-0.12"]  # fmt: skip
    for _ in range(2000):
        p, t = str(rng.choice(pool)), str(rng.choice(pool))
        assert chartqa_relaxed_correctness(p, t) == reference_relaxed_correctness(p, t), (p, t)
        assert ChartQARelaxed()(p, [t, "zzz"]) == reference_relaxed_correctness(p, t)  # any reference


# ---------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("The Two dogs!", "2 dogs"), ("dont, stop.", "don't stop"), ("3.5 kg.", "3.5 kg"), ("coca-cola", "coca cola"),
        ("coca - cola", "coca cola"), ("1,000 people", "1000 people"), ("A (big) one?", "big 1"),
        ("john's\tcar\n", "john 's car"), ("none", "0"), ("an apple", "apple"),
    ],
)  # fmt: skip
def test_evalai_normalize(raw: str, normal: str) -> None:
    assert evalai_normalize(raw) == normal


def reference_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy definition (Antol et al. 2015), written here independently: over every
    subset of all-but-one of the human answers, min(#answers equal to the prediction / 3, 1),
    averaged. Strings are compared as given (the tests pass normalised ones)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == prediction for i in subset) / 3, 1.0) for subset in subsets) / len(subsets)


def test_vqa_accuracy_hand_computed() -> None:
    ten = ["red"] * 2 + ["blue"] * 8
    # leaving out a "red": 1 match -> 1/3 (twice); leaving out a "blue": 2 -> 2/3 (eight times): 0.6
    assert vqa_accuracy("red", ten) == pytest.approx(0.6)
    assert vqa_accuracy("blue", ten) == 1.0  # 7 or 8 matches: capped at 1
    assert vqa_accuracy("Red.", ["red"] * 3 + ["x"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("green", ten) == 0.0
    assert VQAAccuracy()("red", ["red"] * 4 + ["x"] * 6) is True  # 3 or 4 matches everywhere: full credit
    assert VQAAccuracy().value("two", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)  # number words normalised


def test_vqa_accuracy_agrees_with_the_definition_on_random_answers() -> None:
    rng = np.random.default_rng(1)
    vocab = ["red", "blue", "stop", "coca cola", "2", "yes"]  # already in normal form
    for _ in range(500):
        answers = [str(a) for a in rng.choice(vocab, size=int(rng.integers(2, 11)))]
        prediction = str(rng.choice(vocab))
        assert vqa_accuracy(prediction, answers) == pytest.approx(reference_vqa_accuracy(prediction, answers))


# ---------------------------------------------------------------------------------------------- ANLS


def reference_anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS (Biten et al. 2019), written here independently: the edit distance by the full
    dynamic-programming table, on lower-cased, stripped, white-space-collapsed strings;
    s = 1 - NL kept when NL <= threshold (as the DocVQA scripts do), the best over the answers."""

    def distance(a: str, b: str) -> int:
        table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                substitute = table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
                table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, substitute)
        return table[-1][-1]

    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    scores = []
    for answer in answers:
        a, p = norm(answer), norm(prediction)
        nl = distance(a, p) / max(len(a), len(p)) if max(len(a), len(p)) else 0.0
        scores.append(1 - nl if nl <= threshold else 0.0)
    return max(scores)


def test_anls_hand_computed() -> None:
    assert anls("ax", ["ab"]) == 0.5  # NL = 1/2 = threshold: still scores, as the DocVQA scripts do
    assert anls("abcf", ["ABCD ", "zzzz"]) == 0.75  # case and outer spaces ignored, best answer
    assert anls("xyz", ["abc"]) == 0.0
    assert anls(" Hello  World ", ["hello world"]) == 1.0
    assert anls("abcde", ["abxyz"]) == 0.0  # NL = 3/5 > 0.5
    assert ANLS()("Hello World", ["hello world", "x"]) is True
    assert ANLS().value("ax", ["ab"]) == 0.5 and ANLS()("ax", ["ab"]) is False
    assert ANLS(threshold=0.4).value("ax", ["ab"]) == 0.0
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3


def test_anls_agrees_with_the_definition_on_random_strings() -> None:
    rng = np.random.default_rng(2)
    def words() -> str:
        return " ".join("".join(rng.choice(list("abcAB "), size=int(rng.integers(0, 6)))) for _ in range(2))

    for _ in range(500):
        answers = [words() for _ in range(int(rng.integers(1, 4)))]
        prediction = words()
        assert anls(prediction, answers) == pytest.approx(reference_anls(prediction, answers)), (prediction, answers)


# ---------------------------------------------------------------------------------------------- MCQ letters


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"), ("The correct answer is (B).", "B"), ("A. red", "A"), ("C: blue", "C"), ("B) red", "B"),
        ("Option D", "D"), ("answer is D.", "D"), ("(A) and (C)", "C"),  # the later of two parentheses
        ("It is not A, it is B", "B"),  # ends with B: "end" outranks the rest
        ("I think the answer is C because A is wrong", "A"),  # two letters after the phrase: the later one
        ("b", ""), ("E", ""), ("The image shows a cat", ""), ("", ""),  # lower case, out of range, none
    ],
)  # fmt: skip
def test_extract_mcq_letter(response: str, letter: str) -> None:
    assert extract_mcq_letter(response) == letter


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("The answer is (C).", "C", True), ("C", " c ", True), ("(B)", "C", False),
        ("<think>A? no, B</think>B", "B", True),
        ("Downhill.", "Downhill", True), ("downhill", "downhill", True), ("0", "0", True), ("zero", "0", False),
        ("the answer is E", "E", False),  # E is no option letter of A-D: the open-answer comparison applies
    ],
)  # fmt: skip
def test_mcq_letter(generated: str, reference: str, expected: bool) -> None:
    assert MCQLetter()(generated, reference) is expected


def test_mcq_letter_over_more_letters() -> None:
    assert MCQLetter(letters="ABCDE")("the answer is E", "E") is True
    assert MCQLetter()("e", "E") is True  # the open-answer comparison: "e" == "e"


# ---------------------------------------------------------------------------------------------- MathVista


@pytest.mark.parametrize(
    ("response", "question_type", "answer_type", "choices", "extracted"),
    [
        ("8/11", "multi_choice", "text", ["3/11", "8/11"], "8/11"),  # a choice itself
        ("42", "free_form", "integer", None, "42"), ("3.50", "free_form", "float", None, "3.5"),
        ('The answer is "[1, 2]".', "free_form", "list", None, "[1, 2]"),
        ("So the total is 1,250 dollars, or 13 coins", "free_form", "integer", None, "13"),  # the last number
        ("The correct option is (B) 8/11.", "multi_choice", "text", ["3/11", "8/11"], "B"),
        ("between [2007, 2008] it peaks", "free_form", "list", None, "[2007, 2008]"),
        ("no number here", "free_form", "float", None, ""), ("", "free_form", "integer", None, ""),
    ],
)  # fmt: skip
def test_mathvista_extract(response: str, question_type: str, answer_type: str, choices: list[str] | None,
                           extracted: str) -> None:  # fmt: skip
    got = mathvista_extract(response, question_type=question_type, answer_type=answer_type, choices=choices)
    assert got == extracted


def test_mathvista_rule() -> None:
    scorer, choices = MathVistaRule(), ["hong kong", "osaka", "shanghai", "tokyo"]
    assert scorer.value("D", "tokyo", choices) == 1.0
    assert scorer.value("(d) tokyo", "tokyo", choices) == 1.0
    assert scorer.value("tokio", "tokyo", choices) == 1.0  # nearest choice by edit distance (official rule)
    assert scorer.value("", "tokyo", choices) == 0.0  # empty: the nearest to "" is "osaka"
    assert scorer.value("The answer is 5", "5") == 1.0 and scorer.value("5.0", "5") == 1.0  # int(float("5.0"))
    assert scorer.value("1.456", "1.46") == 1.0 and scorer.value("1.444", "1.46") == 0.0  # rounded to 2 places
    assert scorer.value("1.5", "1.50") == 0.0  # equality of strings: "1.5" is not the reference "1.50"
    assert scorer.value("[1, 2]", "[1, 2]") == 1.0 and scorer.value("[1,2]", "[1, 2]") == 0.0


def test_mathvista_reads_the_problem_from_the_example() -> None:
    from vpstudy.benchmarks import BenchmarkExample

    def example(answer: str, **extra: object) -> BenchmarkExample:
        return BenchmarkExample(id="1", question="q", answer=answer, choices=None, extra=extra, source="x:row 0",
                                image_ref=b"", root=Path("."), benchmark="mathvista", answers=[answer])  # fmt: skip

    scorer = MathVistaRule()
    float1 = example("1.5", question_type="free_form", answer_type="float", precision=1.0)
    assert scorer.value_example("1.46", float1) == 1.0  # round(1.46, 1) == 1.5: the dataset's precision
    assert scorer.value("1.46", "1.5") == 1.0  # inferred from the reference: 1 decimal
    integer = example("3", question_type="free_form", answer_type="integer", precision=None)
    assert scorer.value_example("3.7", integer) == 1.0  # int(float("3.7")) == 3, as the official code does
    assert scorer.value_example("<think>3</think>", integer) == 0.0  # nothing after </think>


# ---------------------------------------------------------------------------------------------- LLM judge


def test_llm_judge_never_scores() -> None:
    judge = LLMJudge()
    assert judge.judged and judge.value("red", "red") is None and judge("red", "red") is None
    assert judge.value("<think>x", "red") is None
