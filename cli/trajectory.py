"""`headscope generate PROMPT --trajectory`: the clean image predicted at every step beside per-step word maps.

Writes image.png, trajectory.png (the chosen steps), trajectory.gif (every step), trajectory-distance.png,
trajectory.json / .csv, summary.json, command.txt and index.html into --out, staged like `generate`.
"""
from __future__ import annotations

import sys

import click

from headscope.errors import HeadscopeError
from headscope_cli.maps import META as MAP_META

META = "headscope.option_values"  # ctx.meta key (cli/study.py OPTION_VALUES): the trajectory-only options,
# so that `generate` takes one more argument, not five, and command.txt can still name them
EXAMPLES = """\b
  headscope generate "two red circles" --trajectory --word two --word circles
  headscope generate "two red circles" --trajectory --at 0.1,0.3,0.5 --rapid --rapid-steps 3
"""


def _keep(ctx, param, value):
    ctx.meta.setdefault(META, {})[param.name] = value
    return value


def _fractions(ctx, param, value):
    if value is not None:
        try:
            value = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r}: give comma-separated fractions of the run, e.g. 0.2,0.4") from None
        if not value:
            raise click.BadParameter("give at least one fraction")
        for fraction in value:
            if not 0.0 < fraction <= 1.0:  # also refuses nan
                raise click.BadParameter(f"{fraction:g} is out of range; fractions of the run lie in (0, 1]")
    return _keep(ctx, param, value)


def trajectory_options(command):
    """Decorator adding --trajectory (exposed) and --at, --rapid, --rapid-steps, --word (kept in ctx.meta)."""
    options = [
        click.option("--trajectory", is_flag=True,
                     help="Record the clean-image estimate x0 of every step and per-step word maps: a figure, an "
                          "animated GIF and a table in --out."),
        click.option("--at", default=None, callback=_fractions, expose_value=False, metavar="F,F,...",
                     help="With --trajectory: steps to draw, as fractions of the run [default: 0.2,0.4,0.6,0.8]."),
        click.option("--rapid", is_flag=True, callback=_keep, expose_value=False,
                     help="With --trajectory: also jump from each step to the end in a few large steps (a student "
                          "report's 'rapid denoising'); costs --rapid-steps model calls per drawn step."),
        click.option("--rapid-steps", default=None, type=click.IntRange(1, 50), callback=_keep, expose_value=False,
                     help="With --rapid: the large steps from a step to the end [default: 3; 1 = the plain x0]."),
        click.option("--word", "trajectory_words", multiple=True, callback=_keep, expose_value=False,
                     help="With --trajectory: word whose per-step map to draw (repeatable) [default: the prompt's "
                          "nouns and numerals, by spaCy; else its first words]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_trajectory(prompt, trajectory: bool, *, with_daam, steer, model, seed, steps, guidance, negative_prompt,
                   num_images, window, out, device, dtype) -> bool:
    """Run `generate --trajectory`; False (nothing done) without --trajectory."""
    given = {name: value for name, value in click.get_current_context().meta.get(META, {}).items() if value}
    if not trajectory:
        if given:
            names = ", ".join("--" + name.replace("trajectory_words", "word").replace("_", "-") for name in given)
            raise HeadscopeError(f"{names} only work with --trajectory")
        return False
    if given.get("rapid_steps") and not given.get("rapid"):
        raise HeadscopeError("--rapid-steps needs --rapid")
    map_options = [name for name, value in click.get_current_context().meta.get(MAP_META, {}).items()
                   if value is not None]
    if num_images != 1 or window is not None or with_daam or map_options or any(value for value in steer.values()):
        raise HeadscopeError("--trajectory follows one image without steering: leave out --num-images, --window, "
                             "--daam, the map options (--method, --concept, --top-k) and the steering options")
    from headscope.steer import max_length
    from headscope.studies.trajectory import DEFAULT_AT, DEFAULT_RAPID_STEPS, record_trajectory, steps_at
    from headscope.tokens import tokenize
    from headscope_cli.common import generation_settings, load_model

    pipe = load_model(model, device, dtype)
    steps, guidance = generation_settings(pipe, steps, guidance)
    tokenization = tokenize(pipe.tokenizer, prompt, max_length(pipe))
    if negative_prompt:
        tokenize(pipe.tokenizer, negative_prompt, max_length(pipe))
    words = list(given.get("trajectory_words") or default_words(prompt, tokenization))
    for word in words:
        tokenization.positions(word)
    at = given.get("at") or list(DEFAULT_AT)
    chosen = steps_at(at, steps)
    rapid_steps = (given.get("rapid_steps") or DEFAULT_RAPID_STEPS) if given.get("rapid") else 0
    pipe.set_progress_bar_config(disable=False, file=sys.stderr, desc="denoising", leave=False)
    result = record_trajectory(pipe, prompt, words=words, seed=seed, steps=steps, guidance=guidance,
                               negative_prompt=negative_prompt, rapid_steps=rapid_steps)
    chosen = [step for step in chosen if step in result.x0_images] or [max(result.x0_images)]
    files = write_trajectory(out, result, chosen, at, dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                                          steps=steps, guidance=guidance,
                                                          model=model or "embedded shapes model"))
    click.echo(f"wrote {len(files)} files to {out}/: trajectory.png (steps {', '.join(str(s + 1) for s in chosen)} "
               f"of {result.n_steps}), trajectory.gif, trajectory-distance.png, trajectory.csv, index.html")
    return True


def default_words(prompt: str, tokenization) -> list[str]:
    """The prompt's nouns and numerals (spaCy), else its first three words."""
    try:
        from headscope.language import parse

        words = [t.word.lower() for t in parse(prompt) if t.pos in ("NOUN", "PROPN", "NUM")]
    except (HeadscopeError, ImportError):
        words = []
    words = list(dict.fromkeys(words)) or [word.lower() for word in tokenization.word_texts()][:3]
    if not words:
        raise HeadscopeError(f"the prompt {prompt!r} has no words to draw maps of; give --word")
    return words


def write_trajectory(out, result, chosen: list[int], at: list[float], settings: dict) -> list[str]:
    """Figures, GIF, table and summary, staged into `out` with command.txt and index.html."""
    from headscope.io import write_json, write_text
    from headscope.studies.runner import table_csv
    from headscope.studies.trajectory_plots import distance_figure, trajectory_figure, trajectory_table, write_gif
    from headscope.viz import save_figure
    from headscope_cli.study import write_outputs

    tau = 0.4
    rows = trajectory_table(result, tau)

    def write(stage) -> list[str]:
        from PIL import Image

        Image.fromarray((result.image * 255).round().astype("uint8")).save(stage / "image.png")
        save_figure(trajectory_figure(result, chosen, tau), stage / "trajectory.png")
        save_figure(distance_figure(result), stage / "trajectory-distance.png")
        write_gif(result, stage / "trajectory.gif")
        write_text(stage / "trajectory.csv", table_csv(rows))
        payload = {"title": "What the model predicts along the way", "study": "trajectory", "figures": {
                       "trajectory.png": "the clean-image estimate x0 at the chosen steps (and the rapid variant), "
                                         "with each word's map of that step over it; last column: the result",
                       "trajectory-distance.png": "how far each step's estimate is from the final image",
                       "trajectory.gif": "every step as one frame"},
                   "settings": {**settings, "at": at, "chosen_steps": chosen, "words": result.words, "tau": tau,
                                "rapid_steps": result.rapid_steps, "timesteps": result.timesteps},
                   "summary": {"table": rows}}
        write_json(stage / "trajectory.json", payload, indent=1)
        return ["image.png", "trajectory.png", "trajectory-distance.png", "trajectory.gif", "trajectory.csv",
                "trajectory.json"]

    return write_outputs(out, write, click.get_current_context())
