"""The documentation as a user reads it: README.md and the pages under docs/, and the command lines their
console blocks show (``$ ...``, the comment cut). Tests read the page they check, not a notebook."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]


def command_lines(pages: list[Path] = PAGES) -> list[str]:
    """Every command line of the pages' console blocks, its comment cut."""
    return [re.sub(r"\s+#.*$", "", line[2:]).strip() for page in pages for line in page.read_text().splitlines() if line.startswith("$ ")]
