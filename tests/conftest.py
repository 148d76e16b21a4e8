"""Every test runs on CPU with 8 virtual devices, set before JAX is imported."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tokenizer():
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    return train_builtin_tokenizer(512, seed=0)


@pytest.fixture
def smoke_config():
    """The smoke variant of the default config, unlocked for per-test tweaks."""
    from jit_tune.config import load_config

    config = load_config(str(REPO / "configs/tiny.py") + ":smoke")
    config.unlock()
    return config
