"""Tiny random-weight SD3 and Flux pipelines built from configs, offline, for tests and benchmarks.

Both use the CLIP BPE tokenizer of `headscope.testing` (24 tokens) and a T5-style tokenizer built here:
a `tokenizers` Unigram model with T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2) and its
Metaspace pre-tokenizer, wrapped in transformers' `T5Tokenizer` (the fast, tokenizers-backed class), so
it segments like a SentencePiece T5: the words of `headscope.testing.SINGLE_TOKEN_WORDS` are one piece
each ("▁dog"), "giraffe" is "▁gir" + "affe", any other word is "▁" plus one piece per character.
Nothing is downloaded.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from headscope.testing import SINGLE_TOKEN_WORDS, SPLIT_WORDS, build_tokenizer, text_config

T5_WIDTH = 32  # T5 d_model = the transformers' joint_attention_dim
T5_MAX_LENGTH = 512


def build_t5_tokenizer(extra_words=()):
    """A T5Tokenizer over a small Unigram vocabulary (see the module docstring); `extra_words` are more
    single-token words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys([*SINGLE_TOKEN_WORDS, *extra_words])]
    for parts in SPLIT_WORDS.values():
        pieces += [("▁" + parts[0], -1.0)] + [(part, -1.0) for part in parts[1:]]
    # Single characters score low, so known words stay whole and unknown words still encode.
    pieces += [("▁", -8.0)] + [(char, -8.0) for char in string.ascii_letters + string.digits + ".,;:!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def t5_encoder(tokenizer):
    """A two-layer T5EncoderModel of width T5_WIDTH for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def flow_vae():
    """AutoencoderKL with two levels (VAE scale factor 2) and the shift factor flow pipelines read."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.0,
                         scaling_factor=1.0)


def build_tiny_sd3(folder: str | Path, with_t5: bool = True):
    """StableDiffusion3Pipeline: 3 joint blocks x 2 heads (block 0 with SD3.5's image-only attn2), patch 2.

    16x16 images -> 8x8 latents -> 4x4 image tokens; text = 24 CLIP tokens then `max_sequence_length`
    T5 tokens (zeros when `with_t5` is False: no text_encoder_3 / tokenizer_3).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer-src")
    tokenizer_2 = build_tokenizer(folder / "tokenizer-2-src")
    tokenizer_3 = build_t5_tokenizer() if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(),
        text_encoder=CLIPTextModelWithProjection(text_config(tokenizer, hidden=16, projection=16)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, hidden=16, projection=16)),
        tokenizer_2=tokenizer_2, text_encoder_3=t5_encoder(tokenizer_3) if with_t5 else None,
        tokenizer_3=tokenizer_3)
    return _ready(pipe)


def build_tiny_flux(folder: str | Path, guidance_embeds: bool = True):
    """FluxPipeline: 2 double-stream + 2 single-stream blocks x 2 heads of 8 channels.

    16x16 images -> 8x8 latents -> 2x2-packed 4x4 image tokens; text = `max_sequence_length` T5 tokens
    (CLIP gives only the pooled vector). `guidance_embeds`: Flux-dev's guidance embedding (no CFG batch).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer-src")
    tokenizer_2 = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(),
                        text_encoder=CLIPTextModel(text_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer)
    return _ready(pipe)


def _ready(pipe):
    """Modules in eval mode (as from_pretrained leaves them: T5's dropout would make every call differ), on CPU."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def generate_joint(pipe, prompt, *, seed: int = 0, steps: int = 2, height: int = 16, width: int = 16,
                   max_sequence_length: int = 16, **options) -> torch.Tensor:
    """Run an SD3 / Flux pipeline with a fixed seed at a small size; images as a float tensor [n, 3, H, W]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pt", height=height,
                width=width, max_sequence_length=max_sequence_length, **options).images


class FirstCallInputs:
    """Forward pre-hooks keeping the keyword inputs of some modules at their first call: `seen[name]`."""

    def __init__(self, model, names):
        self.seen = {}
        self.handles = [model.get_submodule(name).register_forward_pre_hook(self._keeper(name), with_kwargs=True)
                        for name in names]

    def _keeper(self, name):
        def keep(module, args, kwargs):
            self.seen.setdefault(name, kwargs)
        return keep

    def remove(self):
        for handle in self.handles:
            handle.remove()
