"""Everything that touches torch.distributed: process-group setup from torchrun's environment,
DDP and FSDP wrapping, and the collectives the trainer needs. No other module imports
torch.distributed, and a single-process run (--strategy none) never creates a process group.

torchrun sets RANK (global index), LOCAL_RANK (index on this node), WORLD_SIZE (all processes),
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts.
"""
import datetime
import json
import os
import socket
import warnings
from dataclasses import dataclass
from itertools import chain

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


def compute_init(strategy: str, device: str = None, timeout_s: float = 600, cpu_collectives=False) -> tuple:
    """Resolve --strategy ('auto': ddp when torchrun started several processes) and set up the
    process group if one is needed: NCCL with one GPU per local rank, gloo on CPU. The timeout
    bounds how long a collective waits for a rank that died, so the others exit instead of hanging.
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
        return strategy, Dist(device=dev)
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
    backend = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=dev if use_cuda else None)
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


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank, on dist_device(); the other ranks pass a placeholder of its shape
    and dtype (on the meta device, say) and get a new tensor. Every rank must call this, in order."""
    out = t.to(dist_device()) if dist.get_rank() == 0 else torch.empty(t.shape, dtype=t.dtype, device=dist_device())
    dist.broadcast(out, src=0)
    return out


def dist_device():
    """Where this group's collectives take their tensors: the current GPU under NCCL, else CPU memory."""
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")


def wrap_ddp(model, d: Dist):
    """DDP replicates the model and averages gradients in buckets during backward. Every trainable
    parameter is used in every step, so the unused-parameter search stays off. DDP broadcasts
    rank 0's weights at construction, so every replica starts from the same LoRA init."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                   find_unused_parameters=False)


def check_one_trained_dtype(model, blocks):
    """FSDP2 reduces each unit's gradients in one flat buffer, so the parameters a unit trains must
    share a dtype (else fully_shard stops on an AssertionError). Units: each block, then the rest."""
    units = [(f"gpt_neox.layers.{i}", block.named_parameters()) for i, block in enumerate(blocks)]
    units.append(("the model outside its blocks",
                  ((n, p) for n, p in model.named_parameters() if not n.startswith("gpt_neox.layers."))))
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


def wrap_fsdp(model, d: Dist, sharding="full", prefetch=False, offload=False, param_dtype=None, full_state=None):
    """Shard with FSDP2 (fully_shard): each transformer block is one unit, then the root.

    sharding: 'full' (FULL_SHARD: free gathered weights after forward), 'grad-op' (SHARD_GRAD_OP:
    keep them until backward), 'hybrid' (HYBRID_SHARD: shard within a node, replicate across
    nodes, over a 2-D device mesh). Ranks other than 0 built the model on the meta device; rank
    0's `full_state` is broadcast and each rank keeps only its shard (cpu_ram_efficient_loading
    + sync_module_states).

    A 4-bit base (QLoRA) is sharded too, not replicated (fully_shard's ignored_params): the codes
    are most of what a large base weighs (a 70B model's are 35 GB). A Linear4bit's weight holds the
    packed NF4 codes, uint8 (out * in / 2, 1), two per byte; its quant_state holds one absmax per
    block of 64 weights ((out * in / 64,) fp32, or uint8 plus nested scales with --double-quant) and
    the 16 NF4 levels. FSDP2 splits the codes on dim 0 like any parameter and all-gathers them as
    bytes, never cast by param_dtype (they are not floats). The gathered weight is a plain Parameter
    without quant_state; Linear4bit.forward re-attaches the layer's own (bitsandbytes' provision
    for FSDP), which every rank keeps whole: 1/8 of the codes' bytes (1/31 with --double-quant).
    quantize() built that state on every rank, so only parameters are broadcast here."""
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
    check_one_trained_dtype(model, blocks)
    for block in blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    if prefetch:  # gather the next block's weights while this one computes
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
            block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    if d.is_main:  # set_model_state_dict loads parameters and buffers (tied ones under each name) and
        # rejects any other entry, such as those bitsandbytes adds for a 4-bit weight (weight.absmax, ...)
        names = {n for n, _ in chain(model.named_parameters(remove_duplicate=False),
                                     model.named_buffers(remove_duplicate=False))}
        full_state = {k: v for k, v in full_state.items() if k in names}
    set_model_state_dict(model, full_state if d.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_state_dict(model, strategy: str, trainable_only=False) -> dict:
    """The model's state (only its trainable part, e.g. the adapter, if asked) on rank 0's CPU,
    gathered from the shards under FSDP and ZeRO-3 (every rank must call this); {} on other ranks."""
    module = model.module if strategy in ("ddp", "deepspeed") else model
    names = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    if strategy == "deepspeed":
        return ds_full_state_dict(model, names)
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if names is None or k in names}


def local(t):
    """This rank's own piece of a tensor: the local shard of an FSDP DTensor, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(param, shard):
    """A tensor laid out like `param` from this rank's piece of it (the inverse of `local`)."""
    shard = shard.to(param.device)
    return DTensor.from_local(shard, param.device_mesh, param.placements) if isinstance(param, DTensor) else shard


# --- DeepSpeed ZeRO (--strategy deepspeed) ----------------------------------------------------------
# ZeRO partitions optimizer state (stage 1), gradients (2) and parameters (3) over ranks. nanotune
# keeps its own AdamW, LR schedule, autocast and loss normalisation; DeepSpeed only partitions.
FLAG_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
             "gradient_clipping")


def deepspeed_config(micro_batch, grad_accum, world_size, max_grad_norm, stage, offload, file=None,
                     autocast_dtype=None):
    """DeepSpeed's config built from the same flags as every other strategy, with a user's
    --deepspeed-config FILE merged over it. The file may repeat what the flags decide, never change it.
    autocast_dtype: the mixed precision's compute dtype (bf16), None for 32 and bf16-true."""
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "train_batch_size": micro_batch * grad_accum * world_size, "gradient_clipping": max_grad_norm,
              # Precision stays nanotune's (fp32 weights + autocast); DeepSpeed's bf16 is another recipe.
              "bf16": {"enabled": False}, "fp16": {"enabled": False},
              # The engine's forward switches off a CUDA autocast opened outside it unless its own
              # torch_autocast is on. No "lower precision safe" modules: gradients are reduced in fp32.
              "torch_autocast": {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch."),
                                 "lower_precision_safe_modules": []} if autocast_dtype else {"enabled": False},
              "zero_optimization": {"stage": 0},
              "zero_allow_untested_optimizer": True,  # our torch AdamW, not DeepSpeed's compiled ones
              "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2 ** 31 - 1}
    if file:
        try:
            with open(file) as f:
                user = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--deepspeed-config {file} cannot be read as JSON ({e})") from None
        for key in FLAG_KEYS:
            if key in user and user[key] != config[key]:
                raise UserError(f"--deepspeed-config {file}: {key} is {user[key]!r} but the flags give "
                                f"{config[key]!r}; set it with the flag, or drop it from the file")
        for key in ("bf16", "fp16", "torch_autocast", "optimizer", "scheduler"):
            if key in user and (key == "torch_autocast" or (user[key] or {}).get("enabled", True)):
                raise UserError(f"--deepspeed-config {file}: {key!r} is nanotune's to choose (--precision, AdamW, "
                                "--lr with warm-up and cosine); drop it from the file")
        file_stage = user.get("zero_optimization", {}).get("stage")
        if stage is not None and file_stage is not None and file_stage != stage:
            raise UserError(f"--zero-stage {stage} contradicts zero_optimization.stage {file_stage} in {file}")
        config = deep_merge(config, user)
    zero = config["zero_optimization"]
    zero["stage"] = stage if stage is not None else zero["stage"]
    if offload:
        if zero["stage"] == 0:
            raise UserError("--zero-offload keeps ZeRO's optimizer partitions in CPU memory; it needs "
                            "--zero-stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return config


def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def wrap_deepspeed(model, optimizer, d: Dist, config):
    """The DeepSpeed engine around `model`, on the process group compute_init made. The engine's
    forward is the model's; engine.backward / engine.step replace loss.backward / optimizer.step."""
    os.environ.setdefault("DS_ACCELERATOR", d.device.type)  # else a CPU run on a GPU box picks CUDA
    warnings.filterwarnings(  # DeepSpeed still calls the old collective names
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    try:
        import deepspeed
    except ImportError:
        raise UserError("--strategy deepspeed needs DeepSpeed: pip install nanotune[deepspeed]") from None
    # Its first process-group setup would JIT-compile a shared-memory all-reduce (minutes on a small
    # CPU) that only inference uses; mark the op unavailable instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def ds_full_state_dict(engine, names=None) -> dict:
    """The model's state (only `names`, if given) complete on rank 0's CPU, {} elsewhere. A ZeRO-3
    parameter holds an empty placeholder until gathered: saving it as is writes size-0 tensors."""
    import deepspeed
    out = {}
    for key, t in engine.module.state_dict(keep_vars=True).items():
        if names is not None and key not in names:
            continue
        if hasattr(t, "ds_id"):  # partitioned by ZeRO-3; every rank takes part in the gather
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if dist.get_rank() == 0:
                    out[key] = t.detach().cpu().clone()
        elif dist.get_rank() == 0:
            out[key] = t.detach().cpu().clone()
    return out


def ds_master_params(engine, optimizer):
    """The fp32 tensors our AdamW updates on this rank: ZeRO-3's flat partitions, ZeRO-1/2's one flat
    partition per group, or (stage 0) the parameters themselves."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return list(zero.fp32_partitioned_groups_flat)
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return list(zero.single_partition_of_fp32_groups)
    return [p for group in optimizer.param_groups for p in group["params"]]


def ds_optimizer_state(engine, optimizer) -> dict:
    """This rank's ZeRO partition as flat tensors: fp32 masters, AdamW moments and step."""
    tensors = {}
    for i, p in enumerate(ds_master_params(engine, optimizer)):
        tensors[f"master.{i}"] = p.detach().cpu().contiguous()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def ds_load_optimizer_state(engine, optimizer, tensors):
    with torch.no_grad():
        for i, p in enumerate(ds_master_params(engine, optimizer)):
            p.copy_(tensors[f"master.{i}"])
            state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            if state:
                optimizer.state[p] = {k: v.to(p.device) for k, v in state.items()}
