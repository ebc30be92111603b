"""Run the regions the `recompute` pass marked under `torch.utils.checkpoint` (non-reentrant).

`with_recompute(gm)` outlines every marked region into a `Recompute` submodule called in
its place: a plain GraphModule that eager code, the pipeline's stage modules and
`torch.compile` run as it is (Dynamo turns the checkpoint call into its checkpoint
higher-order op, and AOTAutograd recomputes the region in the backward graph). The simulator
meets the same submodules and checkpoints its all-rank interpretation of their bodies.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from nxd_autoshard.ir.meta import recompute_of, set_recompute
from nxd_autoshard.runtime.collectives import axis_groups, bound_groups

__all__ = ["RECOMPUTED_KEY", "Recompute", "with_recompute"]

# gm.meta: the graph with its regions outlined (built once per graph, kept with it)
RECOMPUTED_KEY = "nxd_recompute_gm"


class Recompute(torch.nn.Module):
    """One region's graph, run under a non-reentrant checkpoint: its activations are dropped
    after the forward and recomputed (with the same random state) when backward needs them."""

    def __init__(self, body: torch.fx.GraphModule, name: str):
        super().__init__()
        self.body = body
        self.region = name

    def forward(self, *args):
        if torch.compiler.is_compiling():  # the backward graph recomputes it; groups are traced
            return checkpoint(self.body, *args, use_reentrant=False)
        # the recompute runs inside backward, after forward has unbound the mesh axes
        return checkpoint(self._run, bound_groups(), *args, use_reentrant=False)

    def _run(self, groups: dict, *args):
        with axis_groups(groups):
            return self.body(*args)


def with_recompute(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with its marked regions outlined into `Recompute` calls (`gm` itself without marks).

    Made once per graph and kept in its meta.
    """
    done = gm.meta.get(RECOMPUTED_KEY)
    if done is not None:
        return done
    regions: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        name = recompute_of(node)
        if name is not None and node.op == "call_function":
            regions.setdefault(name, []).append(node)
    if not regions:
        gm.meta[RECOMPUTED_KEY] = gm
        return gm
    graph, modules = _outlined(gm, regions)
    out = torch.fx.GraphModule(_root(gm, graph, modules), graph)
    out.meta.update({k: v for k, v in gm.meta.items() if k != RECOMPUTED_KEY})
    out.meta[RECOMPUTED_KEY] = out
    gm.meta[RECOMPUTED_KEY] = out
    return out


def _root(gm: torch.fx.GraphModule, graph: torch.fx.Graph, modules: dict) -> dict:
    """What the outlined graph reads: gm's attributes by their targets, and the regions."""
    root = dict(modules)
    for node in graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            root[node.target] = value
    return root


def _outlined(gm: torch.fx.GraphModule, regions: dict[str, list[torch.fx.Node]]):
    """A copy of gm's graph where each region is one call_module node, and those modules."""
    region_of = {n: name for name, nodes in regions.items() for n in nodes}
    last_of = {nodes[-1]: name for name, nodes in regions.items()}
    graph = torch.fx.Graph()
    modules: dict[str, Recompute] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        name = region_of.get(node)
        if name is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        if node not in last_of:
            continue  # emitted with the region, at its last node
        nodes = regions[name]
        body, inputs, outputs = _body(gm, nodes)
        target = f"recompute_{len(modules)}"
        modules[target] = Recompute(body, name)
        call = graph.call_module(target, tuple(env[i] for i in inputs))
        set_recompute(call, name)
        call.meta["nn_module_stack"] = nodes[0].meta.get("nn_module_stack", {})
        for k, o in enumerate(outputs):
            get = graph.call_function(operator.getitem, (call, k))
            get.meta = dict(o.meta)
            env[o] = get
    return graph, modules


def _body(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]):
    """The region as its own GraphModule: inputs are the values it reads from outside,
    outputs those read after it."""
    inside = set(nodes)
    inputs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i in inputs:
        env[i] = graph.placeholder(i.name)
        env[i].meta = dict(i.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        set_recompute(env[node], None)  # inside the region it runs plainly
    graph.output(tuple(env[o] for o in outputs))
    return torch.fx.GraphModule(gm, graph), inputs, outputs
