"""The benchmarks' code paths stay alive (smoke runs; no timing is asserted); the latency roofline's byte count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


# --- latency benchmark (paper Figure 5) ------------------------------------------------------------

TINY_LATENCY = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
                "--head-dim", "32", "--intermediate", "128", "--vocab", "256", "--batch", "2", "--text-tokens", "8",
                "--decode-steps", "4", "--warmup", "0", "--repeats", "1", "--copy-mib", "8"]  # fmt: skip
ROW_FIELDS = {"visual_tokens", "method", "prefill_s", "decode_s", "total_s", "roofline_decode_s", "kept_fraction",
              "decode_step_s", "backend", "peak_memory_bytes"}  # fmt: skip


def _check_latency_report(report, visual_tokens, tmp_path):
    from vpstudy.figures import fig_latency, load_latency_results

    assert report["kind"] == "latency" and report["device"]["type"] == "cpu"
    assert {"date", "command", "versions", "protocol", "bandwidth", "rows"} <= set(report)
    assert report["bandwidth"]["bytes_per_s"] > 0
    rows = report["rows"]
    pairs = {(n, m) for n in visual_tokens for m in ("dense", "dense-kernel", "visionpulse")}
    assert {(r["visual_tokens"], r["method"]) for r in rows} == pairs
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["peak_memory_bytes"] is None  # CPU
        assert row["total_s"] == pytest.approx(row["prefill_s"] + row["decode_s"])
        assert row["roofline_decode_s"] > 0 and row["decode_step_s"] > 0
        if row["method"] == "dense":
            assert row["kept_fraction"] == 1.0 and row["backend"] == "sdpa"
        elif row["method"] == "dense-kernel":
            assert row["kept_fraction"] == 1.0 and row["backend"] == "cpu"
        else:
            assert 0 < row["kept_fraction"] <= 0.05 + 1 / row["visual_tokens"]
            assert row["backend"] == "cpu"  # the fast path ran (not the gathered fallback)
    (result,) = load_latency_results(tmp_path)
    figure = fig_latency(result)
    figure.savefig(tmp_path / "latency.png")
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_latency_benchmark_module_smoke(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "-m", "vpstudy.bench.latency", *TINY_LATENCY, "--visual-tokens", "64", "128",
           "--prefill-chunk", "48", "--json", str(out)]  # fmt: skip  (the visual run straddles prefill chunks)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    _check_latency_report(report, [64, 128], tmp_path)
    assert report["protocol"]["prefill_chunk"] == 48 and report["command"].endswith(f"--json {out}")
    assert "decode x" in result.stdout and "vs roof" in result.stdout


def test_vpstudy_bench_cli_smoke(tmp_path, capsys):
    from vpstudy import cli

    out = tmp_path / "latency.json"
    assert cli.main(["bench", *TINY_LATENCY, "--visual-tokens", "40", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    _check_latency_report(report, [40], tmp_path)
    assert report["command"].startswith("vpstudy bench ") and report["protocol"]["prefill_chunk"] == 256
    assert f"written to {out}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_vpstudy_bench_rejects_cuda_without_cuda(capsys):
    from vpstudy import cli

    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "vpstudy bench: error: --device cuda: no CUDA device here\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--device", "cpu", "--visual-tokens", "0"])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def _tiny_protocol(**changes):
    from vpstudy.bench.latency import ModelGeometry, Protocol

    settings = dict(geometry=ModelGeometry(layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128,
                                           vocab=256),
                    batch=2, text_tokens=8, visual_tokens=(20,), decode_steps=3, prefill_chunk=7, warmup=0, repeats=1,
                    dtype="float32", device="cpu", backend="reference", copy_mib=8)  # fmt: skip
    return Protocol(**{**settings, **changes})


def test_latency_loop_generates_what_generate_does():
    """Chunked prefill + static cache + explicit M-RoPE positions = the model's own generate()."""
    from vpstudy.bench.latency import build_model, build_prompt, decode, prefill, static_cache

    protocol = _tiny_protocol()
    model = build_model(protocol)
    prompt = build_prompt(model, protocol, 20)
    image = model.config.image_token_id
    assert (prompt.input_ids == image).sum(-1).tolist() == [20, 20]
    with torch.inference_mode():
        cache = static_cache(model, prompt.length + 3)
        first = prefill(model, cache, prompt, chunk=7)  # the visual run spans three chunks
        tokens = torch.cat([first, decode(model, cache, first, prompt.decode_positions(3), None)], dim=1)
        reference = model.generate(input_ids=prompt.input_ids, mm_token_type_ids=(prompt.input_ids == image).int(),
                                   image_grid_thw=prompt.image_grid_thw, max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)  # fmt: skip
    assert torch.equal(tokens, reference[:, prompt.length :])


def test_roofline_bytes_by_hand():
    from vpstudy.bench.latency import ModelGeometry, build_model, roofline_bytes, text_parameters

    g = ModelGeometry(layers=2, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=32, vocab=16)
    # embedding 16*16 = 256 (tied LM head: once); per layer q 16*16 + k 16*8 + v 16*8 + o 16*16 = 768,
    # norms q 8 + k 8 + 2 * 16 = 48, MLP 3 * 16 * 32 = 1536 -> 2352; final norm 16
    assert g.parameters() == 256 + 2 * 2352 + 16 == 4976
    assert text_parameters(build_model(_tiny_protocol(geometry=g))) == 4976
    params = 4976 * 2  # bfloat16
    # per key, layer and row: K + V = 2 * 1 KV head * 8 dims * 2 bytes = 32 bytes (K alone 16)
    # batch 2, prompt 10 tokens of which 6 visual; step 0 attends 11 keys, step 1 attends 12
    kw = dict(parameter_bytes=params, dtype_bytes=2, batch=2, prompt_tokens=10, n_visual=6, steps=2)
    dense = roofline_bytes(g, **kw)
    assert dense.tolist() == [params + 2 * 2 * 32 * 11, params + 2 * 2 * 32 * 12]  # layers * rows * 32 * keys
    kept = [[1, 2], [1, 1]]  # [step, row]
    sparse = roofline_bytes(g, **kw, kept=kept, anchor=1)
    step0 = params + 2 * 32 * 11 + 32 * ((11 - 6 + 1) + (11 - 6 + 2)) + 2 * 16 * 11  # layer 0, layer 1, scoring K
    step1 = params + 2 * 32 * 12 + 32 * ((12 - 6 + 1) + (12 - 6 + 1)) + 2 * 16 * 12
    assert sparse.tolist() == [step0, step1] == [11424, 11552]
    with pytest.raises(ValueError, match="anchor"):
        roofline_bytes(g, **kw, kept=kept, anchor=2)


def test_result_header_device_block_and_kind():
    from vpstudy.bench.results import device_block, device_kind, result_header

    header = result_header("vpstudy.bench.latency", [], None, None, command="vpstudy bench --device cpu")
    assert header["command"] == "vpstudy bench --device cpu" and header["device"]["type"] == "cpu"
    assert {"name", "cpus", "torch_threads"} <= set(device_block("cpu", None, None))
    assert device_kind({"type": "cpu"}) == "cpu"
    assert device_kind({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"


def test_latency_merge_joins_contexts_of_one_protocol(tmp_path, capsys):
    from vpstudy import cli
    from vpstudy.bench.latency import BenchError, merge_results
    from vpstudy.figures import load_latency_results

    def result(n, batch=8):
        runs = (("dense", 2.0, 1.0, "sdpa"), ("visionpulse", 1.5, 0.03, "triton"))
        rows = [{"visual_tokens": n, "method": m, "prefill_s": 1.0, "decode_s": d, "total_s": 1.0 + d,
                 "roofline_decode_s": 0.5, "kept_fraction": k, "decode_step_s": d / 4, "backend": b,
                 "peak_memory_bytes": None} for m, d, k, b in runs]  # fmt: skip
        return {"kind": "latency", "date": "d", "command": f"vpstudy bench --visual-tokens {n}",
                "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "bandwidth": {"bytes_per_s": 3e12},
                "protocol": {"batch": batch, "visual_tokens": [n]}, "rows": rows, "total_s": 10.0}  # fmt: skip

    paths = []
    for name, n, batch in (("a", 8192, 8), ("b", 16384, 8), ("c", 32768, 4)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result(n, batch)))
    merged = merge_results(paths[:2])
    assert merged["protocol"]["visual_tokens"] == [8192, 16384] and len(merged["rows"]) == 4
    assert [m["path"] for m in merged["merged_from"]] == [str(p) for p in paths[:2]] and merged["total_s"] == 20.0
    with pytest.raises(BenchError, match="batch differ"):
        merge_results(paths)
    with pytest.raises(BenchError, match="measured twice"):
        merge_results([paths[0], paths[0]])
    out = tmp_path / "joined" / "latency.json"
    assert cli.main(["bench", "--merge", *map(str, paths[:2]), "--json", str(out)]) == 0
    assert "joined into" in capsys.readouterr().out
    (loaded,) = load_latency_results(out.parent)
    assert sorted(loaded.rows["visual_tokens"].unique()) == [8192, 16384]


def test_latency_kept_block_rows(tmp_path):
    """--kept-block k runs the Pruner's block-sparse variant, labelled visionpulse-block<k>; its
    kept share is the real one (whole blocks), above the token-exact budget."""
    from vpstudy.bench import latency

    out = tmp_path / "latency.json"
    report = latency.main([*TINY_LATENCY, "--visual-tokens", "256", "--kept-block", "16", "--json", str(out)],
                          progress=False)  # fmt: skip
    (sparse,) = [r for r in report["rows"] if r["method"].startswith("visionpulse")]
    assert sparse["method"] == "visionpulse-block16" and sparse["backend"] == "cpu"
    assert 16 / 256 <= sparse["kept_fraction"] <= 1.0 and report["protocol"]["kept_block"] == 16
    assert json.loads(out.read_text())["rows"] == report["rows"]


def test_kernel_benchmark_smoke(tmp_path):
    """The per-kernel benchmark runs end to end on CPU (reference backend) and writes its rows."""
    from vpstudy.bench import kernels

    out = tmp_path / "kernels.json"
    report = kernels.main(["--device", "cpu", "--backend", "reference", "--heads", "4", "--kv-heads", "2",
                           "--head-dim", "32", "--text-tokens", "16", "--visual-tokens", "128", "--iters", "1",
                           "--repeats", "1", "--warmup", "0", "--block", "16", "--json", str(out)])  # fmt: skip
    assert report["kind"] == "kernels" and json.loads(out.read_text())["rows"] == report["rows"]
    by_kernel = {r["kernel"]: r for r in report["rows"]}
    assert set(by_kernel) == {"sdpa", "dense", "sparse", "sparse-block16", "anchor"}
    assert by_kernel["sparse"]["max_abs_error_vs_reference"] == 0.0  # the reference backend is the reference
    assert 0 < by_kernel["sparse"]["retention"] <= by_kernel["sparse-block16"]["retention"] <= 1
    assert by_kernel["sparse"]["bytes"] < by_kernel["sparse-block16"]["bytes"] <= by_kernel["dense"]["bytes"]


def test_a_rewound_static_cache_and_a_dynamic_copy_decode_what_generate_does():
    """The CPU decode benchmark's one prefill per context: every method decodes from the same
    static cache rewound to the prompt, or from a dynamic copy of it, and gets generate's tokens."""
    from vpstudy.bench.latency import build_model, build_prompt, decode, dynamic_copy, prefill, rewind, static_cache

    protocol = _tiny_protocol(prefill_chunk=0)
    model = build_model(protocol)
    prompt = build_prompt(model, protocol, 20)
    image = model.config.image_token_id
    with torch.inference_mode():
        reference = model.generate(input_ids=prompt.input_ids, mm_token_type_ids=(prompt.input_ids == image).int(),
                                   image_grid_thw=prompt.image_grid_thw, max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)[:, prompt.length :]  # fmt: skip
        cache = static_cache(model, prompt.length + 3)
        first = prefill(model, cache, prompt, prompt.length)
        positions = prompt.decode_positions(3)
        runs = []
        for _ in range(2):  # the second run decodes from a cache the first one wrote to
            rewind(cache, prompt.length)
            runs.append(decode(model, cache, first, positions, None))
            copy = dynamic_copy(model, cache, prompt.length)
            assert copy.get_seq_length() == prompt.length
            runs.append(decode(model, copy, first, positions, None))
    for tokens in runs:
        assert torch.equal(torch.cat([first, tokens], dim=1), reference)


CPU_DECODE = ["--layers", "2", "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
              "--intermediate", "128", "--vocab", "256", "--text-tokens", "8", "--decode-steps", "3", "--repeats", "1",
              "--profile-steps", "1", "--read-mib", "8"]  # fmt: skip


def test_cpu_decode_benchmark_smoke(tmp_path):
    """Every method of the CPU decode benchmark runs from one prefill per context and writes its
    rows, summary, targets and profile; no timing is asserted."""
    from vpstudy.bench import cpu_decode

    out = tmp_path / "cpu-decode.json"
    report = cpu_decode.main([*CPU_DECODE, "--visual-tokens", "48", "96", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert report["kind"] == "cpu_decode" and report["threads"] == torch.get_num_threads()
    assert "shared" in report["note"]
    assert set(report["prefill_s"]) == {"shared", "48", "96"}
    for n in ("48", "96"):
        table = report["summary"][n]
        assert set(table) == set(cpu_decode.METHODS)
        assert table["dense/static"]["vs_dense_static"] == pytest.approx(1.0)
        assert table["visionpulse/static"]["backend"] == "cpu"
        assert table["visionpulse-gather/static"]["backend"] == "gather"
        assert table["dense-kernel/static"]["backend"] == "cpu" and table["record/static"]["backend"] == "sdpa"
        assert 0 < table["visionpulse/static"]["kept_fraction"] <= 0.05 + 1 / int(n)
        assert table["dense/dynamic"]["bytes_per_step"] > table["dense/static"]["bytes_per_step"]
        assert table["visionpulse/static"]["bytes_per_step"] < table["dense/static"]["bytes_per_step"]
    assert all(report["tokens_equal_reference"].values())  # physical = mask mode, record = dense, dynamic = static
    assert set(report["profile"]) == set(cpu_decode.PROFILED)
    assert "vpstudy::anchor_decision" in report["profile"]["visionpulse/static"]["regions_ms"]
    assert report["targets"]["visionpulse_tokens_equal_mask_mode"]["value"] is True


def test_cpu_decode_bytes_per_step_by_hand():
    """step_bytes for every method on a 2-layer model: the latency roofline plus what the method
    adds (the dynamic cache's copy, the recorder's and mask mode's second reads of K)."""
    import numpy as np

    from vpstudy.bench.cpu_decode import step_bytes
    from vpstudy.bench.latency import ModelGeometry

    g = ModelGeometry(layers=2, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=32, vocab=16)
    protocol = _tiny_protocol(geometry=g, decode_steps=2)
    # float32: K + V of one key at one layer = 2 * 8 * 4 = 64 bytes, K alone 32; prompt 10 (6 visual)
    kw = dict(protocol=protocol, parameter_bytes=100, prompt_tokens=10, n_visual=6, anchor=1)
    dense = [100 + 2 * 64 * 11, 100 + 2 * 64 * 12]
    assert step_bytes("dense/static", kept=None, **kw).tolist() == dense
    assert step_bytes("dense/dynamic", kept=None, **kw).tolist() == [dense[0] + 2 * 64 * 21, dense[1] + 2 * 64 * 23]
    assert step_bytes("record/static", kept=None, **kw).tolist() == [dense[0] + 2 * 32 * 11, dense[1] + 2 * 32 * 12]
    assert step_bytes("evaluate/static", kept=None, **kw).tolist() == [dense[0] + 3 * 32 * 11, dense[1] + 3 * 32 * 12]
    sparse = step_bytes("visionpulse/static", kept=np.array([1, 2]), **kw).tolist()
    assert sparse == [100 + 64 * 11 + 64 * (11 - 6 + 1) + 32 * 11, 100 + 64 * 12 + 64 * (12 - 6 + 2) + 32 * 12]


def test_one_shared_prefill_gives_each_context_the_cache_of_its_own_prompt():
    """The CPU decode benchmark prefills the largest context's text and image once; each context
    copies its beginning and runs its own text after the image, then decodes generate's tokens."""
    from vpstudy.bench.cpu_decode import shared_prefill
    from vpstudy.bench.latency import build_model, copy_prefix, decode, prefill

    protocol = _tiny_protocol(visual_tokens=(24, 48), prefill_chunk=0)
    model = build_model(protocol)
    prompts, source, _ = shared_prefill(model, protocol)
    image = model.config.image_token_id
    for n, prompt in prompts.items():
        assert prompt.image_grid_thw[0, 2] == prompts[48].image_grid_thw[0, 2]  # one grid width
        with torch.inference_mode():
            start = protocol.text_before + n
            cache = copy_prefix(model, source, start, prompt.length + 3)
            first = prefill(model, cache, prompt, prompt.length, start=start)
            tokens = torch.cat([first, decode(model, cache, first, prompt.decode_positions(3), None)], dim=1)
            reference = model.generate(input_ids=prompt.input_ids, mm_token_type_ids=(prompt.input_ids == image).int(),
                                       image_grid_thw=prompt.image_grid_thw, max_new_tokens=4, min_new_tokens=4,
                                       do_sample=False)  # fmt: skip
        assert torch.equal(tokens, reference[:, prompt.length :]), n
