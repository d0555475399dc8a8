"""The decoder oracle (stvq.oracle): every registered decoder fed the true ``shapes`` factors and trained
alone for a fixed wall-time budget; the benchmark records the validation PSNR curve against steps and
seconds in extra_info. The budget is STVQ_ORACLE_SECONDS (default 60); the records' table uses 300:

    STVQ_ORACLE_SECONDS=300 pytest benchmarks/test_oracle.py --benchmark-only --benchmark-json=oracle.json
"""

import os

import pytest

from stvq.registry import list_plugins
from stvq_reference.shapes.oracle import run_oracle

SECONDS = float(os.environ.get("STVQ_ORACLE_SECONDS", "60"))


@pytest.mark.parametrize("decoder", list_plugins("decoder")["decoder"])
def test_decoder_oracle(benchmark, decoder):
    result = benchmark.pedantic(lambda: run_oracle(decoder, "tiny", train={"steps": 10**6}, seconds=SECONDS), rounds=1, iterations=1)
    benchmark.group = f"decoder oracle tiny {SECONDS:.0f} s"
    benchmark.extra_info.update(
        decoder=decoder,
        impl=decoder,
        seconds=SECONDS,
        final_psnr=result.final_psnr,
        images_per_s=result.images_per_s,
        curve=result.curve,
    )
