"""`nxd-autoshard compile`: one HLO module proto per stage, the manifest and the neuronx-cc
command lines; without neuronx-cc it says so and stops after writing the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_xla")
sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import CONFIGS  # noqa: E402

from nxd_autoshard.runtime import xla  # noqa: E402
from nxd_autoshard.tools.cli import main  # noqa: E402
from nxd_autoshard.tools.neuron import compile_for_neuron, neuron_compiler  # noqa: E402

xla.xla_device()


@pytest.mark.parametrize("family,target", [("llama", "trn1"), ("gpt2", "trn2")])
def test_compile_writes_one_module_per_stage(family, target, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compile", "--config", str(CONFIGS / f"{family}.json"), "--tp", "2", "--pp", "2"]
    assert main(argv + ["--target", target, "--seq", "16", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mesh"] == {"tp": 2, "pp": 2, "dp": 1, "order": "tp fastest, then pp, dp"}
    assert manifest["replica_groups"]["tp"] == [[0, 1], [2, 3]]
    assert [s["stage"] for s in manifest["stages"]] == [0, 1]
    for stage in manifest["stages"]:
        proto = (out / stage["hlo"]).read_bytes()
        assert len(proto) == stage["hlo_bytes"] > 1000
        assert xla.hlo_collectives((out / stage["hlo_text"]).read_text())
        assert stage["tp_ranks_identical"] is True
        assert stage["ranks"] == [[2 * stage["stage"], 2 * stage["stage"] + 1]]
        # the proto is an HloModule XLA reads back
        import torch_xla

        torch_xla._XLAC._xla_op_computation_from_module_proto("stage", proto)
        roles = {p["role"] for p in stage["hlo_parameters"]}
        assert {"state", "input", "rank"} <= roles
        names = {p["name"] for p in stage["hlo_parameters"] if p["role"] == "state"}
        assert names and names <= {p["name"] for p in stage["parameters"]} | set(stage["buffers"])
        sharded = [p for p in stage["parameters"] if p["placement"].startswith("S")]
        assert sharded and all(
            p["local_shape"][p["dim"]] == -(-p["full_shape"][p["dim"]] // 2) for p in sharded
        )
        argv = stage["neuronx_cc"]
        assert argv[:3] == ["neuronx-cc", "compile", stage["hlo"]]
        assert argv[argv.index("--target") + 1] == target
        assert argv[argv.index("--framework") + 1] == "XLA"
    first = manifest["stages"][0]
    assert "cotangent" in {p["role"] for p in first["hlo_parameters"]}  # stage 0 gets a gradient
    last = manifest["stages"][-1]
    assert last["hlo_results"][0]["role"] == "output" and last["hlo_results"][0]["shape"] == []
    if neuron_compiler()[0] is None:
        assert manifest["neuronx_cc"] == {
            "found": False,
            "status": neuron_compiler()[1],
            "ran": False,
        }
        assert "not compiled: neuronx-cc is not installed" in printed.err


def test_run_compiler_without_neuronx_cc_fails_after_writing(tmp_path, capsys):
    if neuron_compiler()[0] is not None:
        pytest.skip("neuronx-cc is installed here")
    out = tmp_path / "o"
    argv = ["compile", "--config", str(CONFIGS / "llama.json"), "--tp", "2", "--seq", "8"]
    assert main(argv + ["-o", str(out), "--run-compiler"]) == 2
    assert "neuronx-cc is not installed" in capsys.readouterr().err
    assert (out / "stage0.hlo.pb").is_file()


def test_compile_from_python(tmp_path):
    manifest = compile_for_neuron(
        CONFIGS / "llama.json", 2, tmp_path, dp=2, seq=8, check_ranks=False
    )
    (stage,) = manifest["stages"]
    assert stage["tp_ranks_identical"] is None
    assert stage["ranks"] == [[0, 1], [2, 3]]
    dp_groups = xla.hlo_groups([[0, 2], [1, 3]])
    assert stage["collectives"][f"all-reduce {dp_groups}"] == 1


def test_equal_middle_stages_are_one_program(tmp_path):
    config = json.loads((CONFIGS / "llama.json").read_text())
    config["num_hidden_layers"] = 4
    manifest = compile_for_neuron(config, 2, tmp_path, pp=4, seq=8, check_ranks=False)
    same = [s["same_program_as_stage"] for s in manifest["stages"]]
    assert same[0] is None and same[1] is None and same[-1] is None  # embedding / head differ
    assert same[2] == 1, same  # one decoder layer each: the HLO of stage 1
