"""Views of a plan Report: rich tables for a terminal, HTML for a notebook or a file.

Repeated blocks that are identical to an earlier one (same ops, placements, shapes and
collectives) are collapsed into one line ("x 31 more identical blocks") unless `full=True`;
the JSON form always holds every row.
"""

from __future__ import annotations

import html
from collections import Counter

__all__ = ["fmt_bytes", "render_html", "render_text", "rich_renderables"]


_STYLE = """
<style>
.nxd-report{font-family:system-ui,-apple-system,Segoe UI,sans-serif;font-size:13px;color:#1b1f24;max-width:1100px}
.nxd-report h2{font-size:18px;margin:8px 0}.nxd-report h3{font-size:15px;margin:14px 0 6px}
.nxd-report table{border-collapse:collapse;margin:4px 0}
.nxd-report th,.nxd-report td{border:1px solid #d0d7de;padding:2px 8px;text-align:left;vertical-align:top}
.nxd-report th{background:#f3f5f7}.nxd-report td.num{text-align:right;font-variant-numeric:tabular-nums}
.nxd-report code{font-size:12px}.nxd-report .ok{color:#1a7f37;font-weight:600}
.nxd-report .bad{color:#cf222e;font-weight:600}.nxd-report .coll{background:#fff1e5}
.nxd-report .ins{background:#dafbe1}.nxd-report .chg{background:#fff8c5}
.nxd-report pre{margin:0;font-size:11.5px}
.nxd-report .tag{display:inline-block;padding:0 6px;border-radius:8px;background:#ddf4ff;margin-right:4px}
</style>
"""


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.1f} {unit}FLOP"
        n /= 1000
    return f"{n:.1f} PFLOP"


def _kinds(counts: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _collapsed(report, full: bool) -> tuple[set[str], dict[str, int]]:
    """Blocks to hide (identical to an earlier one) and, per shown block, how many it stands for."""
    if full:
        return set(), {}
    hidden = {b.name for b in report.blocks if b.same_as is not None}
    stands_for = Counter(b.same_as for b in report.blocks if b.same_as is not None)
    return hidden, dict(stands_for)


def summary_lines(report) -> list[str]:
    """The headline: model, mesh, sizes, totals and the per-block verdict."""
    t = report.totals
    verdict = _verdict(report)
    sizes = (
        ", ".join(
            f"{k} = {v}" if v else f"{k} data-dependent (counted as 0)"
            for k, v in report.sizes.items()
        )
        or "static"
    )
    return (
        [
            (
                f"{report.model} | tp {report.tp} | pp {report.pp} | sequence parallel "
                f"{'on' if report.sequence_parallel else 'off'} | program {report.program} of "
                f"{report.programs} ({report.mode}; inputs {', '.join(report.inputs)})"
            ),
            (
                f"parameters: {t['parameters']} tensors, {fmt_bytes(t['param_bytes_per_rank'])} per rank "
                f"(full model {fmt_bytes(t['param_bytes_full'])})"
            ),
            (
                f"collectives: {t['collective_nodes']} nodes; per step forward {_kinds(t['forward'])} "
                f"({fmt_bytes(t['bytes_forward'])}/rank), backward {_kinds(t['backward'])} "
                f"({fmt_bytes(t['bytes_backward'])}/rank); bytes at example sizes {sizes}"
            ),
            f"blocks: {t['blocks']}; {verdict}",
        ]
        + (
            [
                f"pipeline: {len(report.stages)} stages, imbalance (max / mean forward FLOPs) "
                f"{t['stage_imbalance']:.3f}"
            ]
            if len(report.stages) > 1
            else []
        )
        + _training_lines(report)
    )


def _training_lines(report) -> list[str]:
    """Mixed precision and activation checkpointing, when on."""
    lines = []
    if report.sequence_parallel:
        shown = ", ".join(report.sequence_regions[:6]) or "none found"
        more = len(report.sequence_regions) - 6
        lines.append(
            f"sequence parallel: {report.sequence_ops} ops on Shard(seq) in "
            f"{shown}{f', ... ({more} more)' if more > 0 else ''}; a reduce-scatter leaves each "
            "row-parallel output, an all-gather enters each column-parallel input, norm weight "
            "gradients all-reduced over tp"
        )
    if report.precision != "fp32":
        lines.append(
            f"precision: {report.precision} weights and activations, computed from fp32 master "
            "weights; fp32 gradients"
            + (
                "; tp partial sums made and reduced in fp32"
                if report.reduce_dtype == "fp32"
                else ""
            )
        )
    if report.recomputed:
        blocks = sorted({r.rsplit("[", 1)[0] for r in report.recomputed})
        shown = ", ".join(blocks[:3]) + (f", ... ({len(blocks)} in all)" if len(blocks) > 3 else "")
        lines.append(
            f"activation checkpointing: {len(report.recomputed)} regions recomputed in backward "
            f"({shown}), cut at the forward collectives (none is issued again)"
        )
    return lines


def _verdict(report) -> str:
    if not report.blocks:
        return "no repeated blocks"
    per = Counter(
        (
            tuple(sorted(b.forward.items())),
            tuple(sorted(b.backward.items())),
            b.optimum_forward,
            b.optimum_backward,
            b.replicated,
            b.matmuls - b.sharded_matmuls,
            b.matmuls,
        )
        for b in report.blocks
    )
    parts = []
    for (f, b, of, ob, replicated, whole, matmuls), n in per.items():
        state = (
            "= optimum"
            if sum(dict(f).values()) == of and sum(dict(b).values()) == ob
            else (f"{sum(dict(f).values()) + sum(dict(b).values()) - of - ob:+d} vs optimum")
        )
        if replicated:
            state = "NOT SHARDED: every matmul replicated"
        elif whole:  # the optimum is counted over the sharded matmuls only
            state = f"PARTLY SHARDED: {whole} of {matmuls} matmuls replicated, {state}"
        parts.append(
            f"{n} x (fwd {_kinds(dict(f))}, bwd {_kinds(dict(b))}; optimum {of} + {ob}: {state})"
        )
    return "per block " + "; ".join(parts)


def rich_renderables(report, *, full: bool = False):
    """rich objects for a console: headline, parameters, collectives, blocks, stages, passes."""
    from rich.table import Table
    from rich.text import Text

    hidden, stands = _collapsed(report, full)
    yield Text("\n".join(summary_lines(report)), style="bold")

    params = Table(title="Parameters (per rank)", title_justify="left")
    for col, kw in (
        ("name", {}),
        ("placement", {}),
        ("full shape", {}),
        ("local shape", {}),
        ("dtype", {}),
        ("bytes/rank", {"justify": "right"}),
    ):
        params.add_column(col, **kw)
    for row in _param_view(report, hidden, stands):
        params.add_row(*map(Text, row))
    yield params

    colls = Table(title="Collectives (per rank, one step)", title_justify="left")
    for col in ("node", "module", "call", "input shape", "forward", "backward"):
        colls.add_column(col, overflow="fold")
    for row in _collective_view(report, hidden, stands):
        colls.add_row(*map(Text, row), style="dark_orange" if row[0] != "..." else "dim")
    yield colls

    blocks = Table(title="Blocks: collectives vs optimum", title_justify="left")
    for col in ("block", "params", "bytes/rank", "forward", "backward", "optimum", "verdict"):
        blocks.add_column(col)
    for row in _block_view(report, hidden, stands):
        blocks.add_row(*map(Text, row))
    yield blocks

    stages = Table(title="Pipeline stages", title_justify="left")
    for col in STAGE_COLUMNS:
        stages.add_column(col)
    for row in _stage_view(report):
        stages.add_row(*map(Text, row))
    yield stages

    passes = Table(title="Passes (sharded.history)", title_justify="left")
    for col in ("pass", "ms", "ops"):
        passes.add_column(col)
    for r in report.history:
        passes.add_row(
            Text(r["pass"]),
            f"{r['seconds'] * 1e3:.1f}",
            f"{r['ops_before']} -> {r['ops_after']} ({r['change']:+d})",
        )
    yield passes


def render_text(report, *, width: int = 140, full: bool = False) -> str:
    """The report as plain text (rich tables without colour)."""
    import io

    from rich.console import Console

    console = Console(
        file=io.StringIO(), width=width, no_color=True, color_system=None, force_terminal=False
    )
    for item in rich_renderables(report, full=full):
        console.print(item)
    return console.file.getvalue()


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _param_view(report, hidden, stands):
    for p in report.parameters:
        if p.block in hidden:
            continue
        name = p.name + (f" (tied to {p.tied_to})" if p.tied_to else "")
        yield [
            name,
            p.placement,
            _shape(p.full_shape),
            _shape(p.local_shape),
            p.dtype,
            fmt_bytes(p.bytes_per_rank) if not p.tied_to else "(shared)",
        ]
        if p.block in stands and p is _last_of_block(report, p.block):
            yield ["...", f"x {stands[p.block]} more identical blocks", "", "", "", ""]


def _last_of_block(report, block):
    return [p for p in report.parameters if p.block == block][-1]


def _events_str(events) -> str:
    return "; ".join(f"{e.kind} {_shape(e.shape)} {fmt_bytes(e.bytes)}" for e in events) or "-"


def _collective_view(report, hidden, stands):
    last_shown = {}
    for c in report.collectives:
        if c.block not in hidden:
            last_shown[c.block] = c
    for c in report.collectives:
        if c.block in hidden:
            continue
        yield [c.node, c.module, c.call, c.shape, _events_str(c.forward), _events_str(c.backward)]
        if c.block in stands and last_shown.get(c.block) is c:
            yield ["...", f"x {stands[c.block]} more identical blocks", "", "", "", ""]


def _block_view(report, hidden, stands):
    for b in report.blocks:
        if b.name in hidden:
            continue
        verdict = "= optimum" if b.extra == 0 else f"{b.extra:+d} vs optimum"
        if b.replicated:
            verdict = f"not sharded (0 of {b.matmuls} matmuls)"
        elif b.partly_replicated:
            verdict = f"partly sharded ({b.sharded_matmuls} of {b.matmuls} matmuls), {verdict}"
        name = b.name + (f"  (+{stands[b.name]} identical)" if b.name in stands else "")
        yield [
            name,
            str(b.params),
            fmt_bytes(b.param_bytes),
            _kinds(b.forward),
            _kinds(b.backward),
            f"{b.optimum_forward} fwd + {b.optimum_backward} bwd",
            verdict,
        ]


STAGE_COLUMNS = [
    "stage",
    "blocks",
    "params",
    "param bytes/rank",
    "receives",
    "comm fwd / bwd",
    "matmul FLOPs/rank",
]


def _stage_view(report):
    for s in report.stages:
        names = s.blocks
        blocks = (
            f"{names[0]} .. {names[-1]} ({len(names)})" if len(names) > 2 else ", ".join(names)
        ) or "-"
        yield [
            str(s.index),
            blocks,
            str(s.params),
            fmt_bytes(s.param_bytes),
            f"{len(s.received)} tensors" if s.received else "-",
            f"{fmt_bytes(s.comm_bytes_forward)} / {fmt_bytes(s.comm_bytes_backward)}",
            fmt_flops(s.matmul_flops),
        ]


def _table(head: list[str], rows, *, classes=None) -> str:
    out = [
        "<table><thead><tr>",
        *(f"<th>{html.escape(h)}</th>" for h in head),
        "</tr></thead><tbody>",
    ]
    for row in rows:
        cls = classes(row) if classes else ""
        out.append(
            f"<tr class='{cls}'>"
            + "".join(f"<td>{html.escape(str(x))}</td>" for x in row)
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _stage_html(stages) -> str:
    class _R:  # a report-like holder so the stage rows render alone
        pass

    holder = _R()
    holder.stages = stages
    return (
        _STYLE
        + "<div class='nxd-report'>"
        + _table(STAGE_COLUMNS, list(_stage_view(holder)))
        + "</div>"
    )


def render_html(report, *, full: bool = False, graph: bool = True) -> str:
    """The report as one HTML fragment (style included): headline, picture, tables in <details>."""
    hidden, stands = _collapsed(report, full)
    head = summary_lines(report)
    parts = [
        _STYLE,
        "<div class='nxd-report'>",
        f"<h2>nxd-autoshard plan: {html.escape(report.model)}</h2>",
        "<p>" + "<br>".join(html.escape(x) for x in head) + "</p>",
    ]
    extra, replicated = report.totals["extra_over_optimum"], report.totals["replicated_blocks"]
    partly = report.totals["partly_replicated_blocks"]
    if replicated:
        verdict = (
            f"{replicated} of {len(report.blocks)} blocks are not sharded (every matmul replicated)"
        )
    elif partly:
        verdict = (
            f"{partly} of {len(report.blocks)} blocks are partly sharded: "
            f"{report.totals['replicated_block_matmuls']} matmuls run whole on every rank"
        )
    elif extra:
        verdict = f"{extra} collectives over the optimum in blocks"
    else:
        verdict = (
            "every block at the optimum (Megatron-SP: a reduce-scatter per row-parallel output "
            "and an all-gather per column-parallel input forward, the conjugates backward)"
            if report.sequence_parallel
            else "every block at the optimum (Megatron: one all-reduce per row-parallel output "
            "forward, one per column-parallel input backward)"
        )
    parts.append(
        f"<p class='{'bad' if extra or replicated or partly else 'ok'}'>{html.escape(verdict)}</p>"
    )
    if graph and getattr(report, "_svg", None):
        parts.append("<h3>Rewritten program</h3>" + report._svg)
    parts.append("<h3>Pipeline stages</h3>" + _table(STAGE_COLUMNS, list(_stage_view(report))))
    parts.append(
        "<h3>Blocks: collectives vs optimum</h3>"
        + _table(
            ["block", "params", "bytes/rank", "forward", "backward", "optimum", "verdict"],
            list(_block_view(report, hidden, stands)),
        )
    )
    parts.append(
        "<details open><summary><b>Collectives</b> ("
        + str(len(report.collectives))
        + " nodes)</summary>"
        + _table(
            ["node", "module", "call", "shape", "forward", "backward"],
            list(_collective_view(report, hidden, stands)),
            classes=lambda r: "coll" if r[0] != "..." else "",
        )
        + "</details>"
    )
    parts.append(
        "<details><summary><b>Parameters</b> ("
        + str(report.totals["parameters"])
        + ")</summary>"
        + _table(
            ["name", "placement", "full shape", "local shape", "dtype", "bytes/rank"],
            list(_param_view(report, hidden, stands)),
        )
        + "</details>"
    )
    if getattr(report, "_before_after", None):
        parts.append(
            "<details><summary><b>One block before and after partition</b></summary>"
            + report._before_after
            + "</details>"
        )
    parts.append(
        "<details><summary><b>Passes</b> (sharded.history)</summary>"
        + _table(
            ["pass", "ms", "ops before", "ops after", "change"],
            [
                [
                    r["pass"],
                    f"{r['seconds'] * 1e3:.1f}",
                    r["ops_before"],
                    r["ops_after"],
                    f"{r['change']:+d}",
                ]
                for r in report.history
            ],
        )
        + "</details>"
    )
    parts.append("</div>")
    return "".join(parts)
