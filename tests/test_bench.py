"""The recording benchmark's code path stays alive (a smoke run; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vpstudy
import vpstudy.datasets
import vpstudy.testing
from vpstudy.testing import make_tiny


def test_recording_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "vpstudy.bench.recording", "--layers", "2", "--hidden", "64", "--heads", "4",
           "--kv-heads", "2", "--intermediate", "128", "--visual-tokens", "16", "--new-tokens", "3", "--repeats", "1",
           "--json", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["visual_tokens"] == 16 and report["identical_tokens"]["sdpa_vs_record"] is True
    assert set(report["median"]) == {"sdpa", "record", "eager+attn"}
    assert "recording / plain SDPA" in result.stdout


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_make_tiny_text_overrides_win_and_vision_follows_text_width(family, tmp_path):
    rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e4}
    path = make_tiny(family, tmp_path, text_overrides=dict(hidden_size=128, head_dim=32, rope_parameters=rope))
    model, processor = vpstudy.load(path)
    assert model.config.text_config.hidden_size == 128
    assert model.config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    dataset = vpstudy.datasets.load_dataset(vpstudy.testing.make_tiny_dataset(tmp_path / "data", n=1))
    from vpstudy.processing import format_prompt, prepare_batch

    spec = model.vpstudy_family
    inputs = prepare_batch(processor, spec, model.config, [format_prompt(processor, spec, "what")], [dataset[0].image()])
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_pruning_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "vpstudy.bench.pruning", "--layers", "2", "--hidden", "64", "--heads", "4",
           "--kv-heads", "2", "--intermediate", "128", "--visual-tokens", "64", "--new-tokens", "3", "--repeats", "1",
           "--json", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["visual_tokens"] == 64 and report["identical_tokens_physical_vs_mask"] is True
    assert set(report["median_decode_step_s"]) == {"dense", "visionpulse-physical", "visionpulse-mask"}
    assert 0 < report["kept_fraction_at_anchor"]["visionpulse-physical"] <= 0.05
    assert "decision overhead" in result.stdout
