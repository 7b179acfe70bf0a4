"""Real-size denoisers in ordinary diffusers pipelines, offline: for benchmarks of real layouts on a CPU.

`build_real_size(config)` builds a UNet2DConditionModel (SD 1.x / SDXL), SD3Transformer2DModel or
FluxTransformer2DModel from its real config (a subset of blocks is the caller's choice) on the `meta`
device and fills its weights cheaply (`materialize`: minutes of random initialisation saved on
billions of parameters), then wraps it in its pipeline with text encoders that are one-layer
stand-ins of the real output widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) and CLIP's 77 positions,
over the tokenizers of `headscope.testing` / `headscope.testing_joint`. The VAE is a four-level
stand-in (scale factor 8) meant for `output_type="latent"`. `words` become single tokens of both
tokenizers (as most English words are of the real CLIP and T5 vocabularies), so concept sets such as
the HRV paper's encode as they would on the real model. Nothing is downloaded.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def build_real_size(config: dict, words=()):
    """The pipeline of a real denoiser config (`_class_name` picks SD / SDXL / SD3 / Flux), random weights,
    fp32, eval mode, progress bars off. Text encoders are one-layer stand-ins (see the module docstring)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from headscope.backbones import backbone_for, model_class_for_config
    from headscope.testing import ddim_scheduler

    with torch.device("meta"):  # no slow initialisation of billions of weights: `materialize` fills them
        model = model_class_for_config(config).from_config(dict(config))
    materialize(model)
    family = backbone_for(model).family
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(Path(tempfile.mkdtemp(prefix="headscope-real-")), words)
    clip_l = clip_config(tokenizer, 768)
    clip_g = clip_config(tokenizer, 1280)
    if family == "unet" and model.config.addition_embed_type != "text_time":
        pipe = StableDiffusionPipeline(vae=tiny_vae(4), text_encoder=CLIPTextModel(clip_l), tokenizer=tokenizer,
                                       unet=model, scheduler=ddim_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif family == "unet":  # SDXL: two CLIP encoders, the second one's pooled output
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=CLIPTextModel(clip_l), tokenizer=tokenizer,
                                         text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tokenizer,
                                         unet=model, scheduler=ddim_scheduler())
    elif family == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=tiny_vae(16), text_encoder=CLIPTextModelWithProjection(clip_l),
                                        tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(clip_g),
                                        tokenizer_2=tokenizer, text_encoder_3=t5_stand_in(words), tokenizer_3=t5_tokenizer(words))
    else:
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(16),
                            text_encoder=CLIPTextModel(clip_l), tokenizer=tokenizer, text_encoder_2=t5_stand_in(words),
                            tokenizer_2=t5_tokenizer(words), transformer=model)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def materialize(model, seed: int = 0) -> None:
    """Give a model built on `meta` CPU storage: matrices and kernels get one random block tiled, scaled by
    1/sqrt(fan_in) (activations stay of order 1, no denormals); norm weights 1; biases and buffers 0."""
    noise = torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed))
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            if parameter.ndim == 1:
                values = torch.ones(parameter.shape) if name == "weight" else torch.zeros(parameter.shape)
            else:
                flat = torch.empty(parameter.numel())
                for start in range(0, flat.numel(), noise.numel()):
                    flat[start:start + noise.numel()] = noise[:flat.numel() - start]
                values = flat.view(parameter.shape) * (parameter[0].numel() ** -0.5)
            module._parameters[name] = torch.nn.Parameter(values, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def clip_tokenizer(folder: Path, words=()):
    from transformers import CLIPTokenizer

    from headscope.testing import write_tokenizer_files

    write_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def clip_config(tokenizer, width: int):
    """A one-layer CLIP text encoder of the real width (and projection) and 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=width // 64, max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=width)


def t5_tokenizer(words=()):
    from headscope.testing_joint import build_t5_tokenizer

    return build_t5_tokenizer(words)


def t5_stand_in(words=()):
    """A one-layer T5 encoder with T5-XXL's output width (4096)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(words)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=64, num_layers=1,
                                   num_heads=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def tiny_vae(latent_channels: int):
    """An AutoencoderKL with four levels (scale factor 8, as the real ones) that is never run (latents out)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                         shift_factor=0.0)
