"""Step windows: which denoising steps a trace records or a map aggregates.

A window is given as
  - None: every step;
  - a pair of floats (start, end) with 0 <= start < end <= 1: fractions of the run. Step s of an
    n-step run belongs to the window when its midpoint (s + 0.5) / n lies in [start, end), so
    (0.0, 0.5) and (0.5, 1.0) split a run in two halves without overlap or gap;
  - a slice or range of step indices (Python semantics, negative indices count from the end);
  - a list of step indices.
Steps count UNet forwards within one pipeline call, from 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from headscope.errors import HeadscopeError


@dataclass(frozen=True)
class StepWindow:
    """A validated step window; `spec` is what the user gave (see the module docstring)."""

    spec: object = None

    @classmethod
    def parse(cls, spec) -> "StepWindow":
        """Validate a window given as None, (start, end) fractions, a slice/range or a list of ints."""
        if spec is None or isinstance(spec, StepWindow):
            return spec if isinstance(spec, StepWindow) else cls(None)
        if isinstance(spec, (slice, range)):
            if spec.step is not None and spec.step <= 0:
                raise HeadscopeError(f"step window {spec!r} must have a positive stride")
            return cls(spec if isinstance(spec, slice) else slice(spec.start, spec.stop, spec.step))
        if isinstance(spec, tuple) and len(spec) == 2 and all(_is_float(part) for part in spec):
            start, end = spec
            if not 0.0 <= start < end <= 1.0:
                raise HeadscopeError(f"step window {spec} must satisfy 0 <= start < end <= 1 "
                                     "(fractions of the run)")
            return cls((float(start), float(end)))
        if isinstance(spec, list) and spec and all(_is_int(part) for part in spec):
            return cls(tuple(spec))
        raise HeadscopeError(f"invalid step window {spec!r}: give fractions as floats, e.g. (0.0, 0.5), "
                             "step indices as slice(0, 10) or a list of ints like [0, 1, 2]")

    def contains(self, step: int, n_steps: int | None) -> bool:
        """Whether step `step` of an `n_steps`-step run is in the window."""
        if self.spec is None:
            return True
        if n_steps is None:
            raise HeadscopeError("this step window needs the number of denoising steps, and the "
                                 "pipeline does not report it; trace without a window")
        return step in self.resolve(n_steps)

    def resolve(self, n_steps: int) -> list[int]:
        """The window's step indices in an `n_steps`-step run, ascending."""
        if self.spec is None:
            return list(range(n_steps))
        if isinstance(self.spec, slice):
            return list(range(n_steps)[self.spec])
        if isinstance(self.spec[0], float):
            start, end = self.spec
            return [step for step in range(n_steps) if start <= (step + 0.5) / n_steps < end]
        steps = []
        for step in self.spec:
            if not -n_steps <= step < n_steps:
                raise HeadscopeError(f"step {step} is outside a {n_steps}-step run")
            steps.append(step % n_steps)
        return sorted(set(steps))


def _is_float(value) -> bool:
    return isinstance(value, float)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
