"""Test-wide setup: Triton runs in its interpreter when there is no GPU; `gpu` tests skip;
`launch_main` gives launch.py's main to tests that drive the command line in-process;
`one_process_group` gives a test the one-rank gloo group a one-worker training runs in."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def launch_main():
    """launch.main, loaded from the repository's launch.py."""
    spec = importlib.util.spec_from_file_location("launch", REPO_ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def one_process_group(tmp_path):
    """torch.distributed with one gloo rank: what a one-worker `launch.py train` runs in
    (TorchRec's sharded modules need a process group, even of one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'process_group'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()
