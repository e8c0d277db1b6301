"""FSDP2 (issue 8, item 10): features mode works, sharded parameters are refused by name.

``examples/fsdp.py`` trains a ``fully_shard``-ed model on two gloo CPU processes in features
mode and compares with a single-process run; the engine's DTensor check is also tested here in
one process, on a one-rank mesh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import taskbalance as tb
from test_compile import run_example


@pytest.mark.slow
def test_fsdp2_features_mode_equals_single_process_and_params_mode_is_refused():
    stdout = run_example("fsdp.py")
    assert "parameters mode with sharded parameters refused on every rank: True" in stdout
    assert "identical weights on both ranks at every step: True" in stdout
    assert "weights and model equal the single-process run: True" in stdout


def test_sharded_dtensor_parameters_are_refused_naming_params(tmp_path: Path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        layer = nn.Linear(3, 4)
        plain = nn.Parameter(torch.randn(4))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        z = layer(torch.randn(5, 3))
        losses = torch.stack([(z * plain).sum(), z.pow(2).sum()])
        with pytest.raises(ValueError, match=r"^params\[1\]: a sharded DTensor \(placements"):
            tb.gramian(losses, [plain, sharded])
        b = tb.create("mgda", num_tasks=2, params=[plain, sharded])
        with pytest.raises(ValueError, match=r"^params\[1\]: a sharded DTensor.*features mode"):
            b(losses)
    finally:
        dist.destroy_process_group()
