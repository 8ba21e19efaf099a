"""Fixtures shared by the test files that launch real training processes."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    """Environment for training subprocesses: one data cache per test session ($SCALEINV_CACHE when
    set, as scripts/test.sh does), no inherited test hooks, wandb off, the checkout importable."""
    cache = os.environ.get("SCALEINV_CACHE") or str(tmp_path_factory.getbasetemp() / "scaleinv_cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEINV_TEST_")}
    return {**env, "SCALEINV_CACHE": cache, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and stall on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
