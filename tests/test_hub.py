"""Real models (vpstudy/loading.py, vpstudy/processing.py, vpstudy/devices.py): hub ids read offline
from a hub cache the test builds in huggingface_hub's own layout (not a mock of transformers),
one-line errors for an id the cache lacks, transformers' processor and the fallback giving
identical inputs, `--device-map auto`, the per-layer device moves of the recorder and the
pruner, and (CUDA machines only) bf16, two devices and the Qwen processors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vpstudy
from vpstudy.cli import main
from vpstudy.datasets import load_dataset
from vpstudy.devices import DeviceError, move_fields, move_to, rank_gpus
from vpstudy.loading import check_hub_model
from vpstudy.processing import FallbackProcessor, format_prompt, prepare_batch
from vpstudy.testing import make_tiny

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "vpstudy-test/tiny-llava"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="transformers' Qwen processors need torchvision (GPU machines)")


def build_hub_cache(home: Path, repo: str, model_dir: Path, commit: str = COMMIT) -> Path:
    """``HF_HOME`` holding ``model_dir`` as the snapshot ``commit`` of ``repo``, laid out as
    huggingface_hub writes it: ``hub/models--org--name/{blobs/<hash>, snapshots/<commit>/<file> ->
    ../../blobs/<hash>, refs/main}``."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs" / "main").write_text(commit)
    return home


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return make_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """The launched processes decode with one torch thread (``OMP_NUM_THREADS=1``); so does this
    process while the test runs, so that matmul reductions, and every last bit of the values
    compared, are the same whatever thread count pytest was started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return env | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_hub_id_loads_offline_from_the_cache_and_records(tmp_path, tiny_llava, tiny_data):
    """`vpstudy record --model org/name` with HF_HUB_OFFLINE=1 reads the cached snapshot through
    transformers' from_pretrained and records what the same model recorded from a directory does."""
    home = build_hub_cache(tmp_path / "hf", REPO, tiny_llava)
    hub_run, local_run = tmp_path / "hub-run", tmp_path / "local-run"
    args = ["--data", str(tiny_data), "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"]
    code = ("import sys, vpstudy; from vpstudy.cli import main; m, p = vpstudy.load(sys.argv[1]); "
            "print(type(m).__name__, type(p).__name__, m.vpstudy_revision); sys.exit(main(sys.argv[2:]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, REPO, "record", "--model", REPO, "--out", str(hub_run), *args],
                          env=_offline_env(home), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["LlavaForConditionalGeneration", "LlavaProcessor", COMMIT]
    assert main(["record", "--model", str(tiny_llava), "--out", str(local_run), *args]) == 0
    hub, local = vpstudy.open_run(hub_run), vpstudy.open_run(local_run)
    assert hub.manifest["model"]["path"] == REPO and hub.manifest["model"]["revision"] == COMMIT
    assert hub.manifest["model_config_hash"] == local.manifest["model_config_hash"]
    pd.testing.assert_frame_equal(hub.steps, local.steps, check_exact=True)
    for sample_id in hub.sample_ids:
        np.testing.assert_array_equal(hub.scores(sample_id), local.scores(sample_id))


@pytest.mark.parametrize("model", [REPO.replace("tiny-llava", "absent"), f"{REPO}@v2"])
def test_a_hub_id_missing_offline_is_one_line_and_writes_nothing(model, tmp_path, tiny_llava, tiny_data,
                                                                 monkeypatch, capsys):  # fmt: skip
    home = build_hub_cache(tmp_path / "hf", REPO, tiny_llava)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["record", "--model", model, "--data", str(tiny_data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vpstudy record: error: {model}: model not in the Hugging "
                                                         f"Face cache {home / 'hub'}")  # fmt: skip
    assert "HF_HUB_OFFLINE=1" in err and not out.exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    check_hub_model(model)  # online, the id is left to the hub


def _inputs(processor, spec, config, examples):
    prompts = [format_prompt(processor, spec, ex.question) for ex in examples]
    return prepare_batch(processor, spec, config, prompts, [ex.image() for ex in examples])


def _assert_same_inputs(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("model", ["tiny", "organism"])
def test_llavas_own_processor_and_the_fallback_give_identical_inputs(model, tiny_llava, tiny_data):
    """LlavaProcessor builds without torchvision: vpstudy.load uses it, and the fallback (what the
    other families get here) builds the same input ids, masks and pixels from the same parts."""
    path = tiny_llava if model == "tiny" else ROOT / "data" / "organism-llava"
    data = tiny_data if model == "tiny" else ROOT / "data" / "organism-eval" / "data.jsonl"
    m, processor = vpstudy.load(path)
    assert type(processor).__name__ == "LlavaProcessor"
    spec = m.vpstudy_family
    fallback = FallbackProcessor(spec, processor.tokenizer, processor.image_processor, m.config)
    examples = list(load_dataset(data, limit=3))
    _assert_same_inputs(_inputs(processor, spec, m.config, examples), _inputs(fallback, spec, m.config, examples))


@needs_torchvision
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_processors_and_the_fallback_give_identical_inputs(family, tmp_path, tiny_data):
    """Where torchvision is installed (GPU machines), transformers' Qwen processors build; the
    fallback must give them identical inputs (ids, masks, pixels, grids, M-RoPE token types)."""
    import transformers

    path = make_tiny(family, tmp_path / family)
    model, fallback_or_own = vpstudy.load(path)
    spec = model.vpstudy_family
    tokenizer = fallback_or_own.tokenizer
    image_processor = fallback_or_own.image_processor
    processor_cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen3_vl": "Qwen3VLProcessor"}[family]  # fmt: skip
    video_cls = "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor"
    own = getattr(transformers, processor_cls)(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=getattr(transformers, video_cls)(),
                                               chat_template=tokenizer.chat_template)  # fmt: skip
    fallback = FallbackProcessor(spec, tokenizer, image_processor, model.config)
    examples = list(load_dataset(tiny_data, limit=3))
    _assert_same_inputs(_inputs(own, spec, model.config, examples), _inputs(fallback, spec, model.config, examples))


def test_device_map_auto_records_what_one_device_does(tmp_path, tiny_dirs, tiny_data, capsys):
    """transformers' own placement (from_pretrained(device_map="auto")): on this CPU-only machine
    everything lands on the CPU, and the run equals the one loaded with --device."""
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(tiny_data), "--max-new-tokens", "5",
            "--batch-size", "3", "--no-progress"]  # fmt: skip
    assert main(["record", *args, "--out", str(tmp_path / "placed"), "--device-map", "auto"]) == 0
    assert main(["record", *args, "--out", str(tmp_path / "plain")]) == 0
    placed, plain = vpstudy.open_run(tmp_path / "placed"), vpstudy.open_run(tmp_path / "plain")
    pd.testing.assert_frame_equal(placed.steps, plain.steps, check_exact=True)
    assert main(["record", *args, "--out", str(tmp_path / "x"), "--device-map", "auto", "--device", "cpu:0"]) == 2
    assert "--device-map auto places the model on the devices itself" in capsys.readouterr().err


def test_move_to_moves_every_tensor_and_copies_nothing_in_place():
    from vpstudy.backends.layout import KeyLayout

    layout = KeyLayout.build([0], [9], [2], [4])
    generator = torch.Generator().manual_seed(0)
    value = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "layout": layout, "g": generator}
    moved = move_to(value, torch.device("meta"))
    assert moved["a"].device.type == moved["b"][0].device.type == moved["b"][1][0].device.type == "meta"
    assert moved["layout"].start.device.type == "meta" and moved["layout"].visual_width == 4
    assert moved["g"] is generator and moved["b"][1][1] == 3
    same = move_to(value, torch.device("cpu"))  # already there: the very same objects
    assert same["a"] is value["a"] and same["layout"] is layout


def test_the_pruner_moves_its_state_to_each_layers_device(tiny_dirs, tiny_data):
    """After a generation, the state a layer on another device needs moves there (every tensor of
    the listed fields), and the per-step results stay where they were made."""
    from vpstudy.pruning import Pruner, VisionPulse
    from vpstudy.pruning.pruner import _STATE_TENSORS

    model, processor = vpstudy.load(tiny_dirs["llava"])
    spec = model.vpstudy_family
    inputs = _inputs(processor, spec, model.config, list(load_dataset(tiny_data, limit=2)))
    with Pruner(model, [VisionPulse(anchor=1)]) as pruner:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    state = pruner._state
    kept = state.kept_counts
    move_fields(state, torch.device("meta"), _STATE_TENSORS)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict | list | tuple):
            for v in value.values() if isinstance(value, dict) else value:
                yield from tensors(v)

    moved = [t for name in _STATE_TENSORS for t in tensors(getattr(state, name))]
    assert moved and all(t.device.type == "meta" for t in moved)
    assert state.kept_counts is kept and all(t.device.type == "cpu" for step in kept for t in step.values())


def test_rank_gpus_gives_each_process_its_own_devices():
    assert rank_gpus(0, 2, 8) == [0, 1, 2, 3] and rank_gpus(1, 2, 8) == [4, 5, 6, 7]
    assert rank_gpus(2, 4, 4) == [2]
    with pytest.raises(DeviceError, match=r"^--device-map: 8 processes on this node but 4 GPUs"):
        rank_gpus(0, 8, 4)


# --- CUDA machines ------------------------------------------------------------------------------


@needs_cuda
def test_bf16_on_cuda_records_close_to_fp32(tmp_path, tiny_dirs, tiny_data):
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(tiny_data), "--max-new-tokens", "4",
            "--batch-size", "3", "--no-progress", "--device", "cuda"]  # fmt: skip
    assert main(["record", *args, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert main(["record", *args, "--out", str(tmp_path / "fp32")]) == 0
    low, full = vpstudy.open_run(tmp_path / "bf16"), vpstudy.open_run(tmp_path / "fp32")
    assert low.manifest["model"]["dtype"] == "bfloat16"
    first = low.steps[low.steps["step"] == 0].reset_index(drop=True)  # before any token could differ
    np.testing.assert_allclose(first["mass"], full.steps[full.steps["step"] == 0]["mass"], atol=2e-2)


def _split_map(model_dir: Path) -> dict[str, int]:
    """Every module on cuda:0 but the last text layer, the final norm and the LM head on cuda:1."""
    model, _ = vpstudy.load(model_dir)  # on the CPU, to list its modules
    placement = {f"model.{name}": 0 for name, _ in model.model.named_children() if name != "language_model"}
    placement |= {f"model.language_model.{name}": 0 for name, _ in model.model.language_model.named_children()
                  if name != "layers"}  # fmt: skip
    n_layers = len(model.model.language_model.layers)
    placement |= {f"model.language_model.layers.{i}": int(i == n_layers - 1) for i in range(n_layers)}
    return placement | {"model.language_model.norm": 1, "lm_head": 1}


@needs_two_gpus
@pytest.mark.parametrize("mode", ["record", "mask", "physical"])
def test_two_devices_record_and_prune_like_one(mode, tiny_dirs, tiny_data):
    """The tiny LLaVA's second text layer on cuda:1, the rest on cuda:0: recorded values and
    pruned generations equal the model on cuda:0 alone (fp32)."""
    from vpstudy.pruning import Pruner, VisionPulse

    path = tiny_dirs["llava"]
    split, processor = vpstudy.load(path, device_map=_split_map(path))
    whole, _ = vpstudy.load(path, device="cuda:0")
    assert {str(p.device) for p in split.parameters()} == {"cuda:0", "cuda:1"}
    spec = whole.vpstudy_family
    inputs = _inputs(processor, spec, whole.config, list(load_dataset(tiny_data, limit=3))).to("cuda:0")
    results = []
    for model in (split, whole):
        if mode == "record":
            with vpstudy.record(model) as rec:
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            results.append((out.cpu(), [t.mass for t in rec.traces()], [t.scores for t in rec.traces()]))
        else:
            with Pruner(model, [VisionPulse(anchor=1, b_max=0.2)], mode=mode) as pruner:
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            results.append((out.cpu(), [k.counts for k in pruner.kept()], [k.masks for k in pruner.kept()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1] + results[0][2], results[1][1] + results[1][2], strict=True):
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-5)


def test_offline_cache_layout_is_what_huggingface_hub_reads(tmp_path, tiny_llava):
    """The cache the tests build is read by huggingface_hub's own lookup (not by vpstudy's code)."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    home = build_hub_cache(tmp_path / "hf", REPO, tiny_llava)
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=str(home / "hub"))
    assert isinstance(found, str) and json.loads(Path(found).read_text())["model_type"] == "llava"
    (repo,) = scan_cache_dir(home / "hub").repos
    assert repo.repo_id == REPO and [r.commit_hash for r in repo.revisions] == [COMMIT]
