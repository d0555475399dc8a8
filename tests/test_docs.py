"""The documentation as a user reads it: README is short and for users, every relative link and image of
README and the docs pages resolves, README's Python runs as written, and the product speaks of itself (no
development sessions or issue numbers in its prose). The commands the pages show are parsed in
test_cli.py and started where they are cheap (test_train.py's GPU recipes, test_oracle.py's oracle)."""

import re
from pathlib import Path

import pytest
from docs_pages import PAGES, README, ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """The targets of a page's markdown links and images that point into the repository (no URL, no
    bare anchor), their anchors cut."""
    targets = [m.group(1) for m in LINK.finditer(page.read_text())]
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_for_users_at_most_350_lines():
    assert len(README.read_text().splitlines()) <= 350


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert missing == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("![a figure](missing.png) and [a page](other.md#part) and [the web](https://example.org)")
    (tmp_path / "other.md").write_text("")
    assert relative_links(page) == ["missing.png", "other.md"]


@pytest.mark.parametrize("page", [*PAGES, ROOT / "CHANGELOG.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_product_speaks_of_itself(page):
    """No development session or issue number in README, the docs pages or CHANGELOG."""
    text = page.read_text()
    assert re.findall(r"\bsessions?\b|\bissues? ?#?\d+", text, flags=re.I) == []


def test_readmes_python_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README shows Python"
    monkeypatch.chdir(tmp_path)  # it saves "my-model" where it runs
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()


def guide_commands() -> set[tuple[str, ...]]:
    """The stvq commands (and subcommands) that README and the guides show, under torchrun too."""
    import shlex

    from docs_pages import DOCS, command_lines

    found = set()
    for line in command_lines([README, *sorted(DOCS.glob("*.md"))]):
        line = line.split("$(which stvq)", 1)[1] if "$(which stvq)" in line else line.removeprefix("stvq") if line.startswith("stvq ") else None
        if line is not None:
            words = [w for w in shlex.split(line) if not w.startswith("-")]
            found.add(tuple(words[:2]) if words[:1] == ["prior"] else tuple(words[:1]))
    return found


def test_every_command_readme_and_the_guides_show_starts():
    """Each stvq command the user-facing pages show answers --help (their flags and values are parsed in
    test_cli.py; the jobs themselves run in their own tests)."""
    from click.testing import CliRunner

    from stvq.cli import main

    commands = guide_commands()
    assert {("train",), ("eval",), ("compose",), ("prior", "train"), ("oracle",)} <= commands
    for command in sorted(commands):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (command, result.output)


def test_every_other_command_the_pages_show_starts(tmp_path):
    """The pages' command lines that are not stvq's start as written: a script they name answers --help, a
    pytest line collects its tests, tensorboard answers --help. A line of a program not listed here fails,
    so a new kind of command gets its check."""
    import os
    import shlex
    import subprocess
    import sys

    from docs_pages import PAGES, command_lines

    root = Path(__file__).parents[1]
    checked = 0
    for line in command_lines(PAGES):
        if line.startswith("stvq ") or "$(which stvq)" in line:
            continue  # test_cli.py parses these
        words = shlex.split(line)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words.pop(0)  # VAR=value before the program
        if words[0] == "python":
            run = [sys.executable, *words[1:2], "--help"]
        elif words[0] == "pytest":
            run = [sys.executable, "-m", "pytest", *(w for w in words[1:] if not w.startswith("--benchmark-json")), "--collect-only", "-q", "-p", "no:cacheprovider"]
        elif words[0] == "tensorboard":
            run = [str(Path(sys.executable).with_name("tensorboard")), "--help"]
        elif words[0] == "mkdir" and set(words) & {"&&"} and "cp" in words:
            continue  # a shell line that copies a cache (the recipe it belongs to runs in its own test)
        else:
            raise AssertionError(f"no check for this documented command: {line}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker's
        done = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
        checked += 1
    assert checked >= 5
