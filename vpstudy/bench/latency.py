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
256-token prefill chunks, reference backend.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vpstudy.bench.recording import image_grid
from vpstudy.bench.results import device_kind, kernel_versions, load_average, result_header, write_result
from vpstudy.families import mrope_section
from vpstudy.backends.dense import DenseDecode
from vpstudy.argtypes import non_negative, positive
from vpstudy.backends.choose import NAMES as BACKENDS
from vpstudy.pruning import Pruner, VisionPulse
from ..errors import VpstudyError

MODULE = "vpstudy.bench.latency"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARMUP_DECODE_STEPS = 16  # decode steps of a warm-up run (shapes are static: a few steps warm every kernel)
BANDWIDTH_REPEATS = 5  # copies timed; the best counts
GIB, MIB = 1 << 30, 1 << 20

# Qwen's vocabulary: ids from 151,643 on are special tokens; the vision ids of Qwen3-VL.
QWEN_TEXT_IDS = 151_643
QWEN_VISION_IDS = {"vision_start_token_id": 151_652, "vision_end_token_id": 151_653,
                   "image_token_id": 151_655, "video_token_id": 151_656}  # fmt: skip
QWEN3_VL_4B_MROPE = [24, 20, 20]  # head_dim 128, interleaved

# Flag defaults per device kind (None on the command line means "the profile's").
GPU_DEFAULTS: dict[str, Any] = dict(
    layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151_936,
    batch=8, text_tokens=256, visual_tokens=[8192, 16384, 32768], decode_steps=1024, prefill_chunk=4096,
    warmup=1, repeats=2, dtype="bfloat16", backend="auto", copy_mib=4096,
)  # fmt: skip
CPU_DEFAULTS: dict[str, Any] = dict(
    layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=1024, vocab=8192,
    batch=2, text_tokens=32, visual_tokens=[256, 512, 1024], decode_steps=16, prefill_chunk=256,
    warmup=1, repeats=1, dtype="float32", backend="reference", copy_mib=256,
)  # fmt: skip


class BenchError(VpstudyError):
    """A benchmark setting that cannot run here (one line naming the flag)."""


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGeometry:
    """Text-model geometry of the benchmark model (a Qwen3-VL text decoder)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def parameters(self) -> int:
        """Parameters of the text model with the LM head tied to the embedding (counted once):
        per layer the q/k/v/o projections (no biases), q/k RMS norms (head_dim each), two layer
        norms and the gated MLP; plus the embedding and the final norm."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        norms = 2 * self.head_dim + 2 * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.vocab * self.hidden + self.layers * (attention + norms + mlp) + self.hidden

    def kv_bytes_per_key(self, dtype_bytes: int) -> int:
        """Bytes of one key's K and V at one layer for one sequence (all KV heads)."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    @property
    def mrope_section(self) -> list[int]:
        """Interleaved M-RoPE split: Qwen3-VL's [24, 20, 20] at head dim 128, else Qwen2-VL's proportions."""
        return list(QWEN3_VL_4B_MROPE) if self.head_dim == 128 else mrope_section(self.head_dim)


QWEN3_VL_4B = ModelGeometry(**{f.name: GPU_DEFAULTS[f.name] for f in fields(ModelGeometry)})


@dataclass(frozen=True)
class Protocol:
    """Everything a run measures with (sizes in tokens, one entry per visual context)."""

    geometry: ModelGeometry
    batch: int
    text_tokens: int  # text tokens per prompt around the visual run
    visual_tokens: tuple[int, ...]  # N_v per context
    decode_steps: int  # single-token forwards after the prefill
    prefill_chunk: int  # prompt tokens per prefill forward (0: the whole prompt at once)
    warmup: int  # untimed runs per method and context
    repeats: int  # timed runs per method and context
    dtype: str
    device: str
    backend: str  # Pruner backend of visionpulse
    copy_mib: int  # size of the bandwidth probe's copy (MiB)
    seed: int = 0
    kept_block: int = 1  # Pruner kept_block: 1 = token-exact top-K; 64 = the paper's block-sparse kernel

    @property
    def methods(self) -> tuple[str, str, str]:
        """Row labels: ``dense`` (the model's SDPA), ``dense-kernel`` (every decode call on the
        backend's decode kernel with nothing pruned, the paper's dense-Triton baseline) and
        ``visionpulse`` (``visionpulse-block<k>`` with ``kept_block`` k > 1)."""
        sparse = "visionpulse" if self.kept_block == 1 else f"visionpulse-block{self.kept_block}"
        return "dense", "dense-kernel", sparse

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def text_before(self) -> int:
        """Text tokens before the visual run (an eighth of them: 32 of 256)."""
        return max(1, self.text_tokens // 8)

    def prompt_tokens(self, n_visual: int) -> int:
        return self.text_tokens + n_visual

    def chunk(self, n_visual: int) -> int:
        """Prefill chunk length for a context (the whole prompt when ``prefill_chunk`` is 0)."""
        return self.prefill_chunk or self.prompt_tokens(n_visual)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["visual_tokens"] = list(self.visual_tokens)
        out["text_before_visual"] = self.text_before
        out["warmup_decode_steps"] = min(WARMUP_DECODE_STEPS, self.decode_steps)
        return out


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``python -m vpstudy.bench.latency`` and ``vpstudy bench``).
    Size flags left out take the device's profile (:data:`GPU_DEFAULTS` / :data:`CPU_DEFAULTS`)."""
    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS

    def size(flag: str, help_: str, kind: Callable[[str], int] = positive, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{help_} (default: {gpu[key]} on CUDA, {cpu[key]} on CPU)", **kw)  # fmt: skip

    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N or cpu (default: cuda when there is one, else cpu)")  # fmt: skip
    size("--layers", "text layers")
    size("--hidden", "text hidden size")
    size("--heads", "query heads")
    size("--kv-heads", "key/value heads")
    size("--head-dim", "head dimension")
    size("--intermediate", "MLP size")
    size("--vocab", "vocabulary size (LM head tied to the embedding)")
    size("--batch", "sequences per batch")
    size("--text-tokens", "text tokens per prompt around the visual run")
    size("--visual-tokens", "visual contexts N_v", nargs="+")
    size("--decode-steps", "decode steps per run")
    size("--prefill-chunk", "prompt tokens per prefill forward; 0 = the whole prompt at once", kind=non_negative)
    size("--warmup", "untimed runs per method and context", kind=non_negative)
    size("--repeats", "timed runs per method and context")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help=f"weights and cache (default: {gpu['dtype']} on CUDA, {cpu['dtype']} on CPU)")  # fmt: skip
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help=f"Pruner backend of visionpulse (default: {gpu['backend']} on CUDA, "
                             f"{cpu['backend']} on CPU)")  # fmt: skip
    size("--copy-mib", "size of the bandwidth probe's device-to-device copy, MiB")
    parser.add_argument("--kept-block", type=positive, default=1,
                        help="VisionPulse keeps whole blocks of this many visual tokens covering the rule's "
                             "top-K (Pruner kept_block; 64 = the paper's block-sparse kernel; default 1: "
                             "token-exact)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    parser.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in a captured log)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="result file (default: bench/results/latency-<device kind>-<UTC date>.json)")  # fmt: skip
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="FILE",
                        help="measure nothing: join latency results of the same protocol and device that measured "
                             "different --visual-tokens (one command per context) into --json PATH")  # fmt: skip


def resolve_device(text: str) -> str:
    """``auto`` -> ``cuda:N`` (the current device) or ``cpu``; a CUDA device gets its index;
    checks that a CUDA device asked for exists."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device {text}: not a device (use cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise BenchError(f"--device {text}: only cuda and cpu are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {text}: no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return str(device)


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The :class:`Protocol` of parsed flags: the device's profile where a flag was left out.

    Raises:
        BenchError: one line naming the flag (CUDA asked for without one, inconsistent sizes).
    """
    device = resolve_device(args.device)
    profile = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    value = {key: profile[key] if getattr(args, key, None) is None else getattr(args, key) for key in profile}
    geometry = ModelGeometry(**{f.name: value[f.name] for f in fields(ModelGeometry)})
    if value["heads"] % value["kv_heads"]:
        raise BenchError(f"--heads {value['heads']} must be a multiple of --kv-heads {value['kv_heads']}")
    if value["head_dim"] % 8:
        raise BenchError(f"--head-dim {value['head_dim']} must be a multiple of 8 (M-RoPE sections)")
    if value["layers"] < 2:
        raise BenchError("--layers must be >= 2 (the anchor must leave a layer before it)")
    if value["text_tokens"] < 2:
        raise BenchError("--text-tokens must be >= 2 (<|vision_start|> and <|vision_end|> go around the visual run)")
    if value["vocab"] < 16:
        raise BenchError("--vocab must be >= 16 (four ids are vision tokens)")
    if device == "cpu" and value["dtype"] == "float16":
        raise BenchError("--dtype float16 is for CUDA; use float32 or bfloat16 on CPU")
    return Protocol(
        geometry=geometry, batch=value["batch"], text_tokens=value["text_tokens"],
        visual_tokens=tuple(sorted(set(value["visual_tokens"]))), decode_steps=value["decode_steps"],
        prefill_chunk=value["prefill_chunk"], warmup=value["warmup"], repeats=value["repeats"], dtype=value["dtype"],
        device=device, backend=value["backend"], copy_mib=value["copy_mib"], seed=args.seed, kept_block=args.kept_block,
    )  # fmt: skip


class _OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``<prog>: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Protocol]:
    """Flags and the :class:`Protocol` they give; a bad flag exits with a one-line error."""
    description = "Prefill/decode latency of VisionPulse vs dense (paper Figure 5; see the module doc)."
    parser = _OneLineParser(prog=f"python -m {MODULE}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args, protocol_from_args(args)
    except BenchError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


# --- model and inputs ---------------------------------------------------------------------------


def vision_ids(vocab: int) -> dict[str, int]:
    """Qwen3-VL's vision token ids where the vocabulary holds them, else its top four ids."""
    if vocab > max(QWEN_VISION_IDS.values()):
        return dict(QWEN_VISION_IDS)
    return {name: vocab - 4 + i for i, name in enumerate(QWEN_VISION_IDS)}


def text_id_limit(vocab: int) -> int:
    """Random text ids are drawn from ``[0, limit)``: below Qwen's special tokens and the vision ids."""
    return min(QWEN_TEXT_IDS, min(vision_ids(vocab).values()))


def model_config(geometry: ModelGeometry) -> Any:
    """A ``Qwen3VLConfig`` with ``geometry`` as its text model (tied embeddings, interleaved
    M-RoPE) and a tiny vision tower (never run; its merger outputs the text width)."""
    from transformers import Qwen3VLConfig

    rope = {"rope_type": "default", "mrope_section": geometry.mrope_section, "mrope_interleaved": True,
            "rope_theta": 5_000_000.0}  # fmt: skip
    text = dict(
        hidden_size=geometry.hidden, intermediate_size=geometry.intermediate, num_hidden_layers=geometry.layers,
        num_attention_heads=geometry.heads, num_key_value_heads=geometry.kv_heads, head_dim=geometry.head_dim,
        vocab_size=geometry.vocab, rope_parameters=rope, max_position_embeddings=262_144, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=geometry.hidden,
                  patch_size=16, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **vision_ids(geometry.vocab))


def build_model(protocol: Protocol) -> Any:
    """The random benchmark model, created directly on the device in the protocol's dtype, SDPA, eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(protocol.seed)
    with torch.device(protocol.device):
        config = model_config(protocol.geometry)
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=protocol.torch_dtype,
                                                             attn_implementation="sdpa")  # fmt: skip
    return model.eval()


def text_parameters(model: Any) -> int:
    """Parameters the language model reads per decode step: the text decoder and the LM head (a
    tied head shares the embedding's tensor and is counted once); the vision tower is left out."""
    unique = {id(p): p.numel() for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    return sum(unique.values())


@dataclass
class Prompt:
    """One context's batch: input ids with a run of N_v image placeholders, and its positions.

    Attributes:
        input_ids: [B, T] long.
        position_ids: [4, B, T] long: the text (cache) position, then the three M-RoPE rows.
        rope_delta: [B, 1] long: M-RoPE position minus text position after the prompt.
        image_grid_thw: [B, 3] long: the (never run) image's patch grid the positions follow.
        n_visual: N_v.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: torch.Tensor
    image_grid_thw: torch.Tensor
    n_visual: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def decode_positions(self, steps: int) -> torch.Tensor:
        """[steps, 4, B, 1] position ids of decode steps 0..steps-1 (step s writes cache slot T + s)."""
        batch = self.input_ids.shape[0]
        text = torch.arange(self.length, self.length + steps, device=self.input_ids.device).view(steps, 1, 1)
        text = text.expand(steps, batch, 1)
        mrope = text + self.rope_delta.view(1, batch, 1)
        return torch.stack([text, mrope, mrope, mrope], dim=1)


def build_prompt(model: Any, protocol: Protocol, n_visual: int) -> Prompt:
    """Random text ids around one run of ``n_visual`` image placeholders, with the model's own
    M-RoPE positions (``get_rope_index`` given ``mm_token_type_ids`` and the image grid)."""
    ids = vision_ids(protocol.geometry.vocab)
    before = protocol.text_before
    generator = torch.Generator().manual_seed(protocol.seed + n_visual)
    text = torch.randint(0, text_id_limit(protocol.geometry.vocab), (protocol.batch, protocol.text_tokens),
                         generator=generator)  # fmt: skip
    visual = torch.full((protocol.batch, n_visual), ids["image_token_id"])
    input_ids = torch.cat([text[:, :before], visual, text[:, before:]], dim=1)
    input_ids[:, before - 1] = ids["vision_start_token_id"]
    input_ids[:, before + n_visual] = ids["vision_end_token_id"]
    input_ids = input_ids.to(protocol.device)
    merge = int(model.config.vision_config.spatial_merge_size)
    rows, cols = image_grid(n_visual)
    grid = torch.tensor([[1, rows * merge, cols * merge]] * protocol.batch, device=protocol.device)
    extra = {}  # transformers 5.23 places the image by mm_token_type_ids; older releases by <|vision_start|>
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        extra["mm_token_type_ids"] = (input_ids == ids["image_token_id"]).int()
    mrope, delta = model.model.get_rope_index(input_ids, image_grid_thw=grid, **extra)
    length = input_ids.shape[1]
    text_positions = torch.arange(length, device=input_ids.device).expand(1, protocol.batch, length)
    position_ids = torch.cat([text_positions, mrope.to(input_ids.device)], dim=0)
    return Prompt(input_ids, position_ids, delta.to(input_ids.device).view(-1, 1), grid, n_visual)


def static_cache(model: Any, max_len: int) -> Any:
    """A ``transformers.StaticCache`` of ``max_len`` slots per layer (allocated on first use)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


# --- running -----------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def prefill(model: Any, cache: Any, prompt: Prompt, chunk: int) -> torch.Tensor:
    """Run the prompt through the model in chunks of ``chunk`` tokens (the LM head sees only the
    last position); returns the greedy next token, [B, 1]."""
    logits = None
    for start in range(0, prompt.length, chunk):
        end = min(start + chunk, prompt.length)
        logits = model(input_ids=prompt.input_ids[:, start:end], position_ids=prompt.position_ids[:, :, start:end],
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # fmt: skip
    return logits[:, -1].argmax(-1, keepdim=True)


def decode(model: Any, cache: Any, token: torch.Tensor, positions: torch.Tensor, progress: tqdm | None) -> torch.Tensor:
    """``len(positions)`` single-token forwards, each fed the previous greedy token.

    Args:
        token: [B, 1] the first token to feed (the prefill's).
        positions: [S, 4, B, 1] position ids per step (:meth:`Prompt.decode_positions`).
    Returns:
        [B, S] the greedy token of each step (kept on the device; nothing synchronises).
    """
    tokens = []
    for step in range(positions.shape[0]):
        logits = model(input_ids=token, position_ids=positions[step], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits  # fmt: skip
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if progress is not None:
            progress.update(1)
    return torch.cat(tokens, dim=1)


@dataclass
class Run:
    """One run of one method on one context (seconds; counts per decode step and row)."""

    prefill_s: float
    decode_s: float
    peak_memory_bytes: int | None
    kept: np.ndarray | None  # [S, B] visible visual tokens at the deepest layer (None: dense)
    backend: str


def _ran_backend(owner: Pruner | DenseDecode) -> str:
    """The decode backend that ran (``gather``: the pruner's gathered reference path ran instead)."""
    return owner.backend.name if owner.backend is not None else "gather"


def vision_pulse() -> VisionPulse:
    """The benchmarked method: the paper's τ = 0.1 setting, budget 1–5 %, default anchor."""
    return VisionPulse(tau=0.1, b_min=0.01, b_max=0.05)


def anchor_of(protocol: Protocol) -> int:
    """The anchor layer of :func:`vision_pulse` in the protocol's model (17 of 36)."""
    return vision_pulse().stages(protocol.geometry.layers)[0].decide_at


def make_pruner(model: Any, backend: str, kept_block: int = 1) -> Pruner:
    """:func:`vision_pulse` in a physical-mode Pruner on ``backend`` (block-sparse with ``kept_block`` > 1)."""
    return Pruner(model, [vision_pulse()], mode="physical", backend=backend, kept_block=kept_block)


def kept_counts(pruner: Pruner, steps: int, n_visual: int) -> np.ndarray:
    """[steps, B] visual tokens visible at the deepest layer on the last ``steps`` forwards.

    Raises:
        BenchError: the pruner did not see all N_v visual tokens.
    """
    traces = pruner.kept()
    seen = sorted({int(trace.counts[-1, 0]) for trace in traces})  # layer 0 < anchor: every visual token
    if seen != [n_visual]:
        raise BenchError(f"the pruner found {seen} of {n_visual} visual tokens in the prompt")
    return np.stack([trace.counts[-steps:, -1] for trace in traces], axis=1)


def run_method(model: Any, method: str, protocol: Protocol, cache: Any, prompt: Prompt, steps: int,
               progress: bool = True) -> Run:  # fmt: skip
    """One prefill + ``steps`` decode steps of ``method``, timed with the device synchronised."""
    device, cuda = protocol.device, protocol.device.startswith("cuda")
    positions = prompt.decode_positions(steps)
    pruner = make_pruner(model, protocol.backend, protocol.kept_block) if method.startswith("visionpulse") else None
    dense_kernel = DenseDecode(model, protocol.backend) if method == "dense-kernel" else None
    owner = pruner or dense_kernel
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=steps, desc=f"  {method} N_v={prompt.n_visual:,} decode", unit="step", leave=False,
               disable=not progress)  # fmt: skip
    with torch.inference_mode(), owner if owner is not None else contextlib.nullcontext():
        cache.reset()  # the cache's tensors are inference tensors: reset them in inference mode
        synchronize(device)
        started = time.perf_counter()
        token = prefill(model, cache, prompt, protocol.chunk(prompt.n_visual))
        synchronize(device)
        prefilled = time.perf_counter()
        decode(model, cache, token, positions, bar)
        synchronize(device)
        ended = time.perf_counter()
    bar.close()
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    kept = kept_counts(pruner, steps, prompt.n_visual) if pruner is not None else None
    backend = "sdpa" if owner is None else _ran_backend(owner)  # what ran: "auto" resolves on the first decode call
    if protocol.kept_block > 1 and backend == "gather":
        raise BenchError(f"--kept-block {protocol.kept_block} needs the Pruner's decode-backend fast path, but "
                         f"its gathered path ran (--backend {protocol.backend}; on CPU use --backend reference)")
    return Run(prefilled - started, ended - prefilled, peak, kept, backend)


# --- roofline ------------------------------------------------------------------------------------


def measure_bandwidth(device: str, nbytes: int, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Copy bandwidth of ``device`` in bytes/s: a ``nbytes`` device-to-device copy (read + write,
    2 × nbytes moved), best of ``repeats`` timed copies after one untimed."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - started)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def roofline_bytes(geometry: ModelGeometry, *, parameter_bytes: int, dtype_bytes: int, batch: int, prompt_tokens: int,
                   n_visual: int, steps: int, kept: np.ndarray | None = None,
                   anchor: int | None = None) -> np.ndarray:  # fmt: skip
    """Bytes each decode step must read from memory, at least.

    Step s (0-based) attends ``n_s = prompt_tokens + s + 1`` keys (its own included). Every step
    reads every parameter once (``parameter_bytes``; a tied embedding once, as the LM head), and
    at each layer the K and V of the keys it attends, per sequence:

    - dense: all ``n_s`` keys at every layer;
    - VisionPulse (``kept`` given): all keys at layers < ``anchor``; at layers ≥ ``anchor`` the
      ``n_s − N_v`` non-visual keys and the row's kept visual keys; plus K of all ``n_s`` keys
      once more at the anchor, for the scoring.

    Writes (the new key, activations) and the LM head's logits are left out.

    Args:
        parameter_bytes: bytes of the parameters read per step.
        dtype_bytes: bytes per K/V element.
        kept: [steps, batch] kept visual keys per step and row.
        anchor: the anchor layer (with ``kept``).
    Returns:
        [steps] float64 bytes.
    """
    keys = prompt_tokens + np.arange(steps, dtype=np.float64) + 1  # [S]
    per_key = geometry.kv_bytes_per_key(dtype_bytes)  # K + V, one layer, one row
    if kept is None:
        return parameter_bytes + geometry.layers * batch * per_key * keys
    if anchor is None or not 0 <= anchor < geometry.layers:
        raise ValueError(f"anchor {anchor} is not a layer of a {geometry.layers}-layer model")
    kept = np.asarray(kept, dtype=np.float64).reshape(steps, batch)
    dense_layers = anchor * batch * per_key * keys
    sparse_keys = (keys[:, None] - n_visual + kept).sum(axis=1)  # [S], summed over rows
    sparse_layers = (geometry.layers - anchor) * per_key * sparse_keys
    scoring = batch * (per_key // 2) * keys  # K only, at the anchor
    return parameter_bytes + dense_layers + sparse_layers + scoring


# --- results -------------------------------------------------------------------------------------


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The printed table: medians over repeats per context and method, speedups over dense (decode
    and total, same run), decode time over its roofline, kept visual share and peak memory."""
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "dense")  # dense first
    width = max(12, *map(len, methods))
    head = (f"{'N_v':>7} {'method':<{width}} {'prefill s':>9} {'decode s':>9} {'ms/step':>8} {'total s':>8} "
            f"{'decode x':>8} {'total x':>8} {'x kernel':>8} {'roofline s':>10} {'vs roof':>7} {'kept':>7} "
            f"{'peak GiB':>8}")  # fmt: skip
    lines = [head]
    for n in sorted({r["visual_tokens"] for r in rows}):
        mine = {m: [r for r in rows if r["visual_tokens"] == n and r["method"] == m] for m in methods}
        dense_decode, dense_total = _median(mine["dense"], "decode_s"), _median(mine["dense"], "total_s")
        kernel = mine.get("dense-kernel")
        kernel_total = _median(kernel, "total_s") if kernel else math.nan
        for method, group in mine.items():
            decode_s, total_s = _median(group, "decode_s"), _median(group, "total_s")
            roof = _median(group, "roofline_decode_s")
            peaks = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
            peak = max(peaks) if peaks else None
            lines.append(
                f"{n:>7,} {method:<{width}} {_median(group, 'prefill_s'):>9.3f} {decode_s:>9.3f} "
                f"{1e3 * _median(group, 'decode_step_s'):>8.2f} {total_s:>8.3f} {dense_decode / decode_s:>7.2f}x "
                f"{dense_total / total_s:>7.2f}x {kernel_total / total_s:>7.2f}x {roof:>10.3f} {decode_s / roof:>6.1f}x "
                f"{100 * _median(group, 'kept_fraction'):>6.2f}% {'-' if peak is None else f'{peak / GIB:.1f}':>8}"
            )  # fmt: skip
    lines.append("(medians over repeats; decode x / total x: dense (SDPA) time / this method's; x kernel: "
                 "dense-kernel total time / this method's; vs roof: decode time / "
                 "roofline; kept: visual tokens visible at the deepest layer, mean over decode steps and "
                 "rows)")  # fmt: skip
    return lines


def default_path(device_block: dict[str, Any]) -> Path:
    """``bench/results/latency-<device kind>-<UTC date>.json``."""
    date = dt.datetime.now(dt.timezone.utc).date().isoformat()
    return Path("bench") / "results" / f"latency-{device_kind(device_block)}-{date}.json"


def measure(model: Any, protocol: Protocol, bandwidth: float, progress: bool = True) -> list[dict[str, Any]]:
    """Every context: warm-up, then timed runs with the methods interleaved; one row per timed run."""
    anchor = anchor_of(protocol)
    parameter_bytes = text_parameters(model) * protocol.dtype_bytes
    rows: list[dict[str, Any]] = []
    for n_visual in tqdm(protocol.visual_tokens, desc="contexts", unit="context", disable=not progress):
        prompt = build_prompt(model, protocol, n_visual)
        cache = static_cache(model, prompt.length + protocol.decode_steps)
        for _ in range(protocol.warmup):
            for method in protocol.methods:
                run_method(model, method, protocol, cache, prompt, min(WARMUP_DECODE_STEPS, protocol.decode_steps),
                           progress)  # fmt: skip
        for repeat in range(protocol.repeats):
            for method in protocol.methods:
                run = run_method(model, method, protocol, cache, prompt, protocol.decode_steps, progress)
                roof = roofline_bytes(protocol.geometry, parameter_bytes=parameter_bytes,
                                      dtype_bytes=protocol.dtype_bytes, batch=protocol.batch,
                                      prompt_tokens=prompt.length, n_visual=n_visual, steps=protocol.decode_steps,
                                      kept=run.kept, anchor=anchor)  # fmt: skip
                kept = 1.0 if run.kept is None else float(run.kept.mean() / n_visual)
                tqdm.write(f"N_v {n_visual:,} {method} run {repeat + 1}/{protocol.repeats}: prefill "
                           f"{run.prefill_s:.3f} s, decode {run.decode_s:.3f} s "
                           f"({1e3 * run.decode_s / protocol.decode_steps:.2f} ms/step), kept {100 * kept:.2f}%, "
                           f"backend {run.backend}")  # fmt: skip
                rows.append({
                    "visual_tokens": n_visual, "method": method, "repeat": repeat, "prompt_tokens": prompt.length,
                    "prefill_s": run.prefill_s, "decode_s": run.decode_s, "total_s": run.prefill_s + run.decode_s,
                    "decode_step_s": run.decode_s / protocol.decode_steps,
                    "roofline_decode_s": float(roof.sum() / bandwidth), "roofline_decode_bytes": float(roof.sum()),
                    "kept_fraction": kept, "backend": run.backend, "peak_memory_bytes": run.peak_memory_bytes,
                })  # fmt: skip
        del cache, prompt
        gc.collect()
        if protocol.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def merge_results(paths: Sequence[Path]) -> dict[str, Any]:
    """One latency result from several of the same protocol and device that measured different
    visual contexts (e.g. one command per context under a time limit per command).

    The first file's header is kept; ``rows`` are joined, ``protocol.visual_tokens`` is their
    union, and ``merged_from`` lists each file's path, command, date, bandwidth and total time
    (each row keeps the roofline of its own run's bandwidth).

    Raises:
        BenchError: a file that is not a latency result, another protocol or device, or a context
            measured twice.
    """
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"--merge {path}: cannot be read as JSON ({e})") from None
        if not isinstance(result, dict) or result.get("kind") != "latency" or "protocol" not in result:
            raise BenchError(f"--merge {path}: not a result of this benchmark")
        results.append(result)

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        protocol = {k: v for k, v in result["protocol"].items() if k != "visual_tokens"}
        return protocol | {"device": result["device"].get("name")}

    first, seen = settings(results[0]), set()
    for path, result in zip(paths, results, strict=True):
        mine = settings(result)
        differ = sorted(k for k in first.keys() | mine.keys() if first.get(k) != mine.get(k))
        if differ:
            raise BenchError(f"--merge {path}: {', '.join(differ)} differ from {paths[0]}")
        contexts = {int(r["visual_tokens"]) for r in result["rows"]}
        if contexts & seen:
            raise BenchError(f"--merge {path}: visual_tokens {sorted(contexts & seen)} measured twice")
        seen |= contexts
    merged = dict(results[0])
    merged["protocol"] = {**results[0]["protocol"], "visual_tokens": sorted(seen)}
    merged["rows"] = sorted((row for r in results for row in r["rows"]), key=lambda row: row["visual_tokens"])
    merged["merged_from"] = [{"path": str(p), "command": r["command"], "date": r["date"], "total_s": r.get("total_s"),
                              "bandwidth_bytes_per_s": r["bandwidth"]["bytes_per_s"]}
                             for p, r in zip(paths, results, strict=True)]  # fmt: skip
    merged["total_s"] = sum(float(r.get("total_s") or 0.0) for r in results)
    return merged


def merge_command(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--merge FILE... --json PATH``: write :func:`merge_results` and print its table."""
    if args.json is None:
        raise BenchError("--merge needs --json PATH (where the joined result goes)")
    result = merge_results(args.merge)
    for line in summary_lines(result["rows"]):
        print(line)
    write_result(args.json, result)
    return result, args.json


def resident_bytes(protocol: Protocol, n_visual: int) -> int:
    """Bytes that stay on the device while a context runs: the text parameters and the static
    KV cache (prompt + decode steps slots, every layer, K and V); activations come on top."""
    g = protocol.geometry
    slots = protocol.prompt_tokens(n_visual) + protocol.decode_steps
    kv = g.layers * protocol.batch * slots * g.kv_bytes_per_key(protocol.dtype_bytes)
    return g.parameters() * protocol.dtype_bytes + kv


def check_memory(protocol: Protocol) -> None:
    """Refuse, in one line, a largest context whose parameters and KV cache alone exceed the
    device's free memory (rather than failing with an out-of-memory error halfway through)."""
    free, _ = torch.cuda.mem_get_info(torch.device(protocol.device))
    largest = max(protocol.visual_tokens)
    need = resident_bytes(protocol, largest)
    if need > free:
        raise BenchError(f"--visual-tokens {largest}: the parameters and static KV cache need {need / GIB:.1f} GiB, "
                         f"{protocol.device} has {free / GIB:.1f} GiB free (lower --batch or "
                         "--visual-tokens)")  # fmt: skip


def run(args: argparse.Namespace, protocol: Protocol, *, argv: Sequence[str] | None = None, command: str | None = None,
        progress: bool = True) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """:func:`main` after parsing: the benchmark for ``protocol``, written to ``args.json`` (or the
    default path, :func:`default_path`); returns the result and where it was written."""
    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    if protocol.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(protocol.device))  # resolve_device gave it an index
        check_memory(protocol)
    bandwidth = measure_bandwidth(protocol.device, protocol.copy_mib * MIB)
    model = build_model(protocol)
    n_params = text_parameters(model)
    g = protocol.geometry
    weights = g.parameters() * protocol.dtype_bytes
    kv_gib = [(resident_bytes(protocol, n) - weights) / GIB for n in protocol.visual_tokens]
    print(f"model: random Qwen3-VL text, {g.layers} layers, hidden {g.hidden}, {g.heads}/{g.kv_heads} heads x "
          f"{g.head_dim}, MLP {g.intermediate}, vocab {g.vocab} (tied); {n_params / 1e9:.3f} B text parameters, "
          f"{protocol.dtype} on {protocol.device}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average {load_before}", flush=True)  # fmt: skip
    print(f"protocol: batch {protocol.batch}, {protocol.text_tokens} text + N_v {list(protocol.visual_tokens)} tokens, "
          f"prefill chunk {protocol.prefill_chunk or 'whole prompt'}, {protocol.decode_steps} decode steps, "
          f"{protocol.warmup} warm-up + {protocol.repeats} timed runs per method; static KV cache "
          f"{', '.join(f'{x:.2f}' for x in kv_gib)} GiB; backend {protocol.backend}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    rows = measure(model, protocol, bandwidth, progress)
    print()
    for line in summary_lines(rows):
        print(line)
    elapsed, load_after = time.perf_counter() - started, load_average()
    print(f"total {elapsed:.0f} s; load average {load_after}")
    header = result_header(MODULE, argv, load_before, load_after, device=protocol.device, command=command)
    result = {
        "kind": "latency",
        **header,
        "extra_versions": kernel_versions(),
        "protocol": protocol.as_json(),
        "model": {"class": type(model).__name__, "family": "qwen3_vl", "text_parameters": n_params,
                  "parameter_bytes": n_params * protocol.dtype_bytes, "anchor": anchor_of(protocol),
                  "method": f"VisionPulse(tau=0.1, b_min=0.01, b_max=0.05), Pruner mode physical, kept_block "
                            f"{protocol.kept_block}"},  # fmt: skip
        "bandwidth": {"bytes_per_s": bandwidth, "copy_bytes": protocol.copy_mib * MIB, "repeats": BANDWIDTH_REPEATS,
                      "how": "best of the timed device-to-device copies; bytes moved = 2 x copy size"},  # fmt: skip
        "rows": rows,
        "total_s": elapsed,
    }
    path = args.json or default_path(header["device"])
    write_result(path, result)
    return result, path


def main(argv: Sequence[str] | None = None, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark, print the table, write and return the result (see the module doc).

    ``command`` is recorded as the exact command (default: ``python -m vpstudy.bench.latency ...``).
    """
    args, protocol = parse_args(argv)
    try:
        if args.merge:
            return merge_command(args)[0]
        return run(args, protocol, argv=argv, command=command, progress=progress and not args.no_progress)[0]
    except BenchError as e:
        print(f"python -m {MODULE}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
