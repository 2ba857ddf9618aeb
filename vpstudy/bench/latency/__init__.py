"""Benchmark: prefill and decode latency of VisionPulse (physical mode) against dense decoding at
long visual contexts — the protocol of the VisionPulse paper's Figure 5.

Run ``vpstudy bench`` or ``python -m vpstudy.bench.latency`` (``--help`` for options). This is a
benchmark, not a test: it prints timings, speedups over dense measured in the same run and the
ratio of decode time to its memory roofline, and never fails on them.

Protocol (defaults on CUDA; see ``bench/README.md``)
----------------------------------------------------
- **Model**: a randomly initialised ``Qwen3VLForConditionalGeneration`` with the *text* geometry of
  Qwen3-VL-4B (36 layers, hidden 2560, MLP 9728, 32 query / 8 KV heads, head dim 128, vocab
  151,936, tied embeddings, interleaved M-RoPE [24, 20, 20]) and a tiny vision tower that never
  runs, built from its config directly on the device in bfloat16, SDPA attention. Nothing is
  downloaded.
- **Prompt**: per row, ``--text-tokens`` (256) random text ids with one contiguous run of N_v
  image-placeholder ids inside (1/8 of the text before it, ending with ``<|vision_start|>``, the
  rest after it, starting with ``<|vision_end|>``); no ``pixel_values``. The placeholder ids are
  what the pruner reads the visual positions from; the M-RoPE positions are the model's own
  (``get_rope_index`` with ``mm_token_type_ids`` and an ``image_grid_thw`` of N_v merged
  tokens), passed as explicit ``position_ids`` to every forward. The image features (and
  Qwen3-VL's deepstack additions) are absent: the language model runs on the placeholder
  embeddings, which costs the same.
- **Batch** 8; N_v = 8,192 / 16,384 / 32,768.
- **Prefill** in ``--prefill-chunk`` (4,096) token chunks with ``logits_to_keep=1``; **decode**
  ``--decode-steps`` (1,024) single-token forwards, each feeding back the greedy argmax of the
  last logits; one ``transformers.StaticCache`` of prompt + steps slots per context (reset, not
  reallocated, between runs).
- **Methods**: ``dense`` (the model's SDPA attention) and ``visionpulse``:
  ``VisionPulse(tau=0.1, b_min=0.01, b_max=0.05)`` (default anchor: layer 17 of 36) inside
  ``Pruner(model, [method], mode="physical", backend=--backend)``; with ``--kept-block k`` the
  Pruner's block-sparse variant (whole k-token blocks; rows ``visionpulse-block<k>``).
- **Timing**: per context, ``--warmup`` untimed runs of each method (full prefill, at most 16
  decode steps), then ``--repeats`` timed runs with the methods interleaved. Prefill and decode
  are timed separately with ``perf_counter`` around ``torch.cuda.synchronize()``. One JSON row per
  timed run; the printed table shows medians over repeats.
- **Recorded**: kept visual fraction (``Pruner.kept()`` at the deepest layer over the decode
  steps, mean over steps and rows), peak CUDA memory per run, and the decode **roofline**: per
  step, the bytes the step must read (:func:`roofline_bytes`) over the copy bandwidth measured
  in the same run (:func:`measure_bandwidth`).

On CPU (``--device cpu``) the same code runs a scaled-down protocol (:data:`CPU_DEFAULTS`): 4
layers, hidden 256, float32, batch 2, 32 text tokens, N_v 256 / 512 / 1,024, 16 decode steps,
256-token prefill chunks, the CPU decode backend (``auto``).

Modules: :mod:`.protocol` (settings, devices), :mod:`.model` (model, prompt, cache),
:mod:`.timing` (prefill, decode loop, one timed run, the interleaved measurement),
:mod:`.roofline` (bytes per step, measured bandwidth), :mod:`.cli` (flags, table, ``--merge``,
:func:`run`, :func:`main`). The names below are this package's API (tests, ``vpstudy bench``, the
CPU decode benchmark :mod:`vpstudy.bench.cpu_decode`).
"""

from __future__ import annotations

from .cli import (
                  add_arguments,
                  default_path,
                  main,
                  merge_command,
                  merge_results,
                  parse_args,
                  protocol_from_args,  # fmt: skip
                  run,
                  summary_lines,
)
from .model import (
                  Prompt,
                  build_model,
                  build_prompt,
                  copy_prefix,
                  dynamic_copy,
                  model_config,
                  rewind,
                  static_cache,
                  text_id_limit,  # fmt: skip
                  text_parameters,
                  vision_ids,
)
from .protocol import (
                  BANDWIDTH_REPEATS,
                  CPU_DEFAULTS,
                  DTYPES,
                  GIB,
                  GPU_DEFAULTS,
                  MIB,
                  MODULE,
                  QWEN3_VL_4B,
                  WARMUP_DECODE_STEPS,
                  BenchError,
                  ModelGeometry,
                  Protocol,
                  check_memory,
                  resident_bytes,  # fmt: skip
                  resolve_device,
                  synchronize,
)
from .roofline import measure_bandwidth, measure_read_bandwidth, roofline_bytes
from .timing import (
                  Run,
                  anchor_of,
                  decode,
                  kept_counts,
                  make_pruner,
                  measure,
                  prefill,
                  run_method,
                  vision_pulse,  # fmt: skip
)

__all__ = [
    "BANDWIDTH_REPEATS", "BenchError", "CPU_DEFAULTS", "DTYPES", "GIB", "GPU_DEFAULTS", "MIB", "MODULE",
    "ModelGeometry", "Prompt", "Protocol", "QWEN3_VL_4B", "Run", "WARMUP_DECODE_STEPS", "add_arguments",
    "anchor_of", "build_model", "build_prompt", "check_memory", "copy_prefix", "decode", "default_path", "dynamic_copy",
    "kept_counts", "main", "make_pruner", "measure", "measure_bandwidth", "measure_read_bandwidth", "merge_command",
    "merge_results", "model_config", "parse_args", "prefill", "protocol_from_args", "resident_bytes",
    "resolve_device", "rewind", "roofline_bytes", "run", "run_method", "static_cache", "summary_lines",
    "synchronize", "text_id_limit", "text_parameters", "vision_ids", "vision_pulse",
]  # fmt: skip
