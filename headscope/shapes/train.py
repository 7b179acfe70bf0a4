"""Training of the embedded shapes model: VAE, latent encoding, then UNet + text encoder.

Every stage is seeded, checkpoints periodically into a run folder and resumes from its last
checkpoint when started again with the same folder. The data order and the noise of step t depend
only on (seed, t), so an interrupted and resumed run sees the same batches as an uninterrupted one.
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

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from headscope.io import atomic_path, replace_folder, write_json
from headscope.shapes.model import (ModelConfig, build_scheduler, build_text_encoder, build_unet, build_vae,
                                    latent_size)
from headscope.shapes.runs import EMA, load_checkpoint, save_checkpoint, split_prefix, starting_point
from headscope.shapes.runs import log as log_record
from headscope.shapes.tokenizer import build_tokenizer
from headscope.shapes.world import SceneSampler, render


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved as run.json in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    vae_steps: int = 1800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    n_scenes: int = 50_000
    unet_steps: int = 12_000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    warmup: int = 300
    ema_decay: float = 0.999
    min_snr: float = 5.0
    # SD's recipe: epsilon on SD's schedule. Its last step leaks 7% of the image; our model trained on
    # it put "left" and "right" where the seed said, not the word (benchmarks/position_probe.py), as if
    # it took the layout from that leak. v-prediction on a zero terminal SNR schedule (see
    # build_scheduler) removes the leak; the shipped model is this recipe's 8,500 steps fine-tuned with
    # it (README: "training recipe").
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    # Start the UNet and text encoder (weights and EMA) from another run's UNet checkpoint, and reuse
    # that run's VAE and latent cache: a fine-tuning phase with its own run folder and log.
    init_from: str | None = None
    # Layout is decided at high noise, from the text alone, and is learned last. These shares of each
    # batch draw the timestep from the top `high_noise_from` part of the schedule and the scene from
    # the scenes whose caption says a position (0 = the plain recipe).
    high_noise_share: float = 0.0
    high_noise_from: int = 600
    position_share: float = 0.0
    cond_dropout: float = 0.1
    color_jitter: float = 8.0
    checkpoint_every: int = 500
    export_every: int = 1000
    log_every: int = 50

    def to_json(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        data = dict(data)  # fields missing from older run folders take the defaults, their recipe then
        data["model"] = ModelConfig.from_json(data["model"])
        return cls(**data)


def _render_batch(sampler: SceneSampler, n: int, jitter: float) -> tuple[torch.Tensor, list[str]]:
    """Returns images `[n, 3, H, W]` in [-1, 1] and their captions."""
    images, captions = [], []
    for _ in range(n):
        scene = sampler.sample()
        image, _ = render(scene, color_jitter=jitter, rng=sampler.rng)
        images.append(image)
        captions.append(scene.caption)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return batch, captions


# ----------------------------------------------------------------------------------------------- VAE
def vae_loss(vae, images: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    """Foreground-weighted L1: objects are a small part of a black canvas, and their edges decide shape."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample.float()
    foreground = (images.amax(dim=1, keepdim=True) > -0.8).float()
    weight = 1.0 + 4.0 * F.max_pool2d(foreground, 3, stride=1, padding=1)
    return (weight * (recon - images).abs()).mean() + kl_weight * posterior.kl().mean()


def train_vae(run_dir: Path, cfg: TrainConfig, *, progress: bool = True):
    ckpt = run_dir / "vae"
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    weights, state = load_checkpoint(ckpt)
    start = 0
    if state is not None:
        vae.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        if state.get("done"):
            return vae
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", disable=not progress, initial=start, total=cfg.vae_steps)
    for step in bar:
        sampler = SceneSampler(seed=cfg.seed * 1_000_003 + step)
        images, _ = _render_batch(sampler, cfg.vae_batch, cfg.color_jitter)
        lr = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vae_loss(vae, images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0:
            log_record(run_dir, {"stage": "vae", "step": step, "loss": loss.item(), "lr": lr, "time": time.time()})
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, vae.state_dict(), {"optimizer": opt.state_dict(), "step": step + 1})
    save_checkpoint(ckpt, vae.state_dict(), {"optimizer": opt.state_dict(), "step": cfg.vae_steps, "done": True})
    return vae


# -------------------------------------------------------------------------------------- latent cache
@torch.no_grad()
def encode_dataset(run_dir: Path, cfg: TrainConfig, vae, *, progress: bool = True) -> dict:
    """Render n_scenes training scenes once and keep their latent posteriors (mean, std)."""
    out = run_dir / "latents.safetensors"
    if out.is_file():
        return json.loads((run_dir / "latents.json").read_text())
    vae.eval()
    sampler = SceneSampler(seed=cfg.seed + 7919)
    means, stds, captions = [], [], []
    chunk = 250
    for _ in tqdm(range(math.ceil(cfg.n_scenes / chunk)), desc="encode", disable=not progress):
        images, caps = _render_batch(sampler, chunk, cfg.color_jitter)
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        captions += caps
    mean, std = torch.cat(means)[: cfg.n_scenes].contiguous(), torch.cat(stds)[: cfg.n_scenes].contiguous()
    scaling = 1.0 / float(mean.float().std())
    meta = {"captions": captions[: cfg.n_scenes], "scaling_factor": scaling}
    write_json(run_dir / "latents.json", meta)
    with atomic_path(out) as temporary:  # last: its presence marks the stage as done
        save_file({"mean": mean, "std": std}, str(temporary))
    return meta


# ------------------------------------------------------------------------------------ UNet + text
def _named(unet, text_encoder) -> dict[str, torch.Tensor]:
    params = {f"unet.{k}": v for k, v in unet.named_parameters()}
    params.update({f"text.{k}": v for k, v in text_encoder.named_parameters()})
    return params


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction type.

    Epsilon: min(SNR, gamma) / SNR. For v-prediction the plain v-loss weighs the x0 error by SNR + 1;
    we cap that at gamma, min(SNR + 1, gamma) / (SNR + 1), rather than use min(SNR, gamma) / (SNR + 1),
    which would give the pure-noise steps, where the layout is decided from the text alone, no weight.
    """
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def training_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    return noise


def _says_position(caption: str) -> bool:
    from headscope.shapes.world import POSITION_PHRASES

    return any(phrase in caption for phrase in POSITION_PHRASES.values())


def train_unet(run_dir: Path, cfg: TrainConfig, vae, meta: dict, *, progress: bool = True,
               on_export=None) -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder = build_unet(cfg.model), build_text_encoder(cfg.model, tokenizer)
    scheduler = build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr)
    params = _named(unet, text_encoder)
    opt = torch.optim.AdamW(params.values(), lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMA(params, cfg.ema_decay)
    ckpt = run_dir / "unet"
    weights, state = starting_point(run_dir, "unet", cfg.init_from)
    start = 0
    if weights is not None:
        unet.load_state_dict(split_prefix(weights, "model.unet"), strict=False)
        text_encoder.load_state_dict(split_prefix(weights, "model.text"), strict=False)
        ema.shadow = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
    if state is not None:  # resuming this run: its optimizer and step too
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    latents = load_file(str(run_dir / "latents.safetensors"))
    mean, std = latents["mean"], latents["std"]
    captions = meta["captions"]
    scaling = meta["scaling_factor"]
    n = len(captions)
    positioned = torch.tensor([i for i, caption in enumerate(captions) if _says_position(caption)], dtype=torch.long)
    unet.train(), text_encoder.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", disable=not progress, initial=start,
               total=cfg.unet_steps)
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        epoch, offset = divmod(step * cfg.unet_batch, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        idx = order[offset: offset + cfg.unet_batch]
        n_position = int(round(cfg.position_share * cfg.unet_batch)) if len(positioned) else 0
        if n_position:
            picks = torch.randint(0, len(positioned), (n_position,), generator=gen)
            idx = torch.cat([idx[: cfg.unet_batch - n_position], positioned[picks]])
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=gen)) * scaling
        drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        n_high = int(round(cfg.high_noise_share * len(idx)))
        if n_high:
            t[:n_high] = torch.randint(cfg.high_noise_from, scheduler.config.num_train_timesteps, (n_high,),
                                       generator=gen)
        noisy = scheduler.add_noise(z0, noise, t)
        lr = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        per_sample = (pred - training_target(scheduler, z0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, cfg.min_snr)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0:
            log_record(run_dir, {"stage": "unet", "step": step, "loss": loss.item(), "lr": lr, "time": time.time()})
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            tensors = {f"model.{k}": v for k, v in params.items()}
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
            save_checkpoint(ckpt, tensors, {"optimizer": opt.state_dict(), "step": done})
        if done % cfg.export_every == 0 or done == cfg.unet_steps:
            target = export_pipeline(run_dir, cfg, vae, ema.shadow, scaling, run_dir / "pipeline")
            log_record(run_dir, {"stage": "export", "step": done, "path": str(target), "time": time.time()})
            if on_export is not None:
                on_export(done, target)


def export_pipeline(run_dir: Path, cfg: TrainConfig, vae, weights: dict[str, torch.Tensor], scaling: float,
                    out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write an ordinary StableDiffusionPipeline folder (save_pretrained) from EMA weights, atomically."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer()
    vae = copy.deepcopy(vae)
    unet, text_encoder = build_unet(cfg.model), build_text_encoder(cfg.model, tokenizer)
    unet.load_state_dict(split_prefix(weights, "unet"), strict=False)
    text_encoder.load_state_dict(split_prefix(weights, "text"), strict=False)
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=dtype)
    stage = out.with_name(f".{out.name}.stage")
    shutil.rmtree(stage, ignore_errors=True)
    pipe.save_pretrained(stage)
    write_json(stage / "headscope.json", {"kind": "shapes-world", "train_config": cfg.to_json(),
                                          "latent_size": latent_size(cfg.model), "image_size": cfg.model.image_size})
    return replace_folder(stage, out)


def ship(pipeline: Path, target: Path, defaults: dict) -> Path:
    """Copy an exported pipeline folder to `target` (atomically) and record generation defaults in it.

    `defaults` are merged over the export's own (an SD3-style export records its max_sequence_length).
    Its headscope.json also gets the phases its weights went through (`training_phases`) and their
    total steps (`unet_steps_trained` for a UNet run, `steps_trained` for an SD3-style one).
    """
    from headscope.errors import HeadscopeError

    pipeline, target = Path(pipeline), Path(target)
    if not (pipeline / "model_index.json").is_file():
        raise HeadscopeError(f"{pipeline} holds no exported pipeline; train until the first export")
    stage = target.with_name(f".{target.name}.stage")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(pipeline, stage)
    meta = json.loads((stage / "headscope.json").read_text())
    meta["defaults"] = {**meta.get("defaults", {}), **defaults}
    if meta.get("arch", "unet") == "unet":
        phases, total = training_phases(pipeline.parent), "unet_steps_trained"
    else:
        from headscope.shapes.train_mmdit import MMDiTTrainConfig

        phases = training_phases(pipeline.parent, lambda data: MMDiTTrainConfig.from_json(data).to_json(), "steps")
        total = "steps_trained"
    if phases:
        steps_key = "unet_steps" if total == "unet_steps_trained" else "steps"
        meta[total] = sum(phase[steps_key] or 0 for phase in phases)
        meta["phases"] = phases
    write_json(stage / "headscope.json", meta)
    return replace_folder(stage, target)


def training_phases(run_dir: Path, recipe=None, steps_key: str = "unet_steps") -> list[dict]:
    """The runs a run's weights went through, oldest first: each with its recipe and its steps.

    A run started with `init_from` continues another run's checkpoint; its log records the step it
    took, so a fine-tuned model names both recipes and how long each one trained. `recipe` turns a
    run.json into the recorded recipe (default: the UNet trainer's, older runs get its defaults);
    `steps_key` names each phase's step count.
    """
    recipe = recipe or (lambda data: TrainConfig.from_json(data).to_json())
    run_dir = Path(run_dir)
    log, saved = run_dir / "log.jsonl", run_dir / "run.json"
    if not log.is_file() or not saved.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    exports = [r["step"] for r in records if r.get("stage") == "export"]
    phase = {"run_dir": str(run_dir), "train_config": recipe(json.loads(saved.read_text())),
             steps_key: exports[-1] if exports else None}
    inits = [r for r in records if r.get("stage") == "init"]
    if not inits:
        return [phase]
    earlier = training_phases(Path(inits[-1]["from"]), recipe, steps_key)
    if earlier:
        earlier[-1][steps_key] = inits[-1]["step"]  # the checkpoint this run started from
    return earlier + [phase]


def _reuse_data(source: Path, run_dir: Path) -> None:
    """Link the finished VAE and latent cache of `source` into `run_dir` (copies where links fail)."""
    for name in ("vae/weights.safetensors", "vae/state.pt", "latents.json", "latents.safetensors"):
        src, dst = source / name, run_dir / name
        if dst.exists():
            continue
        if not src.is_file():
            raise FileNotFoundError(f"{source} has no {name}; finish its VAE and encoding stages first")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def train(run_dir: str | Path, cfg: TrainConfig | None = None, *, progress: bool = True, on_export=None) -> Path:
    """Run (or resume) all stages in `run_dir`; returns the exported pipeline folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "run.json"
    if saved.is_file():
        cfg = TrainConfig.from_json(json.loads(saved.read_text())) if cfg is None else cfg
    cfg = cfg or TrainConfig()
    write_json(saved, cfg.to_json())
    if cfg.init_from:
        _reuse_data(Path(cfg.init_from), run_dir)
    vae = train_vae(run_dir, cfg, progress=progress)
    meta = encode_dataset(run_dir, cfg, vae, progress=progress)
    train_unet(run_dir, cfg, vae, meta, progress=progress, on_export=on_export)
    return run_dir / "pipeline"


if __name__ == "__main__":
    import sys

    torch.set_num_threads(int(os.environ.get("HEADSCOPE_THREADS", "2")))
    train(sys.argv[1])
