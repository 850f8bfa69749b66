"""BENCHMARKS.md sections that a benchmark rewrites on its own (``bench embedded``, ``bench
reprocess``): a block between two HTML comments, replaced where it is, appended otherwise."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, begin: str, end: str, title: str, body: str) -> None:
    """Put ``## title`` and ``body`` between the markers ``begin`` and ``end`` of the report."""
    block = f"{begin}\n## {title}\n\n{body}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
