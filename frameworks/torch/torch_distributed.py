"""torch.distributed behind the few collective calls the adapters make (the names Horovod gives
them), so that the rank check, the non-finite guard and CLARS's per-example norm sums run under
either engine: ``hvd=TorchDistributed()`` where they take Horovod.

    import torch.distributed as dist
    dist.init_process_group("gloo")                 # torchrun's environment (env://)
    check = RankConsistencyCheck(model, optimizer, hvd=TorchDistributed())

Gradients themselves are averaged by ``torch.nn.parallel.DistributedDataParallel``; this class
is for the small tensors and Python objects around a step. Gloo has no AVG reduction, so an
average is a sum divided by the world size.
"""
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["TorchDistributed", "compression_hook"]


def compression_hook(compression: str):
    """A DistributedDataParallel communication hook that sends each gradient bucket in half
    precision, averages it and casts it back: ``"fp16"`` is torch's own ``fp16_compress_hook``;
    ``"bf16"`` is the same steps in bfloat16, since torch's ``bf16_compress_hook`` asks for NCCL
    (gloo reduces bfloat16 too). Register with ``ddp.register_comm_hook(None, hook)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    if compression == "fp16":
        return default_hooks.fp16_compress_hook
    if compression != "bf16":
        raise ValueError(f"compression: expected 'fp16' or 'bf16', got {compression!r}")

    def bfloat16_average_hook(process_group, bucket):      # (DDP refuses the name bf16_compress_hook off NCCL)
        group = process_group if process_group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
        future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

        def decompress(done):
            buffer.copy_(done.value()[0])
            return buffer
        return future.then(decompress)
    return bfloat16_average_hook


class TorchDistributed:
    """The process group's collectives with Horovod's call names (``rank``, ``size``,
    ``allreduce(t, op=)``, ``allgather``, ``broadcast_object``, ``allgather_object``)."""

    Sum, Average, Max = "sum", "average", "max"

    def __init__(self, group: Optional[object] = None):
        if not dist.is_initialized():
            raise RuntimeError("TorchDistributed: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group() first (torchrun sets its environment)")
        self.group = group

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def size(self) -> int:
        return dist.get_world_size(self.group)

    def allreduce(self, tensor: torch.Tensor, op: str = "average", name: Optional[str] = None) -> torch.Tensor:
        """A reduced copy of ``tensor`` (``name``: accepted for Horovod's signature, unused)."""
        out = tensor.detach().clone()
        reduce_op = {"sum": dist.ReduceOp.SUM, "average": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(out, op=reduce_op, group=self.group)
        if op == "average":
            out = out / self.size()
        return out

    def allgather(self, tensor: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
        """Every rank's ``tensor`` (the same shape on each) concatenated along dimension 0."""
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size())]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts)

    def broadcast_object(self, obj: Any, root_rank: int = 0, name: Optional[str] = None) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root_rank, group=self.group)
        return box[0]

    def allgather_object(self, obj: Any) -> List[Any]:
        out = [None] * self.size()
        dist.all_gather_object(out, obj, group=self.group)
        return out
