"""Architecture of the SD3-style shapes model: joint-attention transformer, three tiny text encoders.

The second embedded model is an ordinary `StableDiffusion3Pipeline`: `SD3Transformer2DModel` (patch 1
over the shipped VAE's 16x16x4 latents, so 256 image tokens and 16x16 word maps), two
`CLIPTextModelWithProjection` and a `T5EncoderModel`, all over the world tokenizer, and
`FlowMatchEulerDiscreteScheduler`. The VAE is the shipped UNet model's, frozen: both embedded models
share one latent space.

Text layout (what the pipeline's `encode_prompt` builds and the transformer sees), per prompt, as in
SD3: `[24 CLIP tokens; max_sequence_length T5 tokens]`, `[24 + 24, 256]`. A CLIP token is CLIP-1's and
CLIP-2's penultimate hidden states side by side (128 + 64), zero-padded to T5's width 256 (SD3: 768 +
1280 padded to 4096); the pooled vector is the two projected end-token embeddings, `[192]`. Every
word thus appears twice, once per segment, as in SD3.

Why a T5 at all: without one, `from_pretrained` refuses the folder unless the caller passes
`text_encoder_3=None, tokenizer_3=None`, and the pipeline appends `max_sequence_length` zero vectors.
Those stay identical through every block, so N of them act as one key with log N added to its
logit: an attention sink whose pull grows with N. A tiny T5 (2 layers, 1 M parameters) loads with a
plain `from_pretrained`, and its tokens carry the caption. `max_sequence_length` = 24 (the tokenizer's
length: no caption is truncated) must be passed on every call, instead of the default 256: the
transformer was trained on exactly 24 T5 tokens. headscope.json `defaults` records it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes_model"


@dataclass
class MMDiTConfig:
    """Sizes of the transformer and the two text encoders. The defaults are the trained model's."""

    latent_size: int = 16          # the shipped VAE: 64x64 images -> 16x16x4 latents
    latent_channels: int = 4
    layers: int = 5                # joint blocks (~1.0 s/step at batch 32 on 2 cores); the last is context_pre_only
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 1            # 16x16 image tokens: 8x8 maps (patch 2) are coarse for 64x64 images
    # RMS-normalised queries and keys (SD3.5): the SD3 paper's fix for attention logits that grow
    # during training; it keeps a run at a fixed learning rate stable without tuning.
    qk_norm: str | None = "rms_norm"
    # CLIP-1 has the shipped UNet model's text-encoder shape so it can start from its weights;
    # CLIP-2 is smaller, as in SD3 the two CLIPs differ in width (code must not assume equal widths).
    clip1_hidden: int = 128
    clip1_layers: int = 3
    clip1_heads: int = 4
    clip2_hidden: int = 64
    clip2_layers: int = 2
    clip2_heads: int = 2
    # T5 v1.1 style (gated GELU, relative positions, as SD3's T5-XXL); its width is the text-token width
    t5_hidden: int = 256
    t5_layers: int = 2
    t5_heads: int = 4
    t5_head_dim: int = 32
    t5_ff: int = 512
    # Sampling-time shift of the flow schedule, sigma' = shift * s / (1 + (shift - 1) s). SD3 used 1.0
    # for 256 tokens (256x256 px) and 3.0 for 4096; 2.0 puts a quarter of 25 steps above sigma 0.85,
    # where this world's layout is decided, and still leaves steps for edges.
    shift: float = 2.0
    max_sequence_length: int = 24  # T5 tokens per prompt (see the module docstring)

    def __post_init__(self):
        if self.t5_hidden < self.pooled_dim:
            raise ValueError("t5_hidden must be at least clip1_hidden + clip2_hidden: CLIP tokens are padded to it")

    @property
    def joint_attention_dim(self) -> int:
        """Width of a text token: T5's; the two CLIPs' hidden states side by side are padded to it."""
        return self.t5_hidden

    @property
    def pooled_dim(self) -> int:
        return self.clip1_hidden + self.clip2_hidden

    @property
    def text_tokens(self) -> int:
        from headscope.shapes.tokenizer import MAX_LENGTH

        return MAX_LENGTH + self.max_sequence_length

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MMDiTConfig":
        return cls(**data)


TINY_MMDIT = MMDiTConfig(layers=2, heads=2, head_dim=8, clip1_hidden=16, clip1_layers=2, clip1_heads=2,
                         clip2_hidden=8, clip2_layers=2, clip2_heads=2, t5_hidden=32, t5_layers=1, t5_heads=2,
                         t5_head_dim=8, t5_ff=32)


def build_transformer(cfg: MMDiTConfig) -> SD3Transformer2DModel:
    inner = cfg.heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=inner, pooled_projection_dim=cfg.pooled_dim,
        # the sin-cos table is a saved buffer: sized to the latent, not SD3's 96x96 (2.4 MB in fp16)
        pos_embed_max_size=cfg.latent_size // cfg.patch_size, qk_norm=cfg.qk_norm)


def build_clip(hidden: int, layers: int, heads: int, tokenizer) -> CLIPTextModelWithProjection:
    """A CLIP text encoder over the world tokenizer; its projection keeps the width (pooled `[hidden]`)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=hidden)
    return CLIPTextModelWithProjection(config)


def build_t5(cfg: MMDiTConfig, tokenizer) -> T5EncoderModel:
    """A T5 encoder over the world tokenizer; its last hidden state, `[tokens, t5_hidden]`, is the T5 segment."""
    config = T5Config(vocab_size=len(tokenizer), d_model=cfg.t5_hidden, d_kv=cfg.t5_head_dim, d_ff=cfg.t5_ff,
                      num_layers=cfg.t5_layers, num_heads=cfg.t5_heads, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0,  # no dropout: training sees the encoder exactly as generation does
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)
    return T5EncoderModel(config)


def build_text_encoders(cfg: MMDiTConfig, tokenizer):
    """(CLIP-1, CLIP-2, T5), in the pipeline's order text_encoder, text_encoder_2, text_encoder_3."""
    return (build_clip(cfg.clip1_hidden, cfg.clip1_layers, cfg.clip1_heads, tokenizer),
            build_clip(cfg.clip2_hidden, cfg.clip2_layers, cfg.clip2_heads, tokenizer),
            build_t5(cfg, tokenizer))


def build_flow_scheduler(cfg: MMDiTConfig) -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow as SD3: sigma 1 is pure noise; the transformer's timestep is sigma * 1000."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def warm_start_clip1(clip1: CLIPTextModelWithProjection, source: Path = SHIPPED_MODEL / "text_encoder") -> None:
    """Copy the shipped UNet model's trained text encoder into CLIP-1 (its projection stays fresh).

    That encoder already tells the world's words apart; starting from it spends the transformer's
    short CPU budget on images rather than on learning word embeddings from scratch.
    """
    from transformers import CLIPTextModel

    trained = CLIPTextModel.from_pretrained(str(source), torch_dtype=torch.float32).state_dict()
    # transformers 5 keeps CLIPTextModel's layers at the top level, 4.x under `text_model.`
    clip1.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in trained.items()})


def load_shipped_vae(source: Path = SHIPPED_MODEL / "vae") -> AutoencoderKL:
    """The shipped, trained VAE in fp32, frozen, with the `shift_factor` the SD3 pipeline reads."""
    vae = AutoencoderKL.from_pretrained(str(source), torch_dtype=torch.float32)
    return _for_sd3(vae)


def _for_sd3(vae: AutoencoderKL) -> AutoencoderKL:
    # SD3's pipeline decodes latents / scaling_factor + shift_factor; SD's VAEs have shift_factor None
    vae.register_to_config(shift_factor=0.0)
    vae.requires_grad_(False).eval()
    return vae


def assemble(vae, transformer, text_encoders, tokenizer, scheduler):
    """A StableDiffusion3Pipeline around the given modules; the world tokenizer serves all three encoders."""
    from diffusers import StableDiffusion3Pipeline

    text_encoder, text_encoder_2, text_encoder_3 = text_encoders
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_captions(pipe, captions: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning exactly as the pipeline builds it at inference, with gradients.

    Returns `prompt_embeds` `[batch, 24 + max_sequence_length, t5_hidden]` and
    `pooled` `[batch, clip1_hidden + clip2_hidden]`. It is the pipeline's own `encode_prompt` (which, unlike
    `__call__`, runs without no_grad), so training cannot drift from what generation feeds in.
    """
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return embeds, pooled


def random_mmdit_pipeline(cfg: MMDiTConfig = TINY_MMDIT, seed: int = 0):
    """An untrained StableDiffusion3Pipeline of the shapes architecture (random tiny VAE), for tests.

    Call it with `max_sequence_length=cfg.max_sequence_length` to get the trained text layout.
    """
    from headscope.shapes.model import TINY, build_vae
    from headscope.shapes.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return assemble(_for_sd3(build_vae(TINY)), build_transformer(cfg), build_text_encoders(cfg, tokenizer),
                    tokenizer, build_flow_scheduler(cfg))
