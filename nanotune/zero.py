"""DeepSpeed ZeRO (--strategy deepspeed): the engine, its config from nanotune's flags, and its state.

ZeRO partitions optimizer state (stage 1), gradients (2) and parameters (3) over ranks. nanotune
keeps its own AdamW, LR schedule, autocast and loss normalisation; DeepSpeed only partitions.
deepspeed is an optional extra, imported only on this path.
"""
import json
import os
import warnings

import torch
import torch.distributed as dist

from nanotune import UserError
from nanotune.distributed import even_share

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


def wrap_deepspeed(model, optimizer, world, config):
    """The DeepSpeed engine around `model`, on the process group compute_init made. The engine's
    forward is the model's; engine.backward / engine.step replace loss.backward / optimizer.step."""
    os.environ.setdefault("DS_ACCELERATOR", world.device.type)  # else a CPU run on a GPU box picks CUDA
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
    if any(p.is_meta for p in model.parameters()):
        load_partitioned(model, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


@torch.no_grad()
def load_partitioned(model, config):
    """ZeRO-3 loading: the weights still on the meta device are read from the checkpoint module by module,
    whole, in the dtype cast_frozen gave them, and each module is partitioned as soon as it is read
    (deepspeed.zero.Init(module=...), what the engine would do to the whole model; it keeps rank 0's
    copy, the same as every rank's). A rank keeps its partitions only, and holds at most one module's
    weights whole beside them. LoRA's weights, whole on every rank, the engine partitions itself."""
    import deepspeed
    for prefix, module in model.named_modules():
        meta = [(name, p) for name, p in module.named_parameters(prefix, recurse=False) if p.is_meta]
        for name, p in meta:  # a tied tensor was read, and partitioned, under its first name
            t = model.weights.read(name, p.dtype, "cpu")
            torch.utils.swap_tensors(p, torch.nn.Parameter(t, requires_grad=p.requires_grad))
        if meta:
            deepspeed.zero.Init(module=module, config_dict_or_path=config)


def ds_full_state_dict(engine, world, trainable_only=False) -> dict:
    """The model's state (only its trainable part, if asked) complete on rank 0's CPU, {} elsewhere, as
    distributed.full_state_dict for the other strategies. A ZeRO-3 parameter holds an empty placeholder
    until gathered: saving it as is writes size-0 tensors."""
    import deepspeed
    names = {n for n, p in engine.module.named_parameters() if p.requires_grad} if trainable_only else None
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


def ds_pieces(named_trainable, optimizer, world):
    """(key, global shape, start, 1-D piece) for what this rank writes of each trainable weight and
    moment, as checkpoint.my_pieces does for the other strategies. nanotune never turns on DeepSpeed's
    fp16/bf16 optimizers, so ZeRO's fp32 masters hold the parameters' own values. ZeRO-3 holds a
    partition of each flattened parameter and of its moments, which is written as it is. ZeRO-1/2 keep
    the parameters whole on every rank but the moments in one flat partition across all of them: each
    moment is gathered, one parameter at a time (every rank must call), and each rank writes its even
    share. Every rank thus writes 1/N of the state, and holds at most one gathered moment beside it."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_fp32_param, safe_get_local_optimizer_state
    keys = [k for k in next(iter(optimizer.state.values())) if k != "step"]  # exp_avg, exp_avg_sq
    for name, p in named_trainable:
        if hasattr(p, "ds_id"):  # ZeRO-3
            start, n = z3_partition(p, world.rank)
            yield f"param.{name}", p.ds_shape, start, safe_get_local_fp32_param(p)[:n]
            for k in keys:
                yield f"adam.{name}.{k}", p.ds_shape, start, safe_get_local_optimizer_state(p, k)[:n]
        else:
            yield f"param.{name}", p.shape, *even_share(p.detach().reshape(-1), world.rank, world.size)
            for k in keys:
                moment = safe_get_full_optimizer_state(p, k).reshape(-1)
                yield f"adam.{name}.{k}", p.shape, *even_share(moment, world.rank, world.size)


def z3_partition(p, rank):
    """(start, length) of rank's part of a ZeRO-3 parameter's flattened elements: ceil(numel / ranks)
    each (p.ds_tensor), the last zero-padded; length leaves the padding out."""
    size = p.ds_tensor.numel()
    start = min(rank * size, p.ds_numel)
    return start, min(size, p.ds_numel - start)


def ds_restore_moments(engine, optimizer, named_trainable, pieces, adam_step, rank):
    """AdamW's moments from a checkpoint (see checkpoint.Pieces), whatever wrote it, into ZeRO-1/2/3's
    flat fp32 partitions; the weights went in before the engine existed (checkpoint.restore_weights).
    ZeRO-3 ranks read their own partitions; ZeRO-1/2 ranks read each moment whole (every rank holds
    the parameters whole anyway) and keep their fragment."""
    from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state,
                                 safe_set_local_optimizer_state)
    zero = engine.optimizer
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    flats = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
    keys = pieces.moments(named_trainable[0][0])
    for flat in flats:  # our AdamW's state for the flat partitions it updates, filled in below
        optimizer.state[flat] = {"step": torch.tensor(adam_step, dtype=torch.float32),
                                 **{k: torch.zeros_like(flat) for k in keys}}
    if not stage3:  # point each parameter's fragment at that state (DeepSpeed does so after its first step)
        for group, flat in zip(zero.bit16_groups, flats):
            lazy_init_hp_params_optimizer_state(group, flat, optimizer.state)
    for name, p in named_trainable:
        for k in keys:
            key = f"adam.{name}.{k}"
            if stage3:
                if pieces.shapes[key] != list(p.ds_shape):
                    raise ValueError(f"{key}: shape {pieces.shapes[key]} in the checkpoint, {list(p.ds_shape)} here")
                start, n = z3_partition(p, rank)
                mine = pieces.read(key, start, start + n)
                safe_set_local_optimizer_state(p, torch.cat([mine, mine.new_zeros(p.ds_tensor.numel() - n)]), k)
            else:
                safe_set_full_optimizer_state(p, pieces.mine(key, p), k)
