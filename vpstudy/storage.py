"""What a recording keeps of the attention it traces: the store policy (``vpstudy record --store``).

A recorded step gives, at every recorded layer, a handful of scalars (mass, max-head mass, the
budget signal at each τ, the active count at each δ) and one vector, p̄ ∈ R^{N_v}. At paper scale
(36 layers, ~4,096 visual tokens, 1,687 steps on average, up to 16,384) the vectors are ~99% of
the bytes, so a policy says at which layers they are kept:

- ``analysis`` (the default): the steps table at every recorded layer, the running max of p̄ at
  every recorded layer (``max_scores``: the never-activated shares), and p̄ per step only at the
  *score layers*: the analysis layer (:func:`analysis_layer`, the recorded layer at VisionPulse's
  relative depth 17/36) plus the layers given with ``--score-layers``;
- ``full``: p̄ per step at every recorded layer;
- ``scalars``: the steps table and ``max_scores``, no per-step p̄.

Size of one sample on disk (S steps, L recorded layers, L_s score layers, N_v visual tokens, K
thresholds, T budget temperatures; :func:`estimate`)::

    scores      128 + S · L_s · N_v · 2 bytes        (float16 .npy, written in chunks)
    max_scores  128 + L · N_v · 4 bytes              (float32 .npy)
    steps table ≈ S · L · (4 (2 + T) + 2 K + 4) bytes (parquet; the row size is measured,
                                                      bench/results/store-policies-*.json)

and the recorder's buffers on the model's device for a batch of B (C = ``chunk_steps``)::

    B · C · (L_s · N_v · 2 + L · (2 + T + K) · 4) + L · B · N_v · 4   (chunk + running max)

A policy is part of a run's manifest (``store``: ``policy`` and ``score_layers``);
:func:`store_entry` reads it back (a run written before policies existed stored p̄ at every
recorded layer: ``full``). Readers that need p̄ at a layer the run does not store say so in one
line (:func:`missing_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import VpstudyError
from .rules import anchor_layer

STORE_POLICIES: tuple[str, ...] = ("full", "analysis", "scalars")
DEFAULT_STORE = "analysis"
DEFAULT_CHUNK_STEPS = 256
SCORE_BYTES = 2  # p̄ is stored as float16
NPY_HEADER_BYTES = 128  # the fixed header of a chunk-written .npy (vpstudy.runs.ArrayAppender)


class StorePolicyError(VpstudyError):
    """A store policy that cannot be used, or a run that lacks what a command needs (one line)."""


def analysis_layer(layers: Sequence[int]) -> int:
    """The recorded layer nearest to VisionPulse's anchor depth (17 of 36) of a model with
    ``max(layers) + 1`` layers; ties go to the shallower layer. The default analysis layer of
    ``vpstudy analyze`` and the default score layer of the ``analysis`` policy."""
    if not layers:
        raise StorePolicyError("no recorded layers to choose an analysis layer from")
    target = anchor_layer(max(layers) + 1)
    return min(layers, key=lambda layer: (abs(layer - target), layer))


@dataclass(frozen=True)
class StorePolicy:
    """Which per-step p̄ vectors a recording keeps (see the module docstring).

    Attributes:
        policy: ``"full"``, ``"analysis"`` or ``"scalars"``.
        score_layers: layers whose p̄ the ``analysis`` policy keeps besides the analysis layer
            (``--score-layers``; negative indices count from the last text layer).
        chunk_steps: steps per chunk: how many steps of values wait on the model's device before
            they are moved off it (and a chunk of p̄ is written). It changes no stored value.
    """

    policy: str = DEFAULT_STORE
    score_layers: tuple[int, ...] = ()
    chunk_steps: int = DEFAULT_CHUNK_STEPS

    def __post_init__(self) -> None:
        if self.policy not in STORE_POLICIES:
            raise StorePolicyError(f"--store {self.policy!r}: expected one of {', '.join(STORE_POLICIES)}")
        if self.score_layers and self.policy != "analysis":
            what = "every recorded layer" if self.policy == "full" else "no layer"
            raise StorePolicyError(f"--score-layers applies to --store analysis; --store {self.policy} keeps p̄ at "
                                   f"{what}")  # fmt: skip
        if isinstance(self.chunk_steps, bool) or not isinstance(self.chunk_steps, int) or self.chunk_steps < 1:
            raise StorePolicyError(f"--chunk-steps must be an integer >= 1, got {self.chunk_steps!r}")
        object.__setattr__(self, "score_layers", tuple(int(x) for x in self.score_layers))

    @classmethod
    def full(cls, chunk_steps: int = DEFAULT_CHUNK_STEPS) -> StorePolicy:
        """p̄ at every recorded layer (what every run stored before policies existed)."""
        return cls("full", chunk_steps=chunk_steps)

    def resolve(self, layers: Sequence[int], n_layers: int) -> list[int]:
        """The layers whose p̄ this policy keeps, given the recorded ``layers`` (indices in
        0..n_layers-1) of a text model with ``n_layers`` layers.

        Raises:
            StorePolicyError: a ``--score-layers`` entry out of range or not recorded.
        """
        recorded = sorted(set(layers))
        if self.policy == "full":
            return recorded
        if self.policy == "scalars" or not recorded:
            return []
        bad = [i for i in self.score_layers if not -n_layers <= i < n_layers]
        if bad:
            raise StorePolicyError(f"--score-layers {bad} out of range: the text model has {n_layers} layers "
                                   f"(0..{n_layers - 1})")  # fmt: skip
        extra = {i % n_layers for i in self.score_layers}
        missing = sorted(extra - set(recorded))
        if missing:
            raise StorePolicyError(f"--score-layers {missing}: not recorded (recorded layers: {recorded}); add them "
                                   "to --layers")  # fmt: skip
        return sorted(extra | {analysis_layer(recorded)})

    def manifest_entry(self, layers: Sequence[int], n_layers: int) -> dict[str, Any]:
        """The manifest's ``store``: ``{"policy": ..., "score_layers": [...]}`` (the chunk size
        is not part of it: it changes no stored value)."""
        return {"policy": self.policy, "score_layers": self.resolve(layers, n_layers)}


def store_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A run manifest's store policy as ``{"policy": ..., "score_layers": [...]}``. A run written
    before policies existed kept p̄ at every recorded layer (``full``; ``score_layers`` is then the
    manifest's ``layers``, or None when the manifest does not list them)."""
    entry = manifest.get("store")
    if isinstance(entry, Mapping) and "policy" in entry:
        return {"policy": str(entry["policy"]), "score_layers": [int(x) for x in entry.get("score_layers") or []]}
    layers = manifest.get("layers")
    return {"policy": "full", "score_layers": [int(x) for x in layers] if layers is not None else None}


def richer_store(layers: Sequence[int]) -> str:
    """What to record instead: ``"record with --store full or --score-layers 3,5"``."""
    listed = ",".join(str(x) for x in sorted(set(layers)))
    return f"record with --store full or --score-layers {listed}" if listed else "record with --store full"


def missing_scores(what: str, layers: Sequence[int], entry: Mapping[str, Any], *, at_least: int = 0) -> str | None:
    """One line saying that ``what`` needs p̄ at ``layers`` (or, with ``at_least``, at that many
    layers) and what to record instead, or None when the run's store ``entry`` has them."""
    stored = entry.get("score_layers")
    if stored is None:  # a legacy run without a layer list: every recorded layer
        return None
    have = set(stored)
    where = f"at layers {sorted(have)}" if have else "at no layer"
    kept = f"this run kept p̄ {where} (--store {entry.get('policy')})"
    if at_least:
        if len(have) >= at_least:
            return None
        wanted = sorted(set(layers) | have)
        return f"{what} needs p̄ at {at_least} or more layers; {kept}: {richer_store(wanted)}"
    lacking = sorted(set(layers) - have)
    if not lacking:
        return None
    named = f"layer {lacking[0]}" if len(lacking) == 1 else f"layers {lacking}"
    return f"{what} needs p̄ at {named}; {kept}: {richer_store(lacking)}"


def steps_row_bytes(n_thresholds: int, n_temperatures: int) -> int:
    """Bytes on disk of one (step, layer) row of the steps table, estimated: the float32 masses
    and signals do not compress, small-integer counts take about 2 bytes, and step, layer,
    token and sample id columns (run-length and dictionary encoded) about 4 together."""
    return 4 * (2 + n_temperatures) + 2 * n_thresholds + 4


@dataclass(frozen=True)
class StoreEstimate:
    """Estimated bytes of one sample and of the recorder's buffers (:func:`estimate`)."""

    policy: str
    steps: int
    scores: int  # bytes of the per-step p̄ array on disk
    max_scores: int
    steps_table: int
    device_buffers: int  # the recorder's buffers on the model's device, for the whole batch
    host_chunk: int  # one chunk moved off the device (host memory, for the whole batch)
    host_scalars: int  # the per-step scalars the recorder keeps on the host until the sample is written

    @property
    def disk(self) -> int:
        """Bytes on disk of one sample."""
        return self.scores + self.max_scores + self.steps_table


def estimate(
    *,
    policy: str,
    layers: int,
    score_layers: int,
    n_visual: int,
    steps: int,
    thresholds: int,
    temperatures: int,
    chunk_steps: int = DEFAULT_CHUNK_STEPS,
    batch: int = 1,
) -> StoreEstimate:
    """Bytes of one sample of ``steps`` steps under a policy keeping p̄ at ``score_layers`` of
    ``layers`` recorded layers, and of the recorder's buffers for a batch (module docstring)."""
    scalars_per_step = layers * (2 + temperatures + thresholds) * 4
    per_step = score_layers * n_visual * SCORE_BYTES + scalars_per_step
    return StoreEstimate(
        policy=policy,
        steps=steps,
        scores=(NPY_HEADER_BYTES + steps * score_layers * n_visual * SCORE_BYTES) if score_layers else 0,
        max_scores=NPY_HEADER_BYTES + layers * n_visual * 4,
        steps_table=steps * layers * steps_row_bytes(thresholds, temperatures),
        device_buffers=batch * chunk_steps * per_step + layers * batch * n_visual * 4,
        host_chunk=batch * min(chunk_steps, steps) * per_step,
        host_scalars=batch * steps * scalars_per_step,
    )


def human_bytes(n_bytes: float) -> str:
    """``812 B``, ``41.0 kB``, ``12.3 MB``, ``1.52 GB`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:,.{digits}f} {unit}"
    return f"{n_bytes:.0f} B"


def estimate_line(est: StoreEstimate, score_layers: Sequence[int], layers: Sequence[int], *, device: str,
                  batch: int, chunk_steps: int) -> str:  # fmt: skip
    """The line ``vpstudy record`` prints before it starts: size on disk per sample at its
    ``max_new_tokens`` and the recorder's peak memory."""
    where = f"p̄ per step at layers {list(score_layers)}" if score_layers else "no per-step p̄"
    return (f"store {est.policy} ({len(layers)} layers recorded, {where}): ≤ {human_bytes(est.disk)} on disk per "
            f"sample at {est.steps:,} steps (p̄ {human_bytes(est.scores)}, max_scores {human_bytes(est.max_scores)}, "
            f"steps table ≈ {human_bytes(est.steps_table)}); recorder peak memory {human_bytes(est.device_buffers)} on "
            f"{device} + {human_bytes(est.host_chunk + est.host_scalars)} on the host for a batch of {batch} "
            f"(chunks of {chunk_steps} steps)")  # fmt: skip
