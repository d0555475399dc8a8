"""Shared fixtures: small configs and a CLI runner that keeps stdout and stderr apart."""

import pytest
import torch
from click.testing import CliRunner

collect_ignore = ["plugin_pkg"]  # the example package's own tests run installed, in test_plugin_packages.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def runner():
    return CliRunner()
