"""The async save's host staging (``checkpoint.state.HostStager``): what it hands DCP lives in its host buffers.

A sharded (FSDP2) state's DTensors on GPUs have a CUDA mesh and CUDA shards; their staged copies must keep the mesh
(DCP reads the global layout from it) but hold the pinned host buffer. CPU runs have a CPU mesh, where nothing would
move anyway, so the mesh here is on torch's ``meta`` device: a mesh device other than the host's, as a CUDA mesh is.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from dist_train.checkpoint.state import HostStager


@pytest.fixture
def one_rank(tmp_path):
    """A gloo default group of one rank (a DeviceMesh needs one), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_on_another_device(local: torch.Tensor) -> DTensor:
    """A DTensor whose mesh is on ``meta`` (standing for CUDA) and whose shard is ``local``, sharded on dim 0."""
    mesh = DeviceMesh("meta", [0], _init_backend=False)
    spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(local.shape, local.stride(), local.dtype))
    return DTensor(local, spec, requires_grad=False)


def test_a_staged_dtensor_keeps_its_shard_in_the_host_buffer(one_rank):
    """DTensor.from_local would move the staged shard to the mesh's device (on GPUs: back to the GPU, a second copy of
    the state in device memory per save); the staged DTensor holds the stager's buffer, reused by the next save."""
    local = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    source = _sharded_on_another_device(local)
    stager = HostStager()
    staged = stager.stage({"w": source})["w"]
    assert isinstance(staged, DTensor)
    shard = staged._local_tensor
    assert shard.device.type == "cpu" and torch.equal(shard, local) and shard.data_ptr() != local.data_ptr()
    assert staged.device_mesh is source.device_mesh and staged.placements == source.placements
    assert staged.shape == source.shape and staged.stride() == source.stride() and staged.dtype == source.dtype
    local.add_(1.0)  # the snapshot is a copy; the next save copies into the same buffer
    again = stager.stage({"w": source})["w"]._local_tensor
    assert again.data_ptr() == shard.data_ptr() and torch.equal(again, local)
