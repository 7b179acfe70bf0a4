"""Map options of `headscope daam` and `headscope generate --daam`: the map method, and maps of an existing image.

    --method daam|selective|weighted  which heads a word map sums (`headscope.maps.select`)
    --concept C, --top-k K            the HRV concept (default: looked up from each word) and k of selective
    --heads 3,29,34                   sum only these flat head ids (method daam), e.g. heads chosen on data
    --image FILE [--strength S] [--samples N]   (daam only) maps of FILE, not of a generated image

Everything is checked against the loaded pipeline before the model runs: the HRV, the concept of
every word, k, the image file, the strength. A mistake is a HeadscopeError, so one line and exit 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from headscope.errors import HeadscopeError
from headscope.maps.select import METHODS


META = "headscope.maps"  # ctx.meta key: the map and image options, read by `from_context`


def _remember(ctx, param, value):
    ctx.meta.setdefault(META, {})[param.name] = value
    return value


def _remember_heads(ctx, param, value):
    if value is not None:
        try:
            value = sorted({int(part) for part in value.split(",") if part.strip()})
        except ValueError:
            raise click.BadParameter(f"{value!r}: give flat head ids separated by commas, e.g. 3,29,34") from None
        if not value or min(value) < 0:
            raise click.BadParameter("give one or more flat head ids >= 0, e.g. 3,29,34")
    return _remember(ctx, param, value)


def map_options(*, hrv: bool):
    """Decorator adding --method, --concept, --top-k (and --hrv where the command has no --hrv of its own).

    The values go to the click context, not to the command's arguments; `from_context` reads them.
    """
    def decorate(command):
        options = [
            click.option("--method", default=None, type=click.Choice(METHODS), expose_value=False, callback=_remember,
                         help="Map method [default: daam]: daam sums every head; selective the HRV's most relevant "
                              "heads for the word's concept (--top-k, or those above average relevance); weighted "
                              "every head times its relevance."),
            click.option("--concept", default=None, expose_value=False, callback=_remember,
                         help="HRV concept of selective / weighted maps (default: the concept whose words hold "
                              "each mapped word)."),
            click.option("--top-k", "top_k", default=None, type=click.IntRange(min=1), expose_value=False,
                         callback=_remember, help="Selective maps: sum the K most relevant heads."),
            click.option("--heads", default=None, expose_value=False, callback=_remember_heads,
                         help="Sum only these flat head ids, comma-separated (method daam), e.g. --heads 3,29,34,35; "
                              "`headscope heads` lists them."),
        ]
        if hrv:
            options.append(click.option("--hrv", "hrv_file", default=None, type=click.Path(dir_okay=True),
                                        expose_value=False, callback=_remember,
                                        help="HRV file of selective / weighted maps (default: the model's own)."))
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def image_options(command):
    """Decorator adding --image, --strength and --samples (maps of an existing image), read by `from_context`."""
    options = [
        click.option("--image", "image_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                     expose_value=False, callback=_remember,
                     help="Draw the maps of this image (PNG, JPEG...) instead of generating one: it is noised to "
                          "--strength and denoised with PROMPT while traced."),
        click.option("--strength", default=None, type=float, expose_value=False, callback=_remember,
                     help="With --image: how far into the schedule the image is noised, in (0, 1] [default: 0.5]."),
        click.option("--samples", default=None, type=int, expose_value=False, callback=_remember,
                     help="With --image: noise samples whose maps are averaged [default: 4]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def from_context(*, words, steer, guidance, num_images, negative_prompt):
    """(MapSpec, ImageSource or None, steer) of this command's options; HeadscopeError where they contradict.

    `generate` shares its steering --hrv with the maps: taken out of `steer` when only the maps use it.
    """
    given = dict(click.get_current_context().meta.get(META, {}))
    spec = MapSpec(method=given.get("method") or "daam", concept=given.get("concept"), top_k=given.get("top_k"),
                   hrv_file=given.get("hrv_file"), heads=given.get("heads"))
    if words is None and (given.get("method") or spec.concept or spec.top_k or spec.heads):
        fix = "add --word W" if click.get_current_context().info_name == "daam" else "add --daam"
        raise HeadscopeError(f"--method, --concept, --top-k and --heads choose how word maps are drawn; {fix}")
    if steer and spec.method != "daam" and steer.get("hrv_file"):
        spec.hrv_file = steer["hrv_file"]
        steering_needs_hrv = bool(steer["strengthen"] or steer["adjust"]) or steer["neglect"] in ("ae-hrv", "heads")
        if not steering_needs_hrv:
            steer = {**steer, "hrv_file": None}
    source = ImageSource.from_options(given.get("image_file"), given.get("strength"), given.get("samples"), guidance,
                                      num_images=num_images, negative_prompt=negative_prompt)
    return spec, source, steer


@dataclass
class MapSpec:
    """How word maps are computed: the method and its HRV options (keyword arguments of `tc.word_map`)."""

    method: str = "daam"
    concept: str | None = None
    top_k: int | None = None
    hrv_file: str | None = None
    heads: list[int] | None = None
    hrv: object = None

    def check(self, pipe, words) -> None:
        """HeadscopeError for options that do not fit the method, an unreadable HRV, a word without concept."""
        from headscope.maps.select import word_concept

        if self.method == "daam":
            for option, value in (("--concept", self.concept), ("--top-k", self.top_k), ("--hrv", self.hrv_file)):
                if value is not None:
                    raise HeadscopeError(f"{option} is only used with --method selective or weighted")
            if self.heads is not None:
                from headscope.heads import HeadIndex

                n_heads = HeadIndex.from_model(pipe).n_heads
                if max(self.heads) >= n_heads:
                    raise HeadscopeError(f"--heads {max(self.heads)} is out of range: this model has heads 0..{n_heads - 1}")
            return
        if self.heads is not None:
            raise HeadscopeError("--heads chooses the heads itself; use it with --method daam")
        if self.top_k is not None and self.method != "selective":
            raise HeadscopeError("--top-k is only used with --method selective")
        from headscope.steer import resolve_hrv

        self.hrv = resolve_hrv(pipe, self.hrv_file)
        if self.top_k is not None and self.top_k > self.hrv.n_heads:
            raise HeadscopeError(f"--top-k {self.top_k} is more than this model's {self.hrv.n_heads} heads")
        if self.concept is not None:
            self.concept = self.hrv.concept(self.concept)
            return
        for word in words:
            word_concept(self.hrv, word)

    @property
    def options(self) -> dict:
        """Keyword arguments of `tc.word_map` / `tc.head_maps`."""
        if self.method == "daam":
            return {} if self.heads is None else {"heads": self.heads}
        return {"method": self.method, "hrv": self.hrv, "concept": self.concept, "k": self.top_k}

    @property
    def summary(self) -> dict:
        return {"method": self.method, "concept": self.concept, "top_k": self.top_k, "heads": self.heads,
                "hrv": None if self.method == "daam" else self.hrv_file or "model default"}


@dataclass
class ImageSource:
    """An existing image whose maps are drawn: `headscope.image_maps` with its strength and samples."""

    path: Path
    strength: float | None = None
    samples: int | None = None
    guidance: float | None = None

    @classmethod
    def from_options(cls, image_file, strength, samples, guidance, *, num_images, negative_prompt):
        """The source of --image, or None; HeadscopeError for options that need --image or contradict it."""
        if image_file is None:
            for option, value in (("--strength", strength), ("--samples", samples)):
                if value is not None:
                    raise HeadscopeError(f"{option} is only used with --image")
            return None
        if num_images != 1:
            raise HeadscopeError("--num-images does not apply with --image: the maps are of the one image given")
        if negative_prompt is not None:
            raise HeadscopeError("--negative-prompt does not apply with --image (its maps are read without guidance)")
        return cls(Path(image_file), strength, samples, guidance)

    def check(self, pipe) -> None:
        """The image must be readable and of the model's aspect; strength and samples in range."""
        from headscope.maps import images

        _, self.notes = images.load_image(self.path, images._native_size(pipe))
        for note in self.notes:
            click.echo(f"headscope: note: {self.path.name} {note}", err=True)
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise HeadscopeError(f"--strength {self.strength} must lie in (0, 1] (1 noises the image completely)")
        if self.samples is not None and self.samples < 1:
            raise HeadscopeError(f"--samples {self.samples}; use at least 1 noise sample")

    def trace(self, pipe, prompt: str, *, steps: int, seed: int, window):
        """(trace, [the image as the model sees it]) of the image denoised with `prompt`."""
        from headscope.maps import images

        options = {"steps": steps, "seed": seed, "guidance": 1.0 if self.guidance is None else self.guidance}
        if self.strength is not None:
            options["strength"] = self.strength
        if self.samples is not None:
            options["samples"] = self.samples
        tc = images.image_maps(pipe, self.path, prompt, window=window, **options)
        picture, _ = images.load_image(self.path, images._native_size(pipe))
        return tc, [picture]

    def summary(self) -> dict:
        from headscope.maps import images

        return {"image": str(self.path), "image_notes": self.notes,
                "strength": self.strength if self.strength is not None else images.DEFAULT_STRENGTH,
                "samples": self.samples if self.samples is not None else images.DEFAULT_SAMPLES,
                "guidance": 1.0 if self.guidance is None else self.guidance}



# -- concept maps (ConceptAttention) ---------------------------------------------------------------

def _concept_list(ctx, param, value):
    if value is None:
        return None
    from headscope.maps.concepts import check_concepts

    try:
        return check_concepts(value.split(","))
    except HeadscopeError as error:
        raise click.BadParameter(str(error)) from None


concepts_option = click.option(
    "--concepts", default=None, callback=_concept_list, metavar="A,B,...",
    help="SD3 / Flux: also draw a ConceptAttention map of each concept (at least two, e.g. "
         "circle,square,background; need not be in the prompt) into --out/maps/concept-*.png; word maps are "
         "then drawn only for --word.")


def write_concept_maps(stage: Path, tc, images, concepts: list[str], prompt: str) -> tuple[dict, list[str]]:
    """Per image: one overlay per concept and a grid of all; returns (the summary's "concepts", files written).

    Stats per concept and image: the map's max and mean, and `argmax_share`, the share of pixels where
    this concept has the highest saliency (the segmentation ConceptAttention's maps give).
    """
    from headscope import viz
    from headscope.maps.concepts import default_layers
    from headscope_cli.main import _save, _slug

    stats, files = {concept: [] for concept in concepts}, []
    (stage / "maps").mkdir(exist_ok=True)
    for image_number, image in enumerate(images):
        suffix = "" if len(images) == 1 else f"-{image_number}"
        maps = tc.concept_maps(image=image_number).cpu()  # [concepts, H, W]
        winners = maps.argmax(dim=0)
        for row, concept in enumerate(concepts):
            stats[concept].append({"image": image_number, "max": round(float(maps[row].max()), 6),
                                   "mean": round(float(maps[row].mean()), 6),
                                   "argmax_share": round(float((winners == row).float().mean()), 6)})
            figure = viz.overlay_figure(image, maps[row], word=concept, prompt=prompt, method="ConceptAttention map",
                                        shares=True)
            files.append(_save(figure, stage, f"maps/concept-{_slug(concept)}{suffix}.png"))
        grid = viz.word_grid_figure(image, dict(zip(concepts, maps)), prompt=prompt,
                                    question="Where is each concept (ConceptAttention, output space)", shares=True)
        files.append(_save(grid, stage, f"maps/concepts{suffix}.png"))
    layers = [tc.index.layers[layer].name for layer in default_layers(tc.index)]
    return {"method": "ConceptAttention (output space)", "layers": layers, "maps": stats}, files
