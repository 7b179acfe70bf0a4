"""Tiny random-weight diffusers pipelines built from configs, offline, for tests and benchmarks.

The tokenizer is a real CLIPTokenizer read from a small vocab.json + merges.txt written on the spot:
the words in SINGLE_TOKEN_WORDS are one token each, "giraffe" splits into two ("gir" + "affe"),
and any other word falls back to one token per letter. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SINGLE_TOKEN_WORDS = ["a", "an", "the", "of", "and", "on", "photo", "red", "blue", "green", "dog", "cat",
                      "circle", "square", "big", "small", "with", "bird", "tree", "sky"]
SPLIT_WORDS = {"giraffe": ["gir", "affe"]}
MAX_TOKENS = 24  # tokenizer.model_max_length: keeps key counts small and long prompts cheap to build
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable characters, one per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _apply_merges(symbols: list[str], ranks: dict) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while True:
        ranked = [(ranks[pair], position) for position, pair in enumerate(zip(symbols, symbols[1:]))
                  if pair in ranks]
        if not ranked:
            return symbols
        _, position = min(ranked)
        symbols = symbols[:position] + [symbols[position] + symbols[position + 1]] + symbols[position + 2:]


def _merges_making_whole(pieces: list[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which every piece ("dog</w>", "gir") is a single token."""
    merges: list[tuple[str, str]] = []
    changed = True
    while changed:
        changed = False
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        for piece in pieces:
            symbols = list(piece[:-4]) if piece.endswith("</w>") else list(piece)
            if piece.endswith("</w>"):
                symbols[-1] += "</w>"
            encoded = _apply_merges(symbols, ranks)
            if len(encoded) > 1:
                merges.append((encoded[0], encoded[1]))
                changed = True
                break
    return merges


def write_tokenizer_files(folder, extra_words=()) -> None:
    """vocab.json + merges.txt of a small CLIP BPE vocabulary (`extra_words`: more single-token words)."""
    alphabet = _bytes_to_unicode()
    vocab_list = alphabet + [char + "</w>" for char in alphabet]
    singles = list(dict.fromkeys([*SINGLE_TOKEN_WORDS, *extra_words]))
    pieces = [word + "</w>" for word in singles]
    for parts in SPLIT_WORDS.values():
        pieces += parts[:-1] + [parts[-1] + "</w>"]
    merges = _merges_making_whole(pieces)
    for left, right in merges:
        if left + right not in vocab_list:
            vocab_list.append(left + right)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer(folder: Path):
    """A CLIPTokenizer read back from the vocabulary files written into `folder`."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def text_config(tokenizer, hidden: int = 32, projection: int = 32):
    """A two-layer CLIP text encoder config matching `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=projection)


def tiny_vae():
    """AutoencoderKL with two levels: VAE scale factor 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def ddim_scheduler():
    """DDIM with Stable Diffusion's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd(folder: str | Path):
    """StableDiffusionPipeline: cross-attention at 8x8 and 4x4 latents, 2 and 4 heads, 7 layers, 22 heads."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer-src")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(tokenizer)),
                                   tokenizer=tokenizer, unet=unet, scheduler=ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def build_tiny_sdxl(folder: str | Path):
    """StableDiffusionXLPipeline: two text encoders, text_time embedding, 8 layers x 4 heads at 4x4."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer-src")
    tokenizer_2 = build_tokenizer(folder / "tokenizer-2-src")
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        cross_attention_dim=64, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, projection=pooled_dim)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=ddim_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def generate(pipe, prompt, *, seed: int = 0, steps: int = 2, **options) -> torch.Tensor:
    """Run the pipeline with a fixed seed; images as a float tensor [n, 3, H, W]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pt", **options).images


SHAPES_CONCEPTS = {"color": ["red", "blue", "green"], "shape": ["circle", "square"], "size": ["big", "small"]}


def random_hrv(pipe, concepts: dict | None = None, *, seed: int = 0):
    """An HRV with random rows (mean 1, values in (0, 3)) for `pipe`'s head layout (any backbone: UNet,
    SD3, Flux), for tests and --tiny runs.

    `concepts` maps concept names to their words (stored as the HRV's concept set); default
    SHAPES_CONCEPTS, whose words the tiny tokenizer knows.
    """
    from headscope.heads import HeadIndex
    from headscope.hrv import HRV, head_meta

    concepts = dict(concepts or SHAPES_CONCEPTS)
    index = HeadIndex.from_model(pipe)
    generator = torch.Generator().manual_seed(seed)
    vectors = 0.05 + torch.rand(len(concepts), index.n_heads, generator=generator)
    vectors = vectors / vectors.mean(dim=1, keepdim=True)  # [concepts, heads], each row mean 1
    meta = {**head_meta(index), "concept_set": {"name": "test", "concepts": concepts}, "model": {"name_or_path": "tiny"}}
    return HRV(concepts=list(concepts), vectors=vectors, step_votes=None, meta=meta)


def build_tiny_clip(folder: str | Path, tokenizer) -> Path:
    """A random-weight CLIPModel (16x16 images) with `tokenizer` and an image processor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": MAX_TOKENS, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def build_tiny_shapes():
    """The embedded model's architecture at its TINY size, random weights, with the shapes-world
    word-level tokenizer: every shapes caption fits, and the annotator can score its (noise) images."""
    from diffusers import StableDiffusionPipeline

    from headscope.shapes.model import TINY, build_scheduler, build_text_encoder, build_unet, build_vae
    from headscope.shapes.tokenizer import build_tokenizer as build_shapes_tokenizer

    torch.manual_seed(0)
    tokenizer = build_shapes_tokenizer()
    pipe = StableDiffusionPipeline(vae=build_vae(TINY), text_encoder=build_text_encoder(TINY, tokenizer),
                                   tokenizer=tokenizer, unet=build_unet(TINY), scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
