"""Fitting a budget rule from a recorded run, and scoring rules on held-out samples.

:func:`fit_budget` fits N_act(δ)/N_v on a signal at one layer over a training split of the
samples (least squares) and reports how well the rule, and VisionPulse's two published rules,
predict N_act on the held-out samples (:func:`prediction_stats`). The rule itself is
:class:`vpstudy.rules.BudgetRule`.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..rules import SIGNAL_RE, BudgetRule, BudgetRuleError, Threshold, active_column, parse_signal
from ..runs import Run
from .estimators import pearson
from .tables import check_delta, check_layer, check_run


def _split(sample_ids: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """Train / held-out split of the samples (at least one of each)."""
    if len(sample_ids) < 2:
        raise BudgetRuleError(f"fitting a budget rule needs at least 2 samples, the run has {len(sample_ids)}")
    order = np.random.default_rng(seed).permutation(len(sample_ids))
    n_held = min(len(sample_ids) - 1, max(1, round(holdout * len(sample_ids))))
    held = sorted(order[:n_held].tolist())
    return [sample_ids[i] for i in sorted(order[n_held:].tolist())], [sample_ids[i] for i in held]


def prediction_stats(rule: BudgetRule, signal: np.ndarray, active: np.ndarray, n_visual: np.ndarray) -> dict[str, float]:
    """How well ``rule`` predicts N_act on some steps.

    Args:
        signal, active, n_visual: [S] the rule's signal, the active count at the fitted δ and
            the sample's N_v per step.

    Returns:
        ``pearson`` (predicted K vs. N_act), ``r2`` (1 − SS_res/SS_tot of N_act), ``mae_tokens``,
        ``mean_keep_ratio`` (mean K / N_v), ``mean_active_ratio`` (mean N_act / N_v) and
        ``covered`` (share of steps with K ≥ N_act).
    """
    kept = rule.keep_count(signal, n_visual).astype(np.float64)
    active = np.asarray(active, dtype=np.float64)
    residual = ((active - kept) ** 2).sum()
    total = ((active - active.mean()) ** 2).sum()
    return {
        "steps": int(len(active)),
        "pearson": pearson(kept, active),
        "r2": float(1 - residual / total) if total > 0 else float("nan"),
        "mae_tokens": float(np.abs(active - kept).mean()),
        "mean_keep_ratio": float((kept / n_visual).mean()),
        "mean_active_ratio": float((active / n_visual).mean()),
        "covered": float((kept >= active).mean()),
    }


def fit_budget(run: Run, *, layer: int, delta: str | float, signal: str = "mass", holdout: float = 0.3,
               seed: int = 0, b_min: float | None = None, b_max: float | None = None,
               rounding: str = "floor") -> BudgetRule:  # fmt: skip
    """Fit ``ratio = intercept + slope · signal`` to N_act(δ)/N_v at ``layer`` of ``run``.

    The samples are split (``holdout`` share held out, by ``seed``); the line is the ordinary
    least-squares fit over the training samples' steps. Clamps default to the 1st and 99th
    percentiles of the training steps' active share (at least 1/N_v); pass ``b_min``/``b_max``
    to impose a budget instead. ``rule.fit`` holds the provenance and the held-out prediction
    statistics (:func:`prediction_stats`) of this rule and of the paper's two rules (None for a
    paper rule whose signal the run did not record).

    Raises:
        AnalysisError: the run is empty or NaN, or ``layer``/``delta`` were not recorded.
        BudgetRuleError: fewer than 2 samples, a signal not recorded, a constant signal.
    """
    check_run(run)
    check_layer(run, layer)
    label = check_delta(run, delta)
    kind, tau = parse_signal(signal)
    if signal not in run.steps.columns:
        recorded = [c for c in run.steps.columns if SIGNAL_RE.fullmatch(c)]
        raise BudgetRuleError(f"{run.path}: signal {signal!r} was not recorded (recorded: {', '.join(recorded)})")
    table = run.steps[run.steps["layer"] == layer].merge(run.samples[["sample_id", "n_visual"]], on="sample_id")
    train_ids, held_ids = _split(run.sample_ids, holdout, seed)
    train = table[table["sample_id"].isin(train_ids)]
    held = table[table["sample_id"].isin(held_ids)]
    x = train[signal].to_numpy(dtype=np.float64)
    n_visual = train["n_visual"].to_numpy(dtype=np.float64)
    y = train[active_column(label)].to_numpy(dtype=np.float64) / n_visual
    if np.ptp(x) == 0:
        raise BudgetRuleError(f"{run.path}: signal {signal!r} is constant at layer {layer}; nothing to fit")
    slope, intercept = np.polyfit(x, y, 1)
    floor_ratio = float(1 / n_visual.max())
    low = b_min if b_min is not None else max(floor_ratio, float(np.quantile(y, 0.01)))
    high = b_max if b_max is not None else max(low, float(np.quantile(y, 0.99)))
    manifest = run.manifest
    model = {"family": manifest.get("model", {}).get("family"), "config_hash": manifest.get("model_config_hash"),
             "path": manifest.get("model", {}).get("path")}  # fmt: skip
    draft = BudgetRule(signal=signal, b_min=low, b_max=high, slope=float(slope), intercept=float(intercept),
                       layer=layer, rounding=rounding, model=model,
                       name=f"fitted N_act(δ={label})/N_v on {signal}, layer {layer}")  # fmt: skip

    def held_stats(rule: BudgetRule) -> dict[str, float] | None:
        column = rule.signal
        if column not in held.columns:
            return None  # the run did not record this rule's signal
        return prediction_stats(rule, held[column].to_numpy(), held[active_column(label)].to_numpy(),
                                held["n_visual"].to_numpy())  # fmt: skip

    train_pred = draft.intercept + draft.slope * x
    fit = {
        "run": str(run.path),
        "delta": label,
        "delta_value": Threshold.parse(label).value,
        "layer": layer,
        "signal": signal,
        "holdout": holdout,
        "seed": seed,
        "train_samples": len(train_ids),
        "heldout_samples": len(held_ids),
        "train_steps": int(len(train)),
        "train_r2_ratio": float(1 - ((y - train_pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()) if np.ptp(y) > 0 else float("nan"),  # fmt: skip
        "clamps_from": "arguments" if b_min is not None or b_max is not None else "1st/99th percentile of training active share",  # fmt: skip
        "heldout": held_stats(draft),
        "heldout_paper": {r.name: held_stats(r) for r in (BudgetRule.paper(0.1, 0.01, 0.05), BudgetRule.paper(0.4, 0.05, 0.10))},  # fmt: skip
    }
    return BudgetRule(**{**asdict(draft), "fit": fit})
