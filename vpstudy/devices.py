"""Devices of a model whose layers may sit on several devices (``--device-map auto``).

``vpstudy.load(..., device_map="auto")`` lets transformers and accelerate place the model
(``from_pretrained(device_map=...)``): a model larger than one device is split by layers over
the devices of the process, and accelerate's hooks move the activations between them. The
recorder and the pruner keep a little per-generation state (visual positions [B, N_v], keep
masks [B, N_v], running maxima): :func:`move_to` brings it to the device of the layer whose
query it meets, so every layer computes on its own device and nothing large (keys, values,
hidden states) crosses devices because of vpstudy.

Under a data-parallel launch (:mod:`vpstudy.distributed`) with ``--device-map auto``, each of a
node's ``LOCAL_WORLD_SIZE`` processes gets its own contiguous group of the node's GPUs
(:func:`rank_max_memory`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import VpstudyError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class DeviceError(VpstudyError):
    """A device placement that cannot work on this machine (one-line message)."""


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device``: tensors, and the tensors inside lists,
    tuples, dicts and dataclass instances (frozen ones are rebuilt), recursively. Anything else
    (ints, generators, None) is returned as it is. A tensor already on ``device`` is returned
    itself (no copy), so the call costs nothing on a single-device model."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(move_to(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: move_to(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        if all(changes[k] is getattr(value, k) for k in changes):
            return value
        return dataclasses.replace(value, **changes)
    return value


def move_fields(state: Any, device: torch.device, names: tuple[str, ...]) -> None:
    """Move the fields ``names`` of a mutable per-generation ``state`` object to ``device`` in
    place (:func:`move_to` on each); the other fields (per-step results) stay where they are."""
    for name in names:
        setattr(state, name, move_to(getattr(state, name), device))


def layer_devices(model: Any) -> dict[str, str]:
    """Where accelerate put each module of a dispatched model (``model.hf_device_map``: module
    name -> device, as strings), or ``{"": <device>}`` for a model on one device."""
    placement = getattr(model, "hf_device_map", None)
    if placement:
        return {name: f"cuda:{d}" if isinstance(d, int) else str(d) for name, d in placement.items()}
    return {"": str(next(model.parameters()).device)}


def rank_gpus(local_rank: int, local_world_size: int, n_gpus: int) -> list[int]:
    """The GPU indices process ``local_rank`` of ``local_world_size`` on a node with ``n_gpus``
    GPUs spreads one model over: ``n_gpus // local_world_size`` contiguous ones.

    Raises:
        DeviceError: fewer GPUs than processes on the node.
    """
    per_rank = n_gpus // max(1, local_world_size)
    if per_rank < 1:
        raise DeviceError(f"--device-map: {local_world_size} processes on this node but {n_gpus} GPUs; launch at most "
                          f"{n_gpus} processes per node (each spreads its model over its own GPUs)")  # fmt: skip
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def rank_max_memory(local_rank: int, local_world_size: int) -> dict[int | str, int] | None:
    """``max_memory`` for ``from_pretrained(device_map=..., max_memory=...)`` that limits this
    process to its own GPUs (:func:`rank_gpus`, each with its free memory in bytes); None for a
    single process per node or without CUDA (accelerate then uses every visible device)."""
    if local_world_size <= 1 or not torch.cuda.is_available():
        return None
    return {i: int(torch.cuda.mem_get_info(i)[0]) for i in rank_gpus(local_rank, local_world_size,
                                                                       torch.cuda.device_count())}  # fmt: skip
