"""The reference Styled VQ (docs/model.md): shapes at full size, the parameter count, which codes each
condition layer reads, equivalence with the literal original block, and save/load."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stvq
from stvq.metrics import _probe_score
from stvq.pretrained import load_pretrained
from stvq_reference.config import StyledConfig, make_config
from stvq_reference.decoder import ConditionBlock, StyledDecoder, placeholder_mask
from stvq_reference.encoder import StyledEncoder
from stvq_reference.layers import position_tokens
from stvq_reference.literal_block import LiteralConditionBlock
from stvq_reference.shapes import ShapesDataset


def expected_parameters(cfg: StyledConfig) -> int:
    """The architecture's parameter count, written out independently of the modules."""
    d, n, p, c, h = cfg.width, cfg.num_tokens, cfg.num_patches, cfg.code_dim, int(cfg.width * cfg.mlp_ratio)
    ln = 2 * d
    attn = 3 * d * d + 3 * d + d * d + d
    mlp = d * h + h + h * d + d
    vit = 2 * ln + attn + mlp
    patch = 3 * cfg.patch_size**2
    encoder = patch * d + d + p * d + n * d + cfg.encoder_layers * vit + ln + d * c + c
    condition = attn + mlp + 2 * (d * d + d) + 2 * ln + 2 * (d * 2 * d + 2 * d)
    k = cfg.head_channels
    unpatchify = d * k * cfg.patch_size**2 + k
    out = {
        "linear": d * patch + 3,
        "pixel": unpatchify + (d * k + k) + (k * k * 9 + k) + (k * 2 * k + 2 * k) + (2 * k * 3 + 3),  # smooth, mix, MLP
    }[cfg.head]
    decoder = c * d + d + n * d + p * d + cfg.condition_layers * condition + cfg.plain_layers * vit + ln + out
    return encoder + decoder


@pytest.mark.slow
def test_reference_forward_shapes_and_parameter_count():
    model = stvq.create("tokenizer", "styled", preset="reference").eval()
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(StyledConfig.PRESETS["reference"]) == 720_185_363
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert out.codes.shape == (1, 36, 16)
    assert out.reconstruction.shape == (1, 3, 256, 256)
    assert torch.isfinite(out.reconstruction).all()


@pytest.mark.parametrize("preset", sorted(StyledConfig.PRESETS))
def test_every_preset_has_two_tokens_per_condition_layer_and_counts_match(preset):
    cfg = StyledConfig.PRESETS[preset]
    assert cfg.num_tokens == 2 * cfg.condition_layers == 36
    with torch.device("meta"):
        model = stvq.create("tokenizer", "styled", config=cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg)


def test_tiny_shapes():
    model = stvq.create("tokenizer", "styled", preset="tiny")
    out = model(torch.rand(3, 3, 64, 64) * 2 - 1, noise_sigma=0.1)
    assert out.codes.shape == (3, 36, 16)
    assert out.reconstruction.shape == (3, 3, 64, 64)


def test_wrong_image_size_is_a_clear_error():
    model = stvq.create("tokenizer", "styled", preset="tiny")
    with pytest.raises(stvq.StvqError, match=r"expected images of shape \(B, 3, 64, 64\), got \(1, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_stage1_model_refuses_ids_with_a_pointer_to_quantize():
    model = stvq.create("tokenizer", "styled", preset="tiny")
    with pytest.raises(stvq.StvqError, match="stvq quantize"):
        model.encode(torch.zeros(1, 3, 64, 64))


def _trace_condition_layers(decoder: StyledDecoder, codes: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(input state, condition, output state) of every condition layer."""
    trace = []
    hooks = [block.register_forward_hook(lambda mod, args, out: trace.append((args[0].clone(), args[1].clone(), out.clone()))) for block in decoder.condition_blocks]
    with torch.no_grad():
        decoder(codes)
    for hook in hooks:
        hook.remove()
    return trace


@pytest.mark.parametrize("j", [0, 1, 7, 20, 35])
def test_condition_layer_i_reads_only_codes_2i_and_2i_plus_1(j):
    decoder = StyledDecoder(preset="tiny").eval()
    codes = torch.randn(2, 36, 16)
    perturbed = codes.clone()
    perturbed[:, j] += 1.0
    base, other = _trace_condition_layers(decoder, codes), _trace_condition_layers(decoder, perturbed)
    for i, ((x0, c0, y0), (x1, c1, y1)) in enumerate(zip(base, other)):
        assert torch.equal(c0, c1) == (j // 2 != i), f"layer {i}'s conditioning input"
        if i < j // 2:  # code j has not been consumed yet: nothing in this layer may change
            assert torch.equal(x0, x1) and torch.equal(y0, y1), f"layer {i} changed"
    assert not torch.equal(base[j // 2][2], other[j // 2][2])  # the consuming layer's output does change


def _literal_inputs(block: ConditionBlock, batch: int, seq: int, width: int):
    for norm in (block.norm1, block.norm2):  # make the modulation matter, unlike a near-identity init
        torch.nn.init.normal_(norm.modulation.weight, std=0.1)
        torch.nn.init.normal_(norm.modulation.bias, std=0.1)
    x = torch.randn(batch, seq, width, requires_grad=True)
    condition = torch.randn(batch, 2, width, requires_grad=True)
    return x, condition


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """Equal within ``tol`` relative to the tensor's scale (gradients summed over many rows are large,
    and float32 summation order differs between the two implementations)."""
    scale = max(1.0, theirs.abs().max().item())
    error = (ours - theirs).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x scale {scale:.3g}"


GRAD_PAIRS = [  # (ours, literal)
    ("attn.qkv.weight", "attn1.in_proj_weight"),
    ("attn.qkv.bias", "attn1.in_proj_bias"),
    ("attn.proj.weight", "attn1.out_proj.weight"),
    ("mlp.fc1.weight", "mlp.0.weight"),
    ("mlp.fc2.bias", "mlp.2.bias"),
    ("condition_1.weight", "condition_1.weight"),
    ("ln_1.weight", "ln_1.weight"),
    ("condition_2.weight", "condition_2.weight"),
    ("ln_2.bias", "ln_2.bias"),
]


@pytest.mark.parametrize(
    "width,heads,seq,index,masked",
    [(128, 4, 100, 0, False), (128, 4, 100, 17, True), (512, 8, 100, 5, False), (1024, 16, 292, 9, True)],
    ids=["tiny-first", "tiny-last-masked", "small", "reference-masked"],
)
def test_our_block_computes_the_literal_original(width, heads, seq, index, masked):
    block = ConditionBlock(index, width, heads)
    x, condition = _literal_inputs(block, 2, seq, width)
    literal = LiteralConditionBlock.from_block(block)
    allowed = placeholder_mask(36, seq) if masked else None

    ours = block(x, condition, allowed)
    xs = x.detach().transpose(0, 1).requires_grad_()
    cs = condition.detach().transpose(0, 1).requires_grad_()
    theirs = literal(xs, cs, ~allowed if masked else None).transpose(0, 1)
    assert_same(ours, theirs, "output")

    weight = torch.randn_like(ours)
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    assert_same(x.grad, xs.grad.transpose(0, 1), "grad x")
    assert_same(condition.grad, cs.grad.transpose(0, 1), "grad condition")
    ours_params, literal_params = dict(block.named_parameters()), dict(literal.named_parameters())
    for a, b in GRAD_PAIRS:
        assert_same(ours_params[a].grad, literal_params[b].grad, f"grad {a}")
    scale_shift = torch.cat([literal.norm1.scale.weight.grad, literal.norm1.shift.weight.grad])
    assert_same(block.norm1.modulation.weight.grad, scale_shift, "grad norm1.modulation.weight")


def test_causal_placeholder_mask_hides_later_placeholders_only():
    mask = placeholder_mask(4, 6)
    assert mask[0, :4].tolist() == [True, False, False, False]
    assert mask[3, :4].tolist() == [True, True, True, True]
    assert mask[:, 4:].all() and mask[4:].all()


@pytest.mark.parametrize("masked", [True, False])
def test_causal_mask_hides_later_placeholders_from_earlier_rows(masked):
    # AdaLN styles modulate every row, so the mask is about what attention reads: a change in the state
    # of placeholder 20 (not one of this layer's two rows) must not reach rows 0..19 when masked.
    block = ConditionBlock(3, 128, 4).eval()
    mask = placeholder_mask(36, 100) if masked else None
    x, condition = torch.randn(2, 100, 128), torch.randn(2, 2, 128)
    changed = x.clone()
    changed[:, 20] += 1.0
    with torch.no_grad():
        before, after = block(x, condition, mask), block(changed, condition, mask)
    assert torch.equal(before[:, :20], after[:, :20]) == masked
    assert not torch.equal(before[:, 21:], after[:, 21:])


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = stvq.create("tokenizer", "styled", preset="tiny", code_dim=8).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    for loaded in (load_pretrained(tmp_path / "m"), stvq.load_tokenizer(tmp_path / "m"), type(model).from_pretrained(tmp_path / "m")):
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)


def test_config_weights_mismatch_names_the_first_tensors(tmp_path):
    stvq.create("tokenizer", "styled", preset="tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["options"]["config"]["code_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(stvq.CheckpointError, match=r"shape mismatch: encoder\.head\.weight: checkpoint \(16, 64\) vs model \(8, 64\)"):
        stvq.load_tokenizer(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(stvq.CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(stvq.StvqError, match="neither a directory written by stvq nor a registered tokenizer"):
        stvq.load_tokenizer(tmp_path / "absent")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"widht": 64}, "unknown config field.*widht"),
        ({"image_size": 60}, "not a multiple of patch_size"),
        ({"width": 129}, "not divisible by heads"),
        ({"attn_mask": "causal"}, "attn_mask 'causal' is not one of"),
        ({"encoder_init": "xavier"}, "encoder_init 'xavier' is not one of vit, lecun-sincos"),
        ({"heads": 0}, "config field heads must be at least 1"),
        ({"patch_size": 0}, "config field patch_size must be at least 1"),
        ({"code_dim": 0}, "config field code_dim must be at least 1"),
        ({"mlp_ratio": -1.0}, "config field mlp_ratio must be a positive number"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"head": "mlp"}, "head 'mlp' is not one of linear, pixel"),
        ({"head": "linear", "head_channels": 16}, "head 'linear' writes RGB from out_conv and takes no head_channels"),
        ({"head": "pixel", "head_channels": 0}, r"head 'pixel' needs head_channels > 0"),
    ],
)
def test_bad_config_values_are_clear_errors(overrides, message):
    with pytest.raises(stvq.ConfigError, match=message):
        make_config(preset="tiny", **overrides) if "preset" not in overrides else make_config(**overrides)


@pytest.mark.parametrize(
    "options",
    [
        {"head": "pixel", "head_channels": 8},
        {"head": "pixel", "head_channels": 8, "patch_size": 8},
        {"head": "linear", "head_channels": 0},
    ],
)
def test_recipe_options_keep_shapes_and_the_closed_form_parameter_count(options):
    cfg = make_config(preset="tiny", **options)
    model = stvq.create("tokenizer", "styled", config=cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg)
    out = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.codes.shape == (2, 36, 16) and out.reconstruction.shape == (2, 3, 64, 64)


def _location_r2(encoder_init: str) -> float:
    """R^2 of the object's x read from a fresh tiny encoder's codes on held-out images, by the linear probe
    that `stvq eval` uses."""
    torch.manual_seed(0)
    data = ShapesDataset(64, "train", seed=0)
    images = torch.stack([data[i] for i in range(1500)])
    x = np.array([data.factors(i)["x"] for i in range(1500)])
    with torch.no_grad():
        codes = StyledEncoder(preset="tiny", encoder_init=encoder_init)(images).flatten(1).double().numpy()
    return _probe_score(codes[:1200], x[:1200], codes[1200:], x[1200:], classes=0)


@pytest.mark.slow
def test_a_lecun_sincos_encoder_tells_where_the_object_is_before_any_training():
    # The plateau's mechanism (README): a ViT-initialised narrow encoder pools its patches as if it did not
    # know where they are, so its codes carry no position and the decoder never learns to place objects.
    assert _location_r2("vit") < 0.1
    assert _location_r2("lecun-sincos") > 0.4


def test_lecun_sincos_starts_the_encoder_with_fan_in_weights_and_sincos_positions():
    encoder = StyledEncoder(preset="tiny", encoder_init="lecun-sincos")
    fc1 = encoder.blocks[0].mlp.fc1.weight  # (256, 64)
    assert 0.7 * 64**-0.5 < fc1.std().item() < 64**-0.5
    assert torch.equal(encoder.pos_embed, position_tokens(4, 64, "sincos"))  # the tiny grid: 4 x 4 patches
    assert StyledEncoder(preset="tiny", encoder_init="vit").blocks[0].mlp.fc1.weight.std().item() < 0.025


def test_sincos_position_tokens_start_distinct_and_smooth():
    tokens = position_tokens(8, 64, "sincos")  # a lecun-sincos encoder's start, on an 8 x 8 grid
    grid = tokens[0].view(8, 8, -1)  # (H, W, D), row-major tokens
    neighbour = (grid[:, 1:] - grid[:, :-1]).norm(dim=-1).mean()
    far = (grid[:, 7] - grid[:, 0]).norm(dim=-1).mean()
    assert far > 2 * neighbour > 0  # nearby tokens are alike, distant ones are not
    assert tokens.requires_grad


def test_unordered_baseline_has_the_same_size_but_every_code_reaches_layer_0():
    from stvq_reference.unordered import UnorderedDecoder

    styled, unordered = StyledDecoder(preset="tiny").eval(), UnorderedDecoder(preset="tiny").eval()
    assert [p.shape for p in styled.parameters()] == [p.shape for p in unordered.parameters()]
    codes = torch.randn(1, 36, 16)
    perturbed = codes.clone()
    perturbed[:, 35] += 1.0
    for decoder, reaches in ((styled, False), (unordered, True)):
        outputs = []
        hook = decoder.condition_blocks[0].register_forward_hook(lambda mod, args, out, outputs=outputs: outputs.append(out))
        with torch.no_grad():
            decoder(codes), decoder(perturbed)
        hook.remove()
        assert (not torch.equal(outputs[0], outputs[1])) == reaches


def test_the_titok_decoder_puts_every_code_in_context_and_runs_plain_vit_layers_only(tmp_path, runner):
    from timm.models.vision_transformer import Block

    from stvq.cli import main
    from stvq_reference.titok import TiTokDecoder

    titok = TiTokDecoder(preset="tiny").eval()
    blocks = [*titok.condition_blocks, *titok.blocks]
    assert len(blocks) == 18 + 2 and all(type(b) is Block for b in blocks)  # timm's plain ViT block
    assert sum(p.numel() for p in titok.parameters()) == 1_270_387  # Styled's tiny decoder less its AdaLN modulations
    codes = torch.randn(1, 36, 16)
    perturbed = codes.clone()
    perturbed[:, 35] += 1.0
    outputs = []
    hook = titok.condition_blocks[0].register_forward_hook(lambda mod, args, out: outputs.append(out))
    with torch.no_grad():
        first, _ = titok(codes), titok(perturbed)
    hook.remove()
    assert first.shape == (1, 3, 64, 64) and not torch.equal(outputs[0], outputs[1])  # the last code reaches layer 0
    run = tmp_path / "titok"
    result = runner.invoke(
        main, ["train", "--tokenizer", "titok", "--set", "width=32", "--set", "heads=2", "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--run-dir", str(run), "--no-progress"]
    )
    assert result.exit_code == 0, result.stderr
    tok = stvq.load_tokenizer(run)
    assert type(tok.decoder) is TiTokDecoder and tok.config.decoder == "titok" and tok.config.width == 32


@pytest.mark.slow
def test_compiled_decoder_matches_eager_forward_and_backward():
    # four codes (two condition layers) keep the compilation short; every kind of layer and the head is compiled
    decoder = StyledDecoder(preset="tiny", width=32, heads=2, plain_layers=1, condition_layers=2)
    codes = torch.randn(2, 4, 16, requires_grad=True)
    eager = decoder(codes)
    (eager.square().sum()).backward()
    eager_grad, codes.grad = codes.grad.clone(), None
    decoder.compile()
    compiled = decoder(codes)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codes.grad, eager_grad, rtol=1e-4, atol=1e-5)
    assert "condition_blocks.0.attn.qkv.weight" in decoder.state_dict()  # checkpoint names unchanged


def test_tail_drop_decodes_each_image_from_a_prefix_with_the_rest_at_the_batch_mean():
    torch.manual_seed(0)
    model = stvq.create("tokenizer", "styled", preset="tiny")
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    images = torch.rand(6, 3, 64, 64) * 2 - 1
    codes = model(images).codes.detach()
    model(images, tail_drop=1.0)
    decoded, mean = seen[-1], codes.mean(0)
    for b in range(6):
        kept = (decoded[b] == codes[b]).all(-1)  # (N,)
        k = int(kept.long().argmin()) if not kept.all() else 36
        assert k >= 1 and kept[:k].all()  # a prefix of at least one code is kept as encoded
        assert torch.allclose(decoded[b, k:], mean[k:].expand_as(decoded[b, k:]))  # the tail sits at the mean
    model(images, tail_drop=0.0)
    assert torch.equal(seen[-1], codes)


def test_the_presets_heads():
    assert StyledConfig.PRESETS["tiny"].head == "pixel" and StyledConfig.PRESETS["reference"].head == "linear"  # the specification's structure, exactly (docs/model.md)


def test_a_model_saved_with_fewer_config_fields_loads_with_the_defaults_of_the_others(tmp_path):
    """tests/data/saved-with-fewer-fields/config.json was written by save_pretrained without the attn_mask
    field; it loads as the plugin's StyledConfig, with its quantizer, the missing field at its default."""
    import shutil

    from safetensors.torch import save_file

    from stvq.config import PluginConfig

    saved = Path(__file__).parent / "data" / "saved-with-fewer-fields" / "config.json"
    shutil.copy(saved, tmp_path / "config.json")
    options = json.loads(saved.read_text())["options"]
    weights = stvq.create("tokenizer", "styled", config=options["config"], quantizer=options["quantizer"]).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    model = stvq.load_tokenizer(tmp_path)
    assert isinstance(model.config, StyledConfig) and isinstance(model.config, PluginConfig)
    loaded = model.config.to_dict()
    assert {k: loaded.pop(k) for k in options["config"]} == options["config"] and model.quantizer_spec == options["quantizer"]
    assert loaded == {"attn_mask": "none"}  # the field it lacks: its default
    assert (tmp_path / "config.json").read_text() == saved.read_text()  # loading rewrites nothing


def test_the_core_holds_no_field_of_a_plugins_model():
    from dataclasses import fields

    import stvq.config

    assert [f.name for f in fields(stvq.config.PluginConfig)] == []
    source = Path(stvq.config.__file__).read_text()
    assert "condition_layers" not in source and "head_channels" not in source
    assert not hasattr(stvq.config, "PRESETS")


@pytest.mark.parametrize("width,channels,patch,grid", [(1024, 3, 16, 16), (64, 16, 16, 4)], ids=["reference", "tiny-pixel-head"])
def test_out_conv_computes_the_transposed_convolution_it_replaces(width, channels, patch, grid):
    """out_conv is a matrix product per token; forward and backward equal ConvTranspose2d(kernel = stride =
    patch) on the same parameters, at the reference size (to RGB) and tiny's (to the head's channels)."""
    from stvq_reference.layers import Unpatchify

    torch.manual_seed(0)
    layer = Unpatchify(width, channels, patch)
    tokens = torch.randn(2, width, grid, grid, requires_grad=True)
    ours = layer(tokens)
    theirs = torch.nn.functional.conv_transpose2d(tokens, layer.weight, layer.bias, stride=patch)
    assert ours.shape == (2, channels, grid * patch, grid * patch) and ours.is_contiguous(memory_format=torch.channels_last)
    assert_same(ours, theirs, "output")
    weight = torch.randn_like(ours)
    grads = [torch.autograd.grad((y * weight).sum(), (tokens, layer.weight, layer.bias)) for y in (ours, theirs)]
    for name, a, b in zip(("grid", "weight", "bias"), *grads):
        assert_same(a, b, f"grad {name}")
