"""Tokens/s of 1 and 2 processes under DDP and FSDP, against one plain process (issue: scaling).

    python bench/scaling.py --mode lora-bf16            # Pythia-70m shape, 4 x 256 rows per process
    python bench/scaling.py --mode lora-fp32 --steps 8

The parent writes one random model folder (bench.py's), then starts one torchrun job per row:
plain single process with 1 and with 2 threads (what one process makes of every core), then
DDP and FSDP with 1 and 2 processes of 1 thread each (torchrun's default, one core per process).
Every process trains --batch rows of --seq tokens per step, so 2 processes train twice the global
batch (weak scaling, as in data parallelism). tokens/s = global tokens per step / rank 0's median
step time; the steps end in a collective, so rank 0 waits for the slowest rank. Jobs run one after
the other, so the ratios carry whatever the machine's load did between them: run it on a quiet one.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench import MODES, Runner, batches, build_nanotune, write_model  # noqa: E402
from nanotune.distributed import compute_cleanup, compute_init, wrap_ddp, wrap_fsdp  # noqa: E402
from nanotune.precision import resolve  # noqa: E402

ROWS = [("none", 1, 1), ("none", 1, 2), ("ddp", 1, 1), ("ddp", 2, 1), ("fsdp", 1, 1), ("fsdp", 2, 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", default="lora-bf16", choices=["lora-fp32", "lora-bf16", "full"], help="default: %(default)s")
    a("--hidden", type=int, default=512)
    a("--layers", type=int, default=6)
    a("--heads", type=int, default=8)
    a("--intermediate", type=int)
    a("--vocab", type=int, default=50304)
    a("--seq", type=int, default=256)
    a("--batch", type=int, default=4, help="rows per process per step (default: %(default)s)")
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16)
    a("--steps", type=int, default=6, help="timed steps per job (default: %(default)s)")
    a("--warmup", type=int, default=2)
    a("--seed", type=int, default=0)
    a("--port", type=int, default=29860, help="torchrun's master port")
    # Internal: one job's worker.
    a("--strategy", help=argparse.SUPPRESS)
    a("--threads", type=int, help=argparse.SUPPRESS)
    a("--model-dir", help=argparse.SUPPRESS)
    a("--precision", help=argparse.SUPPRESS)  # bench.build_nanotune reads it
    return p.parse_args(argv)


def worker(args):
    """One rank: bench.py's nanotune runner, wrapped as train.py wraps it; rank 0 prints a JSON line."""
    torch.set_num_threads(args.threads)
    strategy, d = compute_init(args.strategy, "cpu")
    runner = build_nanotune(args, args.model_dir, d.device)
    model = runner.model
    if strategy == "ddp":
        model = wrap_ddp(model, d)
    elif strategy == "fsdp":
        precision = resolve(MODES[args.mode][1], d.device)
        model = wrap_fsdp(model, d, param_dtype=precision.compute_dtype if precision.autocast else None,
                          full_state=model.state_dict())
    runner = Runner(strategy, model, runner.context, runner.compute_dtype, hf=False)
    args.seed += d.rank  # each rank its own rows
    batch_list = batches(args)
    for i in range(args.warmup + args.steps):
        wall, _ = runner.step(*batch_list[i % len(batch_list)])
        if i >= args.warmup:
            runner.times.append(wall)
    if d.is_main:
        step = sorted(runner.times)[len(runner.times) // 2]
        print(json.dumps({"tokens_per_s": d.world_size * args.batch * args.seq / step, "step_s": step}))
    compute_cleanup()


def main(args):
    print(f"{args.mode}: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.batch} x {args.seq} tokens per process per step, {args.steps} timed steps per job")
    head = f"{'strategy':<9} {'processes':>9} {'threads':>7} {'tokens/s':>9} {'step ms':>8} {'x 1 process':>11}"
    print(head + "\n" + "-" * len(head))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_model(args, tmp)
        for strategy, nproc, threads in ROWS:
            own = ["--strategy", strategy, "--threads", str(threads), "--model-dir", tmp]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(args.port), os.path.abspath(__file__), *sys.argv[1:], *own]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"{strategy} x {nproc} failed:\n{proc.stderr[-3000:]}")
            r = {"strategy": strategy, "processes": nproc, "threads": threads, **json.loads(lines[-1])}
            base = results[0]["tokens_per_s"] if results else r["tokens_per_s"]
            print(f"{strategy:<9} {nproc:>9} {threads:>7} {r['tokens_per_s']:>9.0f} {1000 * r['step_s']:>8.0f} "
                  f"{r['tokens_per_s'] / base:>11.2f}")
            results.append(r)
    print("json " + json.dumps({"mode": args.mode, "results": results}))


if __name__ == "__main__":
    args = parse_args()
    worker(args) if args.strategy else main(args)
