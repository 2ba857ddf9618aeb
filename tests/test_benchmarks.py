"""Benchmark adapters: each reads a small fixture written here with ``datasets`` in that
benchmark's schema as published on the Hugging Face Hub (column names and types; the source of
each schema is cited at its fixture), builds the toolkit's prompt, picks its scorer; several run
end to end through ``--data`` on a tiny model; judged benchmarks export for their judge and report
no score; bad input is one line that writes nothing. Nothing is downloaded."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from PIL import Image

from vpstudy.benchmarks import REGISTRY, BenchmarkError, adapter_for, get_benchmark, parse_hub_id
from vpstudy.cli import main
from vpstudy.datasets import load_dataset
from vpstudy.scoring import get_scorer
from vpstudy.testing import make_tiny

Value, Seq = datasets.Value, datasets.Sequence
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def png(color: tuple[int, int, int]) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write(root: Path, name: str, features: dict[str, Any], rows: dict[str, list], fmt: str) -> Path:
    """The rows as a ``datasets.Dataset`` with these features, saved with ``save_to_disk`` (a
    directory) or as one parquet file (the form of the hub's own data files)."""
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    if fmt == "parquet":
        ds.to_parquet(str(root / f"{name}.parquet"))
        return root / f"{name}.parquet"
    ds.save_to_disk(str(root / name))
    return root / name


# ---------------------------------------------------------------------------------------------- fixtures
# Each writes three rows; images are solid COLORS[i].


def chartqa(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/lmms-lab/ChartQA README.md (dataset_info); lmms-lab-encoder/ChartQA is the same
    features = {"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                "image": datasets.Image()}
    rows = {"type": ["human_test", "augmented_test", "human_test"],
            "question": ["What is the value of Japan?", "How many bars are red?", "Which year is highest?"],
            "answer": ["45.2", "3", "2019"], "image": [png(c) for c in COLORS]}  # fmt: skip
    return write(root, "chartqa", features, rows, fmt)


def docvqa(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/lmms-lab/DocVQA README.md, config_name DocVQA
    features = {"questionId": Value("string"), "question": Value("string"), "question_types": Seq(Value("string")),
                "image": datasets.Image(), "docId": Value("int64"), "ucsf_document_id": Value("string"),
                "ucsf_document_page_no": Value("string"), "answers": Seq(Value("string")),
                "data_split": Value("string")}  # fmt: skip
    rows = {"questionId": ["49153", "24580", "57349"], "question": ["What is the date?", "Who signed it?", "Total?"],
            "question_types": [["form"], ["handwritten"], ["table/list"]], "image": [png(c) for c in COLORS],
            "docId": [14465, 2, 3], "ucsf_document_id": ["xnbl0037", "a", "b"],
            "ucsf_document_page_no": ["1", "2", "3"],
            "answers": [["1/8/93", "January 8, 1993"], ["J. Smith"], ["$ 1,000"]],
            "data_split": ["val"] * 3}  # fmt: skip
    return write(root, "docvqa", features, rows, fmt)


def infovqa(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/lmms-lab/DocVQA README.md, config_name InfographicVQA
    features = {"questionId": Value("string"), "question": Value("string"), "answers": Seq(Value("string")),
                "answer_type": Seq(Value("string")), "image": datasets.Image(), "image_url": Value("string"),
                "operation/reasoning": Seq(Value("string")), "ocr": Value("string"),
                "data_split": Value("string")}  # fmt: skip
    rows = {"questionId": ["98313", "98314", "98315"], "question": ["Which country?", "What share?", "How many?"],
            "answers": [["Sweden"], ["25%", "25"], ["3"]],
            "answer_type": [["single span"], ["single span"], ["number"]],
            "image": [png(c) for c in COLORS], "image_url": ["https://x/1.jpg", "https://x/2.jpg", "https://x/3.jpg"],
            "operation/reasoning": [[], [], ["counting"]], "ocr": ["{}"] * 3, "data_split": ["val"] * 3}  # fmt: skip
    return write(root, "infovqa", features, rows, fmt)


def textvqa(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/lmms-lab/textvqa README.md (dataset_info; copied verbatim in pppop7/textvqa)
    features = {"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                "question_tokens": Seq(Value("string")), "image": datasets.Image(), "image_width": Value("int32"),
                "image_height": Value("int32"), "flickr_original_url": Value("string"),
                "flickr_300k_url": Value("string"), "answers": Seq(Value("string")),
                "image_classes": Seq(Value("string")), "set_name": Value("string"),
                "ocr_tokens": Seq(Value("string"))}  # fmt: skip
    rows = {"image_id": ["003a8ae2ef43b901", "b", "c"], "question_id": [34602, 34603, 34604],
            "question": ["what is the brand of this camera?", "WHAT time is it?", "what number is on the shirt?"],
            "question_tokens": [["what"], ["what"], ["what"]], "image": [png(c) for c in COLORS],
            "image_width": [40] * 3, "image_height": [32] * 3, "flickr_original_url": ["u"] * 3,
            "flickr_300k_url": ["u"] * 3,
            "answers": [["nous les gosses"] * 4 + ["dakota"] * 6, ["5:41"] * 10, ["23"] * 9 + ["twenty three"]],
            "image_classes": [["Camera"]] * 3, "set_name": ["val"] * 3, "ocr_tokens": [["dakota"], ["5:41"], ["23"]]}
    return write(root, "textvqa", features, rows, fmt)


def mmstar(root: Path, fmt: str = "disk") -> Path:
    # schema: lmms-eval tasks/mmstar/utils.py (reads index, question, image, answer, category, l2_category) and the
    # Lin-Chen/MMStar card's dataset_info (as copied in macabdul9/MMStar): meta_info struct(source, split, image_path)
    meta = datasets.Features({"source": Value("string"), "split": Value("string"), "image_path": Value("string")})
    features = {"index": Value("int64"), "question": Value("string"), "image": datasets.Image(),
                "answer": Value("string"), "category": Value("string"), "l2_category": Value("string"),
                "meta_info": dict(meta)}  # fmt: skip
    question = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is "
                "on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The "
                "suitcase is beneath the book.")  # fmt: skip
    rows = {"index": [0, 1, 2],
            "question": [question, "Is this a cat? Please answer yes or no.\nOptions: A: yes, B: no",
                         "  What is shown?\nOptions: A: x, B: y  "],
            "image": [png(c) for c in COLORS], "answer": ["A", "B", "A"], "category": ["coarse perception"] * 3,
            "l2_category": ["image scene and topic"] * 3,
            "meta_info": [{"source": "MMBench", "split": "val", "image_path": "images/0.jpg"}] * 3}  # fmt: skip
    return write(root, "mmstar", features, rows, fmt)


def realworldqa(root: Path, fmt: str = "disk") -> Path:
    # schema: lmms-eval tasks/realworldqa/utils.py (reads image, question, answer); the card of the same data at
    # huggingface.co/datasets/visheratin/realworldqa lists question string, answer string, image Image
    features = {"question": Value("string"), "answer": Value("string"), "image": datasets.Image()}
    instruction = "Please answer directly with only the letter of the correct option and nothing else."
    rows = {"question": [f"In which direction is the front wheel of the car on the right side facing?\n\nA. Left\n"
                         f"B. Straight\nC. Right\n\n{instruction}", "How many cars are there? Answer with a number. ",
                         "Is the road going uphill or downhill?"],
            "answer": ["C", "0", "Downhill"], "image": [png(c) for c in COLORS]}  # fmt: skip
    return write(root, "realworldqa", features, rows, fmt)


def mathvista(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/AI4Math/MathVista README.md (dataset_info)
    meta = {"category": Value("string"), "context": Value("string"), "grade": Value("string"),
            "img_height": Value("int64"), "img_width": Value("int64"), "language": Value("string"),
            "skills": Seq(Value("string")), "source": Value("string"), "split": Value("string"),
            "task": Value("string")}  # fmt: skip
    features = {"pid": Value("string"), "question": Value("string"), "image": Value("string"),
                "decoded_image": datasets.Image(), "choices": Seq(Value("string")), "unit": Value("string"),
                "precision": Value("float64"), "answer": Value("string"), "question_type": Value("string"),
                "answer_type": Value("string"), "metadata": meta, "query": Value("string")}  # fmt: skip
    metadata = {"category": "math-targeted-vqa", "context": "table", "grade": "elementary school", "img_height": 32,
                "img_width": 40, "language": "english", "skills": ["arithmetic reasoning"], "source": "TabMWP",
                "split": "testmini", "task": "math word problem"}  # fmt: skip
    rows = {"pid": ["1", "2", "3"],
            "question": ["What fraction of the shape is blue?", "How much money does Ruth need?",
                         "What is the fraction of females facing the camera?"],
            "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"], "decoded_image": [png(c) for c in COLORS],
            "choices": [["3/11", "8/11", "6/11", "3/5"], None, None], "unit": [None, "$", None],
            "precision": [None, None, 1.0], "answer": ["8/11", "13", "0.6"],
            "question_type": ["multi_choice", "free_form", "free_form"], "answer_type": ["text", "integer", "float"],
            "metadata": [metadata] * 3, "query": ["q1", "q2", "q3"]}  # fmt: skip
    return write(root, "mathvista", features, rows, fmt)


def charxiv(root: Path, fmt: str = "disk") -> Path:
    # schema: the columns lmms-eval tasks/charxiv/utils.py reads from princeton-nlp/CharXiv (image, figure_path,
    # reasoning_q, reasoning_q_source (compared with the ints 1-4), reasoning_a, descriptive_q1..4 / descriptive_a1..4)
    features = {"image": datasets.Image(), "figure_path": Value("string"), "reasoning_q": Value("string"),
                "reasoning_q_source": Value("int64"), "reasoning_a": Value("string"),
                **{f"descriptive_q{i}": Value("int64") for i in range(1, 5)},
                **{f"descriptive_a{i}": Value("string") for i in range(1, 5)}}  # fmt: skip
    rows = {"image": [png(c) for c in COLORS], "figure_path": ["images/0.jpg", "images/2.jpg", "images/7.jpg"],
            "reasoning_q": ["Which model declines most?", "What is the trend?", "What is the maximum value?"],
            "reasoning_q_source": [1, 2, 4], "reasoning_a": ["Joint-CNN", "increases", "0.75"],
            **{f"descriptive_q{i}": [i] * 3 for i in range(1, 5)},
            **{f"descriptive_a{i}": ["x"] * 3 for i in range(1, 5)}}  # fmt: skip
    return write(root, "charxiv", features, rows, fmt)


def mmvet(root: Path, fmt: str = "disk") -> Path:
    # schema: the columns lmms-eval tasks/mmvet/utils.py reads from lmms-lab/MMVet (question_id, image, question,
    # answer, capability) and the MM-Vet release's image_source; all strings but the image
    features = {"question_id": Value("string"), "image": datasets.Image(), "question": Value("string"),
                "answer": Value("string"), "image_source": Value("string"), "capability": Value("string")}
    rows = {"question_id": ["v1_0", "v1_1", "v1_2"], "image": [png(c) for c in COLORS],
            "question": ["What is x in the equation?", "Can you explain this meme?", "What is red?"],
            "answer": ["-1 <AND> -5", "It is funny.", "the car"], "image_source": ["a", "b", "c"],
            "capability": ["ocr,math", "rec,ocr,know,gen", "rec"]}  # fmt: skip
    return write(root, "mmvet", features, rows, fmt)


def mia_bench(root: Path, fmt: str = "disk") -> Path:
    # schema: huggingface.co/datasets/lmms-lab/MIA-Bench README.md (dataset_info)
    features = {"image": datasets.Image(), "instruction": Value("string"), "type": Value("string"),
                "num_of_component": Value("int32"), "components": Seq(Value("string")),
                "component_weight": Seq(Value("int32")), "component_type": Seq(Value("string"))}  # fmt: skip
    rows = {"image": [png(c) for c in COLORS],
            "instruction": ["Describe the image in two sentences.", "Write a haiku about it.", "List three colors."],
            "type": ["description", "creative writing", "list"], "num_of_component": [2, 1, 1],
            "components": [["Describe the image", "in two sentences"], ["a haiku"], ["three colors"]],
            "component_weight": [[5, 5], [10], [10]],
            "component_type": [["describe", "length_limit"], ["genre"], ["format"]]}  # fmt: skip
    return write(root, "mia_bench", features, rows, fmt)


FIXTURES: dict[str, Callable[..., Path]] = {
    "chartqa": chartqa, "docvqa": docvqa, "infovqa": infovqa, "textvqa": textvqa, "mmstar": mmstar,
    "realworldqa": realworldqa, "mathvista": mathvista, "charxiv": charxiv, "mmvet": mmvet, "mia_bench": mia_bench,
}  # fmt: skip

SHORT = "\nAnswer the question using a single word or phrase."
# per benchmark: (ids, first prompt, answers of the first example, choices of the first example, scorer)
EXPECTED: dict[str, tuple[list[str], str, list[str] | None, list[str] | None, str]] = {
    "chartqa": (["0", "1", "2"], "What is the value of Japan?\nAnswer the question with a single word.", ["45.2"], None,
                "chartqa_relaxed"),
    "docvqa": (["49153", "24580", "57349"], "What is the date?" + SHORT, ["1/8/93", "January 8, 1993"], None, "anls"),
    "infovqa": (["98313", "98314", "98315"], "Which country?" + SHORT, ["Sweden"], None, "anls"),
    "textvqa": (["34602", "34603", "34604"], "What is the brand of this camera?" + SHORT,
                ["nous les gosses"] * 4 + ["dakota"] * 6, None, "vqa_accuracy"),
    "mmstar": (["0", "1", "2"], "Which option describe the object relationship in the image correctly?\nOptions: A: "
               "The suitcase is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the "
               "bed., D: The suitcase is beneath the book.\nAnswer with the option's letter from the given choices "
               "directly",
               ["A"], None, "mcq_letter"),
    "realworldqa": (["0", "1", "2"], "In which direction is the front wheel of the car on the right side facing?\n\nA. "
                    "Left\nB. Straight\nC. Right\n\nPlease answer directly with only the letter of the correct option "
                    "and nothing else.", ["C"], None, "mcq_letter"),
    "mathvista": (["1", "2", "3"], "What fraction of the shape is blue?\nA. 3/11\nB. 8/11\nC. 6/11\nD. 3/5\nAnswer "
                  "with the option's letter from the given choices directly.", ["8/11"],
                  ["3/11", "8/11", "6/11", "3/5"], "mathvista"),
    "charxiv": (["0", "2", "7"], "Which model declines most?\n    * Your final answer must be grounded to some text "
                "that is explicitly written and relevant to the question in the chart.\n    * If you need to answer "
                "multiple terms, separate them with commas.\n    * Unless specified in the question (such as "
                "answering with a letter), you are required to answer the full names of subplots and/or labels by "
                "default.", ["Joint-CNN"], None, "llm_judge"),
    "mmvet": (["v1_0", "v1_1", "v1_2"], "First please perform reasoning, and think step by step to provide best answer "
              "to the following question: \n\nWhat is x in the equation?", ["-1 <AND> -5"], None, "llm_judge"),
    "mia_bench": (["0", "1", "2"], "Describe the image in two sentences.", None, None, "llm_judge"),
}  # fmt: skip


def load(path: Path, name: str, **kwargs: Any):
    """RealWorldQA's columns are too generic to recognise: it is named; the others are recognised."""
    return load_dataset(path, benchmark="realworldqa" if name == "realworldqa" else None, **kwargs)


# ---------------------------------------------------------------------------------------------- adapters


def test_every_benchmark_module_registers_one_adapter() -> None:
    modules = {p.stem for p in (Path(__file__).parents[1] / "vpstudy" / "benchmarks").glob("*.py")}
    adapters = {type(a).__module__.rsplit(".", 1)[1] for a in REGISTRY.values()}
    assert adapters == modules - {"__init__", "base", "hub"}  # a new module is a new benchmark, nothing else
    assert set(REGISTRY) == set(FIXTURES)
    for name, adapter in REGISTRY.items():
        assert adapter.name == name and adapter.sources and adapter.scorer.name in {"chartqa_relaxed", "anls",
               "vqa_accuracy", "mcq_letter", "mathvista", "llm_judge"}  # fmt: skip
        assert adapter.judged == (name in {"charxiv", "mmvet", "mia_bench"})
        for hub_id in adapter.hub_ids:  # each id leads back to its adapter
            repo, _, config = hub_id.partition(":")
            source = parse_hub_id(f"{repo}:{config}:split" if config else f"{repo}:split")
            assert source is not None and adapter_for(None, "x", hub=source) is adapter


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_adapter_reads_its_benchmark_schema(tmp_path: Path, name: str, fmt: str) -> None:
    dataset = load(FIXTURES[name](tmp_path, fmt), name)
    ids, prompt, answers, choices, scorer = EXPECTED[name]
    assert dataset.benchmark is get_benchmark(name)
    assert [e.id for e in dataset] == ids
    first = dataset[0]
    assert first.question == prompt
    assert (first.answers, first.answer, first.choices) == (answers, answers[0] if answers else None, choices)
    assert first.benchmark == name and dataset.benchmark.scorer.name == scorer
    assert "image" not in first.extra and "decoded_image" not in first.extra
    assert [e.image().getpixel((0, 0)) for e in dataset] == COLORS
    assert [e.id for e in load(dataset.path, name, limit=2)] == ids[:2]


def test_prompts_follow_the_toolkits_per_record(tmp_path: Path) -> None:
    textvqa_ds = load_dataset(textvqa(tmp_path))
    assert textvqa_ds[1].question == "What time is it?" + SHORT  # str.capitalize, as lmms-eval does
    mmstar_ds = load_dataset(mmstar(tmp_path))
    assert mmstar_ds[1].question == ("Is this a cat?\nOptions: A: yes, B: no\nAnswer with the option's letter from "
                                     "the given choices directly")  # " Please answer yes or no." dropped  # fmt: skip
    assert mmstar_ds[2].question.startswith("What is shown?\nOptions: A: x, B: y\nAnswer")  # stripped
    math = load_dataset(mathvista(tmp_path))
    assert math[1].question == ("How much money does Ruth need? (Unit: $)\nAnswer the question using a single "
                                "integer number.")  # fmt: skip
    assert math[2].question == ("What is the fraction of females facing the camera?\nAnswer the question using a "
                                "single floating-point number with one decimal place.")  # fmt: skip
    assert math[1].choices is None and math[2].extra["precision"] == 1.0
    cx = load_dataset(charxiv(tmp_path))
    assert cx[2].question == ("What is the maximum value?\n    * Your final answer must be a number with 2 decimal "
                              "places.")  # category 4: the answer's decimals  # fmt: skip
    assert load_dataset(realworldqa(tmp_path), benchmark="realworldqa")[1].question == (
        "How many cars are there? Answer with a number.")  # fmt: skip


def test_a_file_in_vpstudy_format_stays_vpstudy_format(tmp_path: Path) -> None:
    rows = [{"id": "a", "image": "x.png", "question": "what", "answer": "red", "type": "t"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_dataset(tmp_path / "d.jsonl")
    assert dataset.benchmark is None and dataset[0].question == "what"
    named = load_dataset(tmp_path / "d.jsonl", benchmark="chartqa")  # named: the adapter reads it, id is the row
    assert named.benchmark.name == "chartqa" and named[0].question.endswith("with a single word.")


def test_hub_ids_are_parsed() -> None:
    chart = parse_hub_id("lmms-lab/ChartQA:test")
    assert (chart.repo, chart.config, chart.split, chart.name) == ("lmms-lab/ChartQA", None, "test", "ChartQA-test")
    info = parse_hub_id("lmms-lab-encoder/DocVQA:InfographicVQA:validation")
    assert (info.repo, info.config, info.split) == ("lmms-lab-encoder/DocVQA", "InfographicVQA", "validation")
    assert parse_hub_id("Lin-Chen/MMStar").split is None
    for local in ("data/x.jsonl", "runs/a/b", "/abs/x", "x.parquet", "a:b"):
        assert parse_hub_id(local) is None, local


def test_a_hub_split_is_read_by_its_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path past the download: ``datasets.load_dataset`` is replaced by the local fixture
    (nothing is fetched); the id picks the adapter and its default split."""
    local = datasets.load_from_disk(str(chartqa(tmp_path)))
    calls = []

    def from_the_hub(repo: str, config: str | None, *, split: str, cache_dir: str) -> datasets.Dataset:
        calls.append((repo, config, split))
        return local

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", from_the_hub)
    first = load_dataset("lmms-lab-encoder/ChartQA", limit=2)
    assert calls == [("lmms-lab-encoder/ChartQA", None, "test")]  # ChartQA's split
    assert (first.benchmark.name, first.name, [e.id for e in first]) == ("chartqa", "ChartQA-test", ["0", "1"])
    assert first[0].source == "lmms-lab-encoder/ChartQA:test:row 0" and first[1].image().getpixel((0, 0)) == COLORS[1]
    whole = load_dataset("lmms-lab-encoder/ChartQA:test")
    assert len(whole) == 3 and first.fingerprint() == whole.fingerprint()  # another --limit: the same split
    assert whole.fingerprint()["records"] == 3
    assert load_dataset("lmms-lab-encoder/ChartQA:test", benchmark="chartqa").benchmark.name == "chartqa"


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaVA, and the same model with a chat template that opens ``<think>`` after the
    assistant turn, as Qwen3-VL-Thinking's does (its generations start inside the reasoning)."""
    root = tmp_path_factory.mktemp("models")
    plain = make_tiny("llava", root / "plain", seed=0, extra_words=["<think>", "</think>"])
    thinking = make_tiny("llava", root / "thinking", seed=0, extra_words=["<think>", "</think>"])
    template = thinking / "chat_template.jinja"
    text = template.read_text()
    assert text.rstrip().endswith("ASSISTANT:{% endif %}")
    template.write_text(text.rstrip().replace("ASSISTANT:{% endif %}", "ASSISTANT: <think>{% endif %}"))
    return {"plain": plain, "thinking": thinking}


def evaluate(model: Path, data: Path, out: Path, *extra: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--method", "dense", "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", *extra]) == 0  # fmt: skip
    return pd.read_parquet(out / "samples.parquet"), json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize(("name", "fmt"), [("chartqa", "disk"), ("textvqa", "parquet"), ("mathvista", "disk"),
                                           ("docvqa", "parquet"), ("mmstar", "disk")])  # fmt: skip
def test_end_to_end_through_data(tmp_path: Path, models: dict[str, Path], name: str, fmt: str) -> None:
    data = FIXTURES[name](tmp_path, fmt)
    samples, result = evaluate(models["plain"], data, tmp_path / "run")
    dataset = load_dataset(data)
    scorer = get_scorer(EXPECTED[name][4])
    assert result["scorer"] == scorer.name and result["samples"] == 3
    for example, row in zip(dataset, samples.set_index("sample_id").loc[[e.id for e in dataset]].itertuples(),
                            strict=True):  # fmt: skip
        assert row.prompt == example.question and row.answer_text == row.generated_text
        assert row.score == scorer.value_example(row.generated_text, example)  # the benchmark's scorer, recomputed
        assert row.correct == (row.score == 1.0)
    assert result["accuracy"] == pytest.approx(samples["score"].mean())


def test_a_planted_answer_is_scored_by_the_benchmark_metric(tmp_path: Path, models: dict[str, Path]) -> None:
    """Record once, then give each TextVQA question ten human answers of which the model's
    output is 1, 2, or 4: VQA accuracy 0.3, 0.6 and 1 (hand-computed), through --data."""
    path = textvqa(tmp_path)
    samples, _ = evaluate(models["plain"], path, tmp_path / "first")
    generated = samples.set_index("sample_id")["generated_text"]
    ds = datasets.load_from_disk(str(path))
    answers = [[generated[str(qid)]] * matches + ["zz"] * (10 - matches)
               for qid, matches in zip(ds["question_id"], (1, 2, 4), strict=True)]  # fmt: skip
    ds = ds.remove_columns("answers").add_column("answers", answers, feature=Seq(Value("string")))
    ds.save_to_disk(str(tmp_path / "planted"))
    samples, result = evaluate(models["plain"], tmp_path / "planted", tmp_path / "second")
    # 1 match: left out it 0, else 1/3 (9 times) -> 0.3; 2: 2 x 1/3 + 8 x 2/3 -> 0.6; 4: 1
    assert samples.set_index("sample_id").loc[["34602", "34603", "34604"], "score"].tolist() == pytest.approx(
        [0.3, 0.6, 1.0])  # fmt: skip
    assert result["accuracy"] == pytest.approx(1.9 / 3) and result["accuracy_ci95"][0] <= result["accuracy"]


def test_a_thinking_model_cut_before_think_has_no_answer(tmp_path: Path, models: dict[str, Path]) -> None:
    samples, result = evaluate(models["thinking"], chartqa(tmp_path), tmp_path / "run")
    # the prompt opens <think> and 4 random tokens never close it: no answer, score 0
    assert samples["answer_text"].isna().all() and (samples["score"] == 0.0).all() and not samples["correct"].any()
    assert "</think>" not in "".join(samples["generated_text"]) and result["accuracy"] == 0.0


@pytest.mark.parametrize("name", ["mmvet", "charxiv", "mia_bench"])
def test_judged_benchmarks_export_for_their_judge_and_report_no_score(tmp_path: Path, models: dict[str, Path],
                                                                       name: str) -> None:  # fmt: skip
    data = FIXTURES[name](tmp_path, "parquet")
    samples, result = evaluate(models["plain"], data, tmp_path / "run")
    assert samples["correct"].isna().all() and samples["score"].isna().all()
    assert result["accuracy"] is None and result["accuracy_ci95"] == [None, None]
    assert result["judge"].startswith("judge needed")
    answers = samples.set_index("sample_id")["answer_text"]
    judge = tmp_path / "run" / "judge"
    if name == "mmvet":  # the MM-Vet evaluator's results file: {question_id: answer}
        assert json.loads((judge / "mmvet_results.json").read_text()) == answers.to_dict()
    elif name == "charxiv":  # CharXiv's gen-<model>-reasoning_val.json, keyed by figure id
        content = json.loads((judge / "gen-vpstudy-reasoning_val.json").read_text())
        assert content["7"] == {"figure_id": 7, "inst_category": 4, "raw_question": "What is the maximum value?",
                                "response": answers["7"]}  # fmt: skip
        assert set(content) == {"0", "2", "7"}
    else:  # MIA-Bench: one JSON object per line with the response as "text"
        lines = [json.loads(line) for line in (judge / "mia_bench_responses.jsonl").read_text().splitlines()]
        assert [line["text"] for line in lines] == [answers[str(i)] for i in range(3)]
        assert lines[0]["components"] == ["Describe the image", "in two sentences"]
        assert lines[0]["component_weight"] == [5, 5] and lines[0]["url"] is None
    assert "judge/" in result["judge"]


def test_record_uses_the_benchmark_scorer(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "run"
    assert main(["record", "--model", str(models["plain"]), "--data", str(docvqa(tmp_path)), "--out", str(out),
                 "--max-new-tokens", "3", "--no-progress"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    samples = pd.read_parquet(out / "samples.parquet")
    assert manifest["scorer"] == "anls" and samples["score"].notna().all()


def test_an_explicit_scorer_overrides_the_benchmark_s(tmp_path: Path, models: dict[str, Path]) -> None:
    _, result = evaluate(models["plain"], chartqa(tmp_path), tmp_path / "run", "--scorer", "exact_match")
    assert result["scorer"] == "exact_match"


# ---------------------------------------------------------------------------------------------- bad input


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()  # what the fixtures printed (datasets' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_benchmark_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    line = one_line_error(capsys, ["record", "--model", "unused", "--data", str(chartqa(tmp_path)), "--benchmark",
                                   "chartqb", "--out", str(out)])  # fmt: skip
    assert line == ("vpstudy record: error: unknown benchmark 'chartqb' (known: chartqa, charxiv, docvqa, infovqa, "
                    "mathvista, mia_bench, mmstar, mmvet, realworldqa, textvqa)")  # fmt: skip
    assert not out.exists()


def test_a_dataset_without_the_adapter_s_field_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = chartqa(tmp_path), tmp_path / "run"
    line = one_line_error(capsys, ["evaluate", "--model", "unused", "--data", str(data), "--benchmark", "textvqa",
                                   "--method", "dense", "--out", str(out)])  # fmt: skip
    assert line.startswith(f"vpstudy evaluate: error: {data}: no column 'question_id', which the TextVQA adapter reads")
    assert not out.exists()
    # a DocVQA copy whose answers column was dropped: recognised by name, refused naming the field and the file
    path = docvqa(tmp_path, "parquet")
    frame = pd.read_parquet(path).drop(columns=["answers"])
    frame.to_parquet(tmp_path / "no_answers.parquet")
    with pytest.raises(BenchmarkError, match=f"^{tmp_path}/no_answers.parquet: no column 'answers', which the DocVQA"):
        load_dataset(tmp_path / "no_answers.parquet", benchmark="docvqa")


def test_a_hub_id_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], tiny_dirs: dict[str, Path]) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = tmp_path / "run"
    line = one_line_error(capsys, ["record", "--model", str(tiny_dirs["llava"]), "--data", "lmms-lab/ChartQA:test",
                                   "--out", str(out)])  # fmt: skip
    assert line.startswith("vpstudy record: error: lmms-lab/ChartQA:test: not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set")  # fmt: skip
    assert not out.exists()
    with pytest.raises(BenchmarkError, match="^lmms-lab-encoder/DocVQA:DocVQA: not in the local .* HF_HUB_OFFLINE"):
        load_dataset("lmms-lab-encoder/DocVQA:DocVQA")  # no split given: DocVQA's default, validation


def test_a_hub_that_cannot_be_reached_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(*args: Any, **kwargs: Any) -> None:  # what datasets raises without a network
        raise ConnectionError("Couldn't reach 'lmms-lab/ChartQA' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(BenchmarkError) as error:
        load_dataset("lmms-lab/ChartQA:test")
    message = str(error.value)
    assert message.startswith("lmms-lab/ChartQA:test: cannot reach the Hugging Face Hub") and "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message


def test_a_hub_id_without_a_known_default_split_is_one_line() -> None:
    with pytest.raises(BenchmarkError, match="^someone/unknown: name the split, as someone/unknown:SPLIT"):
        load_dataset("someone/unknown")
