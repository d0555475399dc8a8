"""Peak memory of a training step per preset (each in its own process, see peak_memory.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.conftest import DEVICES

TRAIN_BATCH = {"tiny": 32, "small": 8, "reference": 1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", list(TRAIN_BATCH))
def test_train_step_peak_memory(benchmark, preset, device):
    script = Path(__file__).with_name("peak_memory.py")
    result = {}

    def run():
        done = subprocess.run([sys.executable, str(script), "--preset", preset, "--batch", str(TRAIN_BATCH[preset]), "--device", device], capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))

    benchmark.group = f"train step memory {device}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result, impl="ours")
