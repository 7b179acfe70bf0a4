"""Architecture of the embedded shapes model: configs for the VAE, the UNet and the text encoder."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


@dataclass
class ModelConfig:
    """Sizes of the three networks. The defaults are the shipped model; tests use a tiny one."""

    image_size: int = 64
    vae_channels: tuple = (32, 64, 64)       # 3 levels: 64x64 image -> 16x16 latent
    latent_channels: int = 4
    unet_channels: tuple = (64, 96, 128)    # cross-attention at 16x16, 8x8, 4x4 (+ mid block at 4x4)
    unet_layers_per_block: int = 1
    heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


TINY = ModelConfig(vae_channels=(8, 16, 16), unet_channels=(16, 16, 32), heads=2, text_hidden=32,
                   text_layers=1, text_heads=2)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    levels = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels,
                         norm_num_groups=min(8, cfg.vae_channels[0]), sample_size=cfg.image_size)


def latent_size(cfg: ModelConfig) -> int:
    return cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    levels = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size(cfg), in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=min(16, cfg.unet_channels[0]))


def build_text_encoder(cfg: ModelConfig, tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
                            intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                            num_attention_heads=cfg.text_heads, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_hidden)
    return CLIPTextModel(config)


def build_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDIMScheduler:
    """SD's noise schedule, with DDIM sampling as the shipped default.

    SD's schedule leaves sqrt(alpha_bar) = 0.068 of the image in the last training step, so sampling
    starts from noise that lacks what the model saw in training. `zero_terminal_snr` rescales the betas
    so the last step is pure noise (Lin et al. 2024); it needs v-prediction and "trailing" spacing,
    which starts sampling at the last training step.
    """
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("a zero terminal SNR schedule needs prediction_type='v_prediction'")
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=0 if zero_terminal_snr else 1, prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_terminal_snr,
                         timestep_spacing="trailing" if zero_terminal_snr else "leading")


def random_pipeline(cfg: ModelConfig = TINY, seed: int = 0):
    """An untrained StableDiffusionPipeline of the shapes architecture, for smoke runs and tests."""
    import torch
    from diffusers import StableDiffusionPipeline

    from headscope.shapes.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pipe = StableDiffusionPipeline(vae=build_vae(cfg), text_encoder=build_text_encoder(cfg, tokenizer),
                                   tokenizer=tokenizer, unet=build_unet(cfg), scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
