"""`headscope shapes ...`: the shapes world — render scenes, train the embedded model, score a model."""
from __future__ import annotations

import json
from pathlib import Path

import click

from headscope.errors import HeadscopeError
from headscope_cli.common import MODEL_HELP
from headscope.io import write_json
from headscope_cli.common import SEED, Finite, claim_output


@click.group("shapes")
def shapes():
    """The shapes world: synthetic scenes with ground truth, and the embedded model trained on them."""


@shapes.command("render")
@click.option("--n", "count", default=16, show_default=True, type=click.IntRange(1, 1024), help="Scenes to render.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/shapes"),
              show_default=True, callback=claim_output)
def render_cmd(count: int, seed: int, out: Path):
    """Render sampled scenes with their captions and ground truth (scenes.json) and a contact sheet.

    Example: headscope shapes render --n 16 --out out/shapes
    """
    from PIL import Image

    from headscope.io import staged_folder
    from headscope.shapes.world import SceneSampler, render

    sampler = SceneSampler(seed=seed)
    scenes, tiles = [], []
    with staged_folder(out) as stage:
        for i in range(count):
            scene = sampler.sample()
            image, _ = render(scene)
            Image.fromarray(image).save(stage / f"scene-{i:03d}.png")
            scenes.append({"file": f"scene-{i:03d}.png", **scene.to_json()})
            tiles.append(image)
        write_json(stage / "scenes.json", scenes)
        _contact_sheet(tiles, [s["caption"] for s in scenes], stage / "sheet.png")
    click.echo(f"wrote {count} scenes to {out}/ (captions and ground truth in scenes.json)")


def _contact_sheet(images, captions, path: Path, columns: int = 4) -> None:
    from matplotlib.figure import Figure

    from headscope.viz import save_figure

    rows = (len(images) + columns - 1) // columns
    fig = Figure(figsize=(3 * columns, 3.3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8, wrap=True)
    fig.suptitle("shapes world: rendered scenes and their captions")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


@shapes.command("train")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), required=True, callback=claim_output,
              help="Folder for checkpoints, logs and the exported pipeline; re-run to resume.")
@click.option("--unet-steps", type=click.IntRange(1), default=None, help="Override the UNet step count.")
@click.option("--vae-steps", type=click.IntRange(1), default=None, help="Override the VAE step count.")
@click.option("--n-scenes", type=click.IntRange(16), default=None, help="Training scenes to encode.")
@click.option("--seed", type=SEED, default=None)
@click.option("--tiny", is_flag=True, help="A tiny architecture, for smoke tests.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Another run folder: reuse its VAE (mmdit: its latent cache) and start from its checkpoint.")
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="UNet target (default: epsilon).")
@click.option("--zero-snr/--no-zero-snr", default=None,
              help="Rescale the schedule to zero terminal SNR (default: off; needs --prediction v_prediction).")
@click.option("--high-noise-share", type=click.FloatRange(0, 1), default=None,
              help="Share of each batch with timesteps from the noisiest part of the schedule (default 0).")
@click.option("--position-share", type=click.FloatRange(0, 1), default=None,
              help="Share of each batch from scenes whose caption says a position (default 0).")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--arch", type=click.Choice(["unet", "mmdit"]), default="unet", show_default=True,
              help="unet: the embedded SD-style model; mmdit: the SD3-style joint-attention model (it reuses the "
                   "embedded model's VAE; its options are --steps, --n-scenes, --seed, --tiny, --threads, and for a "
                   "fine-tuning phase --init-from, --pair-share, --lr, --lr-final, --warmup).")
@click.option("--steps", type=click.IntRange(1), default=None, help="--arch mmdit: total transformer steps.")
@click.option("--pair-share", type=click.FloatRange(0, 1), default=None,
              help="--arch mmdit: share of each batch from two-object scenes (default 0).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="--arch mmdit: learning rate (default 3e-4).")
@click.option("--lr-final", type=click.FloatRange(0), default=None,
              help="--arch mmdit: decay the learning rate on a cosine to this by the last step (default: constant).")
@click.option("--warmup", type=click.IntRange(1), default=None, help="--arch mmdit: warm-up steps (default 300).")
def train_cmd(run_dir: Path, unet_steps, vae_steps, n_scenes, seed, tiny, init_from, prediction, zero_snr,
              high_noise_share, position_share, threads, arch, steps, pair_share, lr, lr_final, warmup):
    """Train (or resume) a shapes model: VAE, latent encoding, then UNet + text encoder with EMA (--arch mmdit:
    an SD3-style transformer and its three text encoders, rectified flow, on the embedded model's VAE).

    Example: nohup headscope shapes train --run-dir runs/shapes &   (CPU-hours; resumable)

    On shared cores, start it with OMP_WAIT_POLICY=PASSIVE: waiting OpenMP threads then sleep instead of
    spinning, which was 2-7x faster here at nice 19 beside other work.
    """
    import torch

    from headscope_cli.main import RESUME_HINT

    if threads:
        torch.set_num_threads(threads)
    click.get_current_context().meta[RESUME_HINT] = (f"checkpoints are kept in {run_dir}/; run the same command "
                                                     "again to resume")
    mmdit_options = {"steps": steps, "pair_share": pair_share, "lr": lr, "lr_final": lr_final, "warmup": warmup}
    if arch == "mmdit":
        unet_only = {"--unet-steps": unet_steps, "--vae-steps": vae_steps,
                     "--prediction": prediction, "--zero-snr": zero_snr, "--high-noise-share": high_noise_share,
                     "--position-share": position_share}
        given = [name for name, value in unet_only.items() if value is not None]
        if given:
            raise HeadscopeError(f"{', '.join(given)} only apply to --arch unet")
        options = {name: value for name, value in mmdit_options.items() if value is not None}
        click.echo(f"exported pipeline: {_train_mmdit(run_dir, options, n_scenes, seed, tiny, init_from)}")
        return
    given = [f"--{name.replace('_', '-')}" for name, value in mmdit_options.items() if value is not None]
    if given:
        raise HeadscopeError(f"{', '.join(given)} only apply to --arch mmdit (the UNet's step count is --unet-steps)")
    from headscope.shapes.model import TINY
    from headscope.shapes.train import TrainConfig, train

    cfg = _saved_config(run_dir / "run.json", TrainConfig)
    if tiny:
        cfg.model = TINY
    for name, value in (("unet_steps", unet_steps), ("vae_steps", vae_steps), ("n_scenes", n_scenes),
                        ("seed", seed), ("init_from", init_from and str(init_from.resolve())),
                        ("prediction_type", prediction), ("zero_terminal_snr", zero_snr),
                        ("high_noise_share", high_noise_share), ("position_share", position_share)):
        if value is not None:
            setattr(cfg, name, value)
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise HeadscopeError("--zero-snr needs --prediction v_prediction (epsilon is undefined at pure noise)")
    if cfg.init_from and not (run_dir / "unet" / "state.pt").is_file():
        _check_init_from(Path(cfg.init_from))
    pipeline = train(run_dir, cfg)
    click.echo(f"exported pipeline: {pipeline}")


def _train_mmdit(run_dir: Path, options: dict, n_scenes, seed, tiny, init_from) -> Path:
    """Train (or resume) the SD3-style model in `run_dir`; a resumed run keeps its saved config but for
    the given options (`steps`, and a fine-tuning phase's `pair_share`, `lr`, `lr_final`, `warmup`)."""
    from headscope.shapes.train_mmdit import MMDiTTrainConfig, tiny_config, train_mmdit

    saved = run_dir / "run.json"
    cfg = tiny_config() if tiny and not saved.is_file() else _saved_config(saved, MMDiTTrainConfig)
    for name, value in (*options.items(), ("n_scenes", n_scenes), ("seed", seed),
                        ("init_from", init_from and str(init_from.resolve()))):
        if value is not None:
            setattr(cfg, name, value)
    if cfg.init_from and not (run_dir / "checkpoint" / "state.pt").is_file():
        needed = ("checkpoint/weights.safetensors", "checkpoint/state.pt", "latents.json", "latents.safetensors")
        missing = [name for name in needed if not (Path(cfg.init_from) / name).is_file()]
        if missing:
            raise HeadscopeError(f"--init-from {cfg.init_from} is not an SD3-style training run (it lacks "
                                 f"{', '.join(missing)}); give a --run-dir that `headscope shapes train --arch mmdit` "
                                 "has trained")
    return train_mmdit(run_dir, cfg)


def _saved_config(path: Path, config_class):
    """The run's saved TrainConfig, a new default one when there is none; HeadscopeError when unreadable."""
    if not path.is_file():
        return config_class()
    try:
        return config_class.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise HeadscopeError(f"{path} is not a readable training config ({error}); fix it, or start a new "
                             "--run-dir") from None


def _check_init_from(source: Path) -> None:
    """HeadscopeError unless `source` is a run folder with a finished VAE, latents and a UNet checkpoint."""
    needed = ("vae/weights.safetensors", "vae/state.pt", "latents.json", "latents.safetensors",
              "unet/weights.safetensors", "unet/state.pt")
    missing = [name for name in needed if not (source / name).is_file()]
    if missing:
        raise HeadscopeError(f"--init-from {source} is not a finished training run (it lacks {', '.join(missing)}); "
                             "give a --run-dir that `headscope shapes train` has trained")


@shapes.command("eval")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated seeds; one image per prompt and seed.")
@click.option("--steps", type=click.IntRange(1), default=25, show_default=True)
@click.option("--guidance", type=Finite(0), default=None, help="Guidance scale (default: the model's).")
@click.option("--n-single", type=click.IntRange(0), default=48, show_default=True)
@click.option("--n-pair", type=click.IntRange(0), default=24, show_default=True)
@click.option("--n-count", type=click.IntRange(0), default=12, show_default=True)
@click.option("--n-polysemy", type=click.IntRange(0), default=24, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=claim_output,
              help="Write the summary and per-image records as JSON here.")
@click.option("--device", default=None)
def eval_cmd(model, seeds, steps, guidance, n_single, n_pair, n_count, n_polysemy, out, device):
    """Score a model on held-out shapes-world prompts with the annotator; prints a table.

    Example: headscope shapes eval --seeds 0,1,2 --out out/eval.json
    """
    from headscope.models import load_pipeline, model_defaults
    from headscope.shapes.evaluate import eval_scenes, evaluate, format_summary

    try:
        seed_list = [SEED.convert(s.strip(), None, None) for s in seeds.split(",") if s.strip()]
    except click.BadParameter:
        raise HeadscopeError(f"--seeds must be comma-separated integers from 0 to 2**63-1, got {seeds!r}") from None
    if not seed_list:
        raise HeadscopeError("--seeds is empty; give at least one seed, e.g. --seeds 0,1")
    if not any((n_single, n_pair, n_count, n_polysemy)):
        raise HeadscopeError("--n-single, --n-pair, --n-count and --n-polysemy are all 0: nothing to evaluate")
    pipe = load_pipeline(model, device=device)
    guidance = model_defaults(pipe).get("guidance_scale", 5.0) if guidance is None else guidance
    scenes = eval_scenes(n_single=n_single, n_pair=n_pair, n_count=n_count, n_polysemy=n_polysemy)
    result = evaluate(pipe, scenes, seeds=seed_list, steps=steps, guidance=guidance)
    click.echo(format_summary(result["summary"]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"model": str(model or "embedded"), **result})
        click.echo(f"wrote {out}", err=True)


@shapes.command("ship")
@click.option("--run-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A training run folder with an exported pipeline/.")
@click.option("--guidance", type=click.FloatRange(min=1.0), required=True,
              help="Default guidance scale commands use for this model (pick it with `shapes eval`).")
@click.option("--steps", "num_steps", type=click.IntRange(1), default=25, show_default=True,
              help="Default denoising steps.")
@click.option("--target", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put it (default: the package's embedded model folder of the run's architecture: "
                   "shapes_model for a UNet run, shapes_mmdit for an SD3-style one).")
def ship_cmd(run_dir: Path, guidance: float, num_steps: int, target):
    """Make a run's exported pipeline an embedded model (UNet run: "shapes", SD3-style: "shapes-mmdit"),
    with its generation defaults.

    Example: headscope shapes ship --run-dir runs/shapes --guidance 5
    """
    from headscope.models import EMBEDDED, MODELS_DIR
    from headscope.shapes.train import ship

    meta = run_dir / "pipeline" / "headscope.json"
    try:
        arch = json.loads(meta.read_text()).get("arch", "unet") if meta.is_file() else "unet"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HeadscopeError(f"{meta} is not valid JSON ({error}); export the run again") from None
    name = "shapes-mmdit" if arch == "mmdit" else "shapes"
    folder = ship(run_dir / "pipeline", target or MODELS_DIR / EMBEDDED[name],
                  {"guidance_scale": guidance, "num_inference_steps": num_steps})
    click.echo(f"shipped {run_dir / 'pipeline'} as {folder}")
