"""The Flux backbone (Flux.1, `FluxTransformer2DModel`): double- then single-stream blocks, [text; image].

Text-conditioned layers, in execution order: `transformer_blocks[i].attn` (double-stream: text and
image keep their own projections, joined for attention) then `single_transformer_blocks[i].attn`
(single-stream: the block concatenates [text; image] itself and calls attention with no
`encoder_hidden_states`, so the text length comes from the transformer call, which the trace's
pre-hook reads). Flux.1-dev: (19 + 38) x 24 heads = 1,368.

The joint sequence is [T5 tokens; image tokens] (`max_sequence_length`: 512 for dev, 256 for
schnell; CLIP gives only the pooled vector), RoPE applied after the concatenation. Image tokens are
the latent packed into 2x2 patches, row-major; the grid is read from the transformer's `img_ids`
(row, column per token), so non-square images need nothing else. Flux-dev's guidance is an embedding
(no CFG batch); `true_cfg_scale > 1` with a negative prompt runs the transformer a second time per
step, with the negative prompt's embeddings (`separate_cfg_passes`).

Detection is by the module's place in the model (never by the deprecated `FluxAttnProcessor2_0` shim,
which only returns a `FluxAttnProcessor`); attention goes through diffusers' `dispatch_attention_fn`
with the backend the original processor had.
"""
from __future__ import annotations

import torch

from headscope.backbones.base import Backbone, DenoiserCall, TextSlot, head_dim
from headscope.errors import HeadscopeError
from headscope.heads import LayerInfo, resolution_at
from headscope.joint import JointProcessor, JointSequence

PACK_LEVEL = 1  # FluxPipeline packs 2x2 latent pixels into one token: one stride-2 step
DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size: 1024-pixel images


class FluxBackbone(Backbone):
    """Flux.1: double-stream then single-stream attention, text first, T5 text keys, true-CFG passes."""

    family = "flux"
    description = "FluxTransformer2DModel (Flux.1)"
    default_encoder = "t5"
    separate_cfg_passes = True
    plain_processors = frozenset({"FluxAttnProcessor"})
    encoders = ("t5",)  # CLIP only gives Flux its pooled vector
    batch_inputs = ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states")

    def __init__(self, model):
        super().__init__(model)
        self._grid_of = (None, None)  # (img_ids tensor, its grid): read once per call, not per step

    @classmethod
    def accepts(cls, model) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(model, FluxTransformer2DModel)

    def default_latent_hw(self) -> tuple[int, int]:
        return DEFAULT_LATENT, DEFAULT_LATENT

    def layers(self, latent_hw: tuple[int, int]) -> list[LayerInfo]:
        layers, offset = [], 0
        blocks = [("double", "transformer_blocks", "joint"), ("single", "single_transformer_blocks", "single")]
        for block, attribute, kind in blocks:
            for block_index, module in enumerate(getattr(self.model, attribute)):
                attn = module.attn
                layers.append(LayerInfo(index=len(layers), name=f"{attribute}.{block_index}.attn", block=block,
                                        block_index=block_index, level=PACK_LEVEL, heads=attn.heads,
                                        head_dim=head_dim(attn), offset=offset,
                                        resolution=resolution_at(PACK_LEVEL, latent_hw), kind=kind))
                offset += attn.heads
        return layers

    def make_processor(self, layer, hooks) -> "FluxJointProcessor":
        return FluxJointProcessor(layer, hooks)

    def processor_for(self, layer, current, hooks):
        processor = super().processor_for(layer, current, hooks)
        # Keep the attention backend / parallel config a user chose (set_attention_backend sets them per processor).
        processor._attention_backend = getattr(current, "_attention_backend", None)
        processor._parallel_config = getattr(current, "_parallel_config", None)
        return processor

    def denoiser_call(self, args: tuple, kwargs: dict) -> DenoiserCall:
        tokens = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [batch, L_img, channels]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        height, width = self._grid(kwargs.get("img_ids"), tokens.shape[1])
        return DenoiserCall(n_rows=tokens.shape[0], latent_hw=(2 * height, 2 * width), n_text=text.shape[1],
                            text_embeds=text)

    def _grid(self, image_ids: torch.Tensor | None, n_tokens: int) -> tuple[int, int]:
        """(h, w) of the packed token grid, from `img_ids` [L_img, 3] (0, row, column)."""
        if image_ids is None:
            raise HeadscopeError("the Flux transformer was called without img_ids; headscope reads the token grid "
                                 "from them")
        cached, grid = self._grid_of
        if cached is not image_ids:
            positions = image_ids.reshape(-1, image_ids.shape[-1])[-n_tokens:]
            grid = (int(positions[:, 1].max()) + 1, int(positions[:, 2].max()) + 1)
            if grid[0] * grid[1] != n_tokens:
                raise HeadscopeError(f"img_ids describe a {grid[0]}x{grid[1]} grid but the transformer got {n_tokens} "
                                     "image tokens; headscope needs FluxPipeline's row-major image ids")
            self._grid_of = (image_ids, grid)
        return grid

    def text_slots(self, pipe, arguments: dict) -> list[TextSlot]:
        # Negative prompts come through a second encode_prompt call (separate_cfg_passes), as `prompt`.
        length = int(arguments.get("max_sequence_length") or 512)
        return [TextSlot("t5", "tokenizer_2", "text_encoder_2", 0, length, ("prompt_2", "prompt"))]


def _projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v and the text stream's, exactly as FluxAttnProcessor gets them (fused or not)."""
    try:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
    except ImportError:  # diffusers < 0.35 has no FluxAttention / FluxAttnProcessor
        raise HeadscopeError("tracing Flux needs diffusers >= 0.35 (FluxAttnProcessor)") from None
    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


class FluxJointProcessor(JointProcessor):
    """diffusers' FluxAttnProcessor, op for op, with headscope's hooks on the image-query x text-key block.

    Serves double-stream layers (text via `encoder_hidden_states`) and single-stream layers (the
    sequence already [text; image]; the text length is the trace's `state.n_text`).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, encoder_query, encoder_key, encoder_value = _projections(
            attn, hidden_states, encoder_hidden_states)
        # [batch, tokens, heads * head_dim] -> [batch, tokens, heads, head_dim]
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def attention(q, k, v):
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)

        sequence = self._sequence(query.shape[1], encoder_hidden_states, attention_mask)
        if sequence is None:
            hidden_states = attention(query, key, value)
        else:
            hidden_states = self._attend_joint(query, key, value, sequence, 1, attention)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _sequence(self, n_tokens: int, encoder_hidden_states, attention_mask) -> JointSequence | None:
        """The [text; image] layout of this call; None when no hook is to run (plain attention)."""
        if not self.hooks.items or not self.hooks.state.recording:
            return None
        if attention_mask is not None:
            raise HeadscopeError(f"{self.layer.name} got an attention mask; headscope's joint-attention maps do not "
                                 "take masks yet (FluxPipeline passes none)")
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.hooks.state.n_text
        if n_text is None:
            raise HeadscopeError(f"{self.layer.name} is single-stream and the text length is unknown: call it "
                                 "through the transformer inside a trace")
        return JointSequence(n_image=n_tokens - n_text, n_text=n_text, text_first=True)
