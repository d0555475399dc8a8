"""FLOPs counted by torch on the meta device, device peaks, and MFU in training logs and summaries."""

import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

import stvq
from stvq.cli import main
from stvq.config import PriorTrainConfig, TrainConfig
from stvq.errors import StvqError
from stvq.flops import PEAK_ENV, count_flops, cpu_peak, device_peak, emulates_bf16, mfu, tokenizer_flops
from stvq.prior import PriorTrainer
from stvq.train import Trainer

SMALL = {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}


def test_count_flops_counts_the_products_of_forward_and_backward_and_touches_nothing():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 10)
    rng = torch.get_rng_state()
    assert count_flops(model, x, backward=False) == 2 * 3 * (10 * 20 + 20 * 5)
    # backward: both weight gradients, and the input gradient of the second layer only (x needs none)
    assert count_flops(model, x) == 2 * 3 * (10 * 20 + 20 * 5) + 2 * 3 * (10 * 20 + 2 * 20 * 5)
    assert all(p.grad is None for p in model.parameters()) and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())  # a run's exact resume is unaffected


def test_a_tokenizer_costs_what_its_parts_cost_at_the_reference_size():
    with torch.device("meta"):
        model = stvq.create("tokenizer", "styled", preset="reference")
    counted = tokenizer_flops(model, 256)
    # the decoder's plain layers alone: 6 blocks over 292 tokens of width 1024 (QKV, proj, MLP 4x: 12 w^2 per
    # token) and attention (2 products of 292 x 292 x 1024), forward
    plain = 6 * (2 * 292 * 12 * 1024**2 + 2 * 2 * 292**2 * 1024)
    assert counted["decoder"] > 4 * plain  # 18 condition layers cost more than 6 plain ones, each
    assert 2.9 < counted["train"] / counted["forward"] < 3.1  # backward: about twice the forward
    assert counted["forward"] == pytest.approx(370.52e9, rel=1e-3)


def test_info_shows_the_counted_flops(runner):
    result = runner.invoke(main, ["info", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    counted = tokenizer_flops(stvq.create("tokenizer", "styled", preset="tiny"), 64)
    assert re.search(rf"training step, stage 1 \(forward \+ backward\)\s*│\s*{counted['train'] / 1e9:.3f}", result.output)
    assert re.search(rf"decode \(decoder forward\)\s*│\s*{counted['decoder'] / 1e9:.3f}", result.output)


CPUINFO = "processor : 0\nmodel name : Some CPU\ncpu MHz : 2600.000\nflags : fpu sse2 {}\n"


@pytest.mark.parametrize(
    "flags,bf16,per_cycle",
    [
        ("avx2 fma avx512f", False, 64),
        ("avx2 fma", False, 32),
        ("sse4_2", False, 8),
        ("avx2 fma avx512f avx512_bf16", True, 128),
        ("avx2 fma avx512f avx512_bf16 amx_bf16", True, 1024),
        ("avx2 fma avx512f amx_bf16", False, 64),
    ],
)
def test_the_cpu_peak_is_an_estimate_from_cores_clock_and_flags(flags, bf16, per_cycle):
    peak, source = cpu_peak(2, bf16, CPUINFO.format(flags))
    assert peak == 2 * 2.6e9 * per_cycle and source.startswith("estimate: 2 cores x 2.60 GHz")


@pytest.mark.parametrize("flags,emulated", [("avx2 fma", True), ("avx2 fma avx512f", True), ("avx512f avx512_bf16", False), ("amx_bf16", False)])
def test_bf16_is_emulated_on_a_cpu_without_avx512_bf16_or_amx_and_training_says_so(flags, emulated, monkeypatch):
    from stvq import flops
    from stvq.flops import warn_if_bf16_is_emulated

    assert emulates_bf16(torch.device("cpu"), CPUINFO.format(flags)) is emulated
    assert not emulates_bf16(torch.device("cpu"), "processor : 0\nFeatures : fp asimd bf16\n")  # no x86 flags: nothing to say
    assert not emulates_bf16(torch.device("meta"), CPUINFO.format(flags))
    monkeypatch.setattr(flops, "_cpuinfo", lambda: CPUINFO.format(flags))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_bf16_is_emulated(torch.device("cpu"), bf16=True)
        warn_if_bf16_is_emulated(torch.device("cpu"), bf16=False)
    assert [str(w.message).split(":")[0] for w in caught] == (["bf16 on this CPU is emulated (it has neither AVX512_BF16 nor AMX)"] if emulated else [])


def test_the_peak_can_be_overridden_and_a_bad_override_is_one_line(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "989.4")
    assert device_peak(torch.device("cpu"), bf16=True) == (989.4e12, PEAK_ENV)
    for bad in ("fast", "-3", "nan"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(stvq.StvqError, match=f"{PEAK_ENV}="):
            device_peak(torch.device("cpu"), bf16=False)
    assert mfu(None, 100.0, 1e12) is None and mfu(10**9, 100.0, 0.0) is None and mfu(10**9, 100.0, 1e12, world=2) == 0.05


def test_training_logs_mfu_and_its_summary_gives_flops(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "0.5")
    cfg = TrainConfig(preset="tiny", model=SMALL, steps=4, batch_size=4, log_every=2, eval_every=4)
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    expected = count_flops(stvq.create("tokenizer", "styled", preset="tiny", **SMALL), torch.empty(1, 3, 64, 64))
    assert summary["flops_per_item"] == expected and summary["peak_flops"] == 0.5e12 and summary["peak_source"] == PEAK_ENV
    assert summary["mfu"] == pytest.approx(expected * summary["images_per_s"] / 0.5e12)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] == pytest.approx(expected * r["images_per_s"] / 0.5e12) for r in records)


def test_a_model_that_cannot_be_counted_trains_without_mfu_and_one_warning(tmp_path, shards):
    class Uncountable(PriorTrainer):
        def flops_per_item(self, prior):
            raise RuntimeError("meta tensors are not supported here\nsecond line")

    cfg = PriorTrainConfig(shards=str(shards / "shards"), model={"width": 32, "layers": 1, "heads": 2}, steps=2, batch_size=8, eval_every=2)
    with pytest.warns(UserWarning, match=r"^model FLOPs not counted, so no MFU is reported \(meta tensors are not supported here\)$"):
        summary = Uncountable(cfg, tmp_path / "run", progress=False).fit()
    assert summary["flops_per_item"] is None and summary["mfu"] is None and summary["val_nll"] > 0
    counted = PriorTrainer(cfg, tmp_path / "counted", progress=False).fit()
    assert counted["flops_per_item"] > 0 and counted["mfu"] > 0


def test_the_throughput_benchmark_runs_on_cpu_and_reports_each_variant(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from train_throughput import main as benchmark

    monkeypatch.setenv(PEAK_ENV, "1")
    out = tmp_path / "rows.json"
    rows = benchmark(["--presets", "tiny", "--variants", "fp32,fused,bf16,fused+adamw", "--batches", "4", "--steps", "1", "--warmup", "1", "--workers", "0", "--data-batches", "1", "--json", str(out)])
    train = [r for r in rows if "variant" in r]
    assert [(r["variant"], r["optimizer"]) for r in train] == [("fp32", "muon"), ("fused", "muon"), ("bf16", "muon"), ("fused+adamw", "adamw")]
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 for r in train)
    expected = tokenizer_flops(stvq.create("tokenizer", "styled", preset="tiny"), 64)["train"]
    assert all(r["mfu"] == pytest.approx(expected * r["images_per_s"] / 1e12) for r in train)
    assert [r["data"] for r in rows if "data" in r] == ["shapes (rendered)", "JPEG folder (512 px, decoded)"]
    assert json.loads(out.read_text())["device"] == "cpu"
    with pytest.raises(SystemExit):
        benchmark(["--variants", "fp64"])


def test_a_fused_optimizer_takes_the_same_step():
    from stvq.optim import make_optimizer

    steps = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(8, 4)
        opt = make_optimizer(model, TrainConfig(fused_optimizer=fused, optimizer="adamw"))
        assert opt.defaults["fused"] is (True if fused else None)
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        steps.append(model.weight.detach().clone())
    assert torch.allclose(steps[0], steps[1], atol=1e-7)


def test_newton_schulz_in_float32_orthogonalises_as_torchs_bfloat16_does():
    """The CPU's float32 iterations (MuonAdamW off CUDA) and torch's bfloat16 ones give the same
    near-orthogonal update: singular values in the quintic's band about 1, the same direction."""
    from stvq.optim import newton_schulz

    g = torch.randn(6, 64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 0, 256)  # ill-conditioned, wide
    coefficients = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's
    out = {dt: newton_schulz(g, coefficients, 5, 1e-7, dt).float() for dt in (torch.bfloat16, torch.float32)}
    assert out[torch.float32].dtype == torch.float32 and not torch.equal(out[torch.float32], out[torch.bfloat16])
    for o in out.values():
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3
    cos = torch.nn.functional.cosine_similarity(out[torch.float32].flatten(1), out[torch.bfloat16].flatten(1))
    assert cos.min() > 0.98
    assert newton_schulz(g.mT, coefficients, 5, 1e-7, torch.float32).shape == (6, 256, 64)  # tall: transposed and back


@pytest.mark.parametrize("shape", [(4, 64, 256), (3, 32, 32), (2, 512, 64), (1, 16, 1024)])
def test_newton_schulz_on_the_gram_matrix_is_the_same_function(shape):
    """The Gram form (the iterations on x x^T, x multiplied once) gives the quintic's iterate to within
    float32 rounding of the literal one's in float64, for wide, square and tall matrices, ill-conditioned."""
    from stvq.optim import newton_schulz

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 0, shape[-1])
    coefficients = (3.4445, -4.775, 2.0315)
    exact = newton_schulz(g.double(), coefficients, 5, 1e-7, torch.float64)
    for gram in (False, True):
        out = newton_schulz(g, coefficients, 5, 1e-7, torch.float32, gram=gram)
        assert out.shape == shape and out.dtype == torch.float32
        assert ((out.double() - exact).norm() / exact.norm()) < 3e-4, gram
    assert not torch.allclose(newton_schulz(g, coefficients, 4, 1e-7, torch.float32, gram=True).double(), exact, rtol=1e-3)  # the steps count


def test_muon_steps_the_blocks_matrices_and_adamw_the_rest_and_resumes_exactly():
    """optimizer=muon: each parameter takes the step torch's own Muon (the blocks' matrices; ours batches
    same-shaped ones) or AdamW (all else) gives it, in torch's bfloat16 iterations to within float32
    rounding and in the CPU's default float32 iterations to within bfloat16's; a state_dict round trip
    continues as the uninterrupted optimizer."""
    from stvq.optim import make_optimizer

    def model():
        torch.manual_seed(0)
        blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        return nn.ModuleDict({"blocks": blocks, "head": nn.Linear(8, 3)})  # three shapes: two batched, one tall, one wide

    def run(m, opt, steps, start=0):
        for i in range(start, start + steps):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            m["head"](m["blocks"](x)).square().mean().backward()
            opt.step()

    cfg = TrainConfig(optimizer="muon", lr=1e-2, lr_scales={}, muon_params=("blocks",))
    ours, exact = model(), model()
    opt = make_optimizer(ours, cfg)
    assert opt.ns_dtype is None  # float32 iterations on a CPU (bfloat16 on CUDA)
    assert sum(p.ndim for g in opt.param_groups if g["muon"] for p in g["params"]) == 8  # the blocks' 4 matrices: not the head's, not biases
    run(ours, opt, 3)
    as_torch = make_optimizer(exact, cfg)
    as_torch.ns_dtype = torch.bfloat16
    run(exact, as_torch, 3)
    literal = model()
    muon = [literal["blocks"][i].weight for i in (0, 2, 3, 5)]
    rest = [p for p in literal.parameters() if all(p is not q for q in muon)]
    decayed = [p for p in rest if p.ndim == 2]
    opts = [
        torch.optim.Muon(muon, lr=1e-2, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": [p for p in rest if p.ndim != 2], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, cfg.beta2)),
    ]

    class Both:
        def zero_grad(self):
            for o in opts:
                o.zero_grad()

        def step(self):
            for o in opts:
                o.step()

    run(literal, Both(), 3)
    for (name, a), b, c in zip(exact.named_parameters(), literal.parameters(), ours.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
        assert torch.allclose(c, b, atol=5e-3) and (name.startswith("head") or "bias" in name or not torch.allclose(c, b, atol=1e-6)), name
    resumed = model()
    resumed.load_state_dict(ours.state_dict())
    again = make_optimizer(resumed, cfg)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint would: no shared buffers
    run(ours, opt, 2, start=3)
    run(resumed, again, 2, start=3)
    for a, b in zip(ours.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(StvqError, match="optimizer 'sgd' is not one of adamw, muon"):
        TrainConfig(optimizer="sgd")


def test_muon_steps_a_convolution_as_the_matrix_of_its_linear_map():
    """A convolution's weight (out, in, k, k) named in muon_params takes the step that the (out, in k k)
    matrix with its gradients takes, at that matrix's adjusted rate, and its momentum keeps the weight's shape."""
    from stvq.optim import make_optimizer

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    linear = nn.Linear(36, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
    cfg = TrainConfig(optimizer="muon", lr=1e-2, lr_scales={}, muon_params=("blocks",))
    nets = nn.ModuleDict({"blocks_conv": conv}), nn.ModuleDict({"blocks_linear": linear})
    opts = [make_optimizer(net, cfg) for net in nets]
    start = conv.weight.detach().clone()
    assert [sum(len(g["params"]) for g in o.param_groups if g["muon"]) for o in opts] == [1, 1]
    for step in range(3):
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(step))
        patches = nn.functional.unfold(x, 3).mT  # (2, 9, 36): what the convolution multiplies
        for o in opts:
            o.zero_grad()
        conv(x).square().mean().backward()
        linear(patches).square().mean().backward()
        for o in opts:
            o.step()
        assert torch.allclose(conv.weight.flatten(1), linear.weight, atol=1e-6), step
    assert opts[0].state_dict()["state"][0]["momentum_buffer"].shape == (8, 4, 3, 3)
    assert not torch.allclose(conv.weight, start, atol=1e-3)


@pytest.mark.slow
def test_the_prepared_gpu_session_runs_every_part_on_cpu(tmp_path):
    """benchmarks/gpu_session.py, README's command for a lent GPU, with --smoke: every part writes its files."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_session import main as session

    got = session(["--out", str(tmp_path), "--smoke"])
    assert json.loads((tmp_path / "session.json").read_text())["train_tiny"]["steps"] == 2 == got["train_tiny"]["steps"]
    for name in ("oracle_mse", "oracle_adversarial"):
        curve = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert curve[0]["step"] == 0 and "val_shape_accuracy" in curve[-1] and (tmp_path / f"{name}.png").is_file()
    assert got["oracle_adversarial"]["steps"] == got["oracle_mse"]["steps"]  # the adversarial run at equal steps
    assert (tmp_path / "throughput.json").is_file() and (tmp_path / "train_tiny" / "summary.json").is_file()
