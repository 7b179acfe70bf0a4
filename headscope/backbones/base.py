"""The adapter protocol: what the trace, the head index and the CLI ask a backbone family.

An adapter wraps one denoiser (`UNet2DConditionModel`, `SD3Transformer2DModel`,
`FluxTransformer2DModel`) and answers, for that family only:
  - which attention modules see the text, in execution order, as `LayerInfo`s (`layers`);
  - which processor goes on each of them, after checking the one there does plain attention
    (`processor_for`);
  - what a denoiser forward says about itself: batch rows, latent size, text length, the text
    embeddings it got (`denoiser_call`, from the forward pre-hook's arguments);
  - which text encoders' tokens are keys, where they sit among the text keys and which
    `encode_prompt` arguments carry their text (`text_slots`);
  - how guidance lays out the batch: one [uncond; cond] batch (UNet, SD3) or separate
    transformer calls per step (Flux `true_cfg_scale`; `separate_cfg_passes`).
Nothing outside `headscope/backbones/` tests a model class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError


@dataclass(frozen=True)
class TextSlot:
    """One text encoder whose tokens are keys of the text-conditioned attention (or are only checked).

    Attributes:
        encoder: the name users pass as `encoder=`: "clip" or "t5".
        tokenizer: pipeline attribute of its tokenizer ("tokenizer", "tokenizer_3", ...).
        text_encoder: pipeline attribute of its encoder module; a pipeline where it is None has zeros there.
        offset: index of its first token among the layer's text keys (SD3's T5 tokens follow the CLIP ones).
        max_length: tokens it takes (prompts longer are refused); None: the tokenizer's and encoder's limit.
        prompt_args: `encode_prompt` arguments carrying its text, the first one given wins.
        negative_args: the same for the negative prompt (empty: negatives come from a separate call).
        keys: False when its tokens share the positions of another slot (SDXL's and SD3's second CLIP):
            its prompts are only checked for length, word maps never use it.
    """

    encoder: str
    tokenizer: str
    text_encoder: str
    offset: int
    max_length: int | None
    prompt_args: tuple[str, ...]
    negative_args: tuple[str, ...] = ()
    keys: bool = True


@dataclass(frozen=True)
class DenoiserCall:
    """What one denoiser forward says about itself (read from its arguments by the pre-hook).

    Attributes:
        n_rows: batch rows.
        latent_hw: (h, w) of the (unpacked) latent.
        n_text: text tokens in its joint sequence (None for a UNet).
        text_embeds: the `encoder_hidden_states` tensor it got (identifies Flux's negative-prompt pass).
        extra: a pass outside the guidance scheme (SD3 skip-layer guidance): not a step, not recorded.
    """

    n_rows: int
    latent_hw: tuple[int, int]
    n_text: int | None = None
    text_embeds: torch.Tensor | None = None
    extra: bool = False


class Backbone:
    """Base of the family adapters; `model` is the denoiser module."""

    family = ""                      # "unet", "sd3", "flux"
    description = ""                 # for messages, e.g. "SD3Transformer2DModel (SD3 / SD3.5)"
    default_encoder = "clip"         # whose tokens word maps use unless told otherwise
    encoders: tuple[str, ...] = ("clip",)  # the encoders whose tokens are keys
    separate_cfg_passes = False      # True: guidance runs the denoiser again for the negative prompt
    batch_inputs: tuple[str, ...] = ()  # denoiser forward kwargs with a batch dimension (rows picked by A&E)
    plain_processors: frozenset[str] = frozenset()

    def __init__(self, model):
        self.model = model

    @classmethod
    def accepts(cls, model) -> bool:
        raise NotImplementedError

    def default_latent_hw(self) -> tuple[int, int]:
        """Latent (h, w) of the model's default image size."""
        raise NotImplementedError

    def layers(self, latent_hw: tuple[int, int]) -> list:
        """The text-conditioned attention layers, in execution order, flat offsets counted."""
        raise NotImplementedError

    def make_processor(self, layer, hooks):
        """A fresh headscope processor for `layer` sharing `hooks`."""
        raise NotImplementedError

    def denoiser_call(self, args: tuple, kwargs: dict) -> DenoiserCall:
        raise NotImplementedError

    def text_slots(self, pipe, arguments: dict) -> list[TextSlot]:
        """The pipeline's text encoders for one `encode_prompt` call (bound arguments, defaults applied)."""
        raise NotImplementedError

    def check_encoder_name(self, encoder: str | None) -> str:
        """`encoder`, or the default when None; HeadscopeError unless this family's keys hold its tokens."""
        encoder = encoder or self.default_encoder
        if encoder not in self.encoders:
            raise HeadscopeError(f"encoder={encoder!r}: the attention keys of {self.description} are the tokens of "
                                 f"{' and '.join(self.encoders)} only; use encoder={self.default_encoder!r}")
        return encoder

    def processor_for(self, layer, current, hooks):
        """`make_processor(layer, hooks)` after checking that `current` computes plain attention."""
        if type(current).__name__ not in self.plain_processors:
            raise HeadscopeError(
                f"{layer.name} uses {type(current).__name__}, which does more than plain attention; headscope can "
                f"only trace layers with diffusers' standard processors ({', '.join(sorted(self.plain_processors))})"
                f"{self.restore_hint}")
        return self.make_processor(layer, hooks)

    restore_hint = ""  # how to put the standard processors back, appended to the refusal


def patch_level(patch_size: int) -> int:
    """Downsampling depth of a p x p patchify: log2(p) stride-2 steps (a power of two is required)."""
    level = int(patch_size).bit_length() - 1
    if patch_size < 1 or 1 << level != patch_size:
        raise HeadscopeError(f"patch size {patch_size} is not a power of two; headscope cannot lay out its token grid")
    return level


def head_dim(attn) -> int:
    """Channels per head of an attention module."""
    return attn.to_q.out_features // attn.heads
