"""Which checkpoint layouts map onto which job (jitckpt.state.mesh.check_layout)."""

from __future__ import annotations

import pytest

from jitckpt.errors import CheckpointMismatchError as Mismatch
from jitckpt.state.mesh import MeshLayout, check_layout

GRID_2X2 = MeshLayout(((0, 1), (2, 3)), ("replicate", "shard"))
GRID_1D = MeshLayout(((0, 1, 2, 3),), ("shard",))


def test_layouts_that_map_and_that_do_not() -> None:
    hsdp = GRID_2X2.to_manifest()
    assert hsdp == {"type": "hsdp", "mesh_shape": [2, 2], "mesh_dim_names": ["replicate", "shard"]}
    check_layout(hsdp, GRID_1D.to_manifest(), "ck")  # resharding
    check_layout({"type": "ddp"}, {"type": "ddp"}, "ck")
    with pytest.raises(Mismatch, match="HSDP .* cannot be mapped onto this DDP job"):
        check_layout(hsdp, {"type": "ddp"}, "ck")
    with pytest.raises(Mismatch, match="DDP job and cannot be mapped onto this FSDP"):
        check_layout({"type": "ddp"}, GRID_1D.to_manifest(), "ck")
    with pytest.raises(Mismatch, match="mesh this version cannot read"):
        check_layout(dict(hsdp, mesh_shape=[2, 2, 1]), hsdp, "ck")
