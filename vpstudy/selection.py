"""Which visual keys to keep: the small tensor operations every pruning method and decode backend shares.

A leaf of the decode path (torch and :mod:`vpstudy.rules` only): the pruning methods, the
backends' reference and the xformers backend all select with these functions.

Shapes: B = batch rows, H = query heads, T = key positions, N = visual tokens of the row with
the most (rows are padded; ``valid`` [B, N] says which entries are real).
"""

from __future__ import annotations

import torch

from .rules import BudgetRule, keep_count, parse_signal


def visual_logits(logits: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """Logits at the visual keys: [B, H, T] -> [B, H, N]."""
    return logits.gather(2, visual_index.unsqueeze(1).expand(-1, logits.shape[1], -1))


def visual_share(
    logits: torch.Tensor, visual_index: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-head probability of each visual key under softmax(logits / τ) over all visible keys.

    Args:
        logits: [B, H, T] float32, masked keys at -inf.
        visual_index: [B, N] long, the key position of each visual token.
        valid: [B, N] bool, real visual tokens (False at padding entries).
        temperature: τ.

    Returns:
        [B, H, N] (0 at padding entries).
    """
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    return visual_logits(probs, visual_index) * valid.unsqueeze(1)


def budget_signal(logits: torch.Tensor, visual_index: torch.Tensor, valid: torch.Tensor, signal: str) -> torch.Tensor:
    """The value of a :class:`~vpstudy.rules.BudgetRule` signal for each row: [B].

    ``mass``: head-mean visual share at τ = 1; ``max_head_mass[@tau=τ]``: the largest per-head
    visual share of softmax(logits / τ) (VisionPulse's M).
    """
    kind, tau = parse_signal(signal)
    share = visual_share(logits, visual_index, valid, tau).sum(-1)  # [B, H]
    return share.mean(dim=1) if kind == "mass" else share.amax(dim=1)


def rule_keep_counts(rule: BudgetRule, signal: torch.Tensor, n_visual: torch.Tensor) -> torch.Tensor:
    """K per row from a rule (the same arithmetic as :meth:`BudgetRule.keep_count`): [B] long."""
    ratio = (rule.intercept + rule.slope * signal.double()).clamp(rule.b_min, rule.b_max)
    return keep_count(ratio, n_visual, rule.rounding)


def fixed_keep_counts(ratio: float, n_visual: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """K = clamp(floor or ceil(ratio · N_v), 1, N_v) per row: [B] long."""
    return keep_count(ratio, n_visual, rounding)


def top_counts_mask(scores: torch.Tensor, counts: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Keep the ``counts[b]`` highest-scoring allowed visual tokens of each row.

    Ties go to the lower index (a stable sort), so the kept set has exactly ``counts[b]``
    entries (fewer only if fewer are allowed), as the official code's rank mask does. Found
    without sorting: the K-th largest allowed score, every allowed score above it, and the
    lowest-index allowed scores equal to it until K are kept (a full stable sort of 32K scores
    costs about 40 times a top-K on a CPU).

    Args:
        scores: [B, N] ranking scores.
        counts: [B] long.
        allowed: [B, N] bool: real tokens not already dropped.

    Returns:
        [B, N] bool keep mask.
    """
    ranked = scores.masked_fill(~allowed, float("-inf"))
    counts = torch.minimum(counts.long(), allowed.sum(-1)).clamp(min=0)
    widest = int(counts.max()) if counts.numel() else 0
    if widest == 0:
        return torch.zeros_like(allowed)
    kth = torch.topk(ranked, widest, dim=-1).values.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))  # [B, 1]
    above = (ranked > kth) & allowed
    ties = (ranked == kth) & allowed
    room = counts.unsqueeze(1) - above.sum(-1, keepdim=True)
    return (above | (ties & (ties.cumsum(-1) <= room))) & (counts > 0).unsqueeze(1)


def top_p_mask(probs: torch.Tensor, p: float, allowed: torch.Tensor) -> torch.Tensor:
    """The smallest set of allowed visual tokens whose probability reaches ``p`` of the row's
    allowed visual mass (at least one token).

    Args:
        probs: [B, N] head-mean probabilities p̄.
        p: share of the visual mass, in (0, 1].
        allowed: [B, N] bool.
    """
    probs = probs.masked_fill(~allowed, 0.0)
    total = probs.sum(-1, keepdim=True)
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above
    # a token is needed while the mass above it is still short of p (relative guard for float error)
    needed = before < p * total * (1 - 1e-6)
    needed[:, 0] = True
    counts = needed.sum(-1)
    return top_counts_mask(probs, counts, allowed)
