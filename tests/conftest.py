"""Session fixtures: the tiny pipelines of `headscope.testing`, built once per test session."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from headscope.testing import build_tiny_sd, build_tiny_sdxl

# Tiny models: one thread avoids OpenMP spin-waits that make a busy 2-core machine 100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd_folder(tiny_sd, tmp_path_factory):
    """The tiny SD pipeline saved with save_pretrained, as a user's model folder."""
    folder = tmp_path_factory.mktemp("tiny-sd-saved") / "pipeline"
    tiny_sd.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    from headscope.testing_joint import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from headscope.testing_joint import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


def _saved_joint(pipe, tmp_path_factory, name):
    """A tiny joint pipeline saved with save_pretrained, with the 16-token T5 length its tests generate at."""
    folder = tmp_path_factory.mktemp(name) / "pipeline"
    pipe.save_pretrained(folder)
    (folder / "headscope.json").write_text(json.dumps({"defaults": {"max_sequence_length": 16}}))
    return folder


@pytest.fixture(scope="session")
def sd3_folder(tiny_sd3, tmp_path_factory):
    """The tiny SD3 pipeline as a user's model folder (tests only read it)."""
    return _saved_joint(tiny_sd3, tmp_path_factory, "tiny-sd3-saved")


@pytest.fixture(scope="session")
def flux_folder(tiny_flux, tmp_path_factory):
    """The tiny Flux pipeline as a user's model folder (tests only read it)."""
    return _saved_joint(tiny_flux, tmp_path_factory, "tiny-flux-saved")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark(NAME)`: benchmarks/NAME.py as a fresh module, importing as `python benchmarks/NAME.py`
    does (benchmarks/ on sys.path, for `import harness`)."""
    def load(name: str):
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
