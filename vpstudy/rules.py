"""Budget rules, activity thresholds and the names of the recorded columns: the shared vocabulary.

A leaf module (numpy only; torch tensors are taken where noted, never imported here): the decode
path (pruner, backends, kernels) and the analysis layer (statistics, fitting, figures) both read
it, and it reads neither.

- :class:`Threshold`: an activity threshold δ, absolute (``0.001``) or per visual token
  (``"2/Nv"``); N_act(t, l, δ) = #{i : p̄(t, l)_i > δ}.
- Column grammar of a run's ``steps.parquet``: ``active@<δ>`` (:func:`active_column`) and
  ``max_head_mass@tau=<τ>`` (:func:`tau_column`); :func:`parse_column` reads either back.
- :class:`BudgetRule` maps a signal the pruner computes online at its anchor layer to a keep
  ratio, ``r = clamp(intercept + slope · signal, b_min, b_max)``, and the ratio to a count with
  :func:`keep_count`, ``K = clamp(floor(r · N_v), 1, N_v)`` (or ceil). Signals are named like the
  steps columns: ``mass`` (head-mean visual mass, τ = 1), ``max_head_mass`` (τ = 1) and
  ``max_head_mass@tau=<τ>`` (the largest per-head visual share of softmax(logits/τ)).
  ``BudgetRule.paper(0.1, 0.01, 0.05)`` is VisionPulse's published rule. Fitting one from a run
  is :func:`vpstudy.stats.fit.fit_budget`.

Definitions: docs/design.md, "Definitions".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VpstudyError

SIGNAL_RE = re.compile(r"(mass|max_head_mass)(?:@tau=([0-9.eE+-]+))?")
ACTIVE_PREFIX = "active@"
TAU_PREFIX = "max_head_mass@tau="
# keeps 0.03 · 100 (= 3.0000000000000004 in floating point) at 3 under floor, and 3.0 at 3 under ceil
_ROUNDING_GUARD = 1e-9


class ThresholdError(VpstudyError):
    """An activity threshold that is not a finite number >= 0 or 'k/Nv'."""


@dataclass(frozen=True)
class Threshold:
    """An activity threshold δ: absolute (``0.001``) or a multiple of 1/N_v (``"2/Nv"``)."""

    value: float
    per_visual_token: bool = False

    @classmethod
    def parse(cls, spec: str | float | Threshold) -> Threshold:
        """A threshold from ``0.001``, ``"0.001"`` or ``"2/Nv"`` (a :class:`Threshold` is returned as is);
        :class:`ThresholdError` if it is not a finite number >= 0."""
        if isinstance(spec, Threshold):
            return spec
        text = str(spec).strip()
        try:
            if text.endswith("/Nv"):
                threshold = cls(float(text[:-3]), per_visual_token=True)
            else:
                threshold = cls(float(text))
        except ValueError:
            raise ThresholdError(f"threshold {spec!r} is neither a number nor 'k/Nv'") from None
        if not np.isfinite(threshold.value) or threshold.value < 0:
            raise ThresholdError(f"threshold {spec!r} must be a finite number >= 0")
        return threshold

    @property
    def label(self) -> str:
        """Column-safe name: ``"0.0005"`` or ``"2/Nv"``."""
        number = f"{self.value:g}"
        return f"{number}/Nv" if self.per_visual_token else number

    def resolve(self, n_visual: int) -> float:
        """δ for a sample with ``n_visual`` visual tokens."""
        return self.value / n_visual if self.per_visual_token else self.value


def active_column(threshold: Threshold | str | float) -> str:
    """The steps column of N_act at ``threshold``: ``"active@0.001"``, ``"active@2/Nv"``."""
    return ACTIVE_PREFIX + Threshold.parse(threshold).label


def tau_column(tau: float) -> str:
    """The steps column of the max-head visual share at temperature τ: ``"max_head_mass@tau=0.1"``."""
    return f"{TAU_PREFIX}{tau:g}"


def parse_column(name: str) -> tuple[str, str | float] | None:
    """``("active", "2/Nv")`` for an active column, ``("tau", 0.1)`` for a budget-signal column,
    None for any other name."""
    if name.startswith(ACTIVE_PREFIX):
        return "active", name[len(ACTIVE_PREFIX) :]
    if name.startswith(TAU_PREFIX):
        return "tau", float(name[len(TAU_PREFIX) :])
    return None


def active_labels(columns: Any) -> list[str]:
    """The δ labels of the ``active@<δ>`` columns among ``columns``, in order."""
    return [str(parsed[1]) for c in columns if (parsed := parse_column(str(c))) and parsed[0] == "active"]


def keep_count(ratio: Any, n_visual: Any, rounding: str = "floor") -> Any:
    """Visual tokens kept for a keep ratio: K = clamp(floor or ceil(ratio · N_v), 1, N_v).

    The one place the count is computed (budget rules, fixed ratios, the pruner, the backends).
    ``ratio`` and ``n_visual`` are numpy values (int64 result) or torch tensors (long result on
    ``n_visual``'s device); the product is taken in float64 with a 1e-9 guard, so a ratio that is
    exactly a multiple of 1/N_v in decimal (0.03 of 100) gives that count under either rounding.
    """
    if rounding not in ("floor", "ceil"):
        raise BudgetRuleError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")
    if hasattr(n_visual, "double"):  # a torch tensor
        raw = (ratio.double() if hasattr(ratio, "double") else float(ratio)) * n_visual.double()
        counts = (raw + _ROUNDING_GUARD).floor() if rounding == "floor" else (raw - _ROUNDING_GUARD).ceil()
        return counts.long().clamp(min=1).minimum(n_visual)
    n_visual = np.asarray(n_visual, dtype=np.int64)
    raw = np.asarray(ratio, dtype=np.float64) * n_visual
    counts = np.floor(raw + _ROUNDING_GUARD) if rounding == "floor" else np.ceil(raw - _ROUNDING_GUARD)
    return np.clip(counts.astype(np.int64), 1, n_visual)


RULE_FORMAT = "vpstudy-budget-rule/1"


class BudgetRuleError(VpstudyError):
    """A budget rule that is malformed, or applied where it was not fitted."""


def anchor_layer(n_layers: int) -> int:
    """The layer at the relative depth of VisionPulse's anchor (index 17 of 36 layers)."""
    return min(n_layers - 1, round(17 / 36 * n_layers))


def parse_signal(signal: str) -> tuple[str, float]:
    """``"max_head_mass@tau=0.1"`` -> ``("max_head_mass", 0.1)``; τ is 1 when not given."""
    match = SIGNAL_RE.fullmatch(signal)
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
        return cls(
            signal=f"max_head_mass@tau={tau:g}",
            b_min=b_min,
            b_max=b_max,
            layer=layer,
            name=f"paper τ={tau:g} [{b_min:g}, {b_max:g}]",
        )

    @property
    def tau(self) -> float:
        """Temperature of the signal's softmax."""
        return parse_signal(self.signal)[1]

    def ratio(self, signal: np.ndarray | float) -> np.ndarray:
        """Keep ratio per step (same shape as ``signal``), clamped to [b_min, b_max]."""
        return np.clip(self.intercept + self.slope * np.asarray(signal, dtype=np.float64), self.b_min, self.b_max)

    def keep_count(self, signal: np.ndarray | float, n_visual: np.ndarray | int) -> np.ndarray:
        """Visual tokens kept: clamp(floor or ceil(ratio · N_v), 1, N_v), as int64 (:func:`keep_count`)."""
        return keep_count(self.ratio(signal), np.asarray(n_visual, dtype=np.int64), self.rounding)

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
        """JSON-able: every field, tagged with the rule file format (read back by :meth:`from_json`)."""
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
        """The rule :meth:`to_json` wrote; a one-line :class:`BudgetRuleError` starting with ``where``
        if ``data`` is not one."""
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
