"""Shared by the benchmark scripts: replace one "## ..." section of RESULTS.md, describe the machine."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the section headed `title` (or append it); other sections are kept as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{title}\n\n{body.strip()}\n"
    pattern = re.compile(r"^" + re.escape(title) + r"[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def machine() -> str:
    """torch / transformers / Python versions and the CPU, for the header of a section."""
    import torch

    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    return (
        f"torch {torch.__version__}{hf}, Python {platform.python_version()}; "
        f"{os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"
    )
