"""Recording cost on real-size backbones: SD 1.5, SDXL, SD3-medium and Flux.1-dev layouts, random weights, CPU.

    python benchmarks/real_layouts.py                       # all four, one denoising step each
    python benchmarks/real_layouts.py --models sd3-medium,flux-dev --repeats 5

Each backbone is built from its real config (random weights, fp32) inside an ordinary diffusers
pipeline whose text encoders are one-layer stand-ins of the real output widths (CLIP 768 / 1280,
T5 4096; their cost is tiny and the same in every variant), with the real text lengths (CLIP 77,
SD3's T5 256, Flux-dev's T5 512). Where the whole backbone would not run in minutes on 2 CPU cores
(or, for Flux-dev's 12B parameters, fit in 24 GiB in fp32), the transformer keeps its first blocks
of each kind at full width (MODELS): recording costs per layer, so traced / plain over the kept
blocks is the whole model's ratio at that image size.

Three variants of the same call (same prompt and seed, one step, latents out, no VAE):
  plain      the pipeline as diffusers runs it;
  headscope  inside `headscope.trace(pipe)` (DAAM maps of the conditional rows, reduced online);
  full       the way attention-map-diffusers records: an explicit softmax over every key of every
             text-conditioned layer, the whole probability matrix materialised (joint attention:
             heads x (L_img + L_txt)^2) and kept on the CPU per layer and step.
Time: medians of interleaved repeats after a warm-up, as wall time and as this process's CPU time
(the machine is shared; CPU time is what the run itself spent), plus the time spent inside
headscope's readers (`attributed`: probabilities and online sums, timed around each hand-out). One
torch thread unless --threads says otherwise: on a busy 2-core machine every small two-thread op
waits for the other thread to be scheduled (measured: a SDXL-sized map hand-out takes 1.1 ms on one
thread, 81 ms on two), which would time the machine's load, not the work.
Memory: each backbone runs in its own process (glibc's mmap threshold pinned, so freed tensors leave
the resident set) that samples its resident set every 2 ms; "peak+" is a variant's peak minus the
plain call's. Held bytes are counted from the tensors: headscope's map sums, the full variant's
stored maps; "block" is the largest attention tensor one layer hands out (headscope: conditional
rows x heads x L_img x L_txt floats; full: rows x heads x L x L).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import harness
import headscope.joint
import headscope.processor
from headscope import HeadIndex, trace
from headscope.backbones import backbone_for
from headscope.backbones.flux import FluxJointProcessor
from headscope.backbones.sd3 import SD3JointProcessor
from headscope.errors import HeadscopeError
from headscope.joint import MAP_BUDGET_BYTES
from headscope.models import configs
from headscope.processor import HeadProcessor, Hook, Hooks, attention_probs
from headscope.testing_real import build_real_size

PROMPT = "a photo of a red fox next to a blue car"
MMAP_THRESHOLD = "131072"  # bytes; larger tensors are mmapped and go back to the OS when freed
MODELS = {  # family, guidance, image side, config (changes), what the run keeps of the real model
    "sd1.5": ("unet", 7.5, 256, configs.SD15_UNET_CONFIG, "whole UNet: 16 layers, 128 heads"),
    "sdxl": ("unet", 5.0, 128, configs.SDXL_BASE_UNET_CONFIG, "whole UNet: 70 layers, 1,300 heads"),
    "sd3-medium": ("sd3", 7.0, 256, {**configs.SD3_MEDIUM_TRANSFORMER_CONFIG, "num_layers": 4},
                   "4 of 24 joint blocks: 96 of 576 heads"),
    "flux-dev": ("flux", 3.5, 256, {**configs.FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 2},
                 "1 of 19 double + 2 of 38 single blocks: 72 of 1,368 heads"),
}
TEXT_LENGTH = {"unet": None, "sd3": 256, "flux": 512}  # max_sequence_length (T5 tokens)
WHOLE = {"sd1.5": configs.SD15_UNET_CONFIG, "sdxl": configs.SDXL_BASE_UNET_CONFIG,
         "sd3-medium": configs.SD3_MEDIUM_TRANSFORMER_CONFIG, "flux-dev": configs.FLUX_DEV_TRANSFORMER_CONFIG}
NATIVE = {"sd1.5": 512, "sdxl": 1024, "sd3-medium": 1024, "flux-dev": 1024}  # image side the model is made for


def options():
    parser = harness.parser(__doc__, "real_layouts", model=False, device=False)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of plain and headscope (full: one)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser


def measure(args) -> dict | None:
    if args.one:  # a child: one backbone, one JSON line to the parent, no result file
        print(json.dumps(measure_one(args.one, args)))
        return None
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        raise HeadscopeError(f"unknown model(s) {', '.join(unknown) or '(none)'}; use {', '.join(MODELS)}")
    results = {name: run_child(name, args) for name in names}
    result = {"prompt": PROMPT, "steps": 1, "repeats": args.repeats, "dtype": "float32", "device": "cpu",
              "threads": args.threads or 1, "map_budget_bytes": MAP_BUDGET_BYTES, "models": results}
    print(table(results))
    return result


def run_child(name: str, args) -> dict:
    command = [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats), "--threads",
               str(args.threads or 1), "--out", str(Path(tempfile.gettempdir()) / "real_layouts_child.json")]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    print(f"{name}: building and timing ...", file=sys.stderr, flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode:
        raise RuntimeError(f"{name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -- one backbone -----------------------------------------------------------------------------

def measure_one(name: str, args) -> dict:
    family, guidance, size, _, kept = MODELS[name]
    started = time.perf_counter()
    pipe = build_real_size(MODELS[name][3])
    built = time.perf_counter() - started
    index = HeadIndex.from_model(pipe)
    call = Call(pipe, guidance, size, family)
    call("plain")  # warm-up
    order = ["plain", "headscope"] * args.repeats + ["full"]
    runs = {variant: [] for variant in ("plain", "headscope", "full")}
    for position, variant in enumerate(order):
        if position % 4 in (2, 3):  # alternate which variant goes first
            variant = "headscope" if variant == "plain" else "plain" if variant == "headscope" else variant
        runs[variant].append(call(variant))
    median = {variant: {clock: statistics.median(run[clock] for run in measured) for clock in ("wall", "cpu", "hooks")}
              for variant, measured in runs.items()}
    plain = median["plain"]
    peak = max(run["peak"] for run in runs["plain"])
    return {"family": family, "kept": kept, "image": size, "layers": index.n_layers, "heads": index.n_heads,
            "parameters": sum(parameter.numel() for parameter in denoiser(pipe).parameters()),
            "guidance": guidance, "build_s": round(built, 1), "seconds": median, "runs": runs,
            "ratio": {"headscope_wall": median["headscope"]["wall"] / plain["wall"],
                      "headscope_cpu": median["headscope"]["cpu"] / plain["cpu"],
                      "headscope_attributed": 1 + median["headscope"]["hooks"] / plain["wall"],
                      "full_wall": median["full"]["wall"] / plain["wall"],
                      "full_cpu": median["full"]["cpu"] / plain["cpu"]},
            "peak_extra_bytes": {variant: max(0, max(run["peak"] for run in runs[variant]) - peak)
                                 for variant in ("headscope", "full")},
            **call.accounts(), "native": native_bytes(name)}


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def native_bytes(name: str) -> dict:
    """The whole model at its own image size: the largest tensor one layer hands out per conditional row
    (headscope: heads x L_img x L_txt floats; full: heads x queries x keys) and what full keeps per step."""
    family, side = MODELS[name][0], NATIVE[name]
    index = HeadIndex.from_config(WHOLE[name]).at_image(side, side, 8)
    n_text = {"unet": 77, "sd3": 77 + 256, "flux": 512}[family]
    blocks = []
    for layer in index.layers:
        queries = layer.resolution[0] * layer.resolution[1]
        n_joint = queries if family == "unet" else queries + n_text  # full: every query, every key
        blocks.append((layer.heads * queries * n_text * 4, layer.heads * n_joint * (n_text if family == "unet"
                                                                                     else n_joint) * 4))
    return {"image": side, "image_tokens": max(layer.resolution[0] * layer.resolution[1] for layer in index.layers),
            "text_tokens": n_text, "headscope_block_bytes": max(block for block, _ in blocks),
            "full_block_bytes": max(full for _, full in blocks),
            "full_kept_per_step_bytes": sum(full for _, full in blocks)}


class Call:
    """One pipeline call of a variant: wall and CPU seconds, seconds inside headscope's readers, peak RSS."""

    def __init__(self, pipe, guidance: float, size: int, family: str):
        self.pipe, self.guidance, self.size, self.family = pipe, guidance, size, family
        self.last_trace = None
        self.store: dict = {}

    def __call__(self, variant: str) -> dict:
        gc.collect()
        sampler, clock = PeakSampler(), HookClock()
        wall, cpu = time.perf_counter(), time.process_time()
        with sampler, clock:
            if variant == "headscope":
                with trace(self.pipe) as tc:
                    self._generate()
                self.last_trace = tc
            elif variant == "full":
                self.store = {}
                with full_matrix_recording(self.pipe, self.store):
                    self._generate()
            else:
                self._generate()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "hooks": clock.seconds,
                "peak": sampler.peak}

    def _generate(self):
        length = TEXT_LENGTH[self.family]
        options = {"max_sequence_length": length} if length else {}
        generator = torch.Generator("cpu").manual_seed(0)
        self.pipe(PROMPT, num_inference_steps=1, guidance_scale=self.guidance, height=self.size, width=self.size,
                  output_type="latent", generator=generator, **options)

    def accounts(self) -> dict:
        """Bytes held after a call (headscope's map sums; the full variant's stored maps) and the largest
        attention tensor one layer hands out (headscope: conditional rows x heads x L_img x L_txt floats)."""
        tc = self.last_trace
        held = sum(maps.numel() * maps.element_size() for kind in tc.reducer.sums.values() for maps in kind.values())
        n_text = tc.hooks.state.n_text or self.pipe.tokenizer.model_max_length  # a UNet's keys: the CLIP tokens
        grids = [layer.resolution[0] * layer.resolution[1] for layer in tc.index.layers]
        block = max(tc.layout.n_images * layer.heads * queries * n_text * 4
                    for layer, queries in zip(tc.index.layers, grids))
        return {"held_bytes": {"headscope": held, "full": sum(probs.numel() * 4 for probs in self.store.values())},
                "block_bytes": {"headscope": block, "full": max(probs.numel() * 4 for probs in self.store.values())},
                "image_tokens": max(grids), "text_tokens": n_text, "key_limit": tc.reducer.key_limit}


class HookClock:
    """Seconds spent in headscope's hand-outs to readers (probabilities + online sums) during the block."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._originals = (headscope.processor._hand_out, headscope.joint._hand_out)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._originals[0](*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        headscope.processor._hand_out = headscope.joint._hand_out = timed
        return self

    def __exit__(self, *exc_info):
        headscope.processor._hand_out, headscope.joint._hand_out = self._originals


class PeakSampler:
    """Peak resident set (bytes) while the block runs, read from /proc/self/statm every 2 ms."""

    def __init__(self):
        self.peak = 0
        self._running = False

    def __enter__(self):
        self._running = True
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc_info):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the full-matrix recorder (attention-map-diffusers' way) ------------------------------------

class FullCross(HeadProcessor):
    """UNet cross-attention with explicit probabilities [batch, heads, query, 77], kept per layer and step."""

    def _attend(self, attn, query, key, value, attention_mask, ctx):
        probs = attention_probs(attn, query, key, attention_mask)
        self.store[(self.layer.name, self.step["count"])] = probs.cpu()
        return torch.matmul(probs.to(value.dtype), value)


class FullJoint:
    """Mixed into a joint processor: softmax over the whole joint sequence, kept, then probs @ values."""

    def _attend_joint(self, query, key, value, sequence, seq_dim, attention):
        def heads_first(tensor):  # [batch, heads, tokens, head_dim]
            return tensor if seq_dim == 2 else tensor.transpose(1, 2)

        q, k, v = heads_first(query), heads_first(key), heads_first(value)
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1)
        self.store[(self.layer.name, self.step["count"])] = probs.cpu()  # [batch, heads, L, L]
        return heads_first(torch.matmul(probs.to(v.dtype), v))


class FullSD3(FullJoint, SD3JointProcessor):
    pass


class FullFlux(FullJoint, FluxJointProcessor):
    pass


@contextmanager
def full_matrix_recording(pipe, store: dict):
    """Full-matrix processors on every text-conditioned layer (`set_processor`), put back on exit."""
    backbone = backbone_for(pipe)
    index = HeadIndex.from_model(pipe)
    kinds = {"unet": FullCross, "sd3": FullSD3, "flux": FullFlux}
    step = {"count": -1}
    modules = {layer.name: backbone.model.get_submodule(layer.name) for layer in index.layers}
    saved = {name: module.processor for name, module in modules.items()}
    hooks = Hooks([Hook()])  # a no-op hook: Flux's processor takes its hooked path only when one is there
    for layer in index.layers:
        processor = kinds[backbone.family](layer, hooks)
        processor.store, processor.step = store, step
        processor._attention_backend = getattr(saved[layer.name], "_attention_backend", None)
        modules[layer.name].set_processor(processor)
    def before_denoiser(module, args, kwargs):  # count steps; single-stream layers need the text length
        step["count"] += 1
        hooks.state.n_text = backbone.denoiser_call(args, kwargs).n_text

    handle = backbone.model.register_forward_pre_hook(before_denoiser, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for name, module in modules.items():
            module.set_processor(saved[name])


# -- report -----------------------------------------------------------------------------------

def table(results: dict) -> str:
    """Two tables: the measured runs, and the block sizes of the whole models at their own image sizes."""
    mib, gib = 2**20, 2**30
    measured, native = [], []
    for name, result in results.items():
        ratio, peak, block, held = (result[key] for key in ("ratio", "peak_extra_bytes", "block_bytes", "held_bytes"))
        tokens = f"{result['image_tokens']}x{result['text_tokens']}"
        measured.append((name, result["kept"], f"{result['image']}²", tokens,
                         result["seconds"]["plain"]["cpu"], ratio["headscope_cpu"], ratio["headscope_wall"],
                         ratio["headscope_attributed"], ratio["full_cpu"], f"{peak['headscope'] / mib:.0f}",
                         f"{peak['full'] / mib:.0f}", f"{block['headscope'] / mib:.2f}", f"{block['full'] / mib:.2f}",
                         f"{held['headscope'] / mib:.2f}", f"{held['full'] / mib:.1f}"))
        whole = result["native"]
        native.append((name, f"{whole['image']}²", f"{whole['image_tokens']}x{whole['text_tokens']}",
                       f"{whole['headscope_block_bytes'] / mib:.0f}", f"{whole['full_block_bytes'] / mib:.0f}",
                       f"{whole['full_kept_per_step_bytes'] / gib:.1f}"))
    return "\n".join([
        harness.table(measured, ("model", "kept", "image", "L_img x L_txt", "plain cpu s", "hs x cpu", "hs x wall",
                                 "hs x attributed", "full x cpu", "peak+ MiB hs", "peak+ MiB full", "block MiB hs",
                                 "block MiB full", "held MiB hs", "held MiB full"), left=2), "",
        "whole models at their own size, per conditional row (headscope frees its block after each layer; "
        "full keeps every layer's):",
        harness.table(native, ("model", "image", "L_img x L_txt", "block MiB hs", "block MiB full",
                               "full kept GiB / step"))])


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


if __name__ == "__main__":
    sys.exit(main())
