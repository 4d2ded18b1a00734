"""The one place that knows about ranks: the process group, each rank's share of a batch, who writes files.

Under torchrun (WORLD_SIZE > 1) every rank runs the same training code; without it, Ranks() is one process and
every method here is free.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
COLLECTIVE_TIMEOUT_S = 300  # a rank that stops answering ends the run instead of hanging it


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only rank 0 writes checkpoints, metrics and plots, and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> slice:
        """This rank's part of n items, as even as possible: every rank's parts together are 0..n, in order."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every rank (in place), so each rank reports what one process would."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def from_main(self, read: Callable[[], T]) -> T:
        """Rank 0 reads (a checkpoint) and every rank gets it: other machines need no copy of its files. A read
        that fails on rank 0 fails on every rank, instead of leaving them waiting."""
        if not self.distributed:
            return read()
        box: list = [None]
        if self.main:
            try:
                box[0] = ("ok", read())
            except Exception as e:  # handed to every rank, raised there
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        """No rank leaves (or reads a file) before rank 0 has written it."""
        if self.distributed:
            dist.barrier()


def from_env() -> Ranks:
    """What torchrun sets for each process; a plain process is rank 0 of 1."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> Ranks:
    """Join torchrun's process group: NCCL between GPUs, gloo on CPUs."""
    ranks = from_env()
    if ranks.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            device_id=device if device.type == "cuda" else None,
        )
    return ranks


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel averages the gradients over ranks; one process trains the model itself."""
    if not ranks.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-timeout")


class LaunchError(Exception):
    """A distributed run that failed or could not gather; one line for the user."""


def without_launch_flags(argv: list[str]) -> list[str]:
    """The command line each rank runs: ours, minus the flags that were for the launcher."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def launch(
    argv: list[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    endpoint: str | None = None,
    timeout: int = 60,
    out: str = "",
) -> None:
    """Run `torchship <argv>` on nproc processes here (and nnodes machines) through PyTorch's own launcher,
    torch.distributed.run (torchrun); no launcher of our own. Failures come back as one LaunchError line."""
    if nnodes == 1 and endpoint is None:
        gather = ["--standalone"]
    else:
        if endpoint is None:
            raise LaunchError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        # static: machine 0 hosts the store and its first process is rank 0 (the one that writes files);
        # c10d would number machines in the order they arrive, and fail the last to leave once the host has gone
        gather = [
            "--nnodes",
            str(nnodes),
            "--node-rank",
            str(node_rank),
            "--rdzv-backend",
            "static",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-conf",
            f"timeout={timeout}",
        ]
    args = torchrun.get_args_parser().parse_args(
        ["--nproc-per-node", str(nproc), *gather, "--max-restarts", "0", "--module", "torchship.cli", *argv]
    )
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause; torchrun stops the others after it
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
        raise LaunchError(
            f"rank {rank} (pid {failure.pid}) {how}; the others were stopped. {out}/last.pt holds "
            "the last finished epoch: run again with --resume to continue"
        ) from None
    except (RendezvousError, dist.DistError) as e:  # DistNetworkError: nobody at the endpoint
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LaunchError(
            f"could not gather the {nnodes} machine(s) at {endpoint} within {timeout} s ({type(e).__name__}: {first})"
        ) from None
