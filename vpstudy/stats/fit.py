"""Fitting a budget rule from a recorded run, and scoring rules on held-out samples.

:func:`fit_budget` fits N_act(δ)/N_v on a signal at one layer over a training split of the
samples (least squares) and reports how well the rule, and VisionPulse's two published rules,
predict N_act on the held-out samples (:func:`prediction_stats`). The rule itself is
:class:`vpstudy.rules.BudgetRule`.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..rules import SIGNAL_RE, BudgetRule, BudgetRuleError, Threshold, active_column, keep_count, parse_signal
from ..runs import Run
from ..storage import missing_scores
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


def prediction_stats(
    rule: BudgetRule, signal: np.ndarray, active: np.ndarray, n_visual: np.ndarray
) -> dict[str, float]:
    """How well ``rule`` predicts N_act on some steps.

    Args:
        rule: the budget rule to evaluate.
        signal: [S] the rule's signal per step.
        active: [S] the active count at the fitted δ per step (N_act).
        n_visual: [S] the sample's N_v per step.

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


AUTO = "auto"


def anchor_layers(run: Run) -> list[int]:
    """The candidate layers of ``fit-budget --layer auto``: the recorded layers whose p̄ the run
    keeps per step (every recorded layer under ``--store full``; the analysis layer and
    ``--score-layers`` under ``analysis``), two at least.

    Raises:
        BudgetRuleError: fewer than two such layers (one line saying what to record instead).
    """
    layers = sorted(run.score_layers)
    recorded = sorted(run.manifest.get("layers") or layers)
    if len(recorded) < 2:
        raise BudgetRuleError(f"{run.path}: --layer auto needs at least two recorded layers, the run has {recorded}")
    note = missing_scores("fit-budget --layer auto (the anchor criterion compares p̄ across layers)", recorded,
                          {**run.store, "score_layers": layers}, at_least=2)  # fmt: skip
    if note is not None:
        raise BudgetRuleError(f"{run.path}: {note}")
    return layers


def anchor_coverage(run: Run, sample_ids: list[str], budget: float, *, block: int = 256) -> dict[int, float]:
    """The data-driven anchor criterion, per candidate layer a (every layer of
    :func:`anchor_layers` but the deepest): the mean, over the decode steps (t ≥ 1) of
    ``sample_ids`` and over the candidate layers l deeper than a, of the share of layer l's
    visual attention that falls on the top-K visual tokens of layer a, K = clamp(floor(budget ·
    N_v), 1, N_v). A pruner anchored at a keeps only those K tokens for the layers after it; this
    says how much of their attention it keeps. No annotation is needed. Each sample's steps are
    read ``block`` at a time, so memory does not grow with the trace.

    Raises:
        BudgetRuleError: fewer than two layers with p̄, or no decode step.
    """
    layers = anchor_layers(run)
    shares: dict[int, list[float]] = {a: [] for a in layers[:-1]}
    for sample_id in sample_ids:
        stored = run.scores(sample_id)  # [S, L, N] memory-mapped
        if len(stored) < 2:
            continue
        k = int(keep_count(budget, stored.shape[-1]))
        sums, counts = np.zeros(len(layers) - 1), np.zeros(len(layers) - 1)
        for start in range(1, len(stored), block):  # decode steps only
            scores = np.asarray(stored[start : start + block], dtype=np.float64)  # [b, L, N]
            order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # [b, L, K]
            totals = scores.sum(-1)  # [b, L]
            for i in range(len(layers) - 1):
                deeper = len(layers) - i - 1
                kept = np.take_along_axis(scores[:, i + 1 :], np.repeat(order[:, i : i + 1], deeper, 1), -1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    share = kept.sum(-1) / totals[:, i + 1 :]
                finite = np.isfinite(share)
                sums[i] += share[finite].sum()
                counts[i] += finite.sum()
        for i, a in enumerate(layers[:-1]):
            shares[a].append(float(sums[i] / counts[i]) if counts[i] else float("nan"))
    if not any(shares.values()):
        raise BudgetRuleError(f"{run.path}: no decode step to choose an anchor from")
    return {a: float(np.nanmean(v)) for a, v in shares.items()}


def choose_anchor(coverage: dict[int, float], tolerance: float = 0.0) -> int:
    """The shallowest layer whose coverage is within ``tolerance`` of the largest."""
    best = max(coverage.values())
    return min(a for a, v in coverage.items() if v >= best - tolerance)


def fit_budget(
    run: Run,
    *,
    layer: int | str,
    delta: str | float,
    signal: str = "mass",
    holdout: float = 0.3,
    seed: int = 0,
    b_min: float | None = None,
    b_max: float | None = None,
    rounding: str = "floor",
    anchor_budget: float = 0.05,
    localization: dict[int, float] | None = None,
) -> BudgetRule:
    """Fit ``ratio = intercept + slope · signal`` to N_act(δ)/N_v at ``layer`` of ``run``.

    ``layer="auto"`` chooses the anchor on the training split by :func:`anchor_coverage` at
    ``anchor_budget`` (:func:`choose_anchor`) among the layers whose p̄ the run keeps
    (:func:`anchor_layers`: every recorded layer under ``--store full``); the rule records the
    choice and its evidence (the candidates and the coverage of each, and ``localization`` per
    layer where the caller measured it on annotated data). Everything else reads the steps table
    only, so a fixed layer works under every store policy. Only decode steps (t ≥ 1) are fitted
    and scored: step 0 is the prefill's row, which a step-wise pruner never acts on. A run
    recorded under a pruner is refused: its masses are those of the pruned model.

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
    if run.manifest.get("method"):
        name = (run.manifest["method"] or {}).get("name", "a pruning method")
        raise BudgetRuleError(
            f"{run.path}: recorded under {name}; fit a budget rule on a dense recording "
            "(its masses are the unpruned model's)"
        )
    if not 0 < holdout < 1:
        raise BudgetRuleError(f"holdout must be strictly between 0 and 1, got {holdout}")
    anchor_choice = None
    if layer == AUTO:
        train_ids_for_anchor, _ = _split(run.sample_ids, holdout, seed)
        coverage = anchor_coverage(run, train_ids_for_anchor, anchor_budget)
        layer = choose_anchor(coverage)
        anchor_choice = {
            "criterion": "share of the deeper layers' visual attention on the anchor's top-K "
            f"(K = floor({anchor_budget:g} · N_v)), decode steps of the training split",
            "budget": anchor_budget,
            "candidates": anchor_layers(run),
            "coverage": {str(a): v for a, v in coverage.items()},
            "chosen": layer,
            "localization": {str(a): v for a, v in (localization or {}).items()} or None,
        }
    if not isinstance(layer, int):
        raise BudgetRuleError(f"layer must be a recorded layer or 'auto', got {layer!r}")
    check_layer(run, layer)
    label = check_delta(run, delta)
    kind, tau = parse_signal(signal)
    if signal not in run.steps.columns:
        recorded = [c for c in run.steps.columns if SIGNAL_RE.fullmatch(c)]
        raise BudgetRuleError(f"{run.path}: signal {signal!r} was not recorded (recorded: {', '.join(recorded)})")
    steps = run.steps[(run.steps["layer"] == layer) & (run.steps["step"] >= 1)]  # decode steps only
    table = steps.merge(run.samples[["sample_id", "n_visual"]], on="sample_id")
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
    model = {
        "family": manifest.get("model", {}).get("family"),
        "config_hash": manifest.get("model_config_hash"),
        "path": manifest.get("model", {}).get("path"),
    }
    draft = BudgetRule(
        signal=signal,
        b_min=low,
        b_max=high,
        slope=float(slope),
        intercept=float(intercept),
        layer=layer,
        rounding=rounding,
        model=model,
        name=f"fitted N_act(δ={label})/N_v on {signal}, layer {layer}",
    )

    def held_stats(rule: BudgetRule) -> dict[str, float] | None:
        column = rule.signal
        if column not in held.columns:
            return None  # the run did not record this rule's signal
        return prediction_stats(
            rule, held[column].to_numpy(), held[active_column(label)].to_numpy(), held["n_visual"].to_numpy()
        )

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
        "train_r2_ratio": float(1 - ((y - train_pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        if np.ptp(y) > 0
        else float("nan"),
        "clamps_from": "arguments"
        if b_min is not None or b_max is not None
        else "1st/99th percentile of training active share",
        "heldout": held_stats(draft),
        "heldout_paper": {
            r.name: held_stats(r) for r in (BudgetRule.paper(0.1, 0.01, 0.05), BudgetRule.paper(0.4, 0.05, 0.10))
        },
        "steps_fitted": "decode steps (t >= 1)",
        "anchor_choice": anchor_choice,
    }
    return BudgetRule(**{**asdict(draft), "fit": fit})
