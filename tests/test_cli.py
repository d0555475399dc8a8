"""The command line: help with examples, plugin listing, info, and one-line errors."""

import re

import pytest

import stvq
from stvq.cli import main


def test_every_command_has_help_with_an_example(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "Example" in result.output
    for name in main.commands:
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output, name


def test_plugins_lists_kind_name_package_version(runner):
    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0
    rows = [re.split(r"\s*│\s*", line.strip("│ ")) for line in result.output.splitlines() if "styled" in line]
    assert ["encoder", "styled", "stvq", stvq.__version__] in rows
    assert ["tokenizer", "styled", "stvq", stvq.__version__] in rows


def test_info_reports_the_parameter_total_and_sequence_lengths(runner):
    result = runner.invoke(main, ["info", "--preset", "tiny", "--set", "code_dim=8"])
    assert result.exit_code == 0, result.output
    total = sum(p.numel() for p in stvq.create("tokenizer", "styled", preset="tiny", code_dim=8).parameters())
    assert re.search(rf"total\s*│\s*│\s*{total:,}", result.output)
    assert "52 = 16 patches + 36 special tokens" in result.output
    assert re.search(r"code_dim\s*│\s*8", result.output)


@pytest.mark.parametrize(
    "args,message",
    [
        (["info", "--preset", "huge"], "unknown preset 'huge'; choose one of: reference, small, tiny"),
        (["info", "--set", "width"], "is not KEY=VALUE"),
        (["info", "--set", "width=wide"], "expected a value of type int"),
        (["info", "--set", "image_size=60"], "not a multiple of patch_size"),
    ],
)
def test_bad_input_is_one_line_on_stderr(runner, args, message):
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_train_flags_take_their_defaults_from_train_config():
    import dataclasses

    from stvq.cli.train import TRAIN_FLAGS
    from stvq.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    flags = {p.name: p for p in main.commands["train"].params if p.name in TRAIN_FLAGS and p.name in defaults}
    assert len(flags) == len(TRAIN_FLAGS) - 1  # all but --set (the model field, a dict)
    for name, param in flags.items():
        assert param.default == defaults[name], name
    assert main.commands["train"].params[0].opts == ["--stage"]
    cache = next(p for p in main.commands["train"].params if p.name == "cache_codes")
    assert cache.opts == ["--no-cache-codes"] and cache.flag_value is False and cache.default is True
