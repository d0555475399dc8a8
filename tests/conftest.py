"""Shared fixtures: small configs and a CLI runner that keeps stdout and stderr apart."""

import pytest
import torch
from click.testing import CliRunner


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def runner():
    return CliRunner()


def _randomise(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every all-zero parameter random values. A fresh decoder starts each block as the identity
    (zero output projections and AdaLN modulations), so a test of what reaches where would pass trivially
    on it; a trained decoder has no such zeros."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, std)
    return module


@pytest.fixture
def randomise():
    return _randomise
