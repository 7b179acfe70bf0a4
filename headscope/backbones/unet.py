"""The UNet backbone (SD 1.x / 2.x / XL): where its text-conditioned attention modules are, in run order.

A UNet2DConditionModel runs its down blocks, then its mid block, then its up blocks
(`unet.attn_processors` iterates down -> up -> mid, which is not execution order). Cross-attention
modules are the `Attention`s with `attn.is_cross_attention`, whatever their names; a layer's spatial
size follows from its downsampling depth (`level`) and the latent size.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from headscope.backbones.base import Backbone, DenoiserCall, TextSlot, head_dim
from headscope.errors import HeadscopeError
from headscope.heads import LayerInfo, resolution_at
from headscope.processor import HeadProcessor, HookContext, Hooks

# Processors that compute plain softmax attention; HeadProcessor and SelfAttentionProcessor do the same maths.
# Others (IP-Adapter, custom ones) do more, and silently replacing them would change the model.
PLAIN_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor"})


class UNetBackbone(Backbone):
    """SD 1.x / 2.x / XL: cross-attention modules; CFG is one [uncond; cond] batch; keys = CLIP tokens."""

    family = "unet"
    description = "UNet2DConditionModel (SD 1.x / 2.x / XL)"
    plain_processors = PLAIN_PROCESSORS
    restore_hint = " (call pipe.unet.set_default_attn_processor() first if that is what you want)"

    @classmethod
    def accepts(cls, model) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(model, UNet2DConditionModel)

    def default_latent_hw(self) -> tuple[int, int]:
        size = self.model.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def layers(self, latent_hw: tuple[int, int]) -> list[LayerInfo]:
        return cross_attention_layers(self.model, latent_hw)

    def make_processor(self, layer: LayerInfo, hooks: Hooks) -> HeadProcessor:
        return HeadProcessor(layer, hooks)

    def denoiser_call(self, args: tuple, kwargs: dict) -> DenoiserCall:
        sample = args[0] if args else kwargs["sample"]
        return DenoiserCall(n_rows=sample.shape[0], latent_hw=tuple(sample.shape[-2:]))

    def text_slots(self, pipe, arguments: dict) -> list[TextSlot]:
        # SDXL's prompt_2 goes through tokenizer_2 into the same key positions: checked, not mapped.
        return [TextSlot("clip", "tokenizer", "text_encoder", 0, None, ("prompt",), ("negative_prompt",)),
                TextSlot("clip", "tokenizer_2", "text_encoder_2", 0, None, ("prompt_2",), keys=False)]


def cross_attention_layers(unet, latent_hw: tuple[int, int]) -> list[LayerInfo]:
    """Every cross-attention module of `unet` as a `LayerInfo`, in execution order, flat offsets counted."""
    layers, offset = [], 0
    for block, block_index, level, prefix, module in blocks_in_execution_order(unet):
        for name, attn in _cross_attentions(module, prefix):
            layers.append(LayerInfo(index=len(layers), name=name, block=block, block_index=block_index, level=level,
                                    heads=attn.heads, head_dim=head_dim(attn), offset=offset,
                                    resolution=resolution_at(level, latent_hw)))
            offset += attn.heads
    return layers


def self_attention_layers(unet, latent_hw: tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every self-attention module of a UNet's transformer blocks, in execution order, as `LayerInfo`s.

    Indices and flat head ids count self-attention layers only; `latent_hw` (default
    `unet.config.sample_size`) sets the resolutions.
    """
    from diffusers.models.attention_processor import Attention

    size = latent_hw if latent_hw is not None else unet.config.sample_size
    latent_hw = (size, size) if isinstance(size, int) else tuple(size)
    layers, offset = [], 0
    for block, block_index, level, prefix, module in blocks_in_execution_order(unet):
        for name, attn in module.named_modules(prefix=prefix):
            if isinstance(attn, Attention) and not attn.is_cross_attention:
                layers.append(LayerInfo(index=len(layers), name=name, block=block, block_index=block_index,
                                        level=level, heads=attn.heads, head_dim=head_dim(attn), offset=offset,
                                        resolution=resolution_at(level, latent_hw)))
                offset += attn.heads
    return layers


class SelfAttentionProcessor(HeadProcessor):
    """Processor for one self-attention layer: AttnProcessor2_0's maths; hooks may swap queries and keys.

    `layer` describes the self-attention module (its own execution index and flat head ids, see
    `self_attention_layers`). Only `Hook.self_attention` is called here.
    """

    is_cross = False

    def _attend(self, attn, query, key, value, attention_mask, ctx: HookContext) -> torch.Tensor:
        for hook in self.hooks.items:
            replaced = hook.self_attention(ctx, query, key)
            if replaced is not None:
                query, key = replaced
        extra = {} if attn.scale_qk else {"scale": attn.scale}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                              dropout_p=0.0, is_causal=False, **extra)


@contextmanager
def self_attention_processors(unet, hooks: Hooks, latent_hw: tuple[int, int] | None = None):
    """Install a `SelfAttentionProcessor` sharing `hooks` on every self-attention layer; restore on exit.

    Use it inside a `trace` (pass `tc.hooks`) so that cross- and self-attention hooks share one list
    and one run state. Yields the self-attention `LayerInfo`s. Only the self-attention processors
    are restored on exit; whatever the trace installed stays until the trace exits.
    """
    layers = self_attention_layers(unet, latent_hw)
    originals = dict(unet.attn_processors)
    processors = dict(originals)
    for layer in layers:
        current = originals[f"{layer.name}.processor"]
        if type(current).__name__ not in PLAIN_PROCESSORS:
            raise HeadscopeError(f"{layer.name} uses {type(current).__name__}, which does more than plain "
                                 "attention; self-attention injection needs diffusers' standard processors")
        processors[f"{layer.name}.processor"] = SelfAttentionProcessor(layer, hooks)
    unet.set_attn_processor(processors)
    try:
        yield layers
    finally:
        restored = dict(unet.attn_processors)
        for layer in layers:
            restored[f"{layer.name}.processor"] = originals[f"{layer.name}.processor"]
        unet.set_attn_processor(restored)


def blocks_in_execution_order(unet):
    """Yield (block kind, block index, level, module-name prefix, block module) as the UNet runs them."""
    level = 0
    for block_index, block in enumerate(unet.down_blocks):
        yield "down", block_index, level, f"down_blocks.{block_index}", block
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    if unet.mid_block is not None:
        yield "mid", 0, level, "mid_block", unet.mid_block
    for block_index, block in enumerate(unet.up_blocks):
        yield "up", block_index, level, f"up_blocks.{block_index}", block
        if getattr(block, "upsamplers", None) is not None:
            level -= 1


def _cross_attentions(block, prefix: str):
    """Yield (module name, Attention) for the cross-attention modules of one block, in run order.

    Registration order inside a block is run order: attentions[i] runs after resnets[i], and
    inside a transformer, attn1 (self) runs before attn2 (cross).
    """
    from diffusers.models.attention_processor import Attention

    for name, module in block.named_modules(prefix=prefix):
        if isinstance(module, Attention) and module.is_cross_attention:
            if getattr(module, "added_kv_proj_dim", None) is not None:
                raise HeadscopeError(f"{name} uses added key/value projections (UnCLIP-style "
                                     "attention); headscope supports plain cross-attention only")
            yield name, module
