"""Pictures of a rewritten program: an SVG of its modules and collectives, and one block before/after.

The SVG is written by hand (no graphviz binary is needed): one box per top-level part of the
model in program order, one row per module inside it with its op count, collectives as
highlighted rows. A block identical to the one before it is not drawn again: the first is
drawn and a "x 31 more identical blocks" row stands for the rest.
"""

from __future__ import annotations

import difflib
import html
import re
from collections import Counter

import torch.fx

from nxd_autoshard.inspect.render import fmt_bytes
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.meta import placement_of
from nxd_autoshard.ir.placements import Partial, Shard
from nxd_autoshard.ir.printer import display_module, target_name, value_names
from nxd_autoshard.ir.program import block_of

__all__ = ["before_after_html", "block_lines", "graph_svg"]


_COLLECTIVES = {fn.__name__ for fn in (*ops.COLLECTIVES, ops.vocab_parallel_cross_entropy)}


_WIDTH, _ROW, _PAD = 760, 18, 8
_FILL = {
    "coll": "#fd8c3a",
    "shard": "#ddf4ff",
    "partial": "#fff8c5",
    "rep": "#f6f8fa",
    "more": "#eaeef2",
}


def _group_of(path: str, block) -> str:
    b = block(path)
    if b:
        return b
    return path if path == "<top>" else ".".join(path.split(".")[:2])


def _rows(report, gm: torch.fx.GraphModule):
    """(group, [row]) in program order; a row is (kind, text)."""

    by_node = {c.node: c for c in report.collectives}

    names = value_names(gm)
    groups: list[tuple[str, list]] = []
    current_module = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or target_name(node.target).rsplit(".", 1)[-1].startswith(
            "_assert"
        ):
            continue
        path = display_module(node)
        name = target_name(node.target)
        c = by_node.get(names.value(node)) if name in _COLLECTIVES else None
        # a collective is drawn in the block it serves (a grad all-reduce feeds the next layer)
        group = _group_of(c.module if c else path, block_of)
        if not groups or groups[-1][0] != group:
            groups.append((group, []))
            current_module = None
        rows = groups[-1][1]
        if name in _COLLECTIVES:
            sends = (
                "; ".join(
                    f"{'fwd' if e.phase == 'forward' else 'bwd'} {e.kind} {fmt_bytes(e.bytes)}"
                    for e in (c.forward + c.backward)
                )
                if c
                else ""
            )
            rows.append(("coll", f"{name}[tp] {c.shape if c else ''}  {sends}"))
            current_module = None
            continue
        placement = placement_of(node)
        kind = (
            "shard"
            if isinstance(placement, Shard)
            else "partial"
            if isinstance(placement, Partial)
            else "rep"
        )
        if current_module != path:
            rows.append([kind, path, Counter(), placement])
            current_module = path
        row = rows[-1]
        row[2][name.split(".")[-1]] += 1
        if kind != "rep" and row[0] == "rep":
            row[0] = kind
        if kind != "rep":
            row[3] = placement
    return groups


def _row_text(row, group: str) -> tuple[str, str]:
    if row[0] == "coll" or row[0] == "more":
        return row[0], row[1]
    kind, path, ops, placement = row
    rel = (
        path[len(group) + 1 :] if path.startswith(group + ".") else ("" if path == group else path)
    )
    top = ", ".join(f"{op}x{n}" if n > 1 else op for op, n in ops.most_common(4))
    more = sum(ops.values())
    tag = f" {placement}" if kind != "rep" and placement is not None else ""
    return (
        kind,
        f"{rel or '(self)'}: {more} op{'s' if more > 1 else ''} ({top}{', ...' if len(ops) > 4 else ''}){tag}",
    )


def graph_svg(report, gm: torch.fx.GraphModule) -> str:
    """An SVG picture of a rewritten program: module boxes in order, collectives highlighted."""
    same_as = {b.name: b.same_as for b in report.blocks}
    groups = _rows(report, gm)
    shown: list[tuple[str, list]] = []
    skipped = 0
    for group, rows in groups:
        if same_as.get(group) is not None:
            skipped += 1  # identical to an earlier block: drawn once, counted here
            continue
        if skipped:
            shown.append(("", [("more", f"x {skipped} more identical blocks")]))
            skipped = 0
        shown.append((group, rows))
    if skipped:
        shown.append(("", [("more", f"x {skipped} more identical blocks")]))

    y = 34
    body = []
    for group, rows in shown:
        if group:
            height = _ROW * (len(rows) + 1) + _PAD
            body.append(
                f"<rect x='10' y='{y}' width='{_WIDTH - 20}' height='{height}' rx='6' "
                "fill='white' stroke='#57606a'/>"
            )
            body.append(f"<text x='18' y='{y + 14}' font-weight='bold'>{html.escape(group)}</text>")
            y += _ROW + 2
        for row in rows:
            kind, text = _row_text(row, group)
            body.append(
                f"<rect x='22' y='{y}' width='{_WIDTH - 44}' height='{_ROW - 3}' rx='3' "
                f"fill='{_FILL[kind]}' stroke='{'#bc4c00' if kind == 'coll' else '#d0d7de'}'/>"
            )
            weight = " font-weight='bold'" if kind in ("coll", "more") else ""
            body.append(f"<text x='28' y='{y + 11}'{weight}>{html.escape(text[:118])}</text>")
            y += _ROW
        y += _PAD + 6 if group else 4
    legend = "<text x='10' y='20' font-weight='bold'>legend:</text>" + "".join(
        f"<rect x='{70 + i * 130}' y='9' width='14' height='14' fill='{_FILL[k]}' "
        f"stroke='#57606a'/><text x='{88 + i * 130}' y='20'>{label}</text>"
        for i, (k, label) in enumerate(
            (
                ("coll", "collective"),
                ("shard", "sharded op"),
                ("partial", "partial sum"),
                ("rep", "replicated"),
            )
        )
    )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' class='nxd-graph' width='{_WIDTH}' "
        f"height='{y + 10}' font-family='monospace' font-size='11'>{legend}{''.join(body)}</svg>"
    )


_SECTION = re.compile(r"^  \[(.*)\]$")


def block_lines(text: str, block: str) -> list[str]:
    """The op lines of a printed program that belong to `block` (module headers dropped)."""
    out, inside = [], False
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            path = match.group(1)
            inside = path == block or path.startswith(block + ".")
            continue
        if inside and line.startswith("    "):
            out.append(line.strip())
    return out


def _op(line: str) -> str:
    match = re.match(r"%\d+ = ([\w.]+)", line)
    return match.group(1) if match else line


def before_after_html(history, block: str) -> str:
    """Side by side: a block as captured and planned (global shapes) and as rewritten (one rank)."""
    planned = "propagate" if any(r.name == "propagate" for r in history) else "split_bias"
    before = block_lines(history.step(planned).text, block)
    after = block_lines(history.step("partition").text, block)
    matcher = difflib.SequenceMatcher(
        a=[_op(x) for x in before], b=[_op(x) for x in after], autojunk=False
    )
    rows = []
    for _tag, i1, i2, j1, j2 in matcher.get_opcodes():
        left, right = before[i1:i2], after[j1:j2]
        for k in range(max(len(left), len(right))):
            a = left[k] if k < len(left) else ""
            b = right[k] if k < len(right) else ""
            cls = "ins" if not a else "chg" if a.split("  ")[1:] != b.split("  ")[1:] else ""
            rows.append(
                f"<tr class='{cls}'><td><pre>{html.escape(a)}</pre></td>"
                f"<td><pre>{html.escape(b)}</pre></td></tr>"
            )
    return (
        f"<p>block <code>{html.escape(block)}</code>: {len(before)} ops captured, "
        f"{len(after)} after partition; green rows are inserted collectives, yellow rows "
        "changed placement or per-rank shape</p><table><thead><tr><th>captured (global), placements planned</th>"
        "<th>rewritten (one rank)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
