"""The base class of every pruning method: the places a method may act at, and what it sees there.

A method is a small dataclass (its settings) whose hooks the :class:`~vpstudy.pruning.Pruner`
calls; it never touches the model itself. It may act at any of three places:

1. **after the vision encoder** (:meth:`PruningMethod.select_features`): it sees each image's
   visual features as they enter the language model, with what the encoder computed for them
   (:class:`EncoderContext`), and returns the features it keeps, possibly merged
   (:class:`FeatureSelection`). The dropped tokens are hidden from every text layer for the whole
   generation, prompt rows included, and the kept tokens carry the returned features;
2. **at a prefill layer** (a :class:`Stage` of a method with ``step_wise = False``): it decides
   once, from the prompt's attention at that layer (:class:`Decision`), and its drops hold for
   the prompt rows after the stage's layer and for every generated token;
3. **at each decode step** (a :class:`Stage` of a method with ``step_wise = True``): it decides
   again at every decode step from that step's query at its layer, and hides keys from that
   query only, at layers from the stage's ``acts_from`` on (the KV cache is never touched).

Methods compose: a stage sees the keys earlier stages left visible, and a key is visible only if
every method keeps it. Each subclass is registered once (:func:`vpstudy.pruning.registry.register`);
the command line, the evaluation and the tests iterate the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...errors import VpstudyError
from ...rules import anchor_layer
from ...selection import visual_logits, visual_share

if TYPE_CHECKING:
    from ..registry import Entry


class PruningError(VpstudyError):
    """A pruning method or setting that cannot be used (one-line message naming it)."""


class MethodUnavailable(PruningError):
    """A valid method that cannot run on this model: a family it does not support, or a trained
    component it needs that the model does not have. ``vpstudy evaluate --method all`` leaves
    such a row out with this line, where a bad setting stops the whole comparison."""


@dataclass
class Decision:
    """What a stage sees when it decides, for every batch row.

    Attributes:
        logits: [B, H, T] float32 pre-softmax logits of the deciding query row (scaled, masked
            with -inf where the key is not visible, including keys earlier stages dropped): the
            last prompt row at a prefill stage, the step's query at a decode stage.
        visual_index: [B, N] key positions of the visual tokens (padded).
        valid: [B, N] bool, real visual tokens.
        allowed: [B, N] bool, real visual tokens still visible at this layer.
        n_visual: [B] long, real visual tokens per row.
        step: decoding step (0 = the prefill's last row).
        generator: seeded generator for methods that draw at random.
        text_probs: [B, H, Q, N] float32, at prefill stages of methods that ask for it
            (``query_rows = "text"``): the attention probabilities (softmax over every visible key,
            τ = 1) of the prompt's text rows after the image at the visual keys; ``text_rows``
            [B, Q] bool says which of the Q rows are real. None otherwise.
        text_index: [B, Q] long key positions of those text rows (padded; see ``text_rows``).
        hidden: [B, T, D] the layer's input hidden states (prefill stages of methods that ask for
            them, ``wants_hidden = True``), else None.
        n_layers: text layers of the model.
        prefix: [B, T] long, the generation's tokens so far (prompt, then the generated tokens up
            to this step's input); ``prefix_mask`` [B, T] its attention mask (left padding).
    """

    logits: torch.Tensor
    visual_index: torch.Tensor
    valid: torch.Tensor
    allowed: torch.Tensor
    n_visual: torch.Tensor
    step: int
    generator: torch.Generator
    text_probs: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    n_layers: int = 0
    prefix: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class HiddenEdit:
    """Replace the hidden state of batch row ``row`` at key position ``position`` by ``vector``
    ([D]) at the input of a stage's acting layer, in the prefill (token recycling)."""

    row: int
    position: int
    vector: torch.Tensor


@dataclass(frozen=True)
class Stage:
    """One decision of a method: made at ``decide_at`` and acting from ``acts_from`` on."""

    decide_at: int
    acts_from: int


@dataclass
class EncoderContext:
    """What an encoder-side method sees for one image.

    Attributes:
        features: [N, D] the image's visual features as they enter the language model (after
            the projector / merger), in the order of its placeholder tokens.
        cls_attention: [N] the vision encoder's [CLS] attention to each token (head-summed, at
            the layer the family names), or None where the encoder has no [CLS] token.
        keys: [N, d] head-mean key states of the tokens at that encoder layer (VisionZip's
            similarity metric), or None.
        attention_output: [N, D] the attention branch of the encoder's last block (without the
            residual), projected like the features, or None.
        text_embeddings: [Q, D] the prompt's text token embeddings (the language model's input
            embeddings of the question), for methods that compare the image with the text.
        grid: (rows, columns) of the token grid, or None.
        generator: seeded generator.
    """

    features: torch.Tensor
    cls_attention: torch.Tensor | None
    keys: torch.Tensor | None
    attention_output: torch.Tensor | None
    text_embeddings: torch.Tensor
    grid: tuple[int, int] | None
    generator: torch.Generator


@dataclass
class FeatureSelection:
    """An encoder-side decision for one image: the kept token indices (into the image's N
    tokens, ascending) and, where the method merges dropped tokens into kept ones, their new
    features ([len(kept), D]; None keeps the original features)."""

    kept: torch.Tensor
    features: torch.Tensor | None = None
    scores: torch.Tensor | None = field(default=None, compare=False)


def check_ratio(name: str, value: float) -> None:
    """Raise unless ``0 < value <= 1``."""
    if not 0 < value <= 1:
        raise PruningError(f"{name} must be in (0, 1], got {value}")


def anchor_stage(method: str, anchor: int | None, n_layers: int) -> list[Stage]:
    """The one stage of an anchored method: decided and acting at ``anchor`` (default: the
    VisionPulse anchor depth), which must be a layer of the model."""
    layer = anchor_layer(n_layers) if anchor is None else anchor
    if not 0 <= layer < n_layers:
        raise PruningError(
            f"{method}: anchor layer {layer} out of range: the text model has {n_layers} layers (0..{n_layers - 1})"
        )
    return [Stage(layer, layer)]


def head_mean_logits(d: Decision) -> torch.Tensor:
    """[B, N] head-mean pre-softmax logits of the deciding row at the visual keys."""
    return visual_logits(d.logits, d.visual_index).mean(dim=1)


def head_mean_probs(d: Decision) -> torch.Tensor:
    """[B, N] head-mean attention probabilities (τ = 1) of the deciding row at the visual keys."""
    return visual_share(d.logits, d.visual_index, d.valid).mean(dim=1)


@dataclass
class PruningMethod:
    """Base of every method; see the module docstring for the three places a method may act.

    Class attributes a subclass sets:
        name: the registry name (``vpstudy evaluate --method NAME``).
        step_wise: its attention stages decide again at every decode step (True) or once at
            the prefill (False).
        dense_prefill: a prefill decision that hides keys only from generated tokens, never from
            the prompt rows (the prefill stays dense, as in VisionPulse).
        acts_on_encoder: it implements :meth:`select_features`.
        query_rows: what a prefill :class:`Decision` holds besides the last prompt row:
            ``"last"`` (nothing else) or ``"text"`` (``text_probs`` of the prompt's text rows).
        wants_hidden: a prefill :class:`Decision` carries the layer's input hidden states.
        reselects: a prefill method that may change its set at decode steps
            (:meth:`reselect`, called at its decision layer at every decode step).
        families: the families it can prune (None: all); the pruner refuses others in one line
            unless the settings keep everything.
    """

    name: ClassVar[str] = ""
    # for the shared test matrix (tests/test_methods.py): settings that keep every token, settings
    # that prune something on a tiny model, and bad settings with the start of their error
    keep_all_settings: ClassVar[dict[str, Any]] = {}
    pruning_settings: ClassVar[dict[str, Any]] = {}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = ()
    step_wise: ClassVar[bool] = True
    dense_prefill: ClassVar[bool] = False
    acts_on_encoder: ClassVar[bool] = False
    query_rows: ClassVar[str] = "last"
    wants_hidden: ClassVar[bool] = False
    reselects: ClassVar[bool] = False
    # the families it can prune (None: every family); others get a one-line error at install
    families: ClassVar[tuple[str, ...] | None] = None

    def stages(self, n_layers: int) -> list[Stage]:
        """The attention stages of this method (none by default: an encoder-only method)."""
        return []

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        """[B, N] bool: the visual tokens kept by stage ``stage`` (a subset of ``d.allowed``)."""
        raise NotImplementedError(f"{self.name} has attention stages but no keep()")

    def edits(self, stage: int, d: Decision, keep: torch.Tensor) -> tuple[torch.Tensor, list[HiddenEdit]]:
        """After a prefill decision: the final keep mask and hidden-state edits to make at the
        stage's acting layer (default: ``keep`` unchanged, no edits)."""
        return keep, []

    def reselect(self, stage: int, d: Decision, current: torch.Tensor) -> torch.Tensor:
        """A decode step's new set for a prefill stage (methods with ``reselects``); default
        ``current``."""
        return current

    def bind(self, model_dir: str | None) -> None:
        """Load what the method needs from beside the model (e.g. trained weights); default nothing."""

    def select_features(self, ctx: EncoderContext) -> FeatureSelection:
        """The encoder-side decision for one image (methods with ``acts_on_encoder``)."""
        raise NotImplementedError(f"{self.name} does not act after the vision encoder")

    def prepare(self, model_config_hash: str, n_layers: int) -> None:
        """Validate against the model before any generation (default: check the stages)."""
        self.stages(n_layers)

    def begin_generation(self, batch: int, inputs: Mapping[str, Any] | None = None) -> None:
        """Called when a generation starts, with the first forward's keyword inputs (methods with
        per-generation state reset it here)."""

    def keeps_everything(self) -> bool:
        """Whether these settings keep every visual token at every stage (then the pruner does not
        even install the method's hooks); default False."""
        return False

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """This method's rows of ``vpstudy evaluate --method all`` at a per-step budget of
        ``budget`` (a share of the visual tokens); none by default."""
        return []
