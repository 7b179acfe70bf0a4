"""Steering options of `headscope generate`: --strengthen, --adjust, --mitigate-neglect and friends.

Option syntax is checked by click callbacks before any model is loaded; words, concepts and the HRV
are checked against the loaded pipeline before generation starts, so a mistake never leaves output.
"""
from __future__ import annotations

import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import click

from headscope.errors import HeadscopeError
from headscope_cli.common import Finite

STRENGTHEN = re.compile(r"^(?P<token>[^=]+)=(?P<concept>[^:=]+?)(?::(?P<scale>[^:=]+))?$")
ADJUST = re.compile(r"^(?P<token>[^=]+)=\+(?P<desired>[^,:=]+),-(?P<undesired>[^,:=]+)"
                    r"(?::(?P<a>[^,:=]+),(?P<b>[^,:=]+))?$")
NEGLECT_METHODS = ("ae", "ae-hrv", "heads")


def parse_strengthen(ctx, param, values):
    """--strengthen TOKEN=CONCEPT[:SCALE] -> [(token, concept, scale)]."""
    parsed = []
    for value in values:
        match = STRENGTHEN.match(value.strip())
        scale = _number(match.group("scale"), "1") if match else None
        if match is None or scale is None:
            raise click.BadParameter(f"{value!r}: write TOKEN=CONCEPT or TOKEN=CONCEPT:SCALE, e.g. red=color:1.5")
        parsed.append((match.group("token").strip(), match.group("concept").strip(), scale))
    return parsed


def parse_adjust(ctx, param, values):
    """--adjust TOKEN=+DESIRED,-UNDESIRED[:a,b] -> [(token, desired, undesired, a, b)]."""
    parsed = []
    for value in values:
        match = ADJUST.match(value.strip())
        a, b = (_number(match.group("a"), "2"), _number(match.group("b"), "1")) if match else (None, None)
        if match is None or a is None or b is None:
            raise click.BadParameter(f"{value!r}: write TOKEN=+DESIRED,-UNDESIRED or TOKEN=+DESIRED,-UNDESIRED:A,B, "
                                     "e.g. rose=+color,-shape:2,1")
        parsed.append((match.group("token").strip(), match.group("desired").strip(),
                       match.group("undesired").strip(), a, b))
    return parsed


def parse_fractions(ctx, param, value):
    """--window / --steer-steps START:END (fractions of the run) -> (start, end), validated."""
    if value is None:
        return None
    from headscope.steps import StepWindow

    try:
        start, end = (float(part) for part in value.split(":"))
        return StepWindow.parse((start, end)).spec
    except (ValueError, HeadscopeError):
        raise click.BadParameter(f"{value!r}: use START:END fractions with 0 <= START < END <= 1, e.g. 0:0.5") from None


def parse_subject_option(ctx, param, value):
    if value is None:
        return None
    from headscope.steer import parse_subjects

    try:
        return parse_subjects(value)
    except HeadscopeError as error:
        raise click.BadParameter(str(error)) from None


def _number(text: str | None, default: str) -> float | None:
    """The finite number `text` (or `default` when absent); None when it is not one."""
    try:
        number = float(text if text is not None else default)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def steering_options(command):
    """Decorator adding the steering options to a click command."""
    options = [
        click.option("--strengthen", "strengthen", multiple=True, callback=parse_strengthen,
                     metavar="TOKEN=CONCEPT[:SCALE]",
                     help="Strengthen TOKEN's maps by CONCEPT's HRV: x 1 + SCALE * (HRV - 1); SCALE 1 (default) is "
                          "the paper's x HRV. Repeatable."),
        click.option("--adjust", "adjust", multiple=True, callback=parse_adjust,
                     metavar="TOKEN=+DESIRED,-UNDESIRED[:A,B]",
                     help="Adjust TOKEN's maps by A * HRV_desired - B * HRV_undesired (default 2, 1), e.g. "
                          "rose=+color,-shape. Repeatable."),
        click.option("--adjust-clamp", "adjust_clamp", default=None, type=Finite(min=0.0, min_open=True),
                     metavar="C", help="Clip both HRVs of --adjust at C before its formula (the paper clips SDXL's "
                                       "at 9)."),
        click.option("--hrv", "hrv_file", default=None, type=click.Path(dir_okay=True),
                     help="HRV file for steering (default: the model's own HRV)."),
        click.option("--steer-steps", default=None, callback=parse_fractions, metavar="START:END",
                     help="Steer (--strengthen, --adjust, --mitigate-neglect heads) only in this part of the run."),
        click.option("--mitigate-neglect", "neglect", default=None, type=click.Choice(NEGLECT_METHODS),
                     help="Against neglected objects: ae (Attend-and-Excite), ae-hrv (HRV-weighted A&E), heads "
                          "(HRV head reweighting, no gradient)."),
        click.option("--subjects", default=None, callback=parse_subject_option, metavar="W[=CONCEPT],...",
                     help="Subject words for --mitigate-neglect (default: the prompt's nouns, by spaCy), with "
                          "their HRV concept for ae-hrv/heads (default: from the HRV's concept words)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass
class SteeringPlan:
    """Hooks and the Attend-and-Excite callback for one generation, plus a JSON summary of them."""

    hooks: list = field(default_factory=list)
    excite: object = None
    summary: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.hooks) or self.excite is not None

    @contextmanager
    def running(self, pipe, record: bool, window):
        """Context for the pipeline call: a recording trace (record) or a steering-only trace.

        Yields (trace or None, extra pipeline kwargs).
        """
        from headscope.steer import steering
        from headscope.trace import trace

        if not record and not self.active:
            yield None, {}
            return
        with ExitStack() as stack:
            tc = stack.enter_context(trace(pipe, steps=window, hooks=self.hooks) if record
                                     else steering(pipe, self.hooks))
            extra = {}
            if self.excite is not None:
                stack.enter_context(self.excite.attached(tc))
                extra["callback_on_step_end"] = self.excite
            yield tc, extra
        if self.excite is not None:
            self.summary["neglect"]["log"] = self.excite.log


def plan_steering(pipe, prompt, *, strengthen, adjust, hrv_file, steer_steps, neglect, subjects,
                  adjust_clamp=None) -> SteeringPlan:
    """Build (and so validate) every steering hook before generation; HeadscopeError on any mistake."""
    from headscope.steer import AttendAndExcite, heads_hook
    from headscope.steer import adjust_hook, resolve_hrv, strengthen_hook

    if subjects is not None and neglect is None:
        raise HeadscopeError("--subjects needs --mitigate-neglect")
    if adjust_clamp is not None and not adjust:
        raise HeadscopeError("--adjust-clamp needs --adjust")
    needs_hrv = bool(strengthen or adjust) or neglect in ("ae-hrv", "heads")
    if hrv_file is not None and not needs_hrv:
        raise HeadscopeError("--hrv is only used with --strengthen, --adjust or --mitigate-neglect ae-hrv/heads")
    if steer_steps is not None and not (strengthen or adjust or neglect == "heads"):
        raise HeadscopeError("--steer-steps needs --strengthen, --adjust or --mitigate-neglect heads")
    plan = SteeringPlan()
    if not needs_hrv and neglect is None:
        return plan
    hrv = resolve_hrv(pipe, hrv_file) if needs_hrv else None
    plan.summary = {"hrv": str(hrv_file) if hrv_file else "model default", "steps": steer_steps}
    for token, concept, scale in strengthen:
        plan.hooks.append(strengthen_hook(pipe, prompt, {token: (concept, scale)}, hrv=hrv, steps=steer_steps))
        plan.summary.setdefault("strengthen", []).append({"token": token, "concept": concept, "scale": scale})
    for token, desired, undesired, a, b in adjust:
        plan.hooks.append(adjust_hook(pipe, prompt, {token: (desired, undesired, a, b)}, hrv=hrv, clamp=adjust_clamp,
                                      steps=steer_steps))
        plan.summary.setdefault("adjust", []).append({"token": token, "desired": desired, "undesired": undesired,
                                                      "a": a, "b": b, "clamp": adjust_clamp})
    if neglect == "heads":
        plan.hooks.append(heads_hook(pipe, prompt, subjects, hrv=hrv, steps=steer_steps))
        plan.summary["neglect"] = {"method": neglect}
    elif neglect is not None:
        plan.excite = AttendAndExcite(pipe, prompt, subjects, weighted=neglect == "ae-hrv", hrv=hrv)
        plan.summary["neglect"] = {"method": neglect, "level": plan.excite.level,
                                   "subjects": {s.word: s.concept for s in plan.excite.subjects}}
    return plan
