"""One code path for plain runs and `torchrun --nproc_per_node=N`.

Under torchrun (WORLD_SIZE > 1 in the environment) the process group is created here on first
use (nccl when CUDA is present, gloo on CPU) and kept for the life of the process: several
trainings in one process (distillation generations, backbone then hypernet) share it, because
re-initialising a group against torchrun's rendezvous store is not reliable. Only rank 0 writes files and shows progress; the others wait at a
barrier where a file must exist before they read it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when this module created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup() -> DistEnv:
    """Join the process group torchrun describes, or return a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if world <= 1 and not dist.is_initialized():
        return DistEnv(device=device)
    owns = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy)
        owns = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, owns_group=owns)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def teardown(env: DistEnv) -> None:
    """End of one training: the ranks meet, the group stays (destroyed at process exit)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def session():
    """`with session() as env:` joins (or creates) the process group; on success the ranks meet at
    the end. On an error there is no barrier: the other ranks fail on their next collective, and
    torchrun stops the job."""
    env = setup()
    yield env
    teardown(env)


def broadcast_flag(env: DistEnv, value: bool) -> bool:
    """Rank 0's boolean for every rank (e.g. "the run is already complete")."""
    if not env.distributed:
        return value
    t = torch.tensor([int(value)], device=env.device if env.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_mean(env: DistEnv, value: float) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / env.world_size
