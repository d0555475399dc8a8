"""Every extension point is documented in its own entry of the plugin guide (docs/plugins.md), with the
call its docstring shows, and implemented (datasette's hook test); the contracts each registered plugin
keeps are in test_contracts.py."""

import inspect
import re
from pathlib import Path

import pytest

import stvq
from stvq import hookspecs

GUIDE = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("register_"))


def guide_entry(hook: str) -> str:
    """The text of the guide's ``### hook`` section, up to the next heading ('' where there is none)."""
    found = re.search(rf"^### {hook}\n(.*?)(?=^#)", GUIDE + "\n#", flags=re.S | re.M)
    return found.group(1).strip() if found else ""


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_its_own_entry_in_the_plugin_guide_with_its_call(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    call = re.search(r"``([\w.]+\(.*?\))``", doc.splitlines()[0])
    assert call, f"{hook} needs a one-line docstring that shows a call"
    entry = guide_entry(hook)
    assert entry, f"docs/plugins.md has no '### {hook}' section"
    assert call.group(1) in entry and len(entry) > 100, f"the guide's {hook} entry does not show {call.group(1)} or says too little"


def test_the_guide_entry_check_sees_a_missing_entry():
    assert guide_entry("register_encoders") and not guide_entry("register_nothing")


@pytest.mark.parametrize("kind", stvq.KINDS)
def test_every_kinds_hook_is_implemented(kind):
    assert stvq.list_plugins(kind)[kind], f"no installed plugin implements register_{kind}s"


def test_register_commands_is_documented_and_adds_the_reference_options():
    from stvq.cli import main

    doc = inspect.getdoc(hookspecs.register_commands)
    assert "cli.add_command(" in doc.splitlines()[0]
    assert {"--styled", "--vqgan", "--vqgan-config"} <= {o for p in main.commands["compose"].params for o in p.opts}
    assert {"--niter", "--spherical"} <= {o for p in main.commands["quantize"].params for o in p.opts}


def test_register_options_adds_to_the_commands_that_declare_them_and_refuses_the_others():
    from stvq.cli import PLUGIN_OPTIONS, register_option

    assert set(PLUGIN_OPTIONS) == {"compose", "quantize"}
    with pytest.raises(stvq.StvqError, match="stvq train takes no plugin options; these commands do: compose, quantize"):
        register_option("train", "--x", "x", "an option train does not read")
    with pytest.raises(stvq.StvqError, match="stvq quantize already has --niter"):
        register_option("quantize", "--niter", "niter", "a second --niter")


def test_a_plugin_whose_options_name_another_command_costs_itself_one_warning(monkeypatch):
    import warnings

    import pluggy

    from stvq import plugins
    from stvq.cli import register_option

    class Misnamed:
        @stvq.hookimpl
        def register_options(register):
            register("train", "--mine", "mine", "an option train does not read")

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(Misnamed, name="misnamed")
    monkeypatch.setattr(plugins, "plugin_manager", lambda: (pm, {"misnamed": ("misnamed-package", "1.0")}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.add_plugin_options(register_option)
    assert [str(w.message) for w in caught] == ["stvq plugin package 'misnamed-package' failed to add its options: StvqError: stvq train takes no plugin options; these commands do: compose, quantize"]
