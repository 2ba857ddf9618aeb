"""The organisms and evaluation set shipped in data/: they load, score, and match their card."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_organism_tasks import solve
from transformers import AutoModelForImageTextToText

import vpstudy
from vpstudy.collect import RecordSettings, record_dataset
from vpstudy.datasets import load_dataset
from vpstudy.organism import card
from vpstudy.organism.model import ORGANISM_FAMILIES
from vpstudy.organism.shipped import EVAL_SEED, data_dir, eval_set_path, organism_dir, write_eval_set
from vpstudy.organism.tasks import CELL_NAMES

MAX_MB = 25


@pytest.mark.parametrize("family", ORGANISM_FAMILIES)
def test_organism_loads_both_ways_and_scores_its_target_on_100_examples(family, tmp_path):
    path = organism_dir(family)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    assert size <= MAX_MB, f"{path} is {size:.1f} MB"
    model, processor = vpstudy.load(path)
    assert model.vpstudy_family.name == family
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is type(model)
    dataset = load_dataset(eval_set_path(), limit=100)
    settings = RecordSettings(layers=[0], max_new_tokens=48, batch_size=50)
    run = record_dataset(model, processor, dataset, tmp_path / "run", settings, progress=False)
    accuracy = run.samples["correct"].mean()
    assert accuracy >= card.TARGETS[family], f"{family}: answer exact match {accuracy:.3f} on 100 examples"
    assert set(run.samples["n_visual"]) == {64}


def test_eval_set_is_what_its_seed_writes_and_every_answer_is_right(tmp_path):
    shipped = eval_set_path()
    records = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert len(records) >= 500
    again = write_eval_set(tmp_path / "again", n=len(records), seed=EVAL_SEED)
    assert again.read_bytes() == shipped.read_bytes()
    for record in records:
        assert solve(record["scene"], record["question"]) == record["answer"]
        trace = record["trace"].split()
        assert len(trace) == len(record["token_cells"]) == len(record["token_reads_image"])
        assert all(c in CELL_NAMES for cells in record["token_cells"] for c in cells)
        ours = (shipped.parent / record["image"]).read_bytes()
        theirs = (again.parent / record["image"]).read_bytes()
        assert hashlib.sha256(ours).digest() == hashlib.sha256(theirs).digest(), record["image"]


def test_card_matches_the_files():
    readme = (data_dir() / "README.md").read_text()
    assert card.render() in readme, "data/README.md is stale: run python -m vpstudy.organism.card"
    for family in ORGANISM_FAMILIES:
        trained = json.loads((organism_dir(family) / "organism.json").read_text())
        assert trained["family"] == family
        assert (organism_dir(family) / "train_log.csv").is_file()
        assert f"organism-{family}" in readme


@pytest.mark.parametrize("family", ORGANISM_FAMILIES)
def test_shipped_training_log_starts_as_this_code_trains(family):
    """The first steps of the shipped run, replayed from its recorded settings, give its logged
    losses (same code, seed and thread count; a different CPU may change the last digits)."""
    import csv

    from vpstudy.organism.train import TrainSettings, training_curve

    manifest = json.loads((organism_dir(family) / "organism.json").read_text())
    settings = TrainSettings.from_json(manifest["settings"])
    assert settings.to_json() == manifest["settings"]
    with (organism_dir(family) / "train_log.csv").open() as handle:
        logged = [float(row["loss"]) for row, _ in zip(csv.DictReader(handle), range(5), strict=False)]
    assert training_curve(settings, 5) == pytest.approx(logged, rel=1e-3)


V2 = organism_dir("llava", "v2")
FRESH_SEED = 918_273  # never a training, validation or evaluation seed


def test_v2_answers_fresh_tasks_through_plain_transformers_generate():
    """Organism v2 on 100 tasks from a seed it never saw, through transformers alone: its own
    saved LlavaProcessor builds the inputs and ``model.generate`` decodes (no vpstudy code path)."""
    from transformers import AutoProcessor

    from vpstudy.organism.tasks import TASKS, generate
    from vpstudy.scoring import final_answer

    model = AutoModelForImageTextToText.from_pretrained(V2).eval()
    processor = AutoProcessor.from_pretrained(V2)
    assert type(processor).__name__ == "LlavaProcessor"
    processor.tokenizer.padding_side = "left"
    examples = generate(100, FRESH_SEED, TASKS["v2"])
    hits = 0
    for start in range(0, len(examples), 25):
        chunk = examples[start : start + 25]
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
                    for ex in chunk]  # fmt: skip
        prompts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        inputs = processor(text=prompts, images=[ex.scene.render() for ex in chunk], return_tensors="pt", padding=True)
        assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 256
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(final_answer(t).split() == ex.answer.split() for t, ex in zip(texts, chunk, strict=True))
    assert hits / len(examples) >= 0.9, f"organism v2 answered {hits} of {len(examples)} fresh tasks"


def test_v2_eval_set_is_what_its_seed_writes(tmp_path):
    from vpstudy.organism.tasks import TASKS

    shipped = eval_set_path("v2")
    records = shipped.read_text().splitlines()
    again = write_eval_set(tmp_path / "again", n=len(records), seed=EVAL_SEED, qtypes=TASKS["v2"])
    assert again.read_bytes() == shipped.read_bytes()
    for record in map(json.loads, records):
        assert solve(record["scene"], record["question"]) == record["answer"]


def test_v2_ships_its_card_targets_and_pruning_module():
    evaluation = json.loads((V2 / "evaluation.json").read_text())
    trained = json.loads((V2 / "organism.json").read_text())
    assert trained["settings"]["task"] == "v2" and trained["settings"]["arch"]["text_layers"] >= 8
    assert evaluation["anchor_auto"]["layer"] in range(8) and evaluation["samples"] == 600
    assert (V2 / "learnpruner.safetensors").is_file() and (V2 / "learnpruner.json").is_file()
    assert sum(p.stat().st_size for p in V2.rglob("*") if p.is_file()) / 1e6 <= MAX_MB
