"""Write one benchmark's figures into its own section of docs/benchmarks.md.

Each benchmark owns a section fenced by HTML comments, so running one benchmark never
erases another's figures.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Figures written by the benchmarks in `bench/` (and `qflare bench ...`); each section is\n"
    "replaced when its benchmark runs again. Machine: 2 cores, 24 GiB, no accelerator.\n"
)


def write_section(name: str, markdown: str, doc: Path = DOC) -> Path:
    """Replace (or append) the section `name` of the benchmarks document."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (
        f"<!-- bench:{name} -->\n{markdown.rstrip()}\n\n"
        f"_Measured {stamp} on {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}._\n<!-- /bench:{name} -->"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
