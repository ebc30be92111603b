"""The (dp, pp, tp) device mesh with NxD's rank order: tp varies fastest, then pp, then dp."""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Mesh:
    """Shape of the mesh; `rank(dp=i, pp=j, tp=k)` and `coords(rank)` convert between the two views."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.dp * self.pp * self.tp

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    def coords(self, rank: int) -> dict[str, int]:
        tp = rank % self.tp
        pp = (rank // self.tp) % self.pp
        return {"dp": rank // (self.tp * self.pp), "pp": pp, "tp": tp}

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks that differ only along `axis` (each list in axis order)."""
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis '{axis}': use one of {AXES}")
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(getattr(self, others[0])):
            for j in range(getattr(self, others[1])):
                fixed = {others[0]: i, others[1]: j}
                out.append([self.rank(**fixed, **{axis: k}) for k in range(getattr(self, axis))])
        return out
