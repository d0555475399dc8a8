"""The command line: help with examples, plugin listing, info, and one-line errors."""

import re

import pytest
from docs_pages import command_lines

import stvq
from stvq.cli import main


def test_every_command_has_help_with_an_example(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "Example" in result.output
    for name, command in main.commands.items():
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output, name
        for leaf in getattr(command, "commands", {}) or [None]:
            args = [name, leaf, "--help"] if leaf else [name, "--help"]
            text = runner.invoke(main, args).output
            assert "None" not in text, (args, text)  # a range without bounds once read "x<=None"


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


def test_every_stvq_command_the_docs_show_parses_with_its_flags_and_values():
    """Each ``stvq ...`` line of README and the docs pages (under torchrun too) resolves to a command whose options and values
    click accepts as written: a renamed flag, a dropped option or a value out of range fails here. (The
    jobs themselves run elsewhere: the main job, the GPU recipes, the oracle, the prior and eval commands.)"""
    import shlex
    import warnings

    import click

    lines = command_lines()
    stvq_lines = [line.split("$(which stvq)", 1)[1] if "$(which stvq)" in line else line.removeprefix("stvq") for line in lines if line.startswith("stvq ") or "$(which stvq)" in line]
    assert len(stvq_lines) >= 30
    for line in stvq_lines:
        args, command, ctx = shlex.split(line), main, None
        while True:
            ctx = command.make_context(command.name or "stvq", list(args), parent=ctx, resilient_parsing=False)
            if not isinstance(command, click.Group):
                break
            with warnings.catch_warnings():  # click 8.2-8.x: protected_args is deprecated, and still where the subcommand is
                warnings.simplefilter("ignore", DeprecationWarning)
                name, command, args = command.resolve_command(ctx, ctx.protected_args + ctx.args)
            assert command is not None, line
    others = [line for line in lines if not (line.startswith("stvq ") or "$(which stvq)" in line)]
    from pathlib import Path

    root = Path(__file__).parents[1]
    for line in others:  # python, pytest and tensorboard lines name files of the repository or a module
        for word in shlex.split(line):
            if word.endswith(".py") and "/" in word and not word.startswith("-"):
                assert (root / word.split("::")[0]).is_file(), (line, word)


@pytest.mark.parametrize("args,code", [(["plugins"], 0), (["info", "--preset", "huge"], 1), (["info", "--bogus"], 2)])
def test_under_torchrun_a_command_ends_without_the_interpreter_teardown(args, code):
    """gloo's worker threads can outlive destroy_process_group and abort the teardown (SIGABRT after the
    work is done): under torchrun (WORLD_SIZE > 1) the process ends with the command's exit status, its
    output flushed, and no teardown (an atexit hook does not run)."""
    import os
    import subprocess
    import sys

    script = "import atexit, sys; atexit.register(lambda: print('TEARDOWN')); from stvq.cli import main; main(sys.argv[1:], prog_name='stvq')"
    for world, teardown in (("2", False), ("1", True))[: 2 if code == 0 else 1]:  # "1": the hook does run
        done = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, "WORLD_SIZE": world}, capture_output=True, text=True, timeout=120)
        assert done.returncode == code, done.stderr
        assert ("TEARDOWN" in done.stdout) is teardown, done.stdout
        assert (done.stdout if code == 0 else done.stderr).strip(), "the output is flushed"


@pytest.mark.parametrize("args,code", [(["plugins"], 0), (["info", "--preset", "huge"], 1), (["out-of-range"], 2), (["unreadable"], 1)])
def test_a_command_destroys_the_process_group_it_ran_under(tmp_path, runner, args, code):
    """A process left with gloo's threads aborts at exit (SIGABRT, a failed torchrun); every command that
    ends, with its result or with one line (a usage error and an OS error included), destroys the group first."""
    import click
    import torch.distributed as dist

    from stvq.errors import OptionRangeError

    @click.command("out-of-range")
    def out_of_range():
        raise OptionRangeError("--keep 37 is more than the 36 ids")

    @click.command("unreadable")
    def unreadable():
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    for command in (out_of_range, unreadable):
        main.add_command(command)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        result = runner.invoke(main, args)
        assert result.exit_code == code, result.output
        assert not dist.is_initialized()
    finally:
        for command in (out_of_range, unreadable):
            main.commands.pop(command.name)
        if dist.is_initialized():
            dist.destroy_process_group()
