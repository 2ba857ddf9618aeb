"""Every family: tiny model written by make_tiny loads through both entry points; specs are data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vpstudy
import vpstudy.datasets
from vpstudy.families import FAMILIES, TextGeometry, UnsupportedFamilyError, get_family
from vpstudy.loading import ModelLoadError
from vpstudy.processing import InputError, format_prompt, prepare_batch
from vpstudy.testing import make_tiny_dataset

ALL_FAMILIES = sorted(FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tiny_model_loads_both_ways(family, tiny_dirs):
    path = tiny_dirs[family]
    model, processor = vpstudy.load(path)
    reference = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model) is type(reference) and type(model).__name__ == FAMILIES[family].model_class
    assert model.vpstudy_family.name == family
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    geometry = TextGeometry.of(model.config)
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads) == (2, 4, 2)  # GQA
    assert len(model.vpstudy_family.text_layer_modules(model)) == 2
    ids = model.vpstudy_family.placeholder_ids(model.config)
    assert ids and all(0 <= i < model.config.get_text_config().vocab_size for i in ids)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_inputs_have_as_many_placeholders_as_the_vision_tower_gives(family, tiny_dirs, tiny_data):
    model, processor = vpstudy.load(tiny_dirs[family])
    spec = model.vpstudy_family
    dataset = vpstudy.datasets.load_dataset(tiny_data)
    examples = dataset[:2]
    inputs = prepare_batch(processor, spec, model.config, [format_prompt(processor, spec, e.question) for e in examples],
                           [e.image() for e in examples])  # fmt: skip
    image_kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.inference_mode():
        features = model.model.get_image_features(**image_kwargs)
    pooled = getattr(features, "pooler_output", features)
    n_features = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in pooled)
    assert int(spec.visual_mask(inputs["input_ids"], model.config).sum()) == n_features
    if spec.needs_mm_token_type_ids:
        assert torch.equal(inputs["mm_token_type_ids"].bool(), spec.visual_mask(inputs["input_ids"], model.config))


def test_placeholder_count_mismatch_is_one_line_error(tiny_dirs, tiny_data):
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    spec = model.vpstudy_family
    image = vpstudy.datasets.load_dataset(tiny_data)[0].image()
    two = format_prompt(processor, spec, "a") + " " + spec.image_prompt
    with pytest.raises(InputError, match=r"prompt 0 holds 2 image placeholders '<\|image_pad\|>' for its one image"):
        prepare_batch(processor, spec, model.config, [two], [image])
    with pytest.raises(InputError, match="more '<|image_pad|>' placeholders than images"):  # the processor's own check
        processor(text=[two], images=[image])
    with pytest.raises(InputError, match="holds no image placeholder"):
        prepare_batch(processor, spec, model.config, ["USER: what ASSISTANT:"], [image])


def test_unsupported_family_and_missing_model(tmp_path, tiny_dirs):
    config = json.loads((tiny_dirs["llava"] / "config.json").read_text())
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedFamilyError, match=r"bert/config.json: model_type 'bert' is not a supported family"):
        vpstudy.load(bert)
    with pytest.raises(ModelLoadError, match="does not exist"):
        vpstudy.load(tmp_path / "nothing")
    with pytest.raises(UnsupportedFamilyError, match="unknown family 'gpt2'"):
        get_family("gpt2")
    assert config["model_type"] == "llava"


def test_make_tiny_is_deterministic(tmp_path):
    from vpstudy.testing import make_tiny

    a, _ = vpstudy.load(make_tiny("qwen3_vl", tmp_path / "a", seed=3))
    b, _ = vpstudy.load(make_tiny("qwen3_vl", tmp_path / "b", seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_tiny_dataset_roundtrip(tmp_path):
    dataset = vpstudy.datasets.load_dataset(make_tiny_dataset(tmp_path, n=3))
    assert len(dataset) == 3 and dataset[0].image().mode == "RGB"
