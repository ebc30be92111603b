"""What each pass did to a program: name, time, op-count change and the printed graph after it.

Every pass that `autoshard` runs appends one `PassRecord` to its program's history; the
text is the golden printer's output (`golden.graph_text`), so any two steps can be diffed:

    sharded.history.diff("split_bias", "partition")
"""

from __future__ import annotations

import difflib
import html

from nxd_autoshard.compiler.driver import PassRecord

__all__ = ["History"]


class History(list):
    """The passes of one program in order; `diff(a, b)` compares the program after two of them."""

    def step(self, key: int | str) -> PassRecord:
        """A record by position or by pass name (the last run of that name)."""
        if isinstance(key, int):
            return self[key]
        for record in reversed(self):
            if record.name == key:
                return record
        raise KeyError(
            f"no pass named {key!r} in this history; passes: {', '.join(r.name for r in self)}"
        )

    def diff(self, a: int | str, b: int | str, *, context: int = 3) -> str:
        """Unified diff of the program after step `a` and after step `b`."""
        ra, rb = self.step(a), self.step(b)
        lines = difflib.unified_diff(
            ra.text.splitlines(),
            rb.text.splitlines(),
            fromfile=f"after {ra.name}",
            tofile=f"after {rb.name}",
            n=context,
            lineterm="",
        )
        return "\n".join(lines)

    def rows(self) -> list[dict]:
        """One dict per pass (name, seconds, ops before/after, change) for tables and JSON."""
        return [
            {
                "pass": r.name,
                "seconds": round(r.seconds, 4),
                "ops_before": r.ops_before,
                "ops_after": r.ops_after,
                "change": r.ops_after - r.ops_before,
            }
            for r in self
        ]

    def __str__(self) -> str:
        lines = [f"{'pass':18s} {'ms':>9s} {'ops':>13s}"]
        for r in self:
            lines.append(
                f"{r.name:18s} {r.seconds * 1e3:9.1f} {r.ops_before:>5d} -> {r.ops_after:<5d}"
                f" ({r.ops_after - r.ops_before:+d})"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{i}</td><td><code>{html.escape(r.name)}</code></td>"
            f"<td style='text-align:right'>{r.seconds * 1e3:.1f}</td>"
            f"<td style='text-align:right'>{r.ops_before} &rarr; {r.ops_after}</td>"
            f"<td style='text-align:right'>{r.ops_after - r.ops_before:+d}</td></tr>"
            for i, r in enumerate(self)
        )
        return (
            "<table class='nxd-history'><thead><tr><th>#</th><th>pass</th><th>ms</th>"
            f"<th>ops</th><th>change</th></tr></thead><tbody>{body}</tbody></table>"
            "<p><small>diff any two steps: <code>sharded.history.diff('split_bias', "
            "'partition')</code></small></p>"
        )
