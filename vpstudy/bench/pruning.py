"""Benchmark: decode-step time of VisionPulse (physical mode, ≤5%) against dense decoding, on CPU.

Run ``python -m vpstudy.bench.pruning`` (``--help`` for options). This is a benchmark, not a
test: it prints timings and ratios measured in the same run and never fails on them.

Protocol
--------
A random Qwen2-VL-family model (the recording benchmark's: by default text hidden 512, 8
layers, 8 query / 2 KV heads, head_dim 64; the vision tower stays tiny), one image of
``--visual-tokens`` merged visual tokens (default 4,096), batch 1, SDPA. Modes:

``dense``
    plain generation;
``visionpulse-physical``
    inside ``Pruner(model, [VisionPulse(tau=0.1, b_min=0.01, b_max=0.05)], mode="physical")``:
    at the anchor (layer 4 of 8, the relative depth of 17 of 36) the budget and top-K are
    decided, and layers ≥ anchor attend over the gathered kept keys;
``visionpulse-mask``
    the same decisions with the hidden keys masked (the exact mode), for reference.

Each timed call is ``generate(max_new_tokens=N, min_new_tokens=N)``; a forward pre-hook
timestamps every forward, and the decode time per step is the mean over the N − 1 decode
forwards inside the call (prefill excluded). After a warm-up, ``--repeats`` rounds run the
modes interleaved; medians over rounds are shown with ratios to dense. The *decision overhead*
is the wall time the pruner spends deciding at the anchor (the signal's softmax at τ, the
budget, the ranking and top-K) per decode step, as a share of the VisionPulse step.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import vpstudy
from vpstudy.bench.recording import Geometry, StepClock, build_inputs, write_model
from vpstudy.bench.results import load_average, result_header, write_result
from vpstudy.pruning import Pruner, VisionPulse
from vpstudy.rules import anchor_layer

MODES: tuple[str, ...] = ("dense", "visionpulse-physical", "visionpulse-mask")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options from ``argv`` (``sys.argv[1:]`` when None); exits via argparse
    unless ``--new-tokens`` ≥ 2 and ``--repeats`` ≥ 1."""
    parser = argparse.ArgumentParser(
        prog="python -m vpstudy.bench.pruning",
        description="Decode-step time of VisionPulse physical mode vs dense (see module doc).")  # fmt: skip
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="text MLP size (default 2.6875 x hidden)")
    parser.add_argument("--visual-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    import transformers

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    intermediate = args.intermediate or 8 * round(args.hidden * 2.6875 / 8)
    geometry = Geometry(args.hidden, args.layers, args.heads, args.kv_heads, intermediate)
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="vpstudy-bench-") as tmp:
        model, processor = vpstudy.load(write_model(tmp, geometry), attn_implementation="sdpa")
    inputs, n_visual = build_inputs(model, processor, args.visual_tokens)
    anchor = anchor_layer(args.layers)
    print(f"model: random qwen2_vl, text hidden {geometry.hidden}, {geometry.layers} layers, {geometry.heads}/"
          f"{geometry.kv_heads} heads; {n_visual} visual tokens, prompt {inputs['input_ids'].shape[1]}; "
          f"anchor {anchor}; "
          f"N = {args.new_tokens}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load_before}", flush=True)  # fmt: skip

    n = args.new_tokens
    decisions: dict[str, list[float]] = {m: [] for m in MODES}
    kept: dict[str, float] = {}

    def run(mode: str, tokens: int) -> torch.Tensor:
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if mode == "dense":
            return model.generate(**inputs, **kwargs)
        method = VisionPulse(tau=0.1, b_min=0.01, b_max=0.05, anchor=anchor)
        with Pruner(model, [method], mode=mode.split("-")[1]) as pruner:
            out = model.generate(**inputs, **kwargs)
        decisions[mode].append(pruner.decision_s / max(1, tokens - 1))
        trace = pruner.kept()[0]
        kept[mode] = float(trace.counts[1:, anchor].mean() / n_visual)
        return out

    clock = StepClock([model])
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    sequences: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for mode in MODES:
            run(mode, 4)
            decisions[mode].clear()
        for round_ in range(args.repeats):
            for mode in MODES:
                gc.collect()
                clock.stamps.clear()
                out = run(mode, n)
                per_step = clock.decode_steps(time.perf_counter())
                steps[mode].append(sum(per_step) / len(per_step))
                sequences.setdefault(mode, out)
            print(f"round {round_ + 1}/{args.repeats} ms/step: "
                  + ", ".join(f"{m} {1e3 * steps[m][-1]:.2f}" for m in MODES), flush=True)  # fmt: skip
    clock.remove()

    median = {m: statistics.median(steps[m]) for m in MODES}
    overhead = statistics.median(decisions["visionpulse-physical"])
    ratios = {f"{m}/dense": median[m] / median["dense"] for m in MODES[1:]}
    same = torch.equal(sequences["visionpulse-physical"], sequences["visionpulse-mask"])
    print()
    print(f"{'mode':<22} {'decode ms/step':>14} {'vs dense':>9} {'kept visual':>12}")
    for m in MODES:
        print(f"{m:<22} {1e3 * median[m]:>14.2f} {median[m] / median['dense']:>8.2f}x "
              f"{100 * kept.get(m, 1.0):>11.1f}%")  # fmt: skip
    print(f"decision overhead (signal, budget, top-K at the anchor): {1e3 * overhead:.2f} ms/step = "
          f"{100 * overhead / median['visionpulse-physical']:.1f}% of a VisionPulse step")
    print(f"physical and mask modes generate identical tokens: {same}")
    elapsed, load_after = time.perf_counter() - started, load_average()
    print(f"total {elapsed:.0f} s; load average {load_after}")
    result = {
        **result_header("vpstudy.bench.pruning", argv, load_before, load_after),
        "geometry": {"hidden": geometry.hidden, "layers": geometry.layers, "heads": geometry.heads,
                     "kv_heads": geometry.kv_heads, "intermediate": geometry.intermediate},  # fmt: skip
        "visual_tokens": n_visual,
        "anchor": anchor,
        "new_tokens": n,
        "repeats": args.repeats,
        "median_decode_step_s": median,
        "ratios": ratios,
        "kept_fraction_at_anchor": kept,
        "decision_overhead_s_per_step": overhead,
        "decision_overhead_share": overhead / median["visionpulse-physical"],
        "identical_tokens_physical_vs_mask": same,
        "raw_decode_step_s": steps,
        "total_s": elapsed,
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
