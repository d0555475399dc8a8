"""The registry's public contract: listing, creating, and clear errors for unknown kinds and names."""

import pytest

import stvq
from stvq.plugins import PluginInfo, plugin_table


def test_list_plugins_has_every_kind_and_the_reference_model():
    plugins = stvq.list_plugins()
    assert list(plugins) == ["encoder", "decoder", "quantizer", "tokenizer", "composer", "prior", "dataset", "discriminator"]
    assert "styled" in plugins["encoder"]
    assert "styled" in plugins["decoder"]
    assert "styled" in plugins["tokenizer"]


def test_reference_plugins_come_from_our_entry_point():
    info = plugin_table()["encoder"]["styled"]
    assert (info.package, info.version, info.entry_point) == ("stvq", stvq.__version__, "reference")


def test_create_builds_the_registered_class():
    encoder = stvq.create("encoder", "styled", preset="tiny")
    from stvq.interfaces import Encoder

    assert isinstance(encoder, Encoder)
    assert (encoder.num_tokens, encoder.code_dim, encoder.image_size) == (36, 16, 64)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(stvq.UnknownPluginError, match=r"no encoder named 'nope'; available: styled"):
        stvq.create("encoder", "nope")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(stvq.UnknownPluginError, match="unknown plugin kind 'encoders'; choose one of: encoder, decoder"):
        stvq.create("encoders", "styled")


def test_string_factories_resolve_dotted_attributes():
    info = PluginInfo("encoder", "x", "stvq_reference.config:StyledConfig.PRESETS.get", "pkg", "1", "ep")
    assert info.resolve()("tiny").width == 64


def test_a_package_registering_one_name_twice_loses_that_kind_with_one_warning():
    import pluggy

    from stvq import hookspecs
    from stvq.plugins import StvqPluginWarning, collect

    class Twice:
        @stvq.hookimpl
        def register_quantizers(register):
            register("same", object)
            register("same", object)

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(Twice, name="twice")
    with pytest.warns(StvqPluginWarning, match="'twice' failed to register its quantizers: ValueError: it registers quantizer 'same' twice"):
        table = collect(pm, {})
    assert "same" not in table["quantizer"]
