"""Accuracy and peak memory of each precision / quantization mode (issue: int8 and NF4 bases).

    python bench/modes.py [--steps 150]

The same short LoRA fine-tune of the bundled tiny model (assets/) in each mode, each in its own
train.py process: final held-out loss, exact match, and the process's peak RSS. The weight bytes
of each mode at a real size are bench.py's (its "base weights" line).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"32": [], "bf16": ["--precision", "bf16"], "bf16-true": ["--precision", "bf16-true"],
         "int8": ["--load-in-8bit"], "nf4": ["--load-in-4bit"], "nf4 + bf16": ["--load-in-4bit", "--precision", "bf16"]}


def run_modes(steps):
    print("| mode | eval loss | exact match | peak RSS MB |\n|---|---:|---:|---:|")
    for name, flags in MODES.items():
        out = tempfile.mkdtemp()
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", out, "--overwrite", "--max-steps",
               str(steps), "--eval-every", "0", *flags]
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far, so run each mode in a fresh wrapper.
        wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                   "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        rss_kb = int(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                                    check=True).stdout)
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
        match = [r["exact_match"] for r in rows if "exact_match" in r][-1]
        print(f"| {name} | {loss:.4f} | {match:.1%} | {rss_kb / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each short fine-tune")
    args = p.parse_args()
    run_modes(args.steps)
