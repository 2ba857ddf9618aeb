"""Sampled decoding with one random stream per sample, as the paper ran Qwen3-VL-Thinking.

transformers' ``generate(do_sample=True)`` draws every row of a batch from one global random
stream, so a sample's tokens depend on which samples share its batch, on the order batches run
and on the rank that decodes it. :class:`PerSampleSampler` draws each row from its own stream,
seeded from the run's seed and the sample's id (:func:`sample_seed`): a resumed run, a sharded
run (:mod:`vpstudy.distributed`) and a single-process run draw the same tokens for a sample.

It is a ``LogitsProcessor`` run with ``do_sample=False``: it applies transformers' own
temperature, top-k and top-p warpers in transformers' order (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, as ``generate`` builds them for sampling), draws one
token per row from the resulting distribution by inverting its cumulative sum (float64) at a
uniform number from the row's own ``torch.Generator`` (on the CPU, so the stream is the same on
every device), and leaves only that token finite, which the greedy step then picks. Other
sampling settings of a model's generation config (min-p, typical-p, repetition penalty) are
not applied by this processor; the repetition penalty and other processors ``generate`` builds
for greedy decoding still run before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from transformers import LogitsProcessor

from .errors import VpstudyError


class SamplingFields(TypedDict):
    """The fields of :class:`Sampling` as keyword arguments."""

    temperature: float
    top_p: float
    top_k: int


# Qwen3-VL-Thinking as the VisionPulse paper decoded it
PAPER_SAMPLING: SamplingFields = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


class SamplingError(VpstudyError):
    """Sampling settings that cannot be used (one-line message naming the setting)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings: temperature > 0, top-p in (0, 1] (1: off), top-k >= 0 (0: off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise SamplingError(f"--temperature must be a number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"--top-k must be an integer >= 0 (0: off), got {self.top_k!r}")

    @classmethod
    def paper(cls) -> Sampling:
        """Temperature 0.7, top-p 0.8, top-k 20 (Qwen3-VL-Thinking in the VisionPulse paper)."""
        return cls(**PAPER_SAMPLING)

    @classmethod
    def from_generation_config(cls, config: Any) -> Sampling:
        """The sampling settings of a model's ``generation_config`` (transformers' defaults,
        temperature 1, top-p 1, top-k 50, where it sets none)."""

        def get(name: str, default: Any) -> Any:
            value = getattr(config, name, None)
            return default if value is None else value

        return cls(temperature=float(get("temperature", 1.0)), top_p=float(get("top_p", 1.0)),
                   top_k=int(get("top_k", 50)))  # fmt: skip

    def manifest_entry(self) -> dict[str, Any]:
        """What the run's manifest records under ``generation``."""
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "sampler": "one stream per sample, seed = sha256(run seed, sample id)"}  # fmt: skip

    def processor(self, seeds: Sequence[int]) -> PerSampleSampler:
        """The logits processor for one batch whose rows have these seeds (:func:`sample_seed`)."""
        return PerSampleSampler(self, seeds)


def sample_seed(run_seed: int, sample_id: str) -> int:
    """The seed of a sample's random stream: the first 8 bytes of sha256(``run_seed``, ``sample_id``)
    as a non-negative 63-bit integer; the same on every rank, run and resume."""
    digest = hashlib.sha256(f"{int(run_seed)}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerSampleSampler(LogitsProcessor):
    """A ``LogitsProcessor`` that samples each batch row from its own seeded stream (module docstring).

    Args:
        sampling: temperature, top-k, top-p.
        seeds: one seed per batch row, in row order.
    """

    def __init__(self, sampling: Sampling, seeds: Sequence[int]) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.sampling = sampling
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.warpers: list[Any] = []
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))

    def draw(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """One token per row, [B] long, drawn from the warped distribution of ``scores`` [B, V]."""
        if scores.shape[0] != len(self.generators):
            raise SamplingError(f"the sampler was built for {len(self.generators)} rows, the batch has "
                                f"{scores.shape[0]}")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.double(), dim=-1)
        cdf = probs.cumsum(-1)
        uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        target = uniform.to(cdf.device) * cdf[:, -1]
        return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=scores.shape[-1] - 1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` [B, V] with only each row's drawn token left finite (0), for the greedy step."""
        tokens = self.draw(input_ids, scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)
