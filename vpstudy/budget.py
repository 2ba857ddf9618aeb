"""Budget rules: how many visual tokens a decoding step keeps (SPEC, Definitions).

A :class:`BudgetRule` maps a signal the pruner computes online at its anchor layer to a keep
ratio, ``r = clamp(intercept + slope · signal, b_min, b_max)``, and the ratio to a count,
``K = clamp(floor(r · N_v), 1, N_v)`` (or ceil). Signals are named like the run's steps
columns: ``mass`` (head-mean visual mass, τ = 1), ``max_head_mass`` (τ = 1) and
``max_head_mass@tau=<τ>`` (the largest per-head visual share of softmax(logits/τ)).

- The paper's rule is ``BudgetRule.paper(tau=0.1, b_min=0.01, b_max=0.05)``: signal
  ``max_head_mass@tau=0.1``, slope 1, intercept 0; it applies to any model.
- :func:`fit_budget` fits a rule from a recorded run: the least-squares line of the active
  share N_act(t, l, δ) / N_v on the signal at layer l, over a training split of the samples,
  and reports how well the rule predicts N_act on the held-out samples. A fitted rule names
  the model (family and config hash) and layer it was fitted on, and :meth:`BudgetRule.check`
  refuses another model or layer unless told to.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .recorder import Threshold
from .runs import Run
from .stats.estimators import pearson
from .stats.tables import check_delta, check_layer, check_run

RULE_FORMAT = "vpstudy-budget-rule/1"
_SIGNAL_RE = re.compile(r"(mass|max_head_mass)(?:@tau=([0-9.eE+-]+))?")


class BudgetRuleError(ValueError):
    """A budget rule that is malformed, or applied where it was not fitted."""


def anchor_layer(n_layers: int) -> int:
    """The layer at the relative depth of VisionPulse's anchor (index 17 of 36 layers)."""
    return min(n_layers - 1, round(17 / 36 * n_layers))


def parse_signal(signal: str) -> tuple[str, float]:
    """``"max_head_mass@tau=0.1"`` -> ``("max_head_mass", 0.1)``; τ is 1 when not given."""
    match = _SIGNAL_RE.fullmatch(signal)
    if not match:
        raise BudgetRuleError(f"signal {signal!r} is not 'mass', 'max_head_mass' or 'max_head_mass@tau=<τ>'")
    kind, tau = match[1], float(match[2]) if match[2] else 1.0
    if kind == "mass" and tau != 1.0:
        raise BudgetRuleError(f"signal {signal!r}: head-mean mass is recorded at τ = 1 only")
    return kind, tau


@dataclass(frozen=True)
class BudgetRule:
    """Signal → keep ratio → kept visual tokens, with the provenance of the rule.

    Attributes:
        signal: steps-column name of the signal (see the module docstring).
        b_min, b_max: clamps of the keep ratio (shares of N_v, 0 < b_min ≤ b_max ≤ 1).
        slope, intercept: ratio = intercept + slope · signal before clamping.
        layer: text layer where the signal is computed and from which pruning acts (the
            anchor); None = the model's default anchor (:func:`anchor_layer`).
        rounding: ``"floor"`` (the official code) or ``"ceil"`` (the paper's PDF).
        model: ``{"family", "config_hash", "path"}`` of the model fitted on; None = any model.
        fit: how it was fitted and how well it predicts (None for hand-set rules).
        name: a label for tables and figures.
    """

    signal: str
    b_min: float
    b_max: float
    slope: float = 1.0
    intercept: float = 0.0
    layer: int | None = None
    rounding: str = "floor"
    model: dict[str, Any] | None = None
    fit: dict[str, Any] | None = field(default=None, compare=False)
    name: str = ""

    def __post_init__(self) -> None:
        parse_signal(self.signal)
        if not (0 < self.b_min <= self.b_max <= 1):
            raise BudgetRuleError(f"clamps must satisfy 0 < b_min <= b_max <= 1, got [{self.b_min}, {self.b_max}]")
        if self.rounding not in ("floor", "ceil"):
            raise BudgetRuleError(f"rounding must be 'floor' or 'ceil', got {self.rounding!r}")
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise BudgetRuleError(f"slope and intercept must be finite, got {self.slope}, {self.intercept}")

    @classmethod
    def paper(cls, tau: float = 0.1, b_min: float = 0.01, b_max: float = 0.05, layer: int | None = None) -> BudgetRule:
        """VisionPulse's rule: r = clamp(max_h share at τ, b_min, b_max) (published: τ = 0.1 with
        [0.01, 0.05] and τ = 0.4 with [0.05, 0.10])."""
        return cls(signal=f"max_head_mass@tau={tau:g}", b_min=b_min, b_max=b_max, layer=layer,
                   name=f"paper τ={tau:g} [{b_min:g}, {b_max:g}]")  # fmt: skip

    @property
    def tau(self) -> float:
        """Temperature of the signal's softmax."""
        return parse_signal(self.signal)[1]

    def ratio(self, signal: np.ndarray | float) -> np.ndarray:
        """Keep ratio per step (same shape as ``signal``), clamped to [b_min, b_max]."""
        return np.clip(self.intercept + self.slope * np.asarray(signal, dtype=np.float64), self.b_min, self.b_max)

    def keep_count(self, signal: np.ndarray | float, n_visual: np.ndarray | int) -> np.ndarray:
        """Visual tokens kept: clamp(floor or ceil(ratio · N_v), 1, N_v), as int64."""
        n_visual = np.asarray(n_visual, dtype=np.int64)
        raw = self.ratio(signal) * n_visual
        # a relative guard keeps 0.03 · 100 (= 3.0000000000000004 in floating point) at 3
        counts = np.floor(raw + 1e-9) if self.rounding == "floor" else np.ceil(raw - 1e-9)
        return np.clip(counts.astype(np.int64), 1, n_visual)

    def check(self, *, config_hash: str | None, layer: int, allow_mismatch: bool = False) -> None:
        """Refuse to apply a fitted rule to a model or layer other than the one it was fitted for.

        Args:
            config_hash: the target model's config hash (``vpstudy.loading.config_hash``).
            layer: the anchor layer the pruner would use.
            allow_mismatch: apply anyway (the caller takes responsibility).
        """
        if allow_mismatch:
            return
        if self.model is not None and config_hash != self.model.get("config_hash"):
            raise BudgetRuleError(
                f"budget rule {self.name or self.signal!r} was fitted on model {self.model.get('path')} "
                f"(config {self.model.get('config_hash')}), not this one (config {config_hash}); "
                "pass allow_mismatch to apply it anyway"
            )
        if self.layer is not None and layer != self.layer:
            raise BudgetRuleError(
                f"budget rule {self.name or self.signal!r} was fitted at layer {self.layer}, not layer {layer}; "
                "pass allow_mismatch to apply it anyway"
            )

    def to_json(self) -> dict[str, Any]:
        return {"format": RULE_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the rule as JSON (refuses to overwrite another file's content silently: the
        caller decides; this writes atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "budget rule") -> BudgetRule:
        if not isinstance(data, dict) or data.get("format") != RULE_FORMAT:
            raise BudgetRuleError(f"{where}: not a vpstudy budget rule (expected format {RULE_FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            return cls(**fields)
        except TypeError as e:
            raise BudgetRuleError(f"{where}: {e}") from None
        except BudgetRuleError as e:
            raise BudgetRuleError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> BudgetRule:
        """Read a rule written by :meth:`save` (one-line error naming the file if it is not one)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BudgetRuleError(f"{path}: no such budget rule file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BudgetRuleError(f"{path}: cannot be read as JSON ({e})") from None
        return cls.from_json(data, str(path))


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
        recorded = [c for c in run.steps.columns if _SIGNAL_RE.fullmatch(c)]
        raise BudgetRuleError(f"{run.path}: signal {signal!r} was not recorded (recorded: {', '.join(recorded)})")
    table = run.steps[run.steps["layer"] == layer].merge(run.samples[["sample_id", "n_visual"]], on="sample_id")
    train_ids, held_ids = _split(run.sample_ids, holdout, seed)
    train = table[table["sample_id"].isin(train_ids)]
    held = table[table["sample_id"].isin(held_ids)]
    x = train[signal].to_numpy(dtype=np.float64)
    n_visual = train["n_visual"].to_numpy(dtype=np.float64)
    y = train[f"active@{label}"].to_numpy(dtype=np.float64) / n_visual
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
        return prediction_stats(rule, held[column].to_numpy(), held[f"active@{label}"].to_numpy(),
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
