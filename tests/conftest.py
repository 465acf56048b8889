from pathlib import Path

import pytest
import torch

from data_prep.sample_data import build_sample_dataset
from ddmim.config import make_config


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    return build_sample_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def tiny_cfg():
    torch.manual_seed(0)
    return make_config("tiny", ["train.batch_size=8", "data.num_workers=0"])
