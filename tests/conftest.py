import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; it must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from data_prep.sample_data import build_sample_dataset
from ddmim.config import make_config


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    return build_sample_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def tiny_cfg():
    torch.manual_seed(0)
    return make_config("tiny", ["train.batch_size=8", "data.num_workers=0"])
