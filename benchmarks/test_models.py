"""Whole models: our encoder and decoder against a timm VisionTransformer of the same depth, width and
token count (the peer a user compares to), the tokenizer's encode+quantize throughput, and the
torch.compile path against eager."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import stvq
from benchmarks.conftest import DEVICES, SIZES, sync
from stvq_reference.config import StyledConfig


def timm_peer(cfg, depth: int) -> VisionTransformer:
    """A timm ViT with cfg's patches, width and heads, ``depth`` blocks and 36 register tokens, so its
    sequence is the same num_patches + 36 tokens."""
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=False,
        reg_tokens=cfg.num_tokens,
        num_classes=0,
        global_pool="",
    )


def timed(benchmark, fn, device, rounds):
    def step():
        with torch.no_grad():
            fn()
        sync(device)

    if rounds:
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "linear head", "timm"])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("preset,_,batch", SIZES, ids=[s[0] for s in SIZES])
def test_model_forward(benchmark, preset, _, batch, part, impl, device):
    """Our encoder or decoder against timm's ViT; "linear head" is the decoder with the reference out_conv
    alone (``head=linear``), where a preset ends in another head (tiny's pixel head): the trunk's cost
    apart from the head's."""
    cfg = StyledConfig.PRESETS[preset]
    if impl == "linear head":
        if part == "encoder" or cfg.head == "linear":
            pytest.skip("the same model as ours")
        cfg = cfg.make(cfg, head="linear", head_channels=0)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    if impl == "timm":
        depth = cfg.encoder_layers if part == "encoder" else cfg.condition_layers + cfg.plain_layers
        model = timm_peer(cfg, depth).to(device).eval()
        fn = lambda: model.forward_features(images)  # noqa: E731
    elif part == "encoder":
        model = stvq.create("encoder", cfg.encoder, config=cfg).to(device).eval()
        fn = lambda: model(images)  # noqa: E731
    else:  # ours, or ours with the linear head
        model = stvq.create("decoder", cfg.decoder, config=cfg).to(device).eval()
        codes = torch.randn(batch, cfg.num_tokens, cfg.code_dim, device=device)
        fn = lambda: model(codes)  # noqa: E731
    benchmark.group = f"{part} forward {preset} {device}"
    benchmark.extra_info.update(preset=preset, batch=batch, impl=impl, device=device, part=part)
    timed(benchmark, fn, device, rounds=3 if preset == "reference" else 0)


@pytest.mark.parametrize("preset,_,batch", SIZES[:2], ids=[s[0] for s in SIZES[:2]])
def test_encode_quantize_throughput(benchmark, preset, _, batch):
    cfg = StyledConfig.PRESETS[preset]
    tok = stvq.create("tokenizer", "styled", config=cfg, quantizer={"name": "kmeans", "codebook_size": 1024}).eval()
    tok.quantizer.fit(torch.randn(4096, cfg.code_dim))
    images = torch.rand(batch * 4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    benchmark.group = f"encode+quantize {preset} cpu"
    benchmark.extra_info.update(preset=preset, batch=len(images), impl="ours", device="cpu", images=len(images))
    benchmark(lambda: tok.encode(images))


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_decoder_compile_tiny(benchmark, impl):
    cfg = StyledConfig.PRESETS["tiny"]
    decoder = stvq.create("decoder", "styled", config=cfg).eval()
    if impl == "compiled":
        decoder.compile()
    codes = torch.randn(16, cfg.num_tokens, cfg.code_dim)
    with torch.no_grad():
        decoder(codes)  # compile outside the timing
    benchmark.group = "decoder forward tiny cpu compile"
    benchmark.extra_info.update(preset="tiny", batch=16, impl=impl, device="cpu")
    timed(benchmark, lambda: decoder(codes), "cpu", rounds=0)


@pytest.mark.parametrize("impl", ["encoder every step", "cached codes"])
@pytest.mark.parametrize("preset,_,batch", SIZES[:2], ids=[s[0] for s in SIZES[:2]])
def test_stage2_step(benchmark, preset, _, batch, impl):
    """One stage-2 training step (frozen encoder, k-means codes, decoder updated), the encoder run every
    step against codes that `stvq quantize` cached."""
    cfg = StyledConfig.PRESETS[preset]
    model = stvq.create("tokenizer", "styled", config=cfg, quantizer={"name": "kmeans", "codebook_size": 256})
    model.quantizer.fit(torch.randn(4096, cfg.code_dim))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.encoder.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(batch * 2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        cached = model.encode_codes(images) if impl == "cached codes" else None

    def step():
        out = model(images, quantize=True, codes=cached)
        loss = (out.reconstruction - images).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    benchmark.group = f"stage-2 step {preset} cpu"
    benchmark.extra_info.update(preset=preset, batch=len(images), impl=impl, device="cpu")
    benchmark(step)
