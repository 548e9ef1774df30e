"""Peak memory while train.py loads a bf16 checkpoint, per strategy, as a multiple of the checkpoint's bytes N.

    python bench/loading.py                          # a 0.8 GB Llama-shape checkpoint (400M parameters)
    python bench/loading.py --hidden 512 --layers 4  # smaller, on a busy machine
    python bench/loading.py --runs bf16-true fsdp    # only some of the runs

It writes a random bf16 checkpoint of Llama's layout (grouped-query attention, SwiGLU MLP, untied head)
to a temporary folder, then starts train.py on it once per run, each process (each rank under torchrun)
stopped as soon as train.py has wrapped its model: loading, quantizing, LoRA, casting and the strategy's
wrapper done, nothing trained. Every process resets the kernel's high-water mark of its resident memory
(/proc/self/clear_refs) once torch, nanotune and train.py are imported, and reports its peak (VmHWM) above
that baseline: what loading cost it, file pages it mapped included. The table gives that peak / N.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (processes, train.py flags); every run trains LoRA on the same checkpoint.
RUNS = {
    "32": (1, ["--precision", "32"]),
    "bf16-mixed": (1, ["--precision", "bf16"]),
    "bf16-true": (1, ["--precision", "bf16-true"]),
    "nf4": (1, ["--precision", "bf16", "--load-in-4bit"]),
    "fsdp": (2, ["--precision", "bf16-true", "--strategy", "fsdp"]),
    "zero3": (2, ["--precision", "bf16-true", "--strategy", "deepspeed", "--zero-stage", "3"]),
}


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def worker(argv):
    """One process of a run: train.py's main(), ended once wrap() returns, its peak memory printed."""
    train = runpy.run_path(os.path.join(ROOT, "train.py"), run_name="train")  # its functions, main() not run
    wrap = train["wrap"]

    def wrap_then_report(*args, **kwargs):
        wrap(*args, **kwargs)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # every rank done loading before any exits
        print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "baseline_mb": baseline,
                          "peak_mb": rss_mb("VmHWM") - baseline}), flush=True)
        os._exit(0)
    train["train"].__globals__["wrap"] = wrap_then_report
    args = train["parse_args"](argv)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the baseline
    baseline = rss_mb("VmRSS")
    train["main"](args)


def write_checkpoint(args, path):
    """A random bf16 Llama-shape checkpoint (std 0.02, norms 1), its tokenizer and a few rows of data."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from safetensors.torch import save_file
    from nanotune.models.llama import Llama, Config
    config = Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.ones(s, dtype=torch.bfloat16) if "norm" in k else
               (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": "bfloat16"}, f)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rows = [{"instruction": "Say it.", "input": "", "output": f"word {i}"} for i in range(8)]
    tok.train_from_iterator([json.dumps(r) for r in rows], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "data.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def run(name, path, out):
    """The runs' reports, one per process."""
    n, flags = RUNS[name]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29591"] \
        if n > 1 else [sys.executable]
    cmd = [*launch, os.path.abspath(__file__), "--worker", "--model", path, "--data", os.path.join(path, "data.jsonl"),
           "--out", out, "--overwrite", "--device", "cpu", "--max-steps", "1", "--val-fraction", "0",
           "--eval-exact-match", "0", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    if proc.returncode or len(reports) != n:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return sorted(reports, key=lambda r: r["rank"])


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536, help="hidden size")
    p.add_argument("--intermediate", type=int, default=4096, help="MLP width")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks")
    p.add_argument("--heads", type=int, default=12, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        n_bytes = write_checkpoint(args, path)
        print(f"checkpoint: {n_bytes / 1e6:.0f} MB bf16 (N); peak RSS while loading, above each process's baseline\n")
        print("| run | processes | rank | baseline MB | peak above baseline, MB | / N |\n|---|---|---|---|---|---|")
        for name in args.runs:
            for r in run(name, path, os.path.join(tmp, "out")):
                print(f"| {name} | {RUNS[name][0]} | {r['rank']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
                      f"{r['peak_mb'] * 2**20 / n_bytes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
