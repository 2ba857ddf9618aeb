"""Dense decode attention through a decode backend: the baseline a sparse kernel is timed against.

``with DenseDecode(model, backend="triton"): model.generate(...)`` routes every text layer's
decode call (one query row) to the backend's ``sparse_decode`` with nothing pruned; prefill
calls run the model's own attention. It is the "dense Triton kernel" of the paper's latency
protocol (the official code's dense baseline), so that a speedup measures pruning and not a
change of kernel. Transformers' own attention (``sdpa``) is the other baseline.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import visible_range
from ..hooks import AttentionSwap
from .choose import Backend, choose_backend

DENSE_PREFIX = "vpstudy_dense_"
_ACTIVE: dict[int, DenseDecode] = {}  # id(model config) -> the DenseDecode installed on it


def _dense(function: Any, base: str, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    owner = _ACTIVE.get(id(module.config))
    if owner is None or query.shape[2] != 1:
        return function(module, query, key, value, attention_mask, **kwargs)
    return owner._attend(module.layer_idx, query, key, value, attention_mask,
                         kwargs.get("scaling") or query.shape[-1] ** -0.5)  # fmt: skip


class DenseDecode:
    """Context manager: decode calls of the text layers run on ``backend`` (see module docstring).

    Args:
        model: a transformers model whose text attention uses the registered-function interface.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"xformers"`` (:mod:`.choose`).
    """

    def __init__(self, model: Any, backend: str = "auto") -> None:
        self.model, self.backend_name = model, backend
        self.backend: Backend | None = None
        self.calls = 0  # decode forwards routed (counted at the first text layer)
        self._swap = AttentionSwap(model, DENSE_PREFIX, _dense)

    def __enter__(self) -> DenseDecode:
        self._swap.__enter__()
        self._configs = {id(m.config) for m in self.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")}
        for config in self._configs:
            _ACTIVE[config] = self
        return self

    def __exit__(self, *exc: object) -> None:
        for config in self._configs:
            _ACTIVE.pop(config, None)
        self._swap.__exit__(*exc)

    def _attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, None]:  # fmt: skip
        from vpstudy.backends.layout import KeyLayout

        if self.backend is None:
            self.backend = choose_backend(self.backend_name, query.device, query.dtype, query.shape[-1])
        self.calls += int(layer == 0)
        batch = query.shape[0]
        start, end = visible_range(None if attention_mask is None else attention_mask[:, :, -1, :], batch,
                                   key.shape[2], query.device)  # fmt: skip
        # nothing is pruned: one "visual" key at the first slot, all of it attended
        layout = KeyLayout(start, end, start, torch.ones_like(start), 1)
        out = self.backend.sparse_decode(query[:, :, -1], key, value, layout, None, scale=scaling)
        return out.unsqueeze(1), None
