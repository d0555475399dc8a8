"""Every extension point is documented, listed in README and implemented (datasette's hook test); the
contracts each registered plugin keeps are in test_contracts.py."""

import inspect
from pathlib import Path

import pytest

import stvq
from stvq import hookspecs

README = (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("kind", stvq.KINDS)
def test_every_hook_is_documented_listed_and_implemented(kind):
    hook = getattr(hookspecs, f"register_{kind}s")
    doc = inspect.getdoc(hook)
    assert doc and "register('" in doc.splitlines()[0], f"register_{kind}s needs a one-line docstring with a call"
    assert f"register_{kind}s" in README
    assert stvq.list_plugins(kind)[kind], f"no installed plugin implements register_{kind}s"


def test_register_commands_is_documented_and_adds_the_reference_options():
    from stvq.cli import main

    doc = inspect.getdoc(hookspecs.register_commands)
    assert "cli.add_command(" in doc.splitlines()[0] and "register_commands" in README
    assert {"--styled", "--vqgan", "--vqgan-config"} <= {o for p in main.commands["compose"].params for o in p.opts}
    assert {"--niter", "--spherical"} <= {o for p in main.commands["quantize"].params for o in p.opts}
