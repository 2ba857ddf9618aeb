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
