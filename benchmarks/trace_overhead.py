"""What tracing costs: traced / plain generation time, and memory of a long vs a short trace.

    python benchmarks/trace_overhead.py --tiny              # tiny random pipeline, works anywhere
    python benchmarks/trace_overhead.py                     # the embedded shapes model
    python benchmarks/trace_overhead.py --model PATH_OR_ID  # any SD 1.x / 2.x / XL pipeline

Time: the same prompt and seed, plain and traced runs interleaved (the order alternating each repeat)
in one process after a warm-up of each; medians are compared. Memory: each trace length runs in a
fresh subprocess, which reports the peak growth of its resident set (CUDA: peak allocated memory)
over an untraced warm-up run, plus the bytes the trace itself holds. Results are printed as a table
and written atomically to benchmarks/results/trace_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import harness

PROMPT = "a red circle and a blue square"


def options():
    parser = harness.parser(__doc__, "trace_overhead", tiny="sd")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the timed runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind")
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep-steps", action="store_true", help=argparse.SUPPRESS)
    return parser


def measure(args) -> dict | None:
    if args.memory_probe:  # a child of run_probe: its one JSON line goes to the parent, no result file
        print(json.dumps(memory_probe(args)))
        return None
    pipe, model = harness.load(args)
    timing = time_runs(pipe, args)
    memory = {f"{steps} steps": run_probe(args, steps) for steps in (args.short_steps, args.long_steps)}
    memory[f"{args.long_steps} steps, keep_steps"] = run_probe(args, args.long_steps, keep_steps=True)
    result = {"model": model, **harness.machine(pipe), "prompt": PROMPT,
              "steps": args.steps, "repeats": args.repeats, "size": list(image_size(pipe, args)),
              **timing, "memory": memory}
    print(table(result))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


def image_size(pipe, args) -> tuple[int, int]:
    if args.size:
        return args.size, args.size
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def generate(pipe, args, steps: int) -> None:
    height, width = image_size(pipe, args)
    generator = torch.Generator("cpu").manual_seed(0)
    pipe(PROMPT, num_inference_steps=steps, generator=generator, height=height, width=width, output_type="latent")
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(pipe, args, traced: bool) -> float:
    import headscope

    start = time.perf_counter()
    if traced:
        with headscope.trace(pipe):
            generate(pipe, args, args.steps)
    else:
        generate(pipe, args, args.steps)
    return time.perf_counter() - start


def time_runs(pipe, args) -> dict:
    """Median plain and traced seconds over interleaved runs, after one warm-up of each."""
    timed(pipe, args, False)
    timed(pipe, args, True)
    runs = {"plain": [], "traced": []}
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for traced in order:
            runs["traced" if traced else "plain"].append(timed(pipe, args, traced))
    plain, traced = statistics.median(runs["plain"]), statistics.median(runs["traced"])
    return {"plain_s": plain, "traced_s": traced, "ratio": traced / plain, "runs_s": runs}


def run_probe(args, steps: int, keep_steps: bool = False) -> dict:
    """Measure one trace length in a fresh interpreter so peaks do not mix."""
    command = [sys.executable, __file__, "--memory-probe", str(steps)] + forwarded(args)
    command += ["--keep-steps"] if keep_steps else []
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def forwarded(args) -> list[str]:
    options = ["--tiny"] if args.tiny else (["--model", args.model] if args.model else [])
    for name in ("size", "device", "threads"):
        if getattr(args, name):
            options += [f"--{name}", str(getattr(args, name))]
    return options


def memory_probe(args) -> dict:
    """Peak memory growth of one traced run of `args.memory_probe` steps over an untraced run."""
    import headscope

    pipe, _ = harness.load(args)
    steps = args.memory_probe
    generate(pipe, args, steps)
    cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = peak_rss_bytes()
    with headscope.trace(pipe, keep_steps=args.keep_steps) as tc:
        generate(pipe, args, steps)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    kept = [maps for kind in tc.reducer.per_step.values() for layer in kind.values() for maps in layer.values()]
    summed = [maps for kind in tc.reducer.sums.values() for maps in kind.values()]
    state = sum(maps.numel() * maps.element_size() for maps in summed + kept)
    return {"steps": steps, "keep_steps": args.keep_steps, "peak_growth_bytes": max(0, peak - baseline),
            "trace_state_bytes": state,
            "measure": "cuda max_memory_allocated" if cuda else "peak RSS (ru_maxrss)"}


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def table(result: dict) -> str:
    timing = [("plain", f"{result['plain_s']:.4f}"), ("traced", f"{result['traced_s']:.4f}"),
              ("ratio", f"{result['ratio']:.3f}")]
    memory = [(name, f"{probe['peak_growth_bytes'] / 2**20:.2f}", f"{probe['trace_state_bytes'] / 2**20:.3f}")
              for name, probe in result["memory"].items()]
    return "\n".join([f"model: {result['model']}  device: {result['device']}  threads: {result['threads']}  "
                      f"size: {result['size'][0]}x{result['size'][1]}  steps: {result['steps']}  "
                      f"repeats: {result['repeats']}",
                      harness.table(timing, ("", "median s")), "",
                      harness.table(memory, ("trace", "peak growth MiB", "trace state MiB"))])


if __name__ == "__main__":
    sys.exit(main())
