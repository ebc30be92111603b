"""The example notebook runs in a real Jupyter kernel and shows the plan views."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "examples" / "explain.ipynb"


def _outputs(cell) -> dict:
    data = {}
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            data.setdefault("text", "")
            data["text"] += out["text"]
        for mime, value in out.get("data", {}).items():
            data[mime] = value
    return data


def test_example_notebook_runs_and_shows_the_views(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    by_source = {c.source.strip().splitlines()[-1]: _outputs(c) for c in code}
    overview = by_source["sharded"]["text/html"]
    assert "nxd-autoshard plan: LlamaForCausalLM" in overview and "<svg" in overview
    assert "Pipeline stages" in overview and "all_reduce[tp]" in overview
    stages = by_source["piped_report.stages"]["text/html"]
    assert "<table>" in stages and "model.layers.3" in stages and "receives" in stages
    assert by_source["report.svg()"]["image/svg+xml"].lstrip().startswith("<svg")
    assert "x 1 more identical blocks" in by_source["report.svg()"]["image/svg+xml"]
    assert "captured (global)" in by_source["report.before_after()"]["text/html"]
    assert "partition" in by_source["sharded.history"]["text/html"]
    assert (
        "+"
        in by_source['print(sharded.history.diff("propagate", "partition", context=0)[:2500])'][
            "text"
        ]
    )
    losses = by_source[
        'print(f"sharded loss {out.loss.item():.6f}  unsharded {ref.loss.item():.6f}")'
    ]["text"]
    sharded_loss, unsharded_loss = losses.split()[2], losses.split()[4]
    assert abs(float(sharded_loss) - float(unsharded_loss)) < 1e-4
