"""The organism audit on a run with planted attention: it must find exactly what was planted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import N_V, planted_organism_run

from vpstudy.rules import anchor_layer
from vpstudy.organism.audit import audit_run, on_path_steps
from vpstudy.organism.tasks import cell_index, token_cells_to_visual


def test_anchor_layer_is_at_the_papers_relative_depth():
    assert anchor_layer(36) == 17
    assert anchor_layer(4) == 2


def test_on_path_steps_stop_after_the_first_divergence():
    rows = on_path_steps(["red", ":", "b2", "c1"], ["red", ":", "b2", "d1", ";"], [[], [], ["b2"], ["d1"], []],
                         [False, False, True, True, True], "s")  # fmt: skip
    assert [r.step for r in rows] == [0, 1, 2, 3]  # step 3 was on the path (and got it wrong)
    assert rows[2].visual_tokens == token_cells_to_visual([cell_index("b2")]) and rows[3].reads_image


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A run over 8 evaluation examples whose traces are generated exactly, with planted scores."""
    run, dataset, truth = planted_organism_run(tmp_path_factory.mktemp("audit"))
    return audit_run(run, dataset), truth


def test_audit_finds_the_planted_localization_and_mass_contrast(planted):
    result, truth = planted
    assert result["answer_acc"] == 1.0 and result["trace_exact"] == 1.0 and result["trace_token_acc"] == 1.0
    layer = next(r for r in result["per_layer"] if r["layer"] == 1)
    assert result["best_layer"] == 1
    assert layer["localization"] == pytest.approx(np.mean(truth["hits"]))
    assert layer["localization_steps"] == len(truth["hits"])
    hits, listing = np.array(truth["hits"]), np.array(truth["listing"])
    assert 0 < listing.sum() < len(listing)
    assert layer["localization_listing"] == pytest.approx(hits[listing].mean())
    assert layer["localization_content"] == pytest.approx(hits[~listing].mean())
    assert layer["localization_listing"] <= layer["listing_on_same_colour"] <= 1
    read, text = np.array(truth["read"]), np.array(truth["text"])
    assert layer["mass_image_reading"] == pytest.approx(read.mean(), abs=1e-3)  # float16 scores, float32 mass
    assert layer["mass_ratio"] == pytest.approx(read.mean() / text.mean(), rel=1e-3)
    pairwise = (read[:, None] > text[None, :]).mean() + 0.5 * (read[:, None] == text[None, :]).mean()
    assert layer["mass_auc"] == pytest.approx(pairwise, abs=1e-9)
    flat = next(r for r in result["per_layer"] if r["layer"] == 0)
    assert flat["chance"] == pytest.approx(4 / N_V)  # one cell = 2×2 of 64 visual tokens


def test_audit_counts_budget_signals_below_the_upper_clamp(planted):
    result, truth = planted
    signal, is_read = np.array(truth["signal"]), np.array(truth["is_read"])
    budget = result["budget"][0]
    assert (budget["tau"], budget["b_max"], budget["anchor_layer"]) == (0.1, 0.05, 2)
    assert budget["below_upper_clamp"] == pytest.approx((signal < 0.05).mean(), abs=1e-6)
    assert budget["below_upper_clamp_image_reading"] == pytest.approx((signal[is_read] < 0.05).mean(), abs=1e-6)
    assert json.dumps(result)  # serialisable as evaluation.json
