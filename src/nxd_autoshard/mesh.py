"""The (dp, pp, tp) device mesh with NxD's rank order: tp varies fastest, then pp, then dp."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Mesh", "MeshGroups", "build_groups"]

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


@dataclass
class MeshGroups:
    """This rank's place in the mesh and its process group along each axis."""

    mesh: Mesh
    rank: int
    tp: object
    pp: object
    dp: object

    def coord(self, axis: str) -> int:
        return self.mesh.coords(self.rank)[axis]


def build_groups(mesh: Mesh, device_type: str = "cpu") -> MeshGroups:
    """Process groups of this rank along each axis; the world must have exactly mesh.size ranks."""
    world = dist.get_world_size()
    if world != mesh.size:
        raise ValueError(
            f"the world has {world} ranks but dp={mesh.dp} x pp={mesh.pp} x tp={mesh.tp} needs "
            f"{mesh.size}; launch {mesh.size} ranks (torchrun --nproc-per-node {mesh.size}) or change "
            "the degrees")
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(device_type, (mesh.dp, mesh.pp, mesh.tp), mesh_dim_names=AXES)
    return MeshGroups(mesh, dist.get_rank(), **{axis: device_mesh.get_group(axis) for axis in AXES})
