"""Everything that touches torch.distributed: process-group setup from torchrun's environment,
DDP and FSDP wrapping, and the collectives the trainer needs. No other module imports
torch.distributed, and a single-process run (--strategy none) never creates a process group.

torchrun sets RANK (global index), LOCAL_RANK (index on this node), WORLD_SIZE (all processes),
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts.
"""
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanotune import UserError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def compute_init(strategy: str, device: str = None, timeout_s: float = 600) -> tuple:
    """Resolve --strategy ('auto': ddp when torchrun started several processes) and set up the
    process group if one is needed: NCCL with one GPU per local rank, gloo on CPU. The timeout
    bounds how long a collective waits for a rank that died, so the others exit instead of hanging."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if strategy == "auto":
        strategy = "ddp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise UserError(f"--strategy none cannot run {world_size} processes; use ddp, fsdp or deepspeed")
    use_cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if strategy == "none":
        return strategy, Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    if "RANK" not in os.environ:  # --strategy ddp/fsdp without torchrun: a group of one, on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if use_cuda else None)
    return strategy, Dist(rank, local_rank, dist.get_world_size(), dev)


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list) -> list:
    """Sum a few floats over all ranks (evaluation totals); identity in a single process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's value of a small picklable-free object (str, int, list) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=dist_device())
    return box[0]


def dist_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_ddp(model, d: Dist):
    """DDP replicates the model and averages gradients in buckets during backward. Every trainable
    parameter is used in every step, so the unused-parameter search stays off. DDP broadcasts
    rank 0's weights at construction, so every replica starts from the same LoRA init."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                   find_unused_parameters=False)


def wrap_fsdp(model, d: Dist, sharding="full", prefetch=False, offload=False, param_dtype=None, full_state=None):
    """Shard with FSDP2 (fully_shard): each transformer block is one unit, then the root.

    sharding: 'full' (FULL_SHARD: free gathered weights after forward), 'grad-op' (SHARD_GRAD_OP:
    keep them until backward), 'hybrid' (HYBRID_SHARD: shard within a node, replicate across
    nodes, over a 2-D device mesh). Ranks other than 0 built the model on the meta device; rank
    0's `full_state` is broadcast and each rank keeps only its shard (cpu_ram_efficient_loading
    + sync_module_states)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kind = d.device.type
    if sharding == "hybrid":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
        mesh = init_device_mesh(kind, (d.world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(kind, (d.world_size,))
    policy = dict(mesh=mesh, reshard_after_forward=sharding != "grad-op",
                  mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    blocks = list(model.gpt_neox.layers)
    for block in blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    if prefetch:  # gather the next block's weights while this one computes
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
            block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    if full_state is not None or not d.is_main:
        set_model_state_dict(model, full_state if d.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_state_dict(model, strategy: str) -> dict:
    """The whole model's state on rank 0's CPU (gathered from the shards under FSDP; every rank
    must call this), and {} on other ranks."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    module = model.module if strategy == "ddp" else model
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def local(t):
    """This rank's own piece of a tensor: the local shard of an FSDP DTensor, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(param, shard):
    """A tensor laid out like `param` from this rank's piece of it (the inverse of `local`)."""
    shard = shard.to(param.device)
    return DTensor.from_local(shard, param.device_mesh, param.placements) if isinstance(param, DTensor) else shard
