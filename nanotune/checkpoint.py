"""Files that are either complete or absent.

Every folder nanotune writes (adapter, model, checkpoint) is built under a temporary name next to
its destination, its files fsynced, then renamed into place: a crash mid-save leaves at worst a
stray temporary folder, never a destination that looks finished and is not.
"""
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanotune import UserError
from nanotune.distributed import barrier, full_state_dict, like, local


def fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder):
    """Make `folder` if needed and write a file in it, so an unwritable --out fails before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror}); choose an --out you can write to") from None


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder; when the block succeeds it replaces `path` in one rename."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(path):  # rename the old one away first: a directory cannot be renamed over
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- Training checkpoints: OUT/checkpoints/step-N/ ------------------------------------------------
#   trainer.json           rank 0: step, flags, data position, loss-scaler state, world size
#   state-rank{r}.safetensors  trainable weights and AdamW moments. Under FSDP every rank writes
#                          its own shard; under DeepSpeed rank 0 the whole trainable weights and each
#                          rank its ZeRO optimizer partition; otherwise all ranks hold the same values
#                          and rank 0 writes them.
#   rng-rank{r}.safetensors / rng-rank{r}.json  each rank's torch (CPU, CUDA), python, numpy RNG
# A `latest` file names the newest complete step-N; it is replaced (atomically) after the folder
# is renamed into place, so it never points at a half-written checkpoint.

def save(out, step, model, world, named_trainable, optimizer, scaler, flags: dict, keep):
    """Write checkpoint step-`step` of a run (every rank must call: ZeRO-3 gathers, all ranks write)."""
    if world.strategy == "deepspeed":
        from nanotune.zero import ds_optimizer_state
        weights = full_state_dict(model, world, trainable_only=True)
        tensors = {**{f"param.{k}": v for k, v in weights.items()}, **ds_optimizer_state(model, optimizer)}
    elif world.strategy == "fsdp" or world.is_main:
        tensors = local_state(named_trainable, optimizer)
    else:
        tensors = None
    trainer = {"step": step, "args": {**flags, "world_size": world.size}, "scaler": scaler.state_dict()}
    return save_checkpoint(out, step, tensors, trainer, world.rank, keep)


def restore_weights(path, named_trainable):
    """Only the trainable weights, as rank 0 wrote them: DeepSpeed builds its fp32 partitions from the
    weights it is given, so they are restored before the engine exists."""
    with damaged(path):
        restore_local_state(read_state(path, 0), named_trainable)


def restore(path, model, world, named_trainable, optimizer, scaler) -> int:
    """Weights, AdamW moments, every RNG and the loss scale from checkpoint `path`; returns its step
    (which is also the data position). The inverse of save."""
    with damaged(path):
        if world.strategy == "deepspeed":
            from nanotune.zero import ds_load_optimizer_state
            ds_load_optimizer_state(model, optimizer, read_state(path, world.rank))
        else:  # under FSDP each rank reads its own shard; otherwise rank 0 wrote the one copy
            restore_local_state(read_state(path, world.rank if world.strategy == "fsdp" else 0), named_trainable,
                                optimizer)
        restore_rng(path, world.rank)
        trainer = read_trainer(path)
    scaler.load_state_dict(trainer["scaler"] or {})
    return trainer["step"]


def rng_state():
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def set_rng_state(tensors, plain):
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def local_state(named_trainable, optimizer) -> dict:
    """Trainable weights and AdamW moments as this rank holds them (its shards, under FSDP)."""
    tensors = {}
    for name, p in named_trainable:
        tensors[f"param.{name}"] = local(p.detach()).cpu().contiguous()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{name}.{key}"] = local(value).cpu().contiguous()
    return tensors


def restore_local_state(tensors, named_trainable, optimizer=None):
    """The inverse of local_state; without an optimizer, only the weights."""
    with torch.no_grad():
        for name, p in named_trainable:
            local(p).copy_(tensors[f"param.{name}"])
            state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")}
            if optimizer is not None and state:
                optimizer.state[p] = {k: v if k == "step" else like(p, v) for k, v in state.items()}


def save_checkpoint(out, step, tensors, trainer, rank, keep):
    """Every rank calls this, with the tensors it owns (None: nothing). Files go to a temporary
    folder that rank 0 renames into place once all ranks have fsynced theirs (checkpoints in
    multi-node runs need a shared filesystem)."""
    root = os.path.join(out, "checkpoints")
    final, tmp = os.path.join(root, f"step-{step}"), os.path.join(root, f".step-{step}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
        os.makedirs(tmp)
    barrier()
    rng_tensors, rng_plain = rng_state()
    for name, content in ((f"state-rank{rank}.safetensors", tensors), (f"rng-rank{rank}.safetensors", rng_tensors)):
        if content:
            save_file(content, os.path.join(tmp, name))
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
    write_json(os.path.join(tmp, f"rng-rank{rank}.json"), rng_plain)  # write_json fsyncs
    if rank == 0:
        write_json(os.path.join(tmp, "trainer.json"), trainer)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
        write_json(os.path.join(root, "latest.tmp"), {"checkpoint": f"step-{step}"})
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        fsync_dir(root)
        for old in sorted(complete_checkpoints(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, f"step-{old}"))
    barrier()
    return final


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(root):
    """Steps of the checkpoints that were renamed into place (complete by construction)."""
    if not os.path.isdir(root):
        return []
    return [int(n[5:]) for n in os.listdir(root)
            if n.startswith("step-") and n[5:].isdigit() and os.path.exists(os.path.join(root, n, "trainer.json"))]


def find_checkpoint(out, resume):
    """--resume alone: the newest complete checkpoint in OUT (None if there is none); --resume DIR: DIR."""
    if resume != "latest":
        if not os.path.exists(os.path.join(resume, "trainer.json")):
            raise UserError(f"--resume {resume} is not a complete nanotune checkpoint (no trainer.json)")
        return resume
    root = os.path.join(out, "checkpoints")
    try:
        with open(os.path.join(root, "latest")) as f:
            path = os.path.join(root, json.load(f)["checkpoint"])
        if os.path.exists(os.path.join(path, "trainer.json")):
            return path
    except (OSError, ValueError, KeyError):
        pass
    steps = complete_checkpoints(root)  # the pointer is missing or stale: fall back to a scan
    return os.path.join(root, f"step-{max(steps)}") if steps else None


@contextmanager
def damaged(path):
    """Turn what a damaged checkpoint raises while it is read (a missing, truncated or foreign file)
    into one sentence that says where and what to do."""
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"checkpoint {path} is damaged or incomplete ({type(e).__name__}: {e}); resume from an "
                        f"earlier one (--resume {os.path.dirname(path)}/step-N) or start again with --overwrite"
                        ) from None


def read_trainer(path):
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def read_state(path, rank):
    """The tensors rank `rank` wrote into the checkpoint ({} if it wrote none)."""
    file = os.path.join(path, f"state-rank{rank}.safetensors")
    return load_file(file) if os.path.exists(file) else {}


def restore_rng(path, rank):
    with open(os.path.join(path, f"rng-rank{rank}.json")) as f:
        set_rng_state(load_file(os.path.join(path, f"rng-rank{rank}.safetensors")), json.load(f))
