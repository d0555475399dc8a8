"""The hot path: one condition block, forward and forward+backward. Four implementations of the same
shapes side by side in one group: ours, the literal original (plugins/stvq_reference/literal_block.py, same weights),
the bare compute (its matrix products and one SDPA call, the arithmetic no implementation avoids) and timm's
plain ViT block of the same width (no codes, no styles: the cost of a block that conditions on nothing)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICES, SIZES, sync
from stvq_reference.config import StyledConfig
from stvq_reference.decoder import ConditionBlock
from stvq_reference.layers import vit_block
from stvq_reference.literal_block import LiteralConditionBlock


def make(preset: str, batch: int, device: str, dtype=torch.float32):
    cfg = StyledConfig.PRESETS[preset]
    block = ConditionBlock(5, cfg.width, cfg.heads, cfg.mlp_ratio).to(device, dtype)
    literal = LiteralConditionBlock.from_block(block)
    x = torch.randn(batch, cfg.seq_len, cfg.width, device=device, dtype=dtype)
    condition = torch.randn(batch, 2, cfg.width, device=device, dtype=dtype)
    return cfg, block, literal, x, condition


def bare_compute(block: ConditionBlock, heads: int):
    """The block's unavoidable arithmetic: QKV, SDPA, output projection, MLP, and the four style
    projections (per batch row). No norms, activations or residual adds."""
    wqkv, wo = block.attn.qkv.weight, block.attn.proj.weight
    w1, w2 = block.mlp.fc1.weight, block.mlp.fc2.weight
    styles = [block.condition_1.weight, block.condition_2.weight, block.norm1.modulation.weight, block.norm2.modulation.weight]

    def run(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        s = sum((condition[:, 0] @ w.T).sum() for w in styles)
        q, k, v = (x @ wqkv.T).view(b, l, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d) @ wo.T
        return (a @ w1.T) @ w2.T + s

    return run


IMPLEMENTATIONS = ["ours", "literal", "bare", "timm"]


def runner(impl, block, literal, cfg, x, condition):
    if impl == "ours":
        return lambda xx, cc: block(xx, cc)
    if impl == "literal":
        return lambda xx, cc: literal(xx.transpose(0, 1), cc.transpose(0, 1)).transpose(0, 1)
    if impl == "timm":
        plain = vit_block(cfg.width, cfg.heads, cfg.mlp_ratio).to(x.device, x.dtype)
        return lambda xx, cc: plain(xx)
    return bare_compute(block, cfg.heads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("preset,batch,_", SIZES, ids=[s[0] for s in SIZES])
def test_block_forward(benchmark, preset, batch, _, impl, device):
    cfg, block, literal, x, condition = make(preset, batch, device)
    fn = runner(impl, block, literal, cfg, x, condition)
    benchmark.group = f"block forward {preset} {device}"
    benchmark.extra_info.update(preset=preset, batch=batch, impl=impl, device=device, tokens=cfg.seq_len, width=cfg.width)

    def step():
        with torch.no_grad():
            fn(x, condition)
        sync(device)

    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("preset,batch,_", SIZES, ids=[s[0] for s in SIZES])
def test_block_forward_backward(benchmark, preset, batch, _, impl, device):
    cfg, block, literal, x, condition = make(preset, batch, device)
    x.requires_grad_()
    condition.requires_grad_()
    fn = runner(impl, block, literal, cfg, x, condition)
    grad = torch.randn_like(x)
    benchmark.group = f"block forward+backward {preset} {device}"
    benchmark.extra_info.update(preset=preset, batch=batch, impl=impl, device=device, tokens=cfg.seq_len, width=cfg.width)

    def step():
        fn(x, condition).backward(grad)
        sync(device)

    benchmark(step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 matters on GPUs")
@pytest.mark.parametrize("impl", ["ours", "literal"])
def test_block_forward_backward_bf16_reference(benchmark, impl):
    cfg, block, literal, x, condition = make("reference", 16, "cuda", torch.bfloat16)
    x.requires_grad_()
    fn = runner(impl, block, literal, cfg, x, condition)
    grad = torch.randn_like(x)
    benchmark.group = "block forward+backward reference cuda bf16"
    benchmark.extra_info.update(preset="reference", batch=16, impl=impl, device="cuda", dtype="bf16")
    benchmark(lambda: (fn(x, condition).backward(grad), sync("cuda")))


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("preset,batch,_", SIZES, ids=[s[0] for s in SIZES])
def test_block_interleaved_ratio(benchmark, preset, batch, _, mode):
    """The four implementations called in turn, so that all see the same machine load; records the
    median of the per-round time ratios ours / literal, ours / bare and timm / bare. Sequential groups
    drift on shared machines."""
    import statistics
    import time

    cfg, block, literal, x, condition = make(preset, batch, "cpu")
    if mode == "forward+backward":
        x.requires_grad_()
    grad = torch.randn_like(x)
    fns = {impl: runner(impl, block, literal, cfg, x, condition) for impl in IMPLEMENTATIONS}
    rounds = 30 if preset != "reference" else 10

    def timed(fn):
        start = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                fn(x, condition)
        else:
            fn(x, condition).backward(grad)
        return time.perf_counter() - start

    def run():
        for fn in fns.values():  # warm up each
            timed(fn)
        times = [{impl: timed(fn) for impl, fn in fns.items()} for _ in range(rounds)]
        for a, b in (("ours", "literal"), ("ours", "bare"), ("timm", "bare")):
            benchmark.extra_info[f"{a}/{b}"] = statistics.median(t[a] / t[b] for t in times)
        benchmark.extra_info.update(rounds=rounds)

    benchmark.group = f"block interleaved {mode}"
    benchmark.extra_info.update(preset=preset, batch=batch, impl=f"{preset}", device="cpu", mode=mode)
    benchmark.pedantic(run, rounds=1, iterations=1)
