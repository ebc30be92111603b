"""The neuronx-cc hand-off's pieces that need neither torch-xla nor Trainium: the compile
command line, finding the compiler, and the error without torch-xla (tests/xla has the rest)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.ir.placements import Replicate, Shard
from nxd_autoshard.runtime import xla
from nxd_autoshard.tools import neuron
from nxd_autoshard.tools.cli import main


def test_command_line_for_trn1_training():
    argv = neuron.neuronx_cc_command("stage0.hlo.pb", "stage0.neff", target="trn1")
    assert argv == [
        "neuronx-cc",
        "compile",
        "stage0.hlo.pb",
        "--framework",
        "XLA",
        "--target",
        "trn1",
        "--model-type",
        "transformer",
        "-O2",
        "--auto-cast",
        "none",
        "--distribution-strategy",
        "llm-training",
        "--output",
        "stage0.neff",
    ]


def test_command_line_for_trn2_and_options():
    argv = neuron.neuronx_cc_command(
        "s.pb", "s.neff", target="trn2", optlevel=3, training=False, logfile="s.log"
    )
    assert "-O3" in argv and "--distribution-strategy" not in argv
    assert argv[argv.index("--logical-nc-config") + 1] == "2"
    assert argv[-2:] == ["--logfile", "s.log"]
    with pytest.raises(ValueError, match="target"):
        neuron.neuronx_cc_command("s", "o", target="inf1")
    with pytest.raises(ValueError, match="optlevel"):
        neuron.neuronx_cc_command("s", "o", target="trn1", optlevel=4)
    with pytest.raises(ValueError, match="trn2 only"):
        neuron.neuronx_cc_command("s", "o", target="trn1", logical_cores=1)


def test_pypi_placeholder_is_not_a_compiler(monkeypatch):
    """PyPI's neuronx-cc installs a module whose import raises 'WRONG PACKAGE'."""

    finder = types.SimpleNamespace()

    def find_spec(name, path=None, target=None):
        if name == "neuronxcc":
            raise ImportError("WRONG PACKAGE. Please install the package from Neuron Repository")
        return None

    finder.find_spec = find_spec
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "neuronxcc", raising=False)
    exe, why = neuron.neuron_compiler()
    assert exe is None
    assert "WRONG PACKAGE" in why and "pip.repos.neuron.amazonaws.com" in why


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch-xla here")
def test_without_torch_xla_the_error_names_the_package(tmp_path, capsys):
    with pytest.raises(ImportError, match=r"torch-xla.*make test-xla"):
        xla.require_xla()
    argv = ["compile", "--config", "tests/configs/llama.json", "--tp", "2", "-o", str(tmp_path)]
    assert main(argv) == 2
    assert "make test-xla" in capsys.readouterr().err


def test_partition_spec_of_our_placements():
    assert xla.partition_spec(Shard(0), 2) == ("tp", None)
    assert xla.partition_spec(Shard(-1), 3) == (None, None, "tp")
    assert xla.partition_spec(Replicate(), 2) == (None, None)


def test_replica_groups_follow_nxd_rank_order():
    groups = xla.replica_groups(Mesh(dp=2, pp=2, tp=2))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert xla.hlo_groups(groups["dp"]) == "{{0,4},{1,5},{2,6},{3,7}}"
