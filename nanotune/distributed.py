"""Everything that touches torch.distributed: process-group setup from torchrun's environment,
DDP and FSDP wrapping, and the collectives the trainer needs. No other module but DeepSpeed's
(zero.py) imports torch.distributed, and a single-process run (--strategy none) never creates a
process group. Nothing here imports the rest of nanotune: zero.py and checkpoint.py build on this
module, never the other way round.

torchrun sets RANK (global index), LOCAL_RANK (index on this node), WORLD_SIZE (all processes),
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts.
"""
import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanotune import UserError


@dataclass
class World:
    """This process's place in the run: the strategy (none, ddp, fsdp, deepspeed), its global rank,
    its rank on this node, the number of processes, and the device it computes on."""
    strategy: str = "none"
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(name: str = None) -> torch.device:
    """--device as a torch.device (None: cuda when this machine has a GPU, else cpu); one sentence
    for a name torch does not know or a GPU this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: nanotune runs on cpu or cuda")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} usable CUDA GPU(s); "
                        "use --device cpu" + (", or a GPU numbered from 0" if torch.cuda.is_available() else ""))
    return dev


def compute_init(strategy: str, device: str = None, cpu_collectives=False, timeout_minutes=30.0) -> World:
    """Resolve --strategy ('auto': ddp when torchrun started several processes) and set up the
    process group if one is needed: NCCL with one GPU per local rank, gloo on CPU. The timeout
    (--timeout) bounds how long a collective waits for the slowest rank, so the others exit instead
    of hanging when one died; it must outlast the longest stretch one rank works alone (30 minutes,
    as transformers' Trainer; train.py's final save does not wait on rank 0's write).
    cpu_collectives adds gloo beside NCCL for tensors in CPU memory: FSDP's CPU offload keeps the
    gradient shards there, and clipping them all-reduces their norm (NCCL only takes GPU tensors)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if strategy == "auto":
        strategy = "ddp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise UserError(f"--strategy none cannot run {world_size} processes; use ddp, fsdp or deepspeed")
    dev = pick_device(device)
    use_cuda = dev.type == "cuda"
    if strategy == "none":
        if use_cuda and dev.index is not None:
            torch.cuda.set_device(dev)  # calls that take the current GPU (RNG state, peak memory) mean this one
        return World(strategy, device=dev)
    gpu = None  # under torchrun, each process takes the GPU of its local rank
    if "RANK" not in os.environ:  # --strategy ddp/fsdp without torchrun: a group of one, on --device's GPU
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        gpu = dev.index or 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        gpu = local_rank if gpu is None else gpu
        torch.cuda.set_device(gpu)
    dev = torch.device(f"cuda:{gpu}" if use_cuda else "cpu")
    backend = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=dev if use_cuda else None)
    return World(strategy, rank, local_rank, dist.get_world_size(), dev)


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


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank, on dist_device(); each rank passes one of the same shape and dtype.
    Every rank must call this, in order."""
    out = t.to(dist_device())
    dist.broadcast(out, src=0)
    return out


def dist_device():
    """Where this group's collectives take their tensors: the current GPU under NCCL, else CPU memory."""
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")


def load_device(world: World, quantized: bool, zero_stage=None):
    """Where the checkpoint is read. Under FSDP and ZeRO-3 (--zero-stage 3) nowhere yet: every rank keeps
    the model on the meta device and reads only its own shards once it is sharded (wrap_fsdp,
    zero.load_partitioned). A quantized base is read into CPU memory (quantize moves each Linear to the GPU
    only once quantized, so a base that fits the GPU only in 4 bits never sits there whole); anything else
    straight onto its device (8 DDP ranks then hold no copy in RAM)."""
    if world.strategy == "fsdp" or (world.strategy == "deepspeed" and zero_stage == 3):
        return "meta"
    return "cpu" if quantized else world.device


def grad_sync(model, world: World, enabled: bool):
    """Whether this micro-batch's backward all-reduces the gradients: only the last micro-batch of an
    accumulated step needs to (DDP's no_sync, FSDP's set_requires_gradient_sync). DeepSpeed decides
    this inside its own backward, and a single process has nothing to sync."""
    if world.strategy == "ddp":
        model.require_backward_grad_sync = enabled
    elif world.strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)


def wrap_ddp(model, world: World):
    """DDP replicates the model and averages gradients in buckets during backward. Every trainable
    parameter is used in every step, so the unused-parameter search stays off. DDP broadcasts
    rank 0's weights at construction, so every replica starts from the same LoRA init."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                   find_unused_parameters=False)


def check_one_trained_dtype(model):
    """FSDP2 reduces each unit's gradients in one flat buffer, so the parameters a unit trains must
    share a dtype (else fully_shard stops on an AssertionError). Units: each block, then the rest."""
    units = [(f"{model.blocks_path}.{i}", block.named_parameters()) for i, block in enumerate(model.blocks)]
    units.append(("the model outside its blocks", ((n, p) for n, p in model.named_parameters()
                                                   if not n.startswith(model.blocks_path + "."))))
    for where, params in units:
        trained = {}  # dtype -> the first parameter trained in it
        for name, p in params:
            if p.requires_grad:
                trained.setdefault(str(p.dtype).removeprefix("torch."), name)
        if len(trained) > 1:
            (a, a_name), (b, b_name) = list(trained.items())[:2]
            raise UserError(f"FSDP needs one dtype for the trained parameters of each block, but {where} trains "
                            f"{a_name} in {a} and {b_name} in {b}; make them agree (--lora-dtype sets LoRA's, "
                            "--precision bf16-true makes the rest bfloat16) or train fewer kinds (--lora-bias none)")


def wrap_fsdp(model, world: World, sharding="full", prefetch=False, offload=False, autocast_dtype=None):
    """Shard with FSDP2 (fully_shard): each transformer block (model.blocks) is one unit, then the root.
    autocast_dtype: the dtype FSDP gathers the weights in for compute (bf16-mixed, 16-mixed), or None.

    sharding: 'full' (FULL_SHARD: free gathered weights after forward), 'grad-op' (SHARD_GRAD_OP:
    keep them until backward), 'hybrid' (HYBRID_SHARD: shard within a node, replicate across
    nodes, over a 2-D device mesh).

    Loading: every rank built the model on the meta device (its LoRA weights aside, made whole on
    every rank), and fully_shard shards it there, where a shard costs no memory. Each rank then reads
    its own rows of every weight still on the meta device straight from the checkpoint's files
    (load_shards), so no rank ever holds more of the model than its shards and one tensor's rows.

    A 4-bit base (QLoRA) is sharded too, not replicated (fully_shard's ignored_params): the codes
    are most of what a large base weighs (a 70B model's are 35 GB). A Linear4bit's weight holds the
    packed NF4 codes, uint8 (out * in / 2, 1), two per byte; its quant_state holds one absmax per
    block of 64 weights ((out * in / 64,) fp32, or uint8 plus nested scales with --double-quant) and
    the 16 NF4 levels. FSDP2 splits the codes on dim 0 like any parameter and all-gathers them as
    bytes, never cast by param_dtype (they are not floats). The gathered weight is a plain Parameter
    without quant_state; Linear4bit.forward re-attaches the layer's own (bitsandbytes' provision
    for FSDP), which every rank keeps whole: 1/8 of the codes' bytes (1/31 with --double-quant).
    quantize() built that state and the codes on every rank, from the same weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kind = world.device.type
    if sharding == "hybrid":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        mesh = init_device_mesh(kind, (world.size // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(kind, (world.size,))
    policy = dict(mesh=mesh, reshard_after_forward=sharding != "grad-op",
                  mp_policy=MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    blocks = list(model.blocks)
    check_one_trained_dtype(model)
    for block in blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    if prefetch:  # gather the next block's weights while this one computes
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
            block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    load_shards(model, "cpu" if offload else world.device)
    return model


@torch.no_grad()
def load_shards(model, device):
    """Read this rank's rows of each sharded parameter still on the meta device from the checkpoint
    (model.weights), one parameter at a time, in the dtype cast_frozen chose for it. FSDP2 re-pads the
    new shards when load_state_dict assigns them (its post-load hook), as after its own loading."""
    from torch.distributed.tensor import DTensor
    loaded = {}  # meta parameter -> its shard as read; a tied one is read once and set under each name
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if not p.is_meta:  # LoRA's weights, 4-bit codes: sharded by fully_shard from what the rank made
            continue
        owner, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner)
        if p in loaded:
            setattr(owner, attr, loaded[p])
            continue
        first, _ = shard_rows(p)
        rows = model.weights.read(name, p.dtype, device, rows=(first, first + p.to_local().shape[0]))
        shard = DTensor.from_local(rows, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        owner.load_state_dict({attr: shard}, strict=False, assign=True)
        loaded[p] = getattr(owner, attr)


def full_state_dict(model, world: World, trainable_only=False) -> dict:
    """The model's state (only its trainable part, e.g. the adapter, if asked) on rank 0's CPU,
    gathered from the shards under FSDP (every rank must call this); {} on other ranks. DeepSpeed's
    engine has its own: zero.ds_full_state_dict."""
    module = model.module if world.strategy == "ddp" else model
    names = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    if world.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if names is None or k in names}


def is_dtensor(t) -> bool:
    """Is `t` an FSDP shard? DTensors exist only in a process group, and importing their module takes
    most of a second, which every single-process run would otherwise pay at start-up."""
    if not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def scalar(t) -> float:
    """A 0-dim tensor as a float; an FSDP DTensor (clip_grad_norm_'s total norm) made whole first."""
    return float(t.full_tensor() if is_dtensor(t) else t)


def local(t):
    """This rank's own piece of a tensor: the local shard of an FSDP DTensor, else the tensor."""
    return t.to_local() if is_dtensor(t) else t


def shard_rows(t):
    """(first row, whether this rank writes it to a checkpoint) of an FSDP DTensor's local shard. FSDP2
    cuts dim 0 as torch.chunk does, ceil(rows / shards) rows each (the last ones shorter or empty);
    under hybrid sharding every replica group holds the same rows, and only the first writes them."""
    coordinate, first_row, writes = t.device_mesh.get_coordinate(), 0, True
    for dim, placement in enumerate(t.placements):
        if placement.is_shard(0):
            first_row = coordinate[dim] * math.ceil(t.shape[0] / t.device_mesh.size(dim))
        else:  # Replicate
            writes = writes and coordinate[dim] == 0
    return first_row, writes


def even_share(flat, rank, size):
    """(start, piece): rank's ceil(n / size) elements of a 1-D tensor every rank holds (the last share
    shorter or empty), the same cut as ZeRO-3's partitions."""
    n = flat.numel()
    start = min(rank * math.ceil(n / size), n)
    return start, flat[start:start + math.ceil(n / size)]


def like(param, shard):
    """A tensor laid out like `param` from this rank's piece of it (the inverse of `local`)."""
    shard = shard.to(param.device)
    if not is_dtensor(param):
        return shard
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(shard, param.device_mesh, param.placements)
