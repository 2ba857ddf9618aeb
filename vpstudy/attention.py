"""Where a step's attention to visual tokens is computed (pure-torch reference backend).

At every decoding step the recorder needs, per layer, one attention row: the query of the
position that predicts the next token, against every cached key. :func:`visual_row` computes it
from ``q`` and the cached ``k`` alone, so the model itself can run any attention backend (SDPA,
flash, xformers) and never has to materialise a probability matrix.

Semantics (docs/design.md, Definitions): softmax over *all* visible keys at temperature 1, in float32;
``p̄`` is the mean over query heads of those probabilities, restricted to visual keys; mass is
``Σ p̄`` over visual keys; the max-head mass is the largest per-head visual share. The
VisionPulse budget signal is the same max-head share of ``softmax(logits / τ)`` at a
temperature τ (docs/design.md, VisionPulse budget), computed here for each requested τ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualRow:
    """Visual attention of one query row per batch element, at one layer and step.

    Attributes:
        scores: head-mean probabilities at visual keys, [B, N_v_max] float32; zero where
            ``valid`` is False (rows have different N_v).
        mass: ``scores.sum(-1)``, [B].
        max_head_mass: max over query heads of each head's visual share, [B].
        tau_max_head_mass: max over heads of the visual share of ``softmax(logits / τ)``, one
            column per requested temperature, [B, T] (T = 0 when none was requested).
    """

    scores: torch.Tensor
    mass: torch.Tensor
    max_head_mass: torch.Tensor
    tau_max_head_mass: torch.Tensor


def row_logits(query_row: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax logits of one query row per head against all keys, in float32.

    Args:
        query_row: [B, H_q, D] (after RoPE).
        key: [B, H_kv, T, D] cached keys (not repeated for GQA); H_q must be a multiple of H_kv.
        scaling: logit scale (usually D**-0.5).

    Returns:
        [B, H_q, T] float32 logits, query heads in the model's order (head h uses KV head
        h // (H_q / H_kv), as ``repeat_kv`` does).
    """
    batch, heads, dim = query_row.shape
    kv_heads = key.shape[1]
    grouped = query_row.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)) * scaling  # [B, H_kv, G, T]
    return logits.reshape(batch, heads, key.shape[2])


def apply_row_mask(logits: torch.Tensor, mask_row: torch.Tensor | None) -> torch.Tensor:
    """Mask logits [B, H, T] with one mask row as transformers passes it.

    ``mask_row`` is None (every key visible: the last row of a causal prompt or a decode query
    with no padding), a boolean [B, 1 or H, T] (True = visible, as ``sdpa_mask`` builds), or an
    additive float [B, 1 or H, T] (0 / dtype-min, as ``eager_mask`` builds).
    """
    if mask_row is None:
        return logits
    if mask_row.dtype == torch.bool:
        return logits.masked_fill(~mask_row, float("-inf"))
    return logits + mask_row.float()


def as_visible(mask: torch.Tensor) -> torch.Tensor:
    """A mask as transformers passes it, as booleans (True = visible): boolean masks as they are,
    additive float masks (0 / dtype-min) by their sign."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def visible_range(mask_row: torch.Tensor | None, batch: int, n_keys: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """First visible key and one past the last, per row ([B] int32 each), of a decode call's mask
    row (as :func:`apply_row_mask` takes it; left padding before, unwritten static-cache slots
    after the visible run); None means all ``n_keys`` keys are visible."""
    if mask_row is None:
        zeros = torch.zeros(batch, dtype=torch.int32, device=device)
        return zeros, zeros + n_keys
    visible = as_visible(mask_row[:, 0, :]).expand(batch, n_keys).to(torch.int32)
    start = visible.argmax(-1)
    end = n_keys - visible.flip(-1).argmax(-1)
    return start.to(torch.int32), end.to(torch.int32)


def visual_row(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    visual_index: torch.Tensor,
    visual_valid: torch.Tensor,
    temperatures: tuple[float, ...] = (),
) -> VisualRow:
    """Visual scores of the last query row of one attention call.

    Args:
        query: [B, H_q, Q, D] queries of this call (Q = prompt length at prefill, 1 at decode).
        key: [B, H_kv, T, D] all cached keys, this call's included.
        attention_mask: what the attention function received: None, or [B, 1, Q, T] bool/float.
        scaling: logit scale.
        visual_index: [B, N_v_max] long, key positions of visual tokens per row (padded with 0).
        visual_valid: [B, N_v_max] bool, which entries of ``visual_index`` are real.
        temperatures: τ values at which to also return the max-head visual share.

    Returns:
        The :class:`VisualRow` of the last query position.
    """
    logits = row_logits(query[:, :, -1, :], key, scaling)
    mask_row = None if attention_mask is None else attention_mask[:, :, -1, :]
    logits = apply_row_mask(logits, mask_row)
    index = visual_index.unsqueeze(1).expand(-1, logits.shape[1], -1)
    valid = visual_valid.unsqueeze(1)

    def visual_share(temperature: float) -> torch.Tensor:  # [B, H, N_v_max]
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        return probs.gather(2, index) * valid

    per_head = visual_share(1.0)
    scores = per_head.mean(dim=1)
    tau = [visual_share(t).sum(-1).amax(dim=1) for t in temperatures]
    tau_mass = torch.stack(tau, dim=1) if tau else scores.new_zeros(scores.shape[0], 0)
    return VisualRow(scores=scores, mass=scores.sum(-1), max_head_mass=per_head.sum(-1).amax(dim=1),
                     tau_max_head_mass=tau_mass)  # fmt: skip
