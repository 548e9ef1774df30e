"""Memory and accuracy of each precision / quantization mode (issue: int8 and NF4 bases).

    python bench/modes.py [--steps 150]

1. Weight bytes of a base in fp32, bf16, int8 and NF4, for a Pythia-70m-shaped model (random
   weights; bytes do not depend on values): the whole state dict, and the quantized Linears alone.
2. The same short LoRA fine-tune of the bundled tiny model (assets/) in each mode, each in its
   own train.py process: final held-out loss, exact match, and the process's peak RSS.
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
from nanotune.model import Config, GPTNeoX  # noqa: E402
from nanotune.quantize import quantize, weight_bytes  # noqa: E402

MODES = {"32": [], "bf16": ["--precision", "bf16"], "bf16-true": ["--precision", "bf16-true"],
         "int8": ["--load-in-8bit"], "nf4": ["--load-in-4bit"], "nf4 + bf16": ["--load-in-4bit", "--precision", "bf16"]}


def linear_bytes(model):
    return sum(t.nbytes for k, t in model.state_dict().items() if k.startswith("gpt_neox.layers."))


def weight_table():
    config = Config(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                    intermediate_size=2048)
    rows = []
    for name in ("fp32", "bf16", "int8", "nf4"):
        torch.manual_seed(0)
        model = GPTNeoX(config)
        if name == "bf16":
            model = model.to(torch.bfloat16)
        elif name in ("int8", "nf4"):
            model = quantize(model, 8 if name == "int8" else 4)
        rows.append((name, weight_bytes(model), linear_bytes(model)))
    print("| base | state dict MB | x fp32 | blocks MB | x fp32 |\n|---|---:|---:|---:|---:|")
    for name, whole, blocks in rows:
        print(f"| {name} | {whole / 2**20:.1f} | {whole / rows[0][1]:.3f} | {blocks / 2**20:.1f} | "
              f"{blocks / rows[0][2]:.3f} |")


def run_modes(steps):
    print("\n| mode | eval loss | exact match | peak RSS MB |\n|---|---:|---:|---:|")
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
    weight_table()
    run_modes(args.steps)
