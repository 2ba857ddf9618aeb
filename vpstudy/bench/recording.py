"""Benchmark: decode-step cost of :func:`vpstudy.record` against plain SDPA and eager attentions.

Run ``python -m vpstudy.bench.recording`` (``--help`` for options). This is a benchmark, not a
test: it prints timings and ratios and never fails on them.

Protocol
--------
A random Qwen2-VL-family model (:func:`vpstudy.testing.make_tiny` with a wider text model: by
default hidden 512, 8 layers, 8 query / 2 KV heads, head_dim 64, M-RoPE sections [8, 12, 12],
MLP 1376; the vision tower stays the tiny one) is written to a temporary directory and loaded
twice with the same weights: with ``attn_implementation="sdpa"`` and with ``"eager"``. The image
processor's pixel bounds are raised so that one image gives exactly ``--visual-tokens`` merged
visual tokens (one per 28x28 px); the count is read back from the input ids. One prompt (batch
1) holding that image is used throughout. Three modes are timed:

``sdpa``
    plain generation on the SDPA model (the baseline);
``record``
    the same inside ``vpstudy.record(model)`` recording every text layer (``keep_scores=True``);
    entering and leaving the context are inside the timed region, ``Recorder.traces()`` is not;
``eager+attn``
    the eager model with ``output_attentions=True, return_dict_in_generate=True``: what one
    does without vpstudy to get attention rows.

Each timed call is ``model.generate(max_new_tokens=n, min_new_tokens=n, do_sample=False)`` under
``torch.inference_mode``, once with ``n = N`` (``--new-tokens``) and once with ``n = 1`` (prefill
only). The decode time per step is ``(t_N - t_1) / (N - 1)``; the prefill time is ``t_1``. Every
mode gets a warm-up, then ``--repeats`` rounds run the modes interleaved (sdpa, record,
eager+attn, sdpa, ...) so that machine noise hits all modes alike; the table shows medians over
rounds.

Because prefill (vision tower plus ~1k-token prompt) costs far more than N decode steps, noise in
it leaks into ``t_N - t_1``. So the N-token call also timestamps every forward call (a forward
pre-hook on the model): the "in-run" decode time per step is the span from the start of the
first decode forward to the end of ``generate``, divided by N - 1. It is printed next to the
protocol's figure, with its own ratios.

The script also checks (and prints) that ``sdpa`` and ``record`` generate identical tokens,
whether ``eager+attn`` does too, and the shape of the recorded scores.

Targets from the issue (reported, never asserted): ``record / sdpa <= 1.3`` per decode step and
``eager+attn / record >= 2``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vpstudy
from vpstudy.families import mrope_section
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.recorder import Recorder
from vpstudy.testing import make_tiny

from .results import load_average, result_header, write_result

MODES: tuple[str, ...] = ("sdpa", "record", "eager+attn")
PIXELS_PER_TOKEN_SIDE = 28  # Qwen2-VL: patch 14 px, 2x2 patches merged into one visual token
RECORD_TARGET = 1.3  # record / sdpa: at most
EAGER_TARGET = 2.0  # eager+attn / record: at least
QUESTION = "describe the image"
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class Geometry:
    """Text-model geometry of the benchmark model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        """Per-head dimension, ``hidden // heads``."""
        return self.hidden // self.heads

    @property
    def mrope_section(self) -> list[int]:
        """Qwen2-VL M-RoPE split of ``head_dim // 2`` rotary pairs into (temporal, height, width)."""
        return mrope_section(self.head_dim)

    def text_overrides(self) -> dict[str, Any]:
        """Overrides of the tiny model's ``text_config`` (transformers names) giving it this geometry."""
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            rope_parameters={"rope_type": "default", "mrope_section": self.mrope_section, "rope_theta": 10000.0},
        )


@dataclass
class ModeTimings:
    """Raw timings of one mode, one entry per round (seconds)."""

    prefill_s: list[float] = field(default_factory=list)  # t_1: generate with one new token
    full_s: list[float] = field(default_factory=list)  # t_N: generate with N new tokens
    steps_s: list[list[float]] = field(default_factory=list)  # the N - 1 decode steps inside the t_N call

    def decode_step_s(self, new_tokens: int) -> list[float]:
        """Per round: ``(t_N - t_1) / (N - 1)``, the protocol's decode time per step."""
        return [(full - pre) / (new_tokens - 1) for full, pre in zip(self.full_s, self.prefill_s, strict=True)]

    def in_run_step_s(self) -> list[float]:
        """Per round: mean decode step inside the t_N call (immune to prefill noise)."""
        return [sum(steps) / len(steps) for steps in self.steps_s]

    def prefill_in_full_s(self) -> list[float]:
        """Per round: the part of t_N before the first decode step (compare with ``prefill_s``)."""
        return [full - sum(steps) for full, steps in zip(self.full_s, self.steps_s, strict=True)]


class StepClock:
    """Forward pre-hooks timestamping every forward call ``generate`` makes on the given models.

    Forward 0 is the prefill; decode step k >= 1 runs from the start of forward k to the start of
    forward k + 1 (or the end of ``generate``), token selection included.
    """

    def __init__(self, models: Sequence[Any]) -> None:
        self.stamps: list[float] = []
        self._hooks = [m.register_forward_pre_hook(self._stamp) for m in models]

    def _stamp(self, *_: Any) -> None:
        self.stamps.append(time.perf_counter())

    def decode_steps(self, end: float) -> list[float]:
        """Durations of the decode steps of the last call, which ended at ``end``."""
        return [b - a for a, b in zip(self.stamps[1:], [*self.stamps[2:], end], strict=False)]

    def remove(self) -> None:
        """Remove the forward pre-hooks from the models (the clock stops stamping)."""
        for hook in self._hooks:
            hook.remove()


def write_model(out_dir: str | Path, geometry: Geometry, seed: int = 0) -> Path:
    """Write the benchmark model with :func:`make_tiny` (text geometry overridden) and return its directory."""
    return make_tiny("qwen2_vl", out_dir, seed=seed, text_overrides=geometry.text_overrides())


def image_grid(visual_tokens: int) -> tuple[int, int]:
    """The most square (rows, cols) merged-token grid with exactly ``visual_tokens`` tokens."""
    rows = max(d for d in range(1, math.isqrt(visual_tokens) + 1) if visual_tokens % d == 0)
    return rows, visual_tokens // rows


def configure_image_processor(processor: Any, visual_tokens: int) -> tuple[int, int]:
    """Make the image processor keep an image of ``visual_tokens`` merged tokens at its size.

    Qwen2-VL's image processor resizes to multiples of 28 px with the pixel count within
    ``size.shortest_edge`` (its ``min_pixels``) .. ``size.longest_edge`` (``max_pixels``); the
    tiny model ships with 56*56 .. 112*112. Returns the (height, width) in pixels of the image.
    """
    from transformers.image_utils import SizeDict

    rows, cols = image_grid(visual_tokens)
    height, width = rows * PIXELS_PER_TOKEN_SIDE, cols * PIXELS_PER_TOKEN_SIDE
    image_processor = processor.image_processor
    size = image_processor.size
    bounds = dict(shortest_edge=min(56 * 56, height * width), longest_edge=height * width)
    image_processor.size = replace(size, **bounds) if isinstance(size, SizeDict) else SizeDict(**{**size, **bounds})
    return height, width


def build_inputs(model: Any, processor: Any, visual_tokens: int) -> tuple[Any, int]:
    """Batch-1 inputs holding one random image; returns them and the visual-token count in input_ids."""
    height, width = configure_image_processor(processor, visual_tokens)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    spec = model.vpstudy_family
    prompt = format_prompt(processor, spec, QUESTION)
    inputs = prepare_batch(processor, spec, model.config, [prompt], [Image.fromarray(pixels)])
    n_visual = int(spec.visual_mask(inputs["input_ids"], model.config).sum())
    return inputs, n_visual


def _generate(model: Any, inputs: Any, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.sequences


@dataclass
class Runners:
    """One callable per mode: ``runs[mode](n)`` generates ``n`` tokens and returns the sequences."""

    runs: dict[str, Callable[[int], torch.Tensor]]
    last_recorder: list[Recorder]  # the recorder of the most recent ``record`` call


def make_runners(sdpa_model: Any, eager_model: Any, inputs: Any) -> Runners:
    """The three modes on the same ``inputs``: ``sdpa`` (plain generate on the SDPA model), ``record``
    (the same inside :func:`vpstudy.record`, all text layers, scores kept) and ``eager+attn`` (the eager
    model with ``output_attentions=True``); each run returns the generated sequences."""
    last: list[Recorder] = []

    def sdpa(n: int) -> torch.Tensor:
        return _generate(sdpa_model, inputs, n)

    def record(n: int) -> torch.Tensor:
        with vpstudy.record(sdpa_model) as rec:  # all text layers, keep_scores=True
            sequences = _generate(sdpa_model, inputs, n)
        last[:] = [rec]
        return sequences

    def eager(n: int) -> torch.Tensor:
        return _generate(eager_model, inputs, n, output_attentions=True, return_dict_in_generate=True)

    return Runners({"sdpa": sdpa, "record": record, "eager+attn": eager}, last)


def timed(run: Callable[[int], torch.Tensor], n: int, clock: StepClock) -> tuple[float, list[float], torch.Tensor]:
    """Wall time of ``run(n)``, its decode-step durations, and the sequences (gc runs before, untimed)."""
    gc.collect()
    clock.stamps.clear()
    start = time.perf_counter()
    sequences = run(n)
    end = time.perf_counter()
    return end - start, clock.decode_steps(end), sequences


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options from ``argv`` (``sys.argv[1:]`` when None); exits via argparse unless
    N ≥ 2, the sizes are ≥ 1 and the geometry divides evenly (hidden by heads, heads by KV heads, even head dim)."""
    parser = argparse.ArgumentParser(
        prog="python -m vpstudy.bench.recording",
        description="Decode-step time of vpstudy.record vs plain SDPA vs eager output_attentions (see module doc).",
    )
    parser.add_argument("--layers", type=int, default=8, help="text layers, all recorded (default 8)")
    parser.add_argument("--hidden", type=int, default=512, help="text hidden size (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    parser.add_argument("--intermediate", type=int, default=None, help="text MLP size (default 2.6875 x hidden)")
    parser.add_argument("--visual-tokens", type=int, default=1024, help="merged visual tokens (default 1024)")
    parser.add_argument("--new-tokens", type=int, default=33, help="N, new tokens of the long call (default 33)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: decode time is (t_N - t_1) / (N - 1)")
    if min(args.layers, args.repeats, args.visual_tokens, args.kv_heads) < 1:
        parser.error("--layers, --repeats, --visual-tokens and --kv-heads must be >= 1")
    if args.hidden % args.heads or args.heads % args.kv_heads or (args.hidden // args.heads) % 2:
        parser.error("--hidden must be a multiple of --heads, --heads of --kv-heads, and head_dim even")
    return args


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    import transformers

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    intermediate = args.intermediate or 8 * round(args.hidden * 2.6875 / 8)  # 512 -> 1376
    geometry = Geometry(args.hidden, args.layers, args.heads, args.kv_heads, intermediate)
    n = args.new_tokens
    started = time.perf_counter()
    load_before = load_average()
    print(
        f"model: random qwen2_vl, text hidden {geometry.hidden}, {geometry.layers} layers, {geometry.heads} heads / "
        f"{geometry.kv_heads} KV heads, head_dim {geometry.head_dim}, mrope_section {geometry.mrope_section}, "
        f"MLP {geometry.intermediate}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load_before}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="vpstudy-bench-") as tmp:
        path = write_model(tmp, geometry)
        sdpa_model, processor = vpstudy.load(path, attn_implementation="sdpa")
        eager_model, _ = vpstudy.load(path, attn_implementation="eager")
    inputs, n_visual = build_inputs(sdpa_model, processor, args.visual_tokens)
    prompt_len = int(inputs["input_ids"].shape[1])
    grid = inputs["image_grid_thw"][0].tolist()
    print(f"input: {n_visual} visual tokens in input_ids (requested {args.visual_tokens}; patch grid_thw {grid}), "
          f"prompt length {prompt_len}; N = {n} new tokens, {args.repeats} rounds", flush=True)  # fmt: skip
    if n_visual != args.visual_tokens:
        print(f"WARNING: {n_visual} visual tokens, not the {args.visual_tokens} requested", flush=True)

    runners = make_runners(sdpa_model, eager_model, inputs)
    clock = StepClock([sdpa_model, eager_model])
    timings = {mode: ModeTimings() for mode in MODES}
    sequences: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for mode in MODES:
            warm = time.perf_counter()
            runners.runs[mode](1)
            runners.runs[mode](WARMUP_TOKENS)
            print(f"warm-up {mode}: {time.perf_counter() - warm:.1f} s", flush=True)
        for round_ in range(args.repeats):
            for mode in MODES:
                t_full, steps, seq = timed(runners.runs[mode], n, clock)
                if mode == "record":  # convert the N-token trace once, untimed, for the sanity check
                    scores = runners.last_recorder[0].traces()[0].scores  # kept: record() has keep_scores=True
                t_pre, _, _ = timed(runners.runs[mode], 1, clock)
                timing = timings[mode]
                timing.full_s.append(t_full)
                timing.prefill_s.append(t_pre)
                timing.steps_s.append(steps)
                sequences.setdefault(mode, seq)
            line = ", ".join(
                f"{m} {_ms(timings[m].decode_step_s(n)[-1])} ({_ms(timings[m].in_run_step_s()[-1])} in-run)"
                for m in MODES
            )
            print(f"round {round_ + 1}/{args.repeats} ms/step: {line}", flush=True)
    clock.remove()

    same_record = torch.equal(sequences["sdpa"], sequences["record"])
    same_eager = torch.equal(sequences["sdpa"], sequences["eager+attn"])
    prefill = {m: statistics.median(timings[m].prefill_s) for m in MODES}
    decode = {m: statistics.median(timings[m].decode_step_s(n)) for m in MODES}
    in_run = {m: statistics.median(timings[m].in_run_step_s()) for m in MODES}
    ratios = {"record/sdpa": decode["record"] / decode["sdpa"],
              "eager+attn/record": decode["eager+attn"] / decode["record"]}  # fmt: skip
    in_run_ratios = {"record/sdpa": in_run["record"] / in_run["sdpa"],
                     "eager+attn/record": in_run["eager+attn"] / in_run["record"]}  # fmt: skip

    print()
    print(f"{'mode':<11} {'prefill s':>9} {'decode ms/step':>14} {'vs sdpa':>8} {'in-run ms/step':>15} {'vs sdpa':>8}")
    for m in MODES:
        print(f"{m:<11} {prefill[m]:>9.3f} {_ms(decode[m]):>14} {decode[m] / decode['sdpa']:>7.2f}x "
              f"{_ms(in_run[m]):>15} {in_run[m] / in_run['sdpa']:>7.2f}x")  # fmt: skip
    print("(decode = median over rounds of (t_N - t_1)/(N - 1); in-run = median of the mean decode step inside t_N)")
    print()
    for name, target, above in (("record/sdpa", RECORD_TARGET, False), ("eager+attn/record", EAGER_TARGET, True)):
        label = {"record/sdpa": "recording / plain SDPA", "eager+attn/record": "eager+output_attentions / recording"}
        met = ratios[name] >= target if above else ratios[name] <= target
        print(f"{label[name]:<37} {ratios[name]:.2f}x  (target {'>=' if above else '<='} {target}x: "
              f"{'met' if met else 'NOT met'}; in-run {in_run_ratios[name]:.2f}x)")  # fmt: skip
    scores_shape = None if scores is None else list(scores.shape)
    print(f"identical tokens: sdpa vs record {same_record}, sdpa vs eager+attn {same_eager}; "
          f"recorded scores per sample [steps, layers, N_v] = {scores_shape}")  # fmt: skip
    elapsed = time.perf_counter() - started
    load_after = load_average()
    print(f"total {elapsed:.0f} s; load average {load_after}")

    result: dict[str, Any] = {
        **result_header("vpstudy.bench.recording", argv, load_before, load_after),
        "geometry": {**asdict(geometry), "head_dim": geometry.head_dim, "mrope_section": geometry.mrope_section},
        "visual_tokens": n_visual,
        "image_grid_thw": grid,
        "prompt_length": prompt_len,
        "new_tokens": n,
        "repeats": args.repeats,
        "identical_tokens": {"sdpa_vs_record": same_record, "sdpa_vs_eager+attn": same_eager},
        "median": {m: {"prefill_s": prefill[m], "decode_step_s": decode[m], "in_run_step_s": in_run[m]} for m in MODES},
        "ratios": ratios,
        "in_run_ratios": in_run_ratios,
        "targets": {"record/sdpa_max": RECORD_TARGET, "eager+attn/record_min": EAGER_TARGET},
        "raw": {
            m: {
                **asdict(timings[m]),
                "prefill_in_full_s": timings[m].prefill_in_full_s(),
                "decode_step_s": timings[m].decode_step_s(n),
                "in_run_step_s": timings[m].in_run_step_s(),
            }
            for m in MODES
        },
        "total_s": elapsed,
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
