"""``vpstudy attribute``: per-step attribution of each generated token to the visual tokens (captum).

For every sample of a recorded run, the recorded trace is replayed with teacher forcing (the
prompt, its image and the generated tokens, as the run stored them), and for every step t the
logit of the token the step generated is attributed to the visual-token inputs of the language
model: the output of the module that hands the visual features to it (LLaVA's projector,
Qwen-VL's merger; :attr:`vpstudy.families.FamilySpec.vision_layout`), one vector per visual
token, summed over the hidden dimension. Two captum attributions:

- ``grad_x_activation`` (default): :class:`captum.attr.LayerGradientXActivation`, gradient ×
  feature (one backward per step);
- ``integrated_gradients``: :class:`captum.attr.LayerIntegratedGradients` from the features of a
  blank image (pixel values 0 after the processor's normalisation) to the image's, ``n_steps``
  Gauss–Legendre points.

Each sample's attribution goes to ``RUN/arrays/<key>/attribution.npy`` ([steps, N_v] float32,
written atomically; a rerun skips samples that have one), and ``RUN/attribution.json`` records
the settings. :func:`vpstudy.stats.attribution.attribution_agreement_table` compares them with
the recorded attention scores.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import VpstudyError
from .processing import format_prompt, prepare_batch

ATTRIBUTION_ARRAY = "attribution"
SETTINGS_FILE = "attribution.json"
METHODS = ("grad_x_activation", "integrated_gradients")


class AttributionError(VpstudyError):
    """Attribution settings or a run that cannot be attributed (one-line message)."""


@dataclass(frozen=True)
class AttributionSettings:
    """How attributions are computed.

    Attributes:
        method: one of :data:`METHODS`.
        n_steps: integration points of ``integrated_gradients``.
    """

    method: str = "grad_x_activation"
    n_steps: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AttributionError(f"attribution method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.n_steps < 1:
            raise AttributionError(f"n_steps must be >= 1, got {self.n_steps}")


def _extend(inputs: dict[str, torch.Tensor], tokens: list[int]) -> dict[str, torch.Tensor]:
    """``inputs`` (one row, no padding) followed by ``tokens`` (text, not visual)."""
    out = dict(inputs)
    extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    if "attention_mask" in inputs:
        out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out


def attribute_sample(
    model: Any,
    inputs: dict[str, torch.Tensor],
    generated: list[int],
    settings: AttributionSettings = AttributionSettings(),
) -> np.ndarray:
    """Attribution of each generated token to each visual token for one sample.

    Args:
        model: the VLM (any attention backend; the forward is plain, with gradients).
        inputs: the prompt's processed inputs, one row without padding.
        generated: the generated token ids, step 0 first (the recorded steps).
        settings: which captum attribution.

    Returns:
        [steps, N_v] float32: step t's attribution of the logit of ``generated[t]`` at the
        position predicting it, per visual token (summed over the hidden dimension).
    """
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    spec = model.vpstudy_family
    layer = spec.vision_layout(model).features_module
    sequence = _extend(inputs, generated[:-1])
    prompt = int(inputs["input_ids"].shape[1])
    pixel_key = "pixel_values"
    others = {k: v for k, v in sequence.items() if k != pixel_key}

    def forward(pixels: torch.Tensor, position: int) -> torch.Tensor:
        out = model(**others, **{pixel_key: pixels}, use_cache=False, logits_to_keep=0)
        return out.logits[:, position, :]

    pixels = sequence[pixel_key]
    rows = []
    with torch.enable_grad():
        if settings.method == "grad_x_activation":
            attributor: Any = LayerGradientXActivation(forward, layer)
        else:
            attributor = LayerIntegratedGradients(forward, layer)
        for t, token in enumerate(generated):
            kwargs: dict[str, Any] = dict(inputs=pixels, target=int(token), additional_forward_args=(prompt - 1 + t,))
            if settings.method == "integrated_gradients":
                # one integration point per forward: the other inputs (and Qwen's packed pixels) stay one row
                kwargs |= {"baselines": torch.zeros_like(pixels), "n_steps": settings.n_steps, "internal_batch_size": 1}
            values = attributor.attribute(**kwargs)
            values = values[0] if isinstance(values, tuple) else values
            rows.append(values.detach().float().reshape(-1, values.shape[-1]).sum(-1).cpu().numpy())
    return np.stack(rows).astype(np.float32)


def _array_path(run: Any, sample_id: str) -> Path:
    from .runs import ARRAYS_DIR, sample_key

    return Path(run.path) / ARRAYS_DIR / sample_key(sample_id) / f"{ATTRIBUTION_ARRAY}.npy"


def _save(path: Path, values: np.ndarray) -> None:
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
    with os.fdopen(handle, "wb") as file:
        np.save(file, values)
    os.replace(tmp, path)


def load_attribution(run: Any, sample_id: str) -> np.ndarray | None:
    """A sample's attribution array ([steps, N_v]) or None if it has none."""
    path = _array_path(run, sample_id)
    return np.load(path) if path.is_file() else None


def attribute_run(
    run: Any,
    model: Any,
    processor: Any,
    dataset: Any,
    settings: AttributionSettings = AttributionSettings(),
    *,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """Attribute every sample of ``run`` (recorded from ``dataset`` with ``model``); returns the
    number of samples attributed now (samples that already have one are skipped).

    Raises:
        AttributionError: the run was recorded under a pruner (its trace is not the dense
            model's), with other settings than an earlier attribution, or a sample is missing
            from ``dataset``.
    """
    from tqdm.auto import tqdm

    manifest = run.manifest
    if manifest.get("method"):
        raise AttributionError(f"{run.path}: recorded under a pruning method; attribute a dense recording")
    settings_file = Path(run.path) / SETTINGS_FILE
    wanted = {"settings": asdict(settings), "model_config_hash": manifest.get("model_config_hash")}
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
        if previous != wanted:
            raise AttributionError(
                f"{settings_file}: the run was attributed with other settings ({previous['settings']}); "
                "remove the attribution arrays to redo it"
            )
    else:
        settings_file.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    examples = {ex.id: ex for ex in dataset}
    steps = run.steps
    first_layer = steps["layer"].min()
    tokens = steps[steps["layer"] == first_layer].sort_values(["sample_id", "step"]).groupby("sample_id")["token_id"]
    todo = [sid for sid in run.sample_ids if load_attribution(run, sid) is None][:limit]
    missing = [sid for sid in todo if sid not in examples]
    if missing:
        raise AttributionError(f"sample {missing[0]!r} of {run.path} is not in the dataset {dataset.path}")
    spec = model.vpstudy_family
    model.eval()
    for sample_id in tqdm(todo, desc="attribute", unit="sample", disable=not progress):
        example = examples[sample_id]
        prompt = format_prompt(processor, spec, example.question)
        inputs = prepare_batch(processor, spec, model.config, [prompt], [example.image()]).to(model.device)
        values = attribute_sample(model, dict(inputs), tokens.get_group(sample_id).tolist(), settings)
        _save(_array_path(run, sample_id), values)
    return len(todo)
