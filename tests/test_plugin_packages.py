"""Third-party plugin packages, installed for real with pip and discovered through their entry points in
a fresh interpreter: a working one, a broken one, and two kinds of name clash."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import stvq
        try:
            result = {"plugins": stvq.list_plugins()}
        except stvq.PluginError as err:
            result = {"error": f"{type(err).__name__}: {err}"}
    result["warnings"] = [str(w.message) for w in caught if "stvq plugin" in str(w.message)]
    if "plugins" in result and "sign" in result["plugins"]["quantizer"]:
        import torch
        q = stvq.create("quantizer", "sign", dim=4)
        out = q(torch.tensor([[0.5, -1.0, 2.0, -0.1]]))
        result["sign"] = {"ids": out.ids.tolist(), "codes": q.ids_to_codes(out.ids).tolist()}
    print(json.dumps(result))
    """
)


def pip_install(source: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )


def make_package(root: Path, dist: str, ep_name: str, module: str, body: str) -> Path:
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"
            [project]
            name = "{dist}"
            version = "1.2.3"
            [project.entry-points.stvq]
            {ep_name} = "{module}"
            [tool.hatch.build.targets.wheel]
            packages = ["{module}"]
            """
        )
    )
    (pkg / module / "__init__.py").write_text(textwrap.dedent(body))
    return pkg


def probe(*targets: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(t) for t in targets)}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def example_target(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("example-site")
    pip_install(HERE / "plugin_pkg", target)
    return target


@pytest.mark.slow
def test_third_party_package_is_discovered_and_usable(example_target, runner):
    result = probe(example_target)
    assert result["warnings"] == []
    assert "sign" in result["plugins"]["quantizer"]
    assert "styled" in result["plugins"]["encoder"]  # ours still there
    assert result["sign"]["ids"] == [0b0101]
    assert result["sign"]["codes"] == [[1.0, -1.0, 1.0, -1.0]]

    env = {**os.environ, "PYTHONPATH": str(example_target)}
    listed = subprocess.run([sys.executable, "-m", "stvq.cli", "plugins"], env=env, capture_output=True, text=True, check=True)
    row = next(line for line in listed.stdout.splitlines() if "sign" in line)
    assert "stvq-plugin-example" in row and "0.3.1" in row
    added = subprocess.run([sys.executable, "-m", "stvq.cli", "example-codewords", "10"], env=env, capture_output=True, text=True, check=True)
    assert added.stdout.strip() == "sign quantizer over 10 channels: 1,024 codewords"  # register_commands


@pytest.mark.slow
def test_a_third_party_package_runs_stvqs_contracts_in_its_own_tests(example_target):
    env = {**os.environ, "PYTHONPATH": str(example_target), "OMP_NUM_THREADS": "1"}
    tests = HERE / "plugin_pkg" / "tests"
    # The package's own pytest configuration, as its developers run it: not stvq's conftest (its quick
    # recogniser alone took 33 s) nor stvq's pythonpath.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tests.parent / "pyproject.toml"), "--rootdir", str(tests.parent), str(tests)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tests,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "18 passed" in done.stdout  # the sign quantizer, the encoder/decoder pair (and its last layer) and the tokenizer under contract (decode in range included)


@pytest.mark.slow
def test_a_third_party_tokenizer_trains_quantizes_fine_tunes_and_evaluates_through_the_stock_commands(example_target, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(example_target), "OMP_NUM_THREADS": "1"}

    def stvq(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "stvq.cli", *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    run = tmp_path / "conv"
    stvq("train", "--tokenizer", "example-conv", "--set", "width=8", "--steps", "6", "--batch-size", "4", "--eval-every", "6", "--run-dir", str(run), "--no-progress")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_psnr"] is not None
    assert json.loads((run / "config.json").read_text())["name"] == "example-conv"
    info = stvq("info", "--tokenizer", "example-conv", "--preset", "wide", "--set", "code_dim=8").stdout  # the plugin's own options
    assert re.search(r"width\s*│\s*64", info) and re.search(r"code_dim\s*│\s*8", info) and "condition_layers" not in info
    wrong = subprocess.run([sys.executable, "-m", "stvq.cli", "info", "--tokenizer", "example-conv", "--set", "heads=2"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 1 and "--set heads: unknown config field; known fields: code_dim, image_size, num_tokens, patch_size, width" in wrong.stderr
    stvq("quantize", "--run", str(run), "--k", "16", "--max-images", "32")
    stvq("train", "--stage", "2", "--from", str(run), "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--run-dir", str(tmp_path / "s2"), "--no-progress")
    stvq("eval", "--run", str(tmp_path / "s2"), "--images", "8", "--prefix-images", "4", "--probe-images", "100", "--no-perceptual")
    result = json.loads((tmp_path / "s2" / "eval.json").read_text())
    assert result["quantized"] and result["codebook"]["usage"] > 0 and len(result["prefix"]["prefix_psnr"]) == 37


@pytest.mark.slow
def test_broken_package_warns_once_and_the_rest_keeps_working(example_target, tmp_path):
    broken = make_package(tmp_path, "stvq-broken", "broken", "stvq_broken", "raise ImportError('needs libfoo')\n")
    target = tmp_path / "site"
    pip_install(broken, target)
    result = probe(target, example_target)
    assert len(result["warnings"]) == 1
    message = result["warnings"][0]
    assert "'stvq-broken'" in message and "ImportError: needs libfoo" in message
    assert "sign" in result["plugins"]["quantizer"]
    assert "styled" in result["plugins"]["tokenizer"]
    assert result["sign"]["ids"] == [0b0101]


def stvq_cli(target: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stvq.cli", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_packages_registering_the_same_name_clash_only_where_it_is_used(tmp_path):
    clash = make_package(
        tmp_path,
        "stvq-clash",
        "clash",
        "stvq_clash",
        """
        import stvq

        @stvq.hookimpl
        def register_tokenizers(register):
            register("styled", object)
        """,
    )
    target = tmp_path / "site"
    pip_install(clash, target)
    result = probe(target)
    assert "styled" in result["plugins"]["tokenizer"] and result["warnings"] == []
    listed = stvq_cli(target, "plugins")
    assert listed.returncode == 0 and "styled (clash)" in listed.stdout and "stvq, stvq-clash" in listed.stdout
    assert "Clash: tokenizer 'styled' is registered by both 'stvq' and 'stvq-clash'; uninstall one of them" in listed.stderr
    assert stvq_cli(target, "--help").returncode == 0
    used = stvq_cli(target, "train", "--steps", "1", "--run-dir", str(tmp_path / "run"))
    assert used.returncode == 1 and used.stderr.strip() == "Error: tokenizer 'styled' is registered by both 'stvq' and 'stvq-clash'; uninstall one of them or rename the plugin"


@pytest.mark.slow
def test_what_a_plugin_package_gets_wrong_costs_only_its_own_plugins_with_one_line_each(tmp_path):
    target = tmp_path / "site"
    same_ep = make_package(tmp_path, "stvq-same-ep", "reference", "stvq_same_ep", "")  # stvq's own entry-point name
    misnamed = make_package(
        tmp_path,
        "stvq-misnamed",
        "misnamed",
        "stvq_misnamed",
        """
        import stvq

        @stvq.hookimpl
        def register_quantizers(reg):
            reg("never", object)
        """,
    )
    faulty = make_package(
        tmp_path,
        "stvq-faulty",
        "faulty",
        "stvq_faulty",
        """
        import stvq

        @stvq.hookimpl
        def register_tokenizers(register):
            raise RuntimeError("no licence file")

        @stvq.hookimpl
        def register_widgets(register):
            pass

        @stvq.hookimpl
        def register_priors(register):
            register("dict-prior", lambda **options: {"not": "a prior"})

        @stvq.hookimpl
        def register_quantizers(register):
            register("str-quantizer", lambda **options: "q")
            register("gone", "stvq_no_such_module:Quantizer")
        """,
    )
    for package in (same_ep, misnamed, faulty):
        pip_install(package, target)
    listed = stvq_cli(target, "plugins")
    assert listed.returncode == 0 and "str-quantizer" in listed.stdout and "styled" in listed.stdout
    warnings = [line for line in listed.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == len(listed.stderr.strip().splitlines()) == 4, listed.stderr  # one line each
    for phrase in (
        "'stvq-same-ep' uses the entry-point name 'reference', which 'stvq' already uses",
        "'stvq-misnamed' (entry point misnamed = stvq_misnamed) failed to load: PluginValidationError",
        "'stvq-faulty' implements register_widgets, which is no stvq hook",
        "'stvq-faulty' failed to register its tokenizers: RuntimeError: no licence file",
    ):
        assert any(phrase in w for w in warnings), (phrase, warnings)
    assert stvq_cli(target, "--help").returncode == 0
    script = """
import stvq
for kind, name in (("prior", "dict-prior"), ("quantizer", "str-quantizer"), ("quantizer", "gone")):
    try:
        stvq.create(kind, name)
    except stvq.PluginError as err:
        print(err)
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "prior 'dict-prior' of package 'stvq-faulty' returned a dict, not an stvq.interfaces.Prior; fix the plugin"
    assert out[1] == "quantizer 'str-quantizer' of package 'stvq-faulty' returned a str, not an stvq.interfaces.Quantizer; fix the plugin"
    assert out[2].startswith("quantizer 'gone' of package 'stvq-faulty' names the factory 'stvq_no_such_module:Quantizer', which cannot be loaded (ModuleNotFoundError")


def test_a_plugin_package_adds_and_never_replaces_nor_ends_the_process(tmp_path):
    """A package whose hooks replace `stvq train`, add a second `--k` to `stvq quantize`, or raise
    SystemExit at import, in a hook or in a factory: each costs only itself (one warning line), the stock
    commands stay as they were, and every command runs with its own exit status."""
    target = tmp_path / "site"
    usurper = make_package(
        tmp_path,
        "stvq-usurper",
        "usurper",
        "stvq_usurper",
        """
        import click
        import stvq

        @stvq.hookimpl
        def register_commands(cli):
            @click.command("train")
            def fake_train():
                print("not stvq's train")

            cli.add_command(fake_train)
            cli.commands["quantize"].params.insert(0, click.Option(["--k"], type=int, default=1))
            cli.commands["prior"].commands.pop("sample")

            @click.command("hello")
            def hello():
                print("hello from a plugin")

            cli.add_command(hello)

        @stvq.hookimpl
        def register_quantizers(register):
            def leave(**options):
                raise SystemExit(0)
            register("leaver", leave)
        """,
    )
    quitter = make_package(tmp_path, "stvq-quitter", "quitter", "stvq_quitter", "raise SystemExit(0)\n")
    hook_quitter = make_package(
        tmp_path,
        "stvq-hook-quitter",
        "hookquitter",
        "stvq_hook_quitter",
        """
        import stvq

        @stvq.hookimpl
        def register_tokenizers(register):
            raise SystemExit(3)
        """,
    )
    for package in (usurper, quitter, hook_quitter):
        pip_install(package, target)
    listed = stvq_cli(target, "--help")
    assert listed.returncode == 0 and "hello" in listed.stdout, listed.stderr
    warnings = listed.stderr.strip().splitlines()
    for phrase in (
        "'stvq-quitter' (entry point quitter = stvq_quitter) failed to load: SystemExit",
        "'stvq-usurper' replaced or changed the stock command `stvq train`; the stock one is kept",
        "'stvq-usurper' replaced or changed the stock command `stvq quantize`",
        "'stvq-usurper' replaced or changed the stock command `stvq prior sample`",
    ):
        assert any(phrase in w for w in warnings), (phrase, warnings)
    assert all(line.startswith("Warning: ") for line in warnings)
    listed = stvq_cli(target, "plugins")
    assert listed.returncode == 0 and "styled" in listed.stdout
    assert "'stvq-hook-quitter' failed to register its tokenizers: SystemExit: 3" in listed.stderr
    assert "Styled VQ" in stvq_cli(target, "train", "--help").stdout or "--stage" in stvq_cli(target, "train", "--help").stdout
    quantize = stvq_cli(target, "quantize", "--help").stdout
    assert quantize.count("  --k ") == 1 and "[default: 8192" in quantize
    assert stvq_cli(target, "prior", "sample", "--help").returncode == 0
    assert stvq_cli(target, "hello").stdout.strip() == "hello from a plugin"
    script = "import stvq\ntry:\n    stvq.create('quantizer', 'leaver')\nexcept stvq.PluginError as err:\n    print(err)\n"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "quantizer 'leaver' of package 'stvq-usurper' tried to exit (SystemExit 0) while it was built" in out.stdout, out
