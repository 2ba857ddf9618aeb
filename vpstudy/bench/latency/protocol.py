"""The latency benchmark's settings: the model geometry, the :class:`Protocol` (sizes, methods,
device), the per-device defaults, and the device helpers every part uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from vpstudy.errors import VpstudyError
from vpstudy.families import mrope_section

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
    warmup=1, repeats=1, dtype="float32", backend="auto", copy_mib=256,
)  # fmt: skip


class BenchError(VpstudyError):
    """A benchmark setting that cannot run here (one line naming the flag)."""


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
        """The ``torch.dtype`` named by ``dtype``."""
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of ``torch_dtype`` (2 for bfloat16 / float16, 4 for float32)."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def text_before(self) -> int:
        """Text tokens before the visual run (an eighth of them: 32 of 256)."""
        return max(1, self.text_tokens // 8)

    def prompt_tokens(self, n_visual: int) -> int:
        """Prompt length in tokens of the context with ``n_visual`` visual tokens (text + visual)."""
        return self.text_tokens + n_visual

    def chunk(self, n_visual: int) -> int:
        """Prefill chunk length for a context (the whole prompt when ``prefill_chunk`` is 0)."""
        return self.prefill_chunk or self.prompt_tokens(n_visual)

    def as_json(self) -> dict[str, Any]:
        """The protocol as a JSON-ready dict: every field, plus the derived ``text_before_visual``
        and ``warmup_decode_steps`` (decode steps of each untimed warm-up run)."""
        out = asdict(self)
        out["visual_tokens"] = list(self.visual_tokens)
        out["text_before_visual"] = self.text_before
        out["warmup_decode_steps"] = min(WARMUP_DECODE_STEPS, self.decode_steps)
        return out


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


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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

