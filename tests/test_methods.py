"""One test matrix over every registered pruning method (vpstudy.pruning.registry.METHODS), on the
tiny random models of every family.

Each method class declares its ``keep_all_settings`` (keep every visual token), its
``pruning_settings`` (prune something on a tiny model) and its ``bad_settings``; adding a method
to the registry adds it to every test here:

- keep-everything settings generate exactly what the model generates alone (tokens and logits);
- bad settings are one-line errors (a ``VpstudyError`` whose message has no newline);
- mask mode and physical mode give the same tokens, logits (≤1e-5) and kept sets;
- a left-padded batch equals its rows generated one by one (float64, so that padding's float32
  noise cannot move a ranking), for the methods that draw nothing at random;
- every method appears in the comparison of ``vpstudy evaluate --method all`` at 5% and 10%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vpstudy
from vpstudy.errors import VpstudyError
from vpstudy.pruning import Pruner, make_method
from vpstudy.pruning.methods.learnpruner import PruningModule
from vpstudy.pruning.registry import METHODS, comparison_entries

from test_pruning import ALL_FAMILIES, NEW_TOKENS, _generate, _inputs

RANDOM = {"random"}  # methods that draw at random (a batch draws differently from its rows)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request, tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs[request.param])
    return dict(name=request.param, path=tiny_dirs[request.param], model=model, processor=processor,
                inputs=_inputs(model, processor))  # fmt: skip


def _settings(name: str, family: dict, which: str, tmp_path) -> dict:
    cls = METHODS[name]
    settings = dict(cls.keep_all_settings if which == "keep" else cls.pruning_settings)
    n_layers = family["model"].config.get_text_config().num_hidden_layers
    if "anchor" in {f for f in cls.__dataclass_fields__} and which != "keep":
        settings.setdefault("anchor", n_layers // 2)
    if name == "learnpruner" and which != "keep":  # a random module of the right width stands in for a trained one
        dim = family["model"].config.get_text_config().hidden_size
        torch.manual_seed(0)
        PruningModule(dim, 8).save(tmp_path / "lpm", trained_on="random test module")
        settings |= {"module": str(tmp_path / "lpm"), "ratio": 0.3}
    return settings


def _applicable(name: str, family: dict, which: str) -> bool:
    """A method prunes only on the families it declares (encoder-side ones: those with a vision layout)."""
    families = METHODS[name].families
    return which == "keep" or families is None or family["name"] in families


@pytest.mark.parametrize("name", list(METHODS))
def test_keep_everything_settings_generate_exactly_what_the_model_does(family, name, tmp_path):
    plain, _ = _generate(family["model"], family["inputs"])
    method = make_method(name, **_settings(name, family, "keep", tmp_path))
    out, kept = _generate(family["model"], family["inputs"], [method])
    assert torch.equal(out.sequences, plain.sequences), name
    for a, b in zip(out.scores, plain.scores, strict=True):
        assert torch.equal(a, b), name
    assert all((k.counts == k.masks.shape[-1]).all() for k in kept)


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_settings_are_one_line_errors(name):
    bad = METHODS[name].bad_settings
    assert bad, f"{name} declares no bad settings"
    for settings, message in bad:
        with pytest.raises(VpstudyError) as error:
            make_method(name, **settings)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (name, settings)
    with pytest.raises(VpstudyError, match=f"{name}: unknown setting"):
        make_method(name, no_such_setting=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_mask_and_physical_modes_agree(family, name, tmp_path):
    if not _applicable(name, family, "prune"):
        pytest.skip(f"{name} supports {METHODS[name].families}, not {family['name']}")
    settings = _settings(name, family, "prune", tmp_path)
    masked, kept_mask = _generate(family["model"], family["inputs"], [make_method(name, **settings)], "mask")
    physical, kept_phys = _generate(family["model"], family["inputs"], [make_method(name, **settings)], "physical")
    assert torch.equal(masked.sequences, physical.sequences), name
    for a, b in zip(masked.scores, physical.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(kept_mask, kept_phys, strict=True):
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.masks, b.masks)
    # the settings do prune: some visual token is hidden at some step and layer
    assert any((k.counts < k.masks.shape[-1]).any() for k in kept_mask), f"{name}: nothing was pruned"


@pytest.mark.parametrize("name", [n for n in METHODS if n not in RANDOM])
def test_a_batch_equals_its_rows(family, name, tmp_path):
    if not _applicable(name, family, "prune"):
        pytest.skip(f"{name} supports {METHODS[name].families}, not {family['name']}")
    model, _ = vpstudy.load(family["path"], dtype=torch.float64)
    inputs = _inputs(model, family["processor"])
    settings = _settings(name, family, "prune", tmp_path)
    batch, kept = _generate(model, inputs, [make_method(name, **settings)])
    prompt = inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        alone_inputs = _inputs(model, family["processor"], (b,))
        alone, kept_alone = _generate(model, alone_inputs, [make_method(name, **settings)])
        generated = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(batch.sequences[b, prompt : prompt + len(generated)], generated), (name, b)
        steps = len(kept_alone[0].counts)
        np.testing.assert_array_equal(kept[b].counts[:steps], kept_alone[0].counts)
        np.testing.assert_array_equal(kept[b].masks[:steps], kept_alone[0].masks)


def test_every_method_is_in_the_comparison_at_both_budgets():
    entries = comparison_entries(8)
    for name, cls in METHODS.items():
        rows = [e for e in entries if e.method.split("+")[-1] == name or e.method.split("+")[0] == name]
        assert rows, f"{name} has no row in the comparison"
        budgets = {e.budget for e in rows if e.budget is not None}
        if cls.comparison(0.05, 8) != cls.comparison(0.10, 8):
            assert {0.05, 0.10} <= budgets, name
    assert len({e.label for e in entries}) == len(entries)


def test_encoder_side_methods_name_the_unsupported_family(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["internvl"])
    with pytest.raises(VpstudyError, match="visionzip does not support family 'internvl'"):
        Pruner(model, [make_method("visionzip", ratio=0.5)])
    assert NEW_TOKENS > 0


@pytest.mark.parametrize("name", [n for n in METHODS if n not in RANDOM])
def test_static_and_dynamic_caches_prune_alike(family, name, tmp_path):
    """``vpstudy evaluate`` decodes on a static cache where it is exact (vpstudy.caching): each
    method keeps the same tokens and generates the same text there as on transformers' default
    dynamic cache, with the same masks read off the static cache's preallocated slots."""
    from vpstudy.caching import resolve_cache

    if not _applicable(name, family, "prune"):
        pytest.skip(f"{name} supports {METHODS[name].families}, not {family['name']}")
    if resolve_cache(family["model"], "auto") != "static":
        pytest.skip(f"{family['name']}: no exact static cache")
    settings = _settings(name, family, "prune", tmp_path)
    runs = {
        cache: _generate(family["model"], family["inputs"], [make_method(name, **settings)], "mask",
                         cache_implementation=cache)  # fmt: skip
        for cache in ("static", "dynamic")
    }
    (static, kept_static), (dynamic, kept_dynamic) = runs["static"], runs["dynamic"]
    assert torch.equal(static.sequences, dynamic.sequences), name
    for a, b in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(kept_static, kept_dynamic, strict=True):
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.masks, b.masks)


@pytest.mark.parametrize(
    "family_name, left_out",
    [
        ("qwen2_vl", {"learnpruner-5", "learnpruner-10", "attribution_oracle-5", "attribution_oracle-10"}),
        ("internvl", {f"{m}-{b}" for m in ("visionzip", "desap", "learnpruner", "attribution_oracle") for b in (5, 10)}),
    ],
)
def test_the_comparison_leaves_out_rows_the_model_cannot_run_and_says_why(family_name, left_out, tiny_dirs):
    """``--method all`` on a model a method does not support (a family, a missing trained module)
    runs every other row: those rows are left out with one line each, not the whole comparison."""
    from vpstudy.evaluation import check_plans, comparison_plans

    model, _ = vpstudy.load(tiny_dirs[family_name])
    rows = comparison_plans(model.config.get_text_config().num_hidden_layers)
    unavailable = check_plans(model, rows)
    assert set(unavailable) == left_out
    for label, reason in unavailable.items():
        assert "\n" not in reason and ("does not support family" in reason or "no trained pruning module" in reason)


def test_budgets_without_a_paper_rule_give_no_row_that_depends_on_one():
    labels = [e.label for e in comparison_entries(8, budgets=(0.05, 0.2))]
    assert "visionpulse-5" in labels and "random-like-visionpulse-5" in labels and "topk-20" in labels
    assert not [label for label in labels if label.endswith("visionpulse-20")]
