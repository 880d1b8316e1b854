"""Collective ops for data-parallel training, on the device the process group's backend needs.

NCCL reduces CUDA tensors only, gloo CPU tensors (its CUDA support is partial); the SAEs live on
the process's own device (`resources.process_device`). `DistCollective` moves each tensor to the
backend's device, runs the op there and moves the result back, so the training loop never needs to
know which backend it runs under. Only `torch.distributed` calls live here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def backend_device(backend: str) -> torch.device:
    """The device a backend's collectives take: CUDA (this process's current one) for NCCL, else cpu."""
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistCollective:
    """All-gather, all-reduce (sum / max) over the default process group of `torch.distributed`."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device = backend_device(str(dist.get_backend()))

    def gather(self, x: Tensor) -> tuple[Tensor, int]:
        """All-gather a [n] (or [n, ...]) tensor along dim 0 (every replica holds the same n);
        returns the global tensor on `x`'s device and where this replica's rows start."""
        y = x.detach().to(self.device).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        self.dist.all_gather(parts, y)
        return torch.cat(parts).to(x.device), self.rank * x.shape[0]

    def allreduce(self, grads: list[Tensor]) -> None:
        """Sum a list of tensors across replicas, in place, as one flat buffer."""
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self.dist.all_reduce(flat)
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    def sum(self, x: Tensor) -> Tensor:
        """The elementwise sum of `x` over replicas (a new tensor on `x`'s device)."""
        y = x.to(self.device).clone()
        self.dist.all_reduce(y)
        return y.to(x.device)

    def max(self, x: Tensor) -> Tensor:
        """The elementwise max of `x` over replicas (a new tensor on `x`'s device)."""
        y = x.to(self.device).clone()
        self.dist.all_reduce(y, op=self.dist.ReduceOp.MAX)
        return y.to(x.device)
