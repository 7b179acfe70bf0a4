"""Session fixtures: the tiny pipelines of `headscope.testing`, built once per test session."""
from __future__ import annotations

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
