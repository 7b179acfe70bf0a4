"""Training of the SD3-style shapes model: rectified flow on the shipped VAE's latents, text jointly.

The recipe keeps what the UNet trainer (`headscope.shapes.train`) learned and reuses its pieces:
the same 50,000 training scenes (same seed, same latent cache code), EMA of the weights, 10% caption
dropout to "" (the pipeline's negative prompt, so CFG's unconditional row is a trained one), text
encoders trained with the transformer, checkpoints every 500 steps, resumable, and the data and noise
of step t depend only on (seed, t). What changes with the family:

- Rectified flow as SD3: z_t = (1 - s) z0 + s eps, target eps - z0, timestep s * 1000. s = 1 is pure
  noise, so the first sampling step sees no trace of the image: the layout can only come from the text
  (the UNet's SD schedule leaked it, README "training recipe").
- s is drawn logit-normal(0, 1) pushed through the sampling shift (as diffusers' SD3 trainer draws
  from the shifted scheduler sigmas), and a `high_noise_share` of each batch uniform on
  [high_noise_from, 1]: layout is decided there, from the text alone, and the UNet learned it last.
- The frozen VAE is the shipped one; the transformer and the three text encoders train together.

    OMP_WAIT_POLICY=PASSIVE nice -n 19 python -m headscope.shapes.train_mmdit --run runs/mmdit --steps 8000

On a shared 2-core machine, OpenMP's spinning threads stall each other whenever one is descheduled:
measured at nice 19 beside other jobs, 5 blocks took 7-20 s/step with 2 spinning threads, 3.5 with 1,
2.6 with 2 passive ones (1.0 s/step on idle cores). The policy must be set before torch starts.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from headscope.io import replace_folder, write_json
from headscope.shapes.mmdit import (TINY_MMDIT, MMDiTConfig, assemble, build_flow_scheduler, build_text_encoders,
                                    build_transformer, encode_captions, load_shipped_vae, warm_start_clip1)
from headscope.shapes.tokenizer import build_tokenizer
from headscope.shapes.runs import EMA, save_checkpoint, split_prefix, starting_point
from headscope.shapes.runs import log as log_record
from headscope.shapes.train import TrainConfig, encode_dataset

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # the trained modules, by pipeline name


@dataclass
class MMDiTTrainConfig:
    """Everything that decides a run; saved as run.json in the run folder."""

    model: MMDiTConfig = field(default_factory=MMDiTConfig)
    seed: int = 0
    n_scenes: int = 50_000
    steps: int = 8_000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 300
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    color_jitter: float = 8.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    high_noise_share: float = 0.2
    high_noise_from: float = 0.8
    warm_start_text: bool = True     # CLIP-1 from the shipped UNet model's text encoder
    latents_from: str | None = None  # another run folder whose latent cache to reuse
    # A fine-tuning phase: weights and EMA from another run's checkpoint (its latent cache reused),
    # `pair_share` of each batch drawn from the two-object scenes, and the learning rate taken from
    # `lr` down to `lr_final` on a cosine over the phase (None: constant).
    init_from: str | None = None
    pair_share: float = 0.0
    lr_final: float | None = None
    checkpoint_every: int = 500
    export_every: int = 1000
    log_every: int = 50
    guidance: float = 5.0            # generation defaults written into the export's headscope.json
    inference_steps: int = 25

    def to_json(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "MMDiTTrainConfig":
        data = dict(data)
        data["model"] = MMDiTConfig.from_json(data["model"])
        return cls(**data)


def tiny_config(**overrides) -> MMDiTTrainConfig:
    """A seconds-long run on the tiny architecture, for smoke tests."""
    settings = dict(model=TINY_MMDIT, n_scenes=64, steps=20, batch=4, warmup=5, warm_start_text=False,
                    checkpoint_every=10, export_every=20, log_every=5)
    settings.update(overrides)
    return MMDiTTrainConfig(**settings)


def sample_sigmas(cfg: MMDiTTrainConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1] for one batch, `[n]`; see the module docstring for the mixture."""
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))
    shift = cfg.model.shift
    sigmas = shift * u / (1 + (shift - 1) * u)
    n_high = int(round(cfg.high_noise_share * n))
    if n_high:
        sigmas[:n_high] = cfg.high_noise_from + (1 - cfg.high_noise_from) * torch.rand(n_high, generator=gen)
    return sigmas


def batch_indices(cfg: MMDiTTrainConfig, step: int, n: int, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Scene indices of step `step`, `[batch]`: epochs are seeded permutations, so only (seed, step) count.

    `pairs`: indices of the two-object scenes, from which the last `pair_share` of the batch is drawn.
    """
    epoch, offset = divmod(step * cfg.batch, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    idx = order[offset: offset + cfg.batch]
    if len(idx) < cfg.batch:  # the batch crosses an epoch boundary: finish it from the next epoch
        after = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch + 1))
        idx = torch.cat([idx, after[: cfg.batch - len(idx)]])
    n_pair = int(round(cfg.pair_share * cfg.batch)) if pairs is not None and len(pairs) else 0
    if n_pair:
        picks = torch.randint(0, len(pairs), (n_pair,), generator=torch.Generator().manual_seed(cfg.seed + 7 * step + 1))
        idx = torch.cat([idx[: cfg.batch - n_pair], pairs[picks]])
    return idx


def pair_scenes(captions: list[str]) -> torch.Tensor:
    """Indices of the two-object scenes: the world's grammar joins two objects, and only two, with "and"."""
    return torch.tensor([i for i, caption in enumerate(captions) if " and " in caption], dtype=torch.long)


def learning_rate(cfg: MMDiTTrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then constant, or a cosine down to `lr_final` at the last step."""
    warm = min(1.0, (step + 1) / cfg.warmup)
    if cfg.lr_final is None:
        return cfg.lr * warm
    progress = min(1.0, max(0, step + 1 - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return warm * (cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def _modules(cfg: MMDiTTrainConfig, tokenizer) -> dict[str, torch.nn.Module]:
    encoders = build_text_encoders(cfg.model, tokenizer)
    return {"transformer": build_transformer(cfg.model), **dict(zip(COMPONENTS[1:], encoders))}


def _named(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in COMPONENTS for k, v in modules[name].named_parameters()}


def _latent_cache(run_dir: Path, cfg: MMDiTTrainConfig, vae, progress: bool) -> dict:
    """The UNet trainer's latent cache of the training scenes (made, or linked from `latents_from`)."""
    source = cfg.latents_from or cfg.init_from
    if source:
        for name in ("latents.json", "latents.safetensors"):
            src, dst = Path(source) / name, run_dir / name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    recipe = TrainConfig(seed=cfg.seed, n_scenes=cfg.n_scenes, color_jitter=cfg.color_jitter)
    return encode_dataset(run_dir, recipe, vae, progress=progress)


def train_mmdit(run_dir: str | Path, cfg: MMDiTTrainConfig | None = None, *, progress: bool = True,
                on_export=None) -> Path:
    """Run (or resume) training in `run_dir`; returns the exported pipeline folder `run_dir/pipeline`.

    A folder's run.json wins over `cfg` except for `steps`, so a finished run can be extended.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "run.json"
    if saved.is_file():
        stored = MMDiTTrainConfig.from_json(json.loads(saved.read_text()))
        if cfg is not None:
            stored.steps = cfg.steps
        cfg = stored
    cfg = cfg or MMDiTTrainConfig()
    write_json(saved, cfg.to_json())
    vae = load_shipped_vae()
    meta = _latent_cache(run_dir, cfg, vae, progress)
    scaling = float(vae.config.scaling_factor)  # the pipeline divides by it: the VAE's, not the cache's

    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed + 1)
    modules = _modules(cfg, tokenizer)
    if cfg.warm_start_text:
        warm_start_clip1(modules["text_encoder"])
    # training text goes through this pipeline's own encode_prompt
    pipe = assemble(vae, modules["transformer"], [modules[name] for name in COMPONENTS[1:]], tokenizer,
                    build_flow_scheduler(cfg.model))
    params = _named(modules)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=1e-2)
    ema = EMA(params, cfg.ema_decay)
    weights, state = starting_point(run_dir, "checkpoint", cfg.init_from)
    start = 0
    if weights is not None:
        for name in COMPONENTS:
            modules[name].load_state_dict(split_prefix(weights, f"model.{name}"), strict=False)
        ema.shadow = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
    if state is not None:  # resuming this run: its optimizer and step too
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log_record(run_dir, {"stage": "resume", "step": start, "time": time.time()})
    elif not cfg.init_from:
        log_record(run_dir, {"stage": "start", "cache_scaling": meta["scaling_factor"], "scaling": scaling,
                       "time": time.time()})

    latents = load_file(str(run_dir / "latents.safetensors"))
    mean, std, captions = latents["mean"], latents["std"], meta["captions"]
    pairs = pair_scenes(captions) if cfg.pair_share else None
    for module in modules.values():
        module.train()
    bar = tqdm(range(start, cfg.steps), desc="mmdit", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        loss = _train_step(cfg, step, pipe, modules["transformer"], mean, std, captions, scaling, pairs)
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params, step)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.log_every == 0:
            log_record(run_dir, {"stage": "mmdit", "step": step, "loss": loss, "lr": lr, "time": time.time()})
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tensors = {f"model.{k}": v for k, v in params.items()}
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
            save_checkpoint(run_dir / "checkpoint", tensors, {"optimizer": opt.state_dict(), "step": done})
        if done % cfg.export_every == 0 or done == cfg.steps:
            target = export_pipeline(cfg, vae, ema.shadow, run_dir / "pipeline", steps_trained=done)
            log_record(run_dir, {"stage": "export", "step": done, "path": str(target), "time": time.time()})
            if on_export is not None:
                on_export(done, target)
    return run_dir / "pipeline"


def _train_step(cfg: MMDiTTrainConfig, step: int, pipe, transformer, mean: torch.Tensor, std: torch.Tensor,
                captions: list[str], scaling: float, pairs: torch.Tensor | None = None) -> float:
    """Forward and backward of one batch; returns the loss. `mean`/`std`: the cache, `[n, 4, 16, 16]`."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = batch_indices(cfg, step, len(captions), pairs)
    z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=gen)) * scaling
    drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
    texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
    noise = torch.randn(z0.shape, generator=gen)
    sigmas = sample_sigmas(cfg, len(idx), gen)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * z0 + sigmas.view(-1, 1, 1, 1) * noise
    embeds, pooled = encode_captions(pipe, texts, cfg.model.max_sequence_length)
    pred = transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                       pooled_projections=pooled).sample
    loss = (pred - (noise - z0)).pow(2).mean()
    loss.backward()
    return loss.item()


def export_pipeline(cfg: MMDiTTrainConfig, vae, weights: dict[str, torch.Tensor], out: Path, *,
                    steps_trained: int, dtype: torch.dtype = torch.float16) -> Path:
    """Write a StableDiffusion3Pipeline folder (save_pretrained) from EMA weights, atomically.

    Its headscope.json records the recipe and the generation defaults, `max_sequence_length`
    included: the transformer was trained on exactly that many T5 tokens.
    """
    tokenizer = build_tokenizer()
    modules = _modules(cfg, tokenizer)
    for name in COMPONENTS:
        modules[name].load_state_dict(split_prefix(weights, name), strict=False)
    pipe = assemble(copy.deepcopy(vae), modules["transformer"], [modules[name] for name in COMPONENTS[1:]],
                    tokenizer, build_flow_scheduler(cfg.model))
    pipe.to(dtype=dtype)
    stage = out.with_name(f".{out.name}.stage")
    shutil.rmtree(stage, ignore_errors=True)
    pipe.save_pretrained(stage)
    write_json(stage / "headscope.json", {
        "kind": "shapes-world", "arch": "mmdit", "train_config": cfg.to_json(),
        "latent_size": cfg.model.latent_size, "image_size": 4 * cfg.model.latent_size,
        "defaults": {"guidance_scale": cfg.guidance, "num_inference_steps": cfg.inference_steps,
                     "max_sequence_length": cfg.model.max_sequence_length},
        "steps_trained": steps_trained})
    return replace_folder(stage, out)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train (or resume) the SD3-style shapes model.")
    parser.add_argument("--run", required=True, type=Path, help="run folder; start again with it to resume")
    parser.add_argument("--steps", type=int, default=None, help="total steps (raise it to extend a run)")
    parser.add_argument("--tiny", action="store_true", help="the tiny smoke-test configuration")
    parser.add_argument("--n-scenes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--latents-from", type=Path, default=None, help="reuse this run's latent cache")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="fine-tune: start from this run's checkpoint (weights and EMA) and latent cache")
    parser.add_argument("--pair-share", type=float, default=None, help="share of each batch from two-object scenes")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lr-final", type=float, default=None, help="cosine decay of the learning rate to this")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tiny_config() if args.tiny else MMDiTTrainConfig()
    for name in ("steps", "n_scenes", "seed", "pair_share", "lr", "lr_final", "warmup"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.latents_from is not None:
        cfg.latents_from = str(args.latents_from.resolve())
    if args.init_from is not None:
        cfg.init_from = str(args.init_from.resolve())
    if args.steps is None and (args.run / "run.json").is_file():  # resuming: keep the stored step count
        cfg = None
    print(f"exported pipeline: {train_mmdit(args.run, cfg, progress=not args.no_progress)}")


if __name__ == "__main__":
    main()
