"""The SD3 backbone (SD3 / SD3.5, `SD3Transformer2DModel`): joint blocks, [image; text] sequences.

Every `JointTransformerBlock.attn` is a text-conditioned layer, in `transformer_blocks` order (the
order the forward runs them); the last block is `context_pre_only` (its text queries' outputs are
dropped, but the image queries still attend over the text keys, so it is a layer like the others).
SD3.5's `attn2` in early blocks is image-only self-attention and keeps diffusers' processor.
SD3-medium: 24 blocks x 24 heads = 576 heads; SD3.5-large: 38 x 38 = 1,444.

The joint sequence is [image tokens; text tokens]; the text is the CLIP tokens (CLIP-L and CLIP-G
hidden states side by side, `pipe.tokenizer_max_length` = 77 positions) followed by the T5 tokens
(`max_sequence_length`, 256 by default; zeros when the pipeline has no T5). Image tokens are the
latent cut into patch_size^2 patches, row-major: a layer's grid is the latent size / patch size.
Classifier-free guidance is one [uncond; cond] batch, as on a UNet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from headscope.backbones.base import Backbone, DenoiserCall, TextSlot, head_dim, patch_level
from headscope.heads import LayerInfo, resolution_at
from headscope.joint import JointProcessor, JointSequence


class SD3Backbone(Backbone):
    """SD3 / SD3.5: `transformer_blocks[i].attn`, image tokens first, CLIP then T5 text keys."""

    family = "sd3"
    description = "SD3Transformer2DModel (SD3 / SD3.5)"
    plain_processors = frozenset({"JointAttnProcessor2_0"})
    encoders = ("clip", "t5")
    batch_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    @classmethod
    def accepts(cls, model) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(model, SD3Transformer2DModel)

    def default_latent_hw(self) -> tuple[int, int]:
        size = self.model.config.sample_size
        return size, size

    def layers(self, latent_hw: tuple[int, int]) -> list[LayerInfo]:
        level = patch_level(self.model.config.patch_size)
        layers, offset = [], 0
        for block_index, block in enumerate(self.model.transformer_blocks):
            attn = block.attn
            layers.append(LayerInfo(index=len(layers), name=f"transformer_blocks.{block_index}.attn", block="joint",
                                    block_index=block_index, level=level, heads=attn.heads, head_dim=head_dim(attn),
                                    offset=offset, resolution=resolution_at(level, latent_hw), kind="joint"))
            offset += attn.heads
        return layers

    def make_processor(self, layer, hooks) -> "SD3JointProcessor":
        return SD3JointProcessor(layer, hooks)

    def denoiser_call(self, args: tuple, kwargs: dict) -> DenoiserCall:
        sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [batch, channels, h, w]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return DenoiserCall(n_rows=sample.shape[0], latent_hw=tuple(sample.shape[-2:]), n_text=text.shape[1],
                            text_embeds=text, extra=kwargs.get("skip_layers") is not None)

    def text_slots(self, pipe, arguments: dict) -> list[TextSlot]:
        clip_length = int(getattr(pipe, "tokenizer_max_length", 77))
        t5_length = int(arguments.get("max_sequence_length") or 256)
        return [TextSlot("clip", "tokenizer", "text_encoder", 0, clip_length, ("prompt",), ("negative_prompt",)),
                TextSlot("clip", "tokenizer_2", "text_encoder_2", 0, clip_length, ("prompt_2",),
                         ("negative_prompt_2",), keys=False),
                TextSlot("t5", "tokenizer_3", "text_encoder_3", clip_length, t5_length, ("prompt_3", "prompt"),
                         ("negative_prompt_3", "negative_prompt"))]


def _sdpa(query, key, value):
    """The attention call of JointAttnProcessor2_0 (no mask, default scale)."""
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


class SD3JointProcessor(JointProcessor):
    """diffusers' JointAttnProcessor2_0, op for op, with headscope's hooks on the image-query x text-key block.

    Like the original it ignores `attention_mask` and extra arguments (the signature matches, so
    `Attention.forward` hands it the same arguments).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # [batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        sequence = None
        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
            text_query = text_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_key = text_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_value = text_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            sequence = JointSequence(n_image=residual.shape[1], n_text=encoder_hidden_states.shape[1], text_first=False)

        if sequence is None:
            hidden_states = _sdpa(query, key, value)
        else:
            hidden_states = self._attend_joint(query, key, value, sequence, 2, _sdpa)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

