"""What every benchmark shares: its common options, its pipeline, its run, its table and its JSON file.

A benchmark declares its options on `parser`, measures in a function of the parsed options that
returns the result, and hands both to `run`:

    def options():
        parser = harness.parser(__doc__, "my_benchmark", tiny="shapes")
        parser.add_argument("--steps", type=int, default=10)
        return parser

    def measure(args) -> dict:
        pipe, model = harness.load(args)
        ...
        return {"model": model, ...}

    def main(argv=None) -> int:
        return harness.run(measure, options(), argv)

`run` applies --threads, times the call and writes the result once, at the end, through
`headscope.io.write_json` (atomic), with the command, the machine and the wall time under "run".
Ctrl-C ends with one line on stderr and exit code 130, a HeadscopeError with one line and exit code 2;
either way --out is left as it was: complete or absent, never half-written.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path for `import harness`.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from headscope.errors import HeadscopeError, WriteError
from headscope.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
EMBEDDED = "embedded shapes model"
TINY = {"shapes": "tiny random pipeline of the shapes architecture (headscope.testing.build_tiny_shapes)",
        "sd": "tiny random SD pipeline (headscope.testing.build_tiny_sd)"}
INTERRUPTED, FAILED = 130, 2  # the shell's code for SIGINT; the CLI's code for a user's mistake


def parser(doc: str, name: str, *, tiny: str | None = None, model: bool = True,
           device: bool = True) -> argparse.ArgumentParser:
    """The options of benchmark `name`: --out (benchmarks/results/NAME.json) and --threads always;
    --tiny (a smoke run on the tiny pipeline `tiny`, a key of TINY), --model and --device where given.

    Without --model the benchmark runs the embedded model, without --device on the CPU; --tiny and
    --model exclude each other. `args.tiny` is the tiny pipeline's key, or None.
    """
    options = argparse.ArgumentParser(prog=f"{name}.py", description=doc,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    source, absent = options.add_mutually_exclusive_group(), {}
    if tiny is not None:
        source.add_argument("--tiny", action="store_const", const=tiny, default=None,
                            help=f"smoke run on a {TINY[tiny]}")
    else:
        absent["tiny"] = None
    if model:
        source.add_argument("--model", default=None, help=f"pipeline folder or hub id (default: the {EMBEDDED})")
    else:
        absent["model"] = None
    if device:
        options.add_argument("--device", default=None, help="cpu, cuda, mps... (default: the best available)")
    else:
        absent["device"] = "cpu"
    options.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    options.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                         help=f"result JSON, written once at the end (default: benchmarks/results/{name}.json)")
    options.set_defaults(benchmark=name, **absent)
    return options


def run(measure: Callable[[argparse.Namespace], dict | None], options: argparse.ArgumentParser,
        argv: Sequence[str] | None = None, *, indent: int = 2) -> int:
    """Parse `argv`, apply --threads, and write what `measure(args)` returns to --out (None: nothing).

    Returns 0. Ctrl-C exits with code 130 and a HeadscopeError with code 2, each after one line on
    stderr; --out is then left as it was. An --out that cannot be written is refused before measuring.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = options.parse_args(argv)
    try:
        writable(args.out)
        if args.threads:
            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        result = measure(args)
        if result is not None:
            write(args, result, argv=argv, wall_seconds=time.perf_counter() - started, indent=indent)
    except KeyboardInterrupt:
        _fail(args, f"interrupted; {args.out} left as it was", INTERRUPTED)
    except HeadscopeError as error:
        _fail(args, f"error: {error}", FAILED)
    return 0


def writable(out: Path) -> None:
    """A HeadscopeError now, not after the measurement, where `out` cannot be written; creates its folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(out, error) from None
    if out.is_dir():
        raise HeadscopeError(f"--out {out} is a folder; give the result file's name")
    if not os.access(out.parent, os.W_OK):
        raise HeadscopeError(f"cannot write {out}: its folder is not writable; write elsewhere")


def _fail(args, message: str, code: int):
    print(f"{args.benchmark}: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def load(args):
    """(pipeline, what it is): the tiny pipeline of --tiny, else --model on --device; progress bars off.

    A HeadscopeError where --model is not a pipeline folder or hub id.
    """
    if args.tiny:
        pipe = _tiny(args.tiny)
    else:
        from headscope import load_pipeline

        pipe = load_pipeline(args.model, args.device)
        pipe.set_progress_bar_config(disable=True)
    return pipe, describe(args)


def _tiny(kind: str):
    from headscope import testing

    if kind == "shapes":
        return testing.build_tiny_shapes()
    return testing.build_tiny_sd(Path(tempfile.mkdtemp(prefix="headscope-bench-")))


def describe(args) -> str:
    """The model a run measures, in words: the tiny pipeline, the --model given, or the embedded model."""
    return TINY[args.tiny] if args.tiny else (args.model or EMBEDDED)


def machine(pipe) -> dict:
    """Where the run computes: the pipeline's device, torch's version and threads, the processor type."""
    return {"device": str(pipe.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def table(rows: Sequence[Sequence], columns: Sequence[str], *, digits: int = 3, left: int = 1) -> str:
    """The rows under a header of column names, as text: the first `left` columns left-aligned, the others
    right-aligned, each as wide as its widest cell; floats with `digits` decimals, None as n/a."""
    def show(cell) -> str:
        if cell is None:
            return "n/a"
        return f"{cell:.{digits}f}" if isinstance(cell, float) else str(cell)

    lines = [list(columns)] + [[show(cell) for cell in row] for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) if column < left else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def write(args, result: dict, *, argv: Sequence[str] = (), wall_seconds: float | None = None,
          indent: int = 2) -> Path:
    """Write `result` to --out atomically, with how it was run under "run"; says where on stderr."""
    payload = {**result, "run": {"command": shlex.join(["python", f"benchmarks/{args.benchmark}.py", *argv]),
                                 "wall_seconds": None if wall_seconds is None else round(wall_seconds, 2),
                                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "platform": platform.platform(), "python": platform.python_version()}}
    path = write_json(args.out, payload, indent=indent)
    print(f"wrote {path}", file=sys.stderr)
    return path
