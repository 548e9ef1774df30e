"""Files that are either complete or absent.

Every folder nanotune writes (adapter, model, checkpoint) is built under a temporary name next to
its destination, its files fsynced, then renamed into place: a crash mid-save leaves at worst a
stray temporary folder, never a destination that looks finished and is not.
"""
import json
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanotune import UserError
from nanotune.distributed import barrier, even_share, is_dtensor, like, local, print0, shard_rows


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
#   trainer.json           rank 0: step, flags (with the number of processes), loss-scaler state,
#                          AdamW's step count, how many times the run had restarted from a checkpoint
#   state-rank{r}.safetensors  the pieces of the trainable weights (param.NAME) and AdamW moments
#                          (adam.NAME.exp_avg, adam.NAME.exp_avg_sq) that rank r wrote, each flattened
#                          to 1-D: elements [start, end) of the tensor read in row-major order
#   state-rank{r}.json     rank r's layout: {"param.NAME": {"shape": [out, in], "start": s, "end": e}}
#   rng-rank{r}.safetensors / rng-rank{r}.json  each rank's torch (CPU, CUDA), python, numpy RNG
# Each rank writes what it holds: under FSDP its shard (rows [a, b), so elements [a * in, b * in)),
# under ZeRO-3 its partition of each flattened parameter, and where every rank holds a tensor whole
# (LoRA under DDP, ZeRO-1/2's gathered moments) an even share of it. No rank gathers the model, and
# the format is the same whatever the strategy and number of processes: a resuming rank reads the
# elements it will hold from whichever files have them, and nothing else (safetensors slices a file
# without loading it).
# A `latest` file names the newest complete step-N; it is replaced (atomically) after the folder
# is renamed into place, so it never points at a half-written checkpoint.

def save(out, step, model, world, named_trainable, optimizer, scaler, flags: dict, keep, restarts=0):
    """Write checkpoint step-`step` of a run (every rank must call: ZeRO-1/2 gathers moments, all ranks write);
    `restarts`: how many times the run has continued from a checkpoint so far."""
    if world.strategy == "deepspeed" and model.zero_optimization_stage() > 0:
        from nanotune.zero import ds_pieces
        pieces = ds_pieces(named_trainable, optimizer, world)
    else:
        pieces = my_pieces(named_trainable, optimizer, world)
    tensors, layout = {}, {}
    for key, shape, start, piece in pieces:
        if piece.numel():  # a copy: ZeRO's pieces are views into one flat buffer, which safetensors refuses
            tensors[key] = piece.detach().to("cpu", copy=True)
            layout[key] = {"shape": list(shape), "start": start, "end": start + piece.numel()}
    adam = next(iter(optimizer.state.values()), {})  # AdamW's step count: every tensor steps together
    trainer = {"step": step, "args": {**flags, "world_size": world.size}, "scaler": scaler.state_dict(),
               "adam_step": float(adam.get("step", 0)), "restarts": restarts}
    return save_checkpoint(out, step, tensors, layout, trainer, world.rank, keep)


def my_pieces(named_trainable, optimizer, world):
    """(key, global shape, start, 1-D piece) for what this rank writes of each trainable weight and
    moment: its rows of an FSDP shard (under hybrid sharding the first replica's), or an even share
    of a tensor every rank holds whole."""
    for name, p in named_trainable:
        moments = [(f"adam.{name}.{k}", v) for k, v in optimizer.state.get(p, {}).items() if k != "step"]
        for key, t in [(f"param.{name}", p.detach()), *moments]:
            if is_dtensor(t):
                first_row, writes = shard_rows(t)
                piece = local(t).reshape(-1)
                yield key, t.shape, first_row * math.prod(t.shape[1:]), piece if writes else piece[:0]
            else:
                yield key, t.shape, *even_share(t.reshape(-1), world.rank, world.size)


def restore_weights(path, named_trainable):
    """Only the trainable weights, whole on every rank: DeepSpeed builds its fp32 partitions from the
    weights it is given, so they are restored before the engine exists. One still on the meta device
    (ZeRO-3 reads the base as it partitions it) becomes the restored tensor, and is not read from the base."""
    with damaged(path), Pieces(path) as pieces:
        with torch.no_grad():
            for name, p in named_trainable:
                t = pieces.mine(f"param.{name}", p)
                if p.is_meta:
                    torch.utils.swap_tensors(p, torch.nn.Parameter(t.to(p.dtype), requires_grad=True))
                else:
                    p.copy_(t)


def restore(path, model, world, named_trainable, optimizer, scaler) -> int:
    """Weights, AdamW moments, RNG and the loss scale from checkpoint `path`, written by any number of
    processes under any strategy; returns its step (which is also the data position). The inverse of
    save. Each rank's RNG carries over when the number of processes is the same; otherwise there is no
    stream to continue, and every rank re-seeds from (seed, step, rank)."""
    with damaged(path), Pieces(path) as pieces:
        trainer = read_trainer(path)
        if world.strategy == "deepspeed" and model.zero_optimization_stage() > 0:
            from nanotune.zero import ds_restore_moments  # the weights are in since restore_weights
            ds_restore_moments(model, optimizer, named_trainable, pieces, trainer["adam_step"], world.rank)
        else:
            restore_state(pieces, named_trainable, optimizer, trainer["adam_step"])
        saved = trainer["args"]
        if saved["world_size"] == world.size:
            restore_rng(path, world.rank)
        else:
            reseed(saved["seed"], trainer["step"], world.rank)
            print0(f"the checkpoint was written by {saved['world_size']} process(es), this run has {world.size}: "
                   "each rank's RNG is re-seeded from (seed, step, rank)")
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


def reseed(seed, step, rank):
    """Fresh torch (CPU and CUDA), python and numpy streams for `rank`, a pure function of (seed, step,
    rank): two resumes of one checkpoint draw the same dropout masks."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def restore_state(pieces, named_trainable, optimizer, adam_step):
    """Weights and AdamW moments (none, DDP, FSDP, ZeRO stage 0): each rank reads what it holds."""
    with torch.no_grad():
        for name, p in named_trainable:
            local(p).copy_(pieces.mine(f"param.{name}", p))
            moments = pieces.moments(name)
            if moments:  # AdamW keeps its step count as a CPU float tensor
                optimizer.state[p] = {"step": torch.tensor(adam_step, dtype=torch.float32),
                                      **{k: like(p, pieces.mine(f"adam.{name}.{k}", p)) for k in moments}}


class Pieces:
    """The tensors of a checkpoint, however many processes wrote them: read(key, a, b) assembles
    elements [a, b) of a flattened tensor from the pieces that hold them, reading only those bytes."""

    def __init__(self, path):
        self.where = {}  # key -> [(start, end, open file)], by start
        self.shapes = {}
        for rank in range(read_trainer(path)["args"]["world_size"]):
            with open(os.path.join(path, f"state-rank{rank}.json")) as f:
                layout = json.load(f)
            file = safe_open(os.path.join(path, f"state-rank{rank}.safetensors"), "pt") if layout else None
            for key, entry in layout.items():
                self.shapes[key] = entry["shape"]
                self.where.setdefault(key, []).append((entry["start"], entry["end"], file))
        for spans in self.where.values():
            spans.sort(key=lambda span: span[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.where = None  # drop the open files (safetensors unmaps them when they are collected)

    def moments(self, name):
        """The optimizer-state names saved for parameter `name` (exp_avg, exp_avg_sq)."""
        prefix = f"adam.{name}."
        return [key[len(prefix):] for key in self.where if key.startswith(prefix)]

    def read(self, key, start, end):
        spans = self.where[key]
        parts, at = [spans[0][2].get_slice(key)[0:0]], start  # the dtype, when nothing is asked for
        for lo, hi, file in spans:
            if lo <= at < hi and at < end:
                parts.append(file.get_slice(key)[at - lo:min(hi, end) - lo])
                at = min(hi, end)
        if at < end:
            raise ValueError(f"no rank wrote elements {at} to {end} of {key}")
        return torch.cat(parts)

    def mine(self, key, p):
        """The part of tensor `key` that parameter `p` holds on this rank, in its local shape: under
        FSDP its shard's rows, else the whole tensor."""
        if list(p.shape) != self.shapes[key]:
            raise ValueError(f"{key} has shape {self.shapes[key]} in the checkpoint but {list(p.shape)} here")
        first_row = shard_rows(p)[0] if is_dtensor(p) else 0
        shape, row = local(p).shape, math.prod(p.shape[1:])
        return self.read(key, first_row * row, (first_row + shape[0]) * row).view(shape)


def save_checkpoint(out, step, tensors, layout, trainer, rank, keep):
    """Every rank calls this, with the tensors it owns and their layout ({}: nothing). Files go to a
    temporary folder that rank 0 renames into place once all ranks have fsynced theirs (checkpoints in
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
    write_json(os.path.join(tmp, f"state-rank{rank}.json"), layout)  # write_json fsyncs
    write_json(os.path.join(tmp, f"rng-rank{rank}.json"), rng_plain)
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


def restore_rng(path, rank):
    with open(os.path.join(path, f"rng-rank{rank}.json")) as f:
        set_rng_state(load_file(os.path.join(path, f"rng-rank{rank}.safetensors")), json.load(f))
