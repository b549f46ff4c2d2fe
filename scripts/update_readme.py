"""Fill the generated sections of README.md: the config reference and the results table.

    python scripts/update_readme.py

The config reference comes from the pydantic models
(``neuroplex.config_reference.reference_markdown``); the results table from ``docs/results.md``
(written by ``scripts/measure_results.py``). A test checks that the README's config reference
is current.
"""

from __future__ import annotations

import re
from pathlib import Path

from neuroplex.config_reference import reference_markdown
from neuroplex.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def fill(text: str, section: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {section}:start -->\n).*?(<!-- {section}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {section}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    readme = REPO / "README.md"
    text = fill(readme.read_text(encoding="utf-8"), "config-reference", reference_markdown())
    results = REPO / "docs" / "results.md"
    if results.exists():
        text = fill(text, "results", results.read_text(encoding="utf-8"))
    atomic_write_text(readme, text)


if __name__ == "__main__":
    main()
