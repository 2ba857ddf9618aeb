"""The encoder-side stage of the pruner: methods that act after the vision encoder.

While a :class:`~vpstudy.pruning.Pruner` with an encoder-side method is installed,
:class:`EncoderStage` watches the vision encoder and the module that hands the visual features
to the language model (LLaVA's projector, Qwen-VL's merger; :attr:`FamilySpec.visual_features`):

- the vision encoder's attention at the layer whose output becomes the features is read through a
  registered attention function on the vision config (the backend is unchanged): each token's
  [CLS] attention (CLIP, with a [CLS] token) or the attention it receives, averaged over the
  image's tokens (encoders without one), and the head-mean key states (VisionZip's similarity);
- that layer's attention branch (its attention module's output, before the residual) is kept and
  passed through the features module, giving the "attention component" of each feature (DeSAP);
- when the features module returns, each image's features go to every encoder-side method
  (:meth:`~vpstudy.pruning.methods.base.PruningMethod.select_features`), which returns the tokens
  it keeps and, where it merges the dropped ones into them, their new features. The features the
  language model receives are replaced accordingly, and the dropped tokens are hidden from every
  text layer for the whole generation (prompt rows included).

Hiding a token from every layer gives the kept positions exactly the outputs they would have if
the token had been removed from the sequence with the other positions unchanged (FastV's
convention, also this package's for prefill methods); the sequence is not shortened, so this
stage saves no compute. Patch-level quantities are mapped to the language model's tokens through
the family spec: 1:1 after dropping [CLS] (LLaVA-1.5), or summed/averaged over each group of
``spatial_merge_size²`` patches (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). One image per batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..families import FamilySpec
from ..hooks import register
from .methods.base import EncoderContext, FeatureSelection, PruningError, PruningMethod

VISION_PREFIX = "vpstudy_vision_"
STAGE_ATTR = "_vpstudy_encoder_stage"  # the watched vision attention module's attribute: the stage reading it


def _vision_attention(
    function: Any,
    base: str,
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    out = function(module, query, key, value, attention_mask, **kwargs)
    stage = module.__dict__.get(STAGE_ATTR)
    if stage is not None:
        stage._observe_attention(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return out


@dataclass
class _Capture:
    """What one forward's vision encoder showed (per image, patch level, in call order)."""

    saliency: list[torch.Tensor] = field(default_factory=list)  # [n_patches]
    keys: list[torch.Tensor] = field(default_factory=list)  # [n_patches, d]
    attention_output: list[torch.Tensor] = field(default_factory=list)  # [n_patches, D_vision]


@dataclass
class EncoderDecision:
    """The encoder stage's result for one forward: per batch row, the kept mask over its visual
    tokens ([B, N] bool, padded like the pruner's visual index) and per method its selections."""

    keep: torch.Tensor
    selections: dict[int, list[FeatureSelection]]


class EncoderStage:
    """Run the encoder-side methods of a pruner (see the module docstring).

    Args:
        model: the VLM.
        spec: its family spec (where the vision layers and the features module are).
        methods: (index in the pruner, method) of the methods with ``acts_on_encoder``.
    """

    def __init__(self, model: Any, spec: FamilySpec, methods: Sequence[tuple[int, PruningMethod]]) -> None:
        self.model, self.spec, self.methods = model, spec, list(methods)
        self.layout = spec.vision_layout(model)
        self._hooks: list[Any] = []
        self._saved_impl: str | None = None
        self._capture = _Capture()
        self._closed = True  # the last capture was used (the next vision attention call starts a new one)
        self._pending: tuple[Any, torch.Tensor] | None = None  # features seen before the generation began
        self._projecting = False  # the stage itself is calling the features module
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # visual index, valid, counts
        self._text: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None
        self.decision: EncoderDecision | None = None

    # --- installing ----------------------------------------------------------------------------

    def __enter__(self) -> EncoderStage:
        vision_config = getattr(self.model.config, "vision_config", None)
        if vision_config is None:
            raise PruningError(f"{self.spec.name}: the model has no vision config; encoder-side methods cannot run")
        self._saved_impl = vision_config._attn_implementation
        name = register(VISION_PREFIX, self._saved_impl or "sdpa", _vision_attention)
        self.model.set_attn_implementation({"vision_config": name})
        attention = self.layout.attention_module
        attention.__dict__[STAGE_ATTR] = self
        self._hooks = [
            attention.register_forward_hook(self._attention_output),
            self.layout.features_module.register_forward_hook(self._features),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self.layout.attention_module.__dict__.pop(STAGE_ATTR, None)
        self.model.set_attn_implementation({"vision_config": self._saved_impl})

    # --- per generation ------------------------------------------------------------------------

    def begin(
        self,
        input_ids: torch.Tensor,
        visual_index: torch.Tensor,
        valid: torch.Tensor,
        generator: torch.Generator,
        kwargs: dict[str, Any],
    ) -> dict[str, Any] | None:
        """A generation's first forward is about to run (the model's forward pre-hook).

        Keeps what the methods need from the prompt (each row's text embeddings after its image).
        When ``generate`` has already run the vision encoder (transformers passes the features as
        ``mm_encoder_outputs``), the selection is made now and the returned kwargs carry the
        changed features; otherwise (a plain forward with ``pixel_values``) it is made when the
        features module runs. Returns the changed kwargs, or None.
        """
        self.decision = None
        self._generator = generator
        embed = self.model.get_input_embeddings()
        counts = valid.sum(-1)
        self._text = []
        with torch.no_grad():
            for b in range(input_ids.shape[0]):
                last = int(visual_index[b, int(counts[b]) - 1]) if int(counts[b]) else -1
                self._text.append(embed(input_ids[b, last + 1 :]).detach().float())
        self._rows = (visual_index, valid, counts)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None or self._pending is None:
            return None
        module, features = self._pending
        self._pending = None
        per_image = [f for f in encoded.pooler_output]
        changed = self._select(module, per_image)
        encoded.pooler_output = (
            type(encoded.pooler_output)(changed) if isinstance(encoded.pooler_output, tuple) else changed
        )
        return kwargs

    def end(self) -> None:
        """The generation is over: forget its prompt."""
        self._rows = None

    # --- hooks ---------------------------------------------------------------------------------

    def _observe_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """The chosen vision layer's attention call: [B or 1, H, T, d] query and key."""
        if self._closed:  # a new vision forward: start a new capture
            self._capture, self._closed = _Capture(), False
        kv_heads = key.shape[1]
        q = query.float().reshape(query.shape[0], kv_heads, -1, query.shape[2], query.shape[3])
        k = key.float()
        for i in range(query.shape[0]):
            keys = k[i].mean(0)  # [T, d], head mean
            if self.layout.has_cls:
                logits = torch.einsum("hgd,htd->hgt", q[i, :, :, 0], k[i]) * scaling  # [Hkv, g, T]
                saliency = logits.softmax(-1).sum((0, 1))  # head-summed [CLS] row
            else:
                logits = torch.einsum("hgqd,htd->hgqt", q[i], k[i]) * scaling
                saliency = logits.softmax(-1).mean(2).sum((0, 1))  # attention received, mean over queries
            self._capture.saliency.append(saliency)
            self._capture.keys.append(keys)

    def _attention_output(self, _module: Any, _args: Any, output: Any) -> None:
        if self._closed:
            return
        out = output[0] if isinstance(output, tuple) else output
        out = out.detach().float()
        if out.dim() == 3:  # [B, T, D]: one entry per image
            self._capture.attention_output.extend(list(out))
        else:  # [ΣT, D] packed (Qwen): split like the saliency calls of this forward
            sizes = [len(s) for s in self._capture.saliency[len(self._capture.attention_output) :]]
            self._capture.attention_output.extend(list(torch.split(out, sizes)) if sizes else [out])

    def _features(self, module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._projecting or self._closed:
            return None
        self._closed = True  # this vision forward's capture is complete
        if self._rows is None or self.decision is not None:  # generate's early encoder pass: select at begin()
            self._pending = (module, output)
            return None
        counts = self._rows[2].tolist()
        changed = self._select(module, self.layout.split_features(output, counts))
        return self.layout.join_features(output, changed)

    def _select(self, module: Any, per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run every encoder-side method on each image's features; set :attr:`decision` and return
        the features the language model receives (per image)."""
        assert self._rows is not None
        visual_index, valid, counts = self._rows
        if len(per_image) != len(counts):
            raise PruningError(
                f"encoder-side pruning needs one image per batch row: {len(per_image)} images for {len(counts)} rows"
            )
        keep = valid.clone()
        selections: dict[int, list[FeatureSelection]] = {i: [] for i, _ in self.methods}
        new_features = []
        capture = self._capture
        for b, features in enumerate(per_image):
            n = features.shape[0]
            if n != int(counts[b]):
                raise PruningError(f"row {b}: {n} visual features for {int(counts[b])} placeholder tokens")
            ctx = EncoderContext(
                features=features.detach().float(),
                cls_attention=self._tokens(capture.saliency, b, n, "sum"),
                keys=self._tokens(capture.keys, b, n, "mean"),
                attention_output=self._attention_component(module, capture, b, n),
                text_embeddings=self._text[b],
                grid=self.layout.grid(n),
                generator=self._generator or torch.Generator().manual_seed(0),
            )
            current = features
            kept_here = torch.ones(n, dtype=torch.bool, device=features.device)
            for index, method in self.methods:
                selection = method.select_features(ctx)
                selections[index].append(selection)
                mask = torch.zeros(n, dtype=torch.bool, device=features.device)
                mask[selection.kept.to(features.device)] = True
                kept_here &= mask
                if selection.features is not None:
                    current = current.clone()
                    current[selection.kept.to(features.device)] = selection.features.to(current.dtype)
            keep[b, :n] = kept_here
            new_features.append(current)
        self.decision = EncoderDecision(keep, selections)
        return new_features

    def _tokens(self, per_patch: list[torch.Tensor], b: int, n: int, reduce: str) -> torch.Tensor | None:
        """Image ``b``'s patch-level values mapped to its ``n`` language-model tokens."""
        if b >= len(per_patch):
            return None
        return self.layout.patches_to_tokens(per_patch[b], n, reduce)

    def _attention_component(self, module: Any, capture: _Capture, b: int, n: int) -> torch.Tensor | None:
        """The attention branch of image ``b``'s features, passed through the features module."""
        if b >= len(capture.attention_output):
            return None
        branch = self.layout.drop_cls(capture.attention_output[b])
        self._projecting = True
        try:
            with torch.no_grad():
                projected = self.layout.project(module, branch)
        finally:
            self._projecting = False
        return projected.float() if projected.shape[0] == n else None
