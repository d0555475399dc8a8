"""Shared settings of the benchmark suite: presets with batch sizes that fit 24 GB on a CPU machine, and
the devices present (cpu; cuda when available)."""

import pytest
import torch

# (preset, batch for one condition block, batch for a whole encoder or decoder)
SIZES = [("tiny", 32, 16), ("small", 8, 4), ("reference", 2, 1)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
