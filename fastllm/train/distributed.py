"""Process layout: one process, or one per device under torchrun (DDP or FSDP2 over NCCL / gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process created the process group and destroys it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place for world > 1)."""
        if self.distributed:
            dist.all_reduce(value)
        return value

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={spec!r} but this torch sees no CUDA device; use run.device='cpu'")
        return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
    return torch.device("cpu")


def setup(device_spec: str) -> Env:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; creates the process group when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Env(0, 1, 0, resolve_device(device_spec), owns_group=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU processes on one machine share its cores.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Env(rank, world, local_rank, device, owns_group=owns)
