"""The (dp, pp, tp) device mesh with NxD's rank order: tp varies fastest, then pp, then dp."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from nxd_autoshard.ir.mesh import AXES, Mesh

__all__ = ["MeshGroups", "build_groups"]


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
            "the degrees"
        )
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(device_type, (mesh.dp, mesh.pp, mesh.tp), mesh_dim_names=AXES)
    return MeshGroups(mesh, dist.get_rank(), **{axis: device_mesh.get_group(axis) for axis in AXES})
