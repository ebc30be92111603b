"""The README's pass list is the driver's (import layers are checked by `make test`)."""

import re
from pathlib import Path

from nxd_autoshard.compiler.driver import pass_names

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_the_passes_the_driver_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("tests/test_layout.py checks it -->", 1)[1].split("\n\n", 1)[0]
    # every optional pass on: pipeline stages, bf16 (fp32 partial sums) and checkpointing
    options = dict(precision="bf16", reduce_dtype="fp32", recompute="full")
    assert re.findall(r"`(\w+)`", block) == pass_names(2, **options)
