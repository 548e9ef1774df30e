"""Peak memory while train.py loads a bf16 checkpoint, per strategy, as a multiple of the checkpoint's bytes N.

    python bench/loading.py                          # a 0.8 GB Llama-shape checkpoint (400M parameters)
    python bench/loading.py --hidden 512 --layers 4  # smaller, on a busy machine
    python bench/loading.py --runs bf16-true fsdp    # only some of the runs
    python bench/loading.py --device cuda --runs bf16-true --hidden 5120 --layers 40 --heads 40 --kv-heads 40 \
        --intermediate 13824                         # Llama-2-13B's shape on one GPU (bench/gpu_check.py)

It writes a random bf16 checkpoint of Llama's layout (grouped-query attention, SwiGLU MLP, untied head)
to a temporary folder, one tensor at a time, then starts train.py on it once per run, each process (each
rank under torchrun) stopped as soon as train.py has wrapped its model: loading, quantizing, LoRA,
casting and the strategy's wrapper done, nothing trained. Every process resets the kernel's high-water
mark of its resident memory (/proc/self/clear_refs) once torch, nanotune and train.py are imported, and
reports its peak (VmHWM) above that baseline: what loading cost it, file pages it mapped included. The
table gives that peak / N; with --device cuda also torch.cuda.max_memory_allocated / N. The last line
is `json {...}`, every figure, for bench/gpu_check.py.
"""
import argparse
import json
import math
import os
import runpy
import struct
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
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
        print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "baseline_mb": baseline,
                          "peak_mb": rss_mb("VmHWM") - baseline, "cuda_mb": cuda}), flush=True)
        os._exit(0)
    train["train"].__globals__["wrap"] = wrap_then_report
    args = train["parse_args"](argv)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the baseline
    baseline = rss_mb("VmRSS")
    train["main"](args)


def write_checkpoint(args, path):
    """A random bf16 Llama-shape checkpoint (std ~0.02, norms 1), its tokenizer and a few rows of data. The
    file is written as the safetensors format lays it out (8-byte header size, JSON header, the tensors'
    bytes in order), one tensor at a time, so a 26 GB checkpoint needs no 26 GB in memory; each tensor is
    a random block of 1M values repeated (a 13B model's worth of random numbers would take minutes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from nanotune.models.llama import Llama, Config
    config = Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the tensors start 8-byte aligned
    block = (torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for key, shape in shapes.items():
            n = math.prod(shape)
            t = torch.ones(n, dtype=torch.bfloat16) if "norm" in key else block.repeat(n // block.numel() + 1)[:n]
            f.write(t.view(torch.uint8).numpy().tobytes())
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


def run(name, path, out, device, processes):
    """The run's reports, one per process."""
    n, flags = RUNS[name]
    n = processes if n > 1 else 1
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] \
        if n > 1 or name in ("fsdp", "zero3") else [sys.executable]
    cmd = [*launch, os.path.abspath(__file__), "--worker", "--model", path, "--data", os.path.join(path, "data.jsonl"),
           "--out", out, "--overwrite", "--device", device, "--max-steps", "1", "--val-fraction", "0",
           "--eval-exact-match", "0", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where train.py loads the model")
    p.add_argument("--processes", type=int, default=2, help="processes of the fsdp and zero3 runs (one GPU each "
                   "on CUDA)")
    args = p.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        n_bytes = write_checkpoint(args, path)
        print(f"checkpoint: {n_bytes / 1e6:.0f} MB bf16 (N); peak RSS while loading, above each process's baseline"
              + ("; peak CUDA memory allocated" if args.device == "cuda" else "") + "\n")
        print("| run | processes | rank | baseline MB | peak above baseline, MB | / N |"
              + (" CUDA MB | / N |" if args.device == "cuda" else "") + "\n|---|---|---|---|---|---|"
              + ("---|---|" if args.device == "cuda" else ""))
        for name in args.runs:
            reports = run(name, path, os.path.join(tmp, "out"), args.device, args.processes)
            figures[name] = [{**r, "rss_per_n": r["peak_mb"] * 2**20 / n_bytes,
                              "cuda_per_n": r["cuda_mb"] and r["cuda_mb"] * 2**20 / n_bytes} for r in reports]
            for r in figures[name]:
                cuda = f" {r['cuda_mb']:.0f} | {r['cuda_per_n']:.2f} |" if r["cuda_mb"] is not None else ""
                print(f"| {name} | {len(reports)} | {r['rank']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
                      f"{r['rss_per_n']:.2f} |{cuda}", flush=True)
    print("json " + json.dumps({"checkpoint_mb": n_bytes / 2**20, "runs": figures}))


if __name__ == "__main__":
    main()
