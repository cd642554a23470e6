"""Process-group setup that works the same with torchrun, across nodes, or as one plain process."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist


# How long a rank waits for the others in one collective before it gives up: the bound on
# how long a job whose peer machine vanished (no FIN, no RST: a power cut, a pulled cable) hangs.
DEFAULT_PEER_TIMEOUT_S = 300.0


class PeerLostError(RuntimeError):
    """A collective failed: another rank stopped answering (its process or machine is gone,
    or the network between them)."""


@dataclass(frozen=True)
class Peer:
    """One rank as the others know it: the machine's name and the address it reaches the
    store from. Machines that share a name (network namespaces, cloned VMs) differ in address."""
    rank: int
    hostname: str
    address: str | None

    def describe(self) -> str:
        return f"rank {self.rank} on {self.hostname} ({self.address or 'address unknown'})"


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    peers: tuple[Peer, ...] = ()           # every rank of the job, gathered at setup

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str, timeout_s: float = DEFAULT_PEER_TIMEOUT_S) -> DistContext:
    """Join the process group when torchrun set RANK/WORLD_SIZE; else run single-process.

    gloo on CPU, nccl on CUDA. The timeout makes a job whose peer died exit with an
    error instead of waiting forever on a collective.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_name)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    context = DistContext(rank, local_rank, world_size, local_world_size, device)
    return replace(context, peers=gather_peers(context))


def own_address() -> str | None:
    """The address this process reaches the job's store from (MASTER_ADDR, which torchrun
    points at rank 0's machine): the source address the kernel routes to it. No packet is
    sent: connecting a UDP socket only picks the route."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return probe.getsockname()[0]
    except OSError:   # an unresolvable name: leave the address out rather than fail the run
        return None


def all_gather_objects(value, context: DistContext) -> list:
    """Every rank's value (picklable), in rank order (a collective: every rank calls it)."""
    if not context.enabled:
        return [value]
    values: list = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def gather_peers(context: DistContext) -> tuple[Peer, ...]:
    return tuple(all_gather_objects(Peer(context.rank, socket.gethostname(), own_address()), context))


def hosts(context: DistContext) -> list[dict]:
    """The machines of the job, for the checkpoint: each one's hostname, the address its
    ranks used and those ranks. Grouped by address too, since namespaces share a hostname."""
    machines: dict[tuple, list[int]] = {}
    for peer in context.peers:
        machines.setdefault((peer.hostname, peer.address), []).append(peer.rank)
    return [{"hostname": hostname, "address": address, "ranks": ranks}
            for (hostname, address), ranks in machines.items()]


def is_collective_failure(error: BaseException) -> bool:
    """An error from the transport under a collective: gloo raises plain RuntimeErrors
    that name its own sources (".../gloo/transport/tcp/..."), NCCL and the stores DistErrors."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def peer_lost(error: BaseException, context: DistContext, timeout_s: float) -> PeerLostError:
    """The error a rank reports when a collective failed under it, naming the other ranks:
    gloo names the lost peer when its connection closed, never when the wait timed out."""
    others = "; ".join(peer.describe() for peer in context.peers if peer.rank != context.rank)
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return PeerLostError(f"rank {context.rank} lost contact with the other rank(s) of the job "
                         f"(waited at most {timeout_s:g} s): {others}. The collective failed with: {detail}")


def teardown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op for one process)."""
    if context.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: torch.nn.Module, context: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank so all ranks hold
    the same model: DDP syncs gradients, but each rank's last forward moved its own stats."""
    if context.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()
