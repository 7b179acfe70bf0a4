"""A training run's folder: atomic checkpoints, the JSON log, and the EMA of the weights.

Both trainers (`train.py`: the UNet model, `train_mmdit.py`: the SD3-style model) keep their state this
way: weights as safetensors, the trainer state (optimizer, step) as a weights-only torch file, so a
resumed run never unpickles anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headscope.io import atomic_path, uninterrupted


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Weights as safetensors, trainer state (optimizer, step) as a weights-only torch file; Ctrl-C waits
    until both are written, so a resumed run never pairs new weights with an old step."""
    with uninterrupted():
        with atomic_path(path / "weights.safetensors") as temporary:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary))
        with atomic_path(path / "state.pt") as temporary:
            torch.save(state, temporary)


def load_checkpoint(path: Path):
    """(weights, trainer state) of a checkpoint folder, or (None, None) when it holds none yet."""
    if not (path / "state.pt").is_file():
        return None, None
    return load_file(str(path / "weights.safetensors")), torch.load(path / "state.pt", weights_only=True)


def starting_point(run_dir: Path, checkpoint: str, init_from: str | None):
    """(weights, trainer state) a run starts from: its own checkpoint folder `checkpoint` when it has one
    (resuming), else, for a fine-tuning phase, the `init_from` run's (state None: a fresh optimizer and
    step 0; the log records where and at which step it started), else (None, None)."""
    weights, state = load_checkpoint(run_dir / checkpoint)
    if state is None and init_from:
        weights, source = load_checkpoint(Path(init_from) / checkpoint)
        if weights is None:
            raise FileNotFoundError(f"{init_from} holds no {checkpoint} checkpoint to start from")
        log(run_dir, {"stage": "init", "from": str(init_from), "step": source["step"], "time": time.time()})
    return weights, state


def log(run_dir: Path, record: dict) -> None:
    """Append one JSON record to the run's log.jsonl."""
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - decay)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix.`, with that prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
