"""The README's pass list is the driver's; no import cycle (import layers are checked by `make
test`)."""

import re
from pathlib import Path

from nxd_autoshard.compiler.driver import pass_names

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_the_passes_the_driver_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("tests/test_layout.py checks it -->", 1)[1].split("\n\n", 1)[0]
    # every optional pass on: pipeline stages, bf16 and activation checkpointing
    assert re.findall(r"`(\w+)`", block) == pass_names(2, precision="bf16", recompute="full")


def test_no_module_of_the_package_imports_itself_back():
    """No import cycle inside a layer either (the layers contract sees only imports between
    layers); function-level imports count, so none can hide a cycle."""
    import grimp

    graph = grimp.build_graph("nxd_autoshard")
    cycles = sorted(
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if graph.find_shortest_chain(importer=b, imported=a)
    )
    assert cycles == []
