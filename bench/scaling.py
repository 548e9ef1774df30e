"""Tokens/s of 1 and 2 processes under DDP and FSDP, against one plain process (issue: scaling).

    python bench/scaling.py --mode lora-bf16            # Pythia-70m shape, 4 x 256 rows per process
    python bench/scaling.py --mode lora-fp32 --steps 8

Each row is one bench.py run (its arguments pass through): a plain single process with 1 and with
2 threads (what one process makes of every core), then `torchrun --nproc_per_node N bench.py
--strategy ddp|fsdp` with 1 and 2 processes of 1 thread each (torchrun's default: a core per
process). Every process trains --batch rows per step, so 2 processes train twice the rows (weak
scaling, as data parallelism does). The runs follow one another, so the ratios also carry
whatever the machine's load did in between: run it on a quiet machine.
"""
import json
import os
import subprocess
import sys

import torch

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
ROWS = [("none", 1, 1), ("none", 1, 2), ("ddp", 1, 1), ("ddp", 2, 1), ("fsdp", 1, 1), ("fsdp", 2, 1)]


def run(strategy, nproc, threads, argv, port=29860):
    own = ["--threads", str(threads), "--no-memory", "--block", "1"]
    if strategy == "none":
        cmd = [sys.executable, BENCH, *argv, *own]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), BENCH, *argv, *own, "--strategy", strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("json ")]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    (result,) = json.loads(lines[-1][5:])["results"].values()
    return result


def main(argv):
    if {"-h", "--help"} & set(argv):
        sys.exit(__doc__)
    head = f"{'strategy':<9} {'processes':>9} {'threads':>7} {'tokens/s':>9} {'x 1 process':>11}"
    print(f"bench.py {' '.join(argv)}\n{head}\n{'-' * len(head)}", flush=True)
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count() if device.startswith("cuda") else None
    base = None
    for strategy, nproc, threads in ROWS:
        if gpus is not None and nproc > gpus:  # one GPU per process
            print(f"{strategy:<9} {nproc:>9} {threads:>7}   skipped: needs {nproc} GPUs, this machine has {gpus}")
            continue
        tps = run(strategy, nproc, threads, argv)["tokens_per_s"]
        base = base or tps
        print(f"{strategy:<9} {nproc:>9} {threads:>7} {tps:>9.0f} {tps / base:>11.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
