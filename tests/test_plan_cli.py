"""`nxd-autoshard plan`: plans from a config on the meta device, the same plan as on real weights."""

import json
from pathlib import Path

import pytest
from conftest import CONFIGS
from sharded_cache import sharded_family

from nxd_autoshard.compiler.driver import pass_names
from nxd_autoshard.inspect.golden import golden_text
from nxd_autoshard.tools.cli import main
from nxd_autoshard.tools.plan_meta import plan_on_meta

GOLDENS = Path(__file__).parent / "goldens"


@pytest.fixture(scope="module")
def meta_plan():
    steps = []
    sharded = plan_on_meta(
        CONFIGS / "llama.json", 2, batch=2, seq=16, step=lambda name, seconds: steps.append(name)
    )
    return sharded, steps


def test_meta_plan_holds_no_weights_and_reports_every_step(meta_plan):
    sharded, steps = meta_plan
    assert steps == ["build model on meta", *pass_names()]
    assert all(p.device.type == "meta" for p in sharded.parameters())


def _without_node_numbers(collectives: list[dict]) -> list[dict]:
    # numbering differs by layout-only ops: on meta, SDPA's strides make HF's `.contiguous()`
    # a real op that the cpu capture elides
    return [{k: v for k, v in c.items() if k not in ("node", "call")} for c in collectives]


def test_meta_plan_is_the_plan_of_real_weights(meta_plan):
    sharded, _ = meta_plan
    meta = sharded.explain(format="json")
    cpu = sharded_family("llama", 2)[1].explain(format="json")
    for key in ("parameters", "blocks", "sizes", "stages"):
        assert meta[key] == cpu[key], key
    assert _without_node_numbers(meta["collectives"]) == _without_node_numbers(cpu["collectives"])
    assert meta["totals"] == cpu["totals"]
    meta_ops = [
        line.split(" = ", 1)[1] for line in golden_text(sharded).splitlines() if " = " in line
    ]
    cpu_ops = [
        line.split(" = ", 1)[1]
        for line in (GOLDENS / "llama_tp2.txt").read_text().splitlines()
        if " = " in line
    ]
    extra = [
        op.split("(")[0]
        for op in meta_ops
        if op.split("(")[0] not in {o.split("(")[0] for o in cpu_ops}
    ]
    assert set(extra) <= {"aten.contiguous"}, extra


def test_plan_json_is_the_explain_report(tmp_path, meta_plan):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            str(CONFIGS / "llama.json"),
            "--tp",
            "2",
            "--batch",
            "2",
            "--seq",
            "16",
            "--format",
            "json",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    same = meta_plan[0].explain(format="json")
    for key in ("parameters", "collectives", "blocks", "sizes", "stages", "totals"):
        assert data[key] == same[key], key


def test_plan_html_is_a_page_with_the_picture(tmp_path, capsys):
    out = tmp_path / "plan.html"
    rc = main(
        [
            "plan",
            "--config",
            str(CONFIGS / "gpt2.json"),
            "--tp",
            "2",
            "--format",
            "html",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Pipeline stages" in page
    err = capsys.readouterr().err
    assert "capture:" in err and f"wrote {out}" in err  # progress lines name each pass


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pp", "4"], "pp=4 stages need at least 4 blocks, but LlamaForCausalLM has 2"),
    ],
)
def test_plan_refuses_what_is_not_built_yet(flags, message, capsys):
    rc = main(["plan", "--config", str(CONFIGS / "llama.json"), "--tp", "2", *flags])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_plan_with_pipeline_stages(tmp_path):
    cfg = json.loads((CONFIGS / "llama.json").read_text()) | {"num_hidden_layers": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            str(tmp_path),
            "--tp",
            "2",
            "--pp",
            "2",
            "--format",
            "json",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    stages = data["stages"]
    assert data["pp"] == 2 and [s["index"] for s in stages] == [0, 1]
    assert [b for s in stages for b in s["blocks"]] == [f"model.layers.{i}" for i in range(4)]
    assert sum(s["params"] for s in stages) == data["totals"]["parameters"]  # each on one stage
    assert stages[0]["received"] == ["input_ids", "labels"] and len(stages[1]["received"]) > 2
    assert 1.0 <= data["totals"]["stage_imbalance"] < 1.2
