"""The GPU figures and CUDA checks in one command, sized for a short lease of one GPU (issue #21).

    python3 bench/gpu_check.py OUT                 # on the GPU machine: 8 minutes at most (--budget 480)
    python bench/gpu_check.py OUT --tiny           # anywhere: every part at a tiny shape on the CPU (~6 min on 2 cores)
    python bench/gpu_check.py --make-carry build/gpu_site   # here, before: the bitsandbytes to carry

Each part is one subprocess (bench.py, train.py, pytest, ...) with its own timeout, so one hang
cannot eat the rest; the parts run cheapest and most important first, and a part whose rough
need no longer fits in what is left of --budget is skipped, not started. Everything a part prints
goes to OUT/gpu_check.log as it runs; OUT/gpu_check.json is rewritten after every part: per part
its command, status (ok, failed, timeout, skipped and why), seconds, the figures parsed from its
output (bench.py's `json ...` line, pytest's counts, train.py's losses) and each target with its
value and whether it was met. stdout gets one line per part and a summary at the end.

--tiny runs the same parts at tiny shapes on the CPU (CUDA-only ones skipped with the reason, the
CUDA tests only collected), so the script is known to work before GPU time is spent; its figures
and targets mean nothing. --parts picks parts by name, e.g. to finish what a short budget skipped.

The GPU machine has torch, transformers and peft but no bitsandbytes, and no network: --make-carry
copies this interpreter's bitsandbytes into a folder (only its CPU and CUDA 13 libraries, as that
machine's torch is cu130: 8 MB), which travels as an ignored path; this script puts build/gpu_site
on the children's PYTHONPATH when it is there. Only load-zero3-1b needs deepspeed (skipped without it);
dpo-vs-trl and grpo-vs-trl need trl and ../shared/data (skipped without them: the GPU machine has neither).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CARRY = os.path.join(ROOT, "build", "gpu_site")  # the carried bitsandbytes (--make-carry)
KEEP_LIBS = ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")  # the GPU machine's torch is 2.11.0+cu130

SHAPES = {  # bench.py flags; batch 4 (bench's default)
    "neox-1.4b": ["--hidden", "2048", "--layers", "24", "--heads", "16", "--seq", "2048"],  # Pythia-1.4B
    "llama-1b": ["--family", "llama", "--hidden", "2048", "--layers", "16", "--heads", "32", "--kv-heads", "8",
                 "--intermediate", "8192", "--seq", "2048"],  # Llama-3.2-1B; vocabulary 128256 (bench's default)
    "neox-70m": []}  # bench's default, Pythia-70m: BENCHMARKS.md's CPU table of weight bytes
TINY_SHAPES = {"neox": ["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "512", "--seq", "32",
                        "--batch", "2"],
               "llama": ["--family", "llama", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                         "--intermediate", "128", "--vocab", "512", "--seq", "32", "--batch", "2"]}
TINY_STEPS = ["--steps", "2", "--warmup", "1", "--block", "1", "--threads", "1"]
MFU, VS_HF, MEMORY = 0.45, 1.3, 1.0  # the targets: MFU, tokens/s x HF + peft, peak memory x HF + peft
VS_TRL_DPO = 1.5  # DPO tokens/s x TRL's DPOTrainer + peft


class Skip(Exception):
    """A part that cannot run here; the message says why."""


@dataclass
class Part:
    name: str
    need: float  # rough seconds on the H200: the part is not started with less left of the budget
    timeout: float  # seconds on the H200, before it is killed
    command: Callable  # (run) -> argv, or raises Skip
    check: Callable = None  # (run, figures) -> {target: {value, target, met}}
    parse: Callable = None  # (output) -> figures; bench.py's json line when None


class Run:
    """What every part sees: the mode, the device, the children's environment, the results so far."""

    def __init__(self, args):
        self.tiny, self.device = args.tiny, "cpu" if args.tiny else "cuda"
        self.python, self.notes, self.results = sys.executable, [], {}
        self.work = tempfile.mkdtemp(prefix="gpu_check-")  # out folders; TMPDIR, so killed parts leave nothing
        paths = [ROOT] + ([CARRY] if os.path.isdir(CARRY) else []) + [os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "TMPDIR": self.work,
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}  # the GPU machine has no network
        self.memory_key = "peak_rss_mb" if self.tiny else "cuda_max_allocated_mb"

    def has(self, *modules):
        return all(importlib.util.find_spec(m) for m in modules)

    def bench(self, shape, *flags, hf=False, profile=0, steps=(), torchrun=False, device=None):
        """bench.py at a SHAPES shape on this run's device (or `device`); --tiny: the same flags at a tiny shape."""
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun \
            else [self.python]
        cmd += [os.path.join(HERE, "bench.py"), *flags, "--device", device or self.device]
        cmd += TINY_SHAPES["llama" if "llama" in shape else "neox"] + TINY_STEPS if self.tiny \
            else SHAPES[shape] + list(steps)
        if hf and self.has("transformers", "peft"):
            cmd.append("--compare-hf")
        elif hf:
            self.notes.append("transformers or peft is not importable here: --compare-hf left out")
        if profile:
            cmd += ["--profile", str(1 if self.tiny else profile)]
        return cmd

    def train(self, *flags):
        """train.py on the bundled tiny model and data, on this run's device, for a few steps."""
        out = tempfile.mkdtemp(dir=self.work)
        return [self.python, os.path.join(ROOT, "train.py"), "--out", out, "--overwrite", "--device", self.device,
                "--max-steps", "4" if self.tiny else "30", "--log-every", "1" if self.tiny else "5",
                "--eval-exact-match", "0", "--max-seq-len", "64", "--batch-size", "4", *flags]


# ---- what each part runs ------------------------------------------------------------------------------

ENV = """import importlib.metadata as m, json, os, sys, time, torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("transformers", "peft", "bitsandbytes", "deepspeed"):
    try: out[name] = m.version(name)
    except m.PackageNotFoundError: out[name] = None
if out["gpu"]:  # the chip's dense bf16 rate on random data (KINDS.md: ~790 TFLOP/s), bench.py's peaks aside
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): a @ b
    torch.cuda.synchronize(); out["bf16_tflops_8192"] = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
print("json " + json.dumps(out))"""


def env_command(run):
    return [run.python, "-c", ENV]


def tests_command(run):
    """The CUDA tests: this file is a pytest plugin (-p gpu_check, bench/ on the path) that keeps only them."""
    cmd = ["env", f"PYTHONPATH={HERE}{os.pathsep}{run.env['PYTHONPATH']}", run.python, "-m", "pytest", "-q", "-rfEs",
           "-p", "gpu_check", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")]
    if run.tiny:
        return cmd + ["--collect-only"]  # on a CPU they skip: check what would run
    return cmd + (["-n", "4"] if run.has("xdist") else [])


def pytest_collection_modifyitems(config, items):
    """Keep tests/test_gpu.py and every case of a test function that has a case marked skipif
    'needs a CUDA GPU' (its CPU cases too: on a GPU machine the tests' gpu=True runs train on the GPU)."""
    def cuda_marked(item):
        return any(m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers())
    functions = {item.nodeid.split("[")[0] for item in items if cuda_marked(item)}
    keep = [i for i in items if i.nodeid.split("[")[0] in functions or i.nodeid.startswith("tests/test_gpu.py::")]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def needs_bnb(run):
    if not run.has("bitsandbytes"):
        raise Skip("bitsandbytes is not importable: make build/gpu_site with --make-carry and carry it")


def fp16_command(run):
    if run.tiny:
        raise Skip("fp16-mixed needs CUDA (train.py refuses --precision 16 on a CPU)")
    return run.train("--precision", "16")


def packing_command(run):
    with open(os.path.join(ROOT, "train.py")) as f:
        if '"--packing"' not in f.read():
            raise Skip("train.py has no --packing yet")
    return run.train("--packing", "--precision", "bf16")


WEIGHT_BYTES = """import json, sys, tempfile, torch
sys.path.insert(0, "bench")
import bench  # its model, built as train.py builds it, and its count of the base's bytes
args, out = bench.parse_args(sys.argv[1:]), {}
with tempfile.TemporaryDirectory() as tmp:
    bench.write_model(args, tmp)
    for args.mode in ("int8", "nf4"):
        for name, device in (("device", args.device), ("cpu", "cpu")):
            model, _ = bench.nanotune_model(args, tmp, torch.device(device))
            out[f"{args.mode} {name}"] = {"base_mb": bench.base_bytes(model) / 2**20,
                                          "blocks_mb": bench.base_bytes(model.blocks) / 2**20}
print("json " + json.dumps(out))"""


def weight_bytes_command(run):
    """The int8 and NF4 bases quantized on the device and on the CPU, in one process: the same bytes?"""
    needs_bnb(run)
    shape = TINY_SHAPES["neox"] if run.tiny else SHAPES["neox-70m"]
    return [run.python, "-c", WEIGHT_BYTES, "--device", run.device, *shape]


def quantized_command(mode):
    def command(run):
        needs_bnb(run)
        return run.bench("neox-1.4b", "--mode", mode, "--precision", "bf16", hf=True,
                         steps=["--steps", "3", "--warmup", "1"])
    return command


def compile_command(run):
    """bench.py --compile times nanotune eager and compiled (nanotune.compile) side by side."""
    with open(os.path.join(HERE, "bench.py")) as f:
        if '"--compile"' not in f.read():
            raise Skip("bench.py has no --compile yet")
    return run.bench("neox-1.4b", "--mode", "lora-bf16", "--compile", "--no-memory")


def read_compile(output):
    """bench.py's json line, and the first step's seconds of each runner (compiling, for the compiled one)."""
    first = re.search(r"first step: nanotune ([\d.]+) s, nanotune-compile ([\d.]+) s", output)
    return json_line(output) | ({"first_step_s": {"eager": float(first[1]), "compile": float(first[2])}}
                                if first else {})


def fsdp_command(mode):
    def command(run):
        if mode == "nf4":
            needs_bnb(run)
        return run.bench("neox-1.4b", "--mode", mode, "--precision", "bf16", "--strategy", "fsdp", torchrun=True,
                         steps=["--steps", "6", "--warmup", "2"])
    return command


def qdora_command(run):
    """DoRA on an NF4 base (QDoRA), dropout on, beside LoRA on it, each against peft's: what DoRA costs per
    step. Its logits against peft's are tests/test_dora.py's CUDA case, which the tests part runs."""
    needs_bnb(run)
    return run.bench("neox-1.4b", "--mode", "nf4", "--precision", "bf16", "--dora", "--lora-dropout", "0.1", hf=True,
                     steps=["--steps", "3", "--warmup", "1"])


def generate_smoke_command(run):
    return [run.python, "-m", "nanotune.generate", "--model", os.path.join(ROOT, "assets", "tiny-neox"),
            "--prompt", "Reverse the order of these words.", "--input", "cat dog pear fig", "--device", run.device]


def generate_command(run):
    """KV-cache decode tokens/s, nanotune.generate against transformers' generate (fp32, greedy, batch 1
    and 8, 128 new tokens), at the 1.4B shape."""
    path = os.path.join(HERE, "generate.py")
    if not os.path.exists(path):
        raise Skip("bench/generate.py (tokens/s against transformers' generate) is not there yet")
    cmd = [run.python, path, "--device", run.device] + (["--compare-hf"] if run.has("transformers") else [])
    if run.tiny:
        return cmd + TINY_SHAPES["neox"][:8] + ["--new-tokens", "8", "--rounds", "1", "--threads", "1"]
    return cmd + SHAPES["neox-1.4b"][:6] + ["--rounds", "3"]


LOAD_SHAPES = {  # bench/loading.py flags: a bf16 Llama-shape checkpoint written on the machine
    "llama-13b": ["--hidden", "5120", "--layers", "40", "--heads", "40", "--kv-heads", "40", "--intermediate", "13824"],
    "llama-1b": ["--hidden", "2048", "--layers", "16", "--heads", "32", "--kv-heads", "8", "--intermediate", "8192",
                 "--vocab", "128256"],
    "tiny": ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
             "--vocab", "512"]}
LOAD_BOUND = 1.1  # peak CUDA memory while loading / the checkpoint's bytes N: what a process keeps, and one tensor


def loading_command(shape, *runs):
    """bench/loading.py: peak memory while train.py loads a bf16 checkpoint, per process; FSDP and ZeRO-3
    with one process per GPU (on a 1-GPU lease a rank holds every shard, but the sharded load runs on CUDA)."""
    def command(run):
        if "zero3" in runs and not run.has("deepspeed"):
            raise Skip("deepspeed is not importable here (the GPU machine has none)")
        import torch
        processes = 2 if run.tiny else max(1, torch.cuda.device_count())
        return [run.python, os.path.join(HERE, "loading.py"), "--device", run.device, "--runs", *runs,
                "--processes", str(processes), *LOAD_SHAPES["tiny" if run.tiny else shape]]
    return command


def loading_check(run, figures):
    """Every process's peak CUDA memory while loading, against the checkpoint's bytes (shards are 1/world
    of it): a 13B bf16 model must load on one 80 GB GPU for a LoRA run, so no fp32 copy may exist."""
    out = {}
    for name, reports in figures.get("runs", {}).items():
        for r in reports:
            world = len(reports) if name in ("fsdp", "zero3") else 1
            out[f"{name} rank {r['rank']} CUDA peak / (N / {world})"] = target(
                None if r["cuda_per_n"] is None else r["cuda_per_n"] * world, "<=", LOAD_BOUND)
    return out


QUANT_CODES = """import json, sys, torch, torch.nn as nn
from nanotune.quantize import quantize
device, out = sys.argv[1], {}
w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
w[::97, ::89] *= 200  # outliers, as real weights have
def linear():
    layer = nn.Linear(1024, 1024, bias=False)
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    return nn.Sequential(layer)
for bits in (8, 4):
    layers = [quantize(linear(), bits, device=d)[0] for d in ("cpu", device)]
    if bits == 8:  # CB (out, in) int8 and SCB (out,) fp32 row maxima (kept on the weight until a first forward)
        cpu, dev = (l.weight.data.int() for l in layers)
        scales = [l.weight.SCB for l in layers]
    else:  # packed NF4 codes, two per byte, and one absmax per block of 64
        cpu, dev = (torch.cat((l.weight.data.view(-1) >> 4, l.weight.data.view(-1) & 15)).int() for l in layers)
        scales = [l.weight.quant_state.absmax for l in layers]
    name = "int8" if bits == 8 else "nf4"
    diff = (cpu - dev.cpu()).abs()
    out[name] = {"codes_equal": (diff == 0).float().mean().item(), "codes_max_diff": diff.max().item(),
                 "scales_max_rel_diff": ((scales[0] - scales[1].cpu()).abs() / scales[0].abs()).max().item()}
print("json " + json.dumps(out))"""


def quant_codes_command(run):
    """int8 and NF4 codes quantized on the CPU and on the device from the same weights (issue #25, item 7)."""
    needs_bnb(run)
    return [run.python, "-c", QUANT_CODES, run.device]


def quant_codes_check(run, figures):
    return {"nf4 codes equal": target(figures.get("nf4", {}).get("codes_equal"), ">=", 1.0),
            "int8 codes at most 1 apart": target(figures.get("int8", {}).get("codes_max_diff"), "<=", 1),
            "int8 codes equal": target(figures.get("int8", {}).get("codes_equal"), ">=", 0.999)}


def offload_generate_command(run):
    """Exact match (batched generation of prompts of different lengths) under FSDP with --fsdp-offload, whose
    parameters live in CPU memory while the inputs go to the GPU; on a CPU (--tiny) FSDP without offload."""
    return run.train("--strategy", "fsdp", "--eval-exact-match", "8", "--precision", "32" if run.tiny else "bf16",
                     *([] if run.tiny else ["--fsdp-offload"]))


def train_figures(output):
    """train_losses, and the exact-match scores."""
    scores = re.findall(r"exact match ([\d.]+)%", output)
    return train_losses(output) | {"exact_match": [float(x) / 100 for x in scores]}


def exact_match_check(run, figures):
    return loss_check(run, figures) | {"exact match scored": target(len(figures.get("exact_match", [])), ">=", 2)}


TF32 = """import json, sys, time, torch
from nanotune.precision import matmul_precision, resolve
device, n, out = torch.device(sys.argv[1]), int(sys.argv[2]), {}
a, b = (torch.randn(n, n, device=device, generator=torch.Generator(device).manual_seed(i)) for i in (0, 1))
exact = (a.double() @ b.double())
for name in ("32", "bf16"):  # what train.py sets for each --precision
    matmul_precision(resolve(name, device), device)
    for _ in range(3): a @ b
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(10): c = a @ b
    torch.cuda.synchronize() if device.type == "cuda" else None
    out[name] = {"fp32_matmul_tflops": 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12,
                 "max_rel_err": ((c.double() - exact).abs().max() / exact.abs().max()).item(),
                 "setting": torch.get_float32_matmul_precision()}
print("json " + json.dumps(out))"""


def tf32_command(run):
    """fp32 matmuls under --precision 32 (IEEE) and bf16 (TF32 on CUDA): speed and error against fp64."""
    return [run.python, "-c", TF32, run.device, "256" if run.tiny else "8192"]


def tf32_check(run, figures):
    exact, tf32 = figures.get("32", {}), figures.get("bf16", {})
    out = {"--precision 32 exact": target(exact.get("max_rel_err"), "<=", 1e-5)}
    if not run.tiny:
        out["TF32 x fp32 speed"] = target(tf32.get("fp32_matmul_tflops", 0) / exact.get("fp32_matmul_tflops", 1),
                                          ">=", 2)
    return out


PACKED_ATTENTION = """import json, sys, time, torch
from nanotune.models.base import Context
device, dtype, B, T, nh, nkv = torch.device(sys.argv[1]), torch.bfloat16, *map(int, sys.argv[2:6])
g = torch.Generator().manual_seed(0)
lengths = []
for _ in range(B):  # rows of 20 to 660 tokens (Alpaca-like) filling each sequence, the rest padding
    left = T
    while left > 20:
        n = min(left, int(torch.randint(20, 661, (), generator=g)))
        lengths.append(n); left -= n
    lengths += [left] if left else []
row_lengths = torch.tensor(lengths)
q = torch.randn(B, nh, T, 64, device=device, dtype=dtype, requires_grad=True)
k, v = (torch.randn(B, nkv, T, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
out = {"rows": len(lengths), "positions": B * T}
results = {}
for name in ("per_row", "masked"):
    for window in (None, 256):  # 256: a sliding window shorter than the longer rows (Mistral's kind)
        ctx = Context(None, None, row_lengths.to(device))
        y = getattr(ctx, name)(q, k, v, window)
        grads = torch.autograd.grad(y.float().square().sum(), (q, k, v))
        results[name, window] = (y.float(), [x.float() for x in grads])
    for _ in range(2):
        getattr(Context(None, None, row_lengths.to(device)), name)(q, k, v, None).sum().backward()
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(5):  # a forward and backward of one layer, its mask built anew as each forward builds it
        getattr(Context(None, None, row_lengths.to(device)), name)(q, k, v, None).sum().backward()
    torch.cuda.synchronize() if device.type == "cuda" else None
    out[name + "_ms"] = (time.perf_counter() - start) / 5 * 1000
for window in (None, 256):
    (y0, g0), (y1, g1) = results["per_row", window], results["masked", window]
    out[f"max_diff_window_{window}"] = max((a - b).abs().max().item() / b.abs().max().item()
                                           for a, b in zip([y1, *g1], [y0, *g0]))
out["masked_x_per_row_speed"] = out["per_row_ms"] / out["masked_ms"]
print("json " + json.dumps(out))"""


def packed_attention_command(run):
    """Packed rows' attention on the device: one masked SDPA call (the GPU's way) against a call per row
    (the CPU's), bf16, GQA 4:1: the same outputs and gradients, and the time of a layer's forward + backward."""
    shape = ["2", "256", "4", "1"] if run.tiny else ["8", "4096", "32", "8"]
    return [run.python, "-c", PACKED_ATTENTION, run.device, *shape]


def packed_attention_check(run, figures):
    out = {f"masked = per row (window {w})": target(figures.get(f"max_diff_window_{w}"), "<=", 0.02)
           for w in (None, 256)}
    if not run.tiny:
        out["masked x per-row speed"] = target(figures.get("masked_x_per_row_speed"), ">=", 1)
    return out


def dpo_command(run):
    """A DPO step on the device: train.py --objective dpo, LoRA under bf16-mixed over an NF4 base, on the
    bundled pairs (its reference log-probs computed once first, as train.py does)."""
    needs_bnb(run)
    return with_peak(run.train("--objective", "dpo", "--data", os.path.join(ROOT, "assets", "data", "pairs.jsonl"),
                               "--load-in-4bit", "--precision", "bf16"))


PEAK = """import importlib.util, json, resource, sys, torch
spec = importlib.util.spec_from_file_location("train_script", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.main(train.parse_args(sys.argv[2:]))
cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print("json " + json.dumps({"cuda_max_allocated_mb": cuda,
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"""


def with_peak(cmd):
    """train.py's main() in a process that then prints its peak CUDA memory and RSS (train.py prints neither)."""
    return [cmd[0], "-c", PEAK, *cmd[1:]]


def train_peak(output):
    return train_losses(output) | json_line(output)


def trl_bench(script, *flags):
    """bench/dpo.py or bench/grpo.py: nanotune against TRL + peft, each in a child process of its own; both
    read ../shared/data (the real tokenizer and rows), and both time on the CPU (they hide CUDA)."""
    def command(run):
        if not run.has("trl", "transformers", "peft", "datasets"):
            raise Skip("trl, transformers, peft or datasets is not importable here (the GPU machine has no trl)")
        if not os.path.isdir(os.path.join(os.path.dirname(ROOT), "shared", "data")):
            raise Skip(f"bench/{script} reads ../shared/data (tokenizer and rows), which is not beside the repo")
        return [run.python, os.path.join(HERE, script), *(flags if run.tiny else ())]
    return command


def read_dpo(output):
    """bench/dpo.py's last line: 'nanotune / TRL: 1.52x tokens/s, ...; 0.49x the training memory'."""
    speed = re.search(r"nanotune / TRL: ([\d.]+)x tokens/s", output)
    memory = re.search(r"([\d.]+)x the training memory", output)
    return {"tokens_per_s_x_trl": float(speed[1]) if speed else None,
            "training_memory_x_trl": float(memory[1]) if memory else None}


def dpo_trl_check(run, figures):
    return {"tokens/s x TRL": target(figures.get("tokens_per_s_x_trl"), ">=", VS_TRL_DPO),
            "training memory x TRL": target(figures.get("training_memory_x_trl"), "<=", MEMORY)}


def grpo_command(run):
    """A GRPO step with generation on the device: train.py --objective grpo, G = 8 completions per prompt
    sampled with the KV cache, the built-in length reward, LoRA under bf16-mixed."""
    return with_peak(run.train("--objective", "grpo", "--num-generations", "8", "--reward", "length",
                               "--max-new-tokens", "8" if run.tiny else "64", "--temperature", "1.0",
                               "--precision", "bf16"))


def read_grpo(output):
    """bench/grpo.py's last line: 'nanotune / TRL: 1.23x (wall), 1.30x (CPU)'."""
    ratio = re.search(r"nanotune / TRL: ([\d.]+)x \(wall\)", output)
    return {"completions_per_s_x_trl": float(ratio[1]) if ratio else None}


GEMMA2 = """import json, sys, torch
import torch.nn.functional as F
from nanotune.generate import generate
from nanotune.models.gemma import Config, Gemma
device, out = torch.device(sys.argv[1]), {}
hf = {"model_type": "gemma2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
      "query_pre_attn_scalar": 16, "sliding_window": 8,  # prompts longer than the local layers' window
      "final_logit_softcapping": 5.0, "attn_logit_softcapping": 1.0,  # caps below the logits, so both bite
      "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
torch.manual_seed(0)
model = Gemma(Config.from_hf(hf, "gpu_check"))
for name, p in model.named_parameters():
    torch.nn.init.normal_(p, std=0.02 if "norm" in name else 0.5)
model = model.to(device).eval()
prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 19)]  # ragged: the shorter one left-padded
with torch.no_grad():
    cached = generate(model, prompts, max_new_tokens=16, device=device)
    recomputed = []  # greedy, the whole sequence through the model again for every token
    for ids in prompts:
        ids, new = list(ids), []
        for _ in range(16):
            new.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
            ids.append(new[-1])
        recomputed.append(new)
out["generation_equal"] = cached == recomputed
ids = torch.randint(3, 512, (2, 64), device=device)
labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
for dtype in (torch.float32, torch.bfloat16):  # the fused, capped loss against capped logits' cross-entropy
    with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
        fused = model(ids, labels=labels)
        naive = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten(), reduction="sum")
    out[f"loss_rel_diff_{str(dtype)[6:]}"] = abs(fused.item() - naive.item()) / naive.item()
    model.zero_grad()
    fused.backward()
    out[f"grad_finite_{str(dtype)[6:]}"] = all(p.grad.isfinite().all().item() for p in model.parameters()
                                              if p.grad is not None)
print("json " + json.dumps(out))"""


def gemma2_command(run):
    """A Gemma-2-shaped model (both soft-cappings, sliding-window layers) on the device: greedy cached
    generation against recomputing every token, and the fused capped loss against plain cross-entropy."""
    return [run.python, "-c", GEMMA2, run.device]


def gemma2_check(run, figures):
    return {"cached = recomputed generation": target(int(figures.get("generation_equal", False)), ">=", 1),
            "fused loss fp32 rel diff": target(figures.get("loss_rel_diff_float32"), "<=", 1e-4),
            "fused loss bf16 rel diff": target(figures.get("loss_rel_diff_bfloat16"), "<=", 0.02),
            "gradients finite": target(int(figures.get("grad_finite_float32", False)
                                           and figures.get("grad_finite_bfloat16", False)), ">=", 1)}


def finite_loss_check(run, figures):
    losses = figures.get("losses", [])
    return {"losses logged, all finite": target(
        len(losses) if losses and all(x == x and abs(x) != float("inf") for x in losses) else 0, ">=", 1)}


# ---- reading the output, and the targets -----------------------------------------------------------------

def json_line(output):
    lines = [line[5:] for line in output.splitlines() if line.startswith("json ")]
    return json.loads(lines[-1]) if lines else {}


def read_pytest_counts(output):
    """pytest's summary line, e.g. '5 passed, 3 skipped, 342 deselected in 41.2s' or, collecting,
    '19/350 tests collected (331 deselected) in 5.2s' -> counts."""
    counts = {}
    for line in output.splitlines():
        if re.search(r" in [\d.]+s", line):
            found = re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|error)", line)
            collected = re.search(r"(\d+)(?:/\d+)? tests? collected", line)
            counts = {word: int(n) for n, word in found} | ({"collected": int(collected[1])} if collected else {})
    return counts


def train_losses(output):
    """train.py's held-out loss before and after, its logged training losses, fp16's skipped steps."""
    return {"eval_losses": [float(x) for x in re.findall(r"eval loss ([\d.naninf]+)", output)],
            "losses": [float(x) for x in re.findall(r"\| loss ([\d.naninf]+)", output)],
            "overflows": output.count("fp16 gradients overflowed")}


def target(value, op, bound):
    met = None if value is None else {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return {"value": value, "target": f"{op} {bound}", "met": met}


def tests_check(run, figures):
    ran = figures.get("passed", 0) + figures.get("collected", 0)
    return {"all pass": target(figures.get("failed", 0) + figures.get("error", 0), "<=", 0),
            "some ran": target(ran, ">=", 1)}


def loss_check(run, figures):
    losses = figures.get("eval_losses", [])
    return {"eval loss after - before": target(losses[-1] - losses[0] if len(losses) > 1 else None, "<", 0)}


def hf_check(speed):
    """MFU and tokens/s against the fastest HF setting (speed) and peak memory against HF's leanest."""
    def check(run, figures):
        results = figures.get("results", {})
        ours, theirs = results.get("nanotune", {}), [v for k, v in results.items() if k.startswith("hf")]
        out = {"mfu": target(ours.get("mfu"), ">=", MFU)} if speed else {}
        if theirs and speed:
            out["tokens/s x HF"] = target(ours["tokens_per_s"] / max(v["tokens_per_s"] for v in theirs), ">=", VS_HF)
        memories = [v[run.memory_key] for v in theirs if run.memory_key in v]
        if memories and run.memory_key in ours:
            out["memory x HF"] = target(ours[run.memory_key] / min(memories), "<=", MEMORY)
        return out
    return check


def compile_check(run, figures):
    ours = figures.get("results", {}).get("nanotune-compile", {})
    out = {"mfu": target(ours.get("mfu"), ">=", MFU)}
    eager = run.results.get("lora-bf16-1.4b", {}).get("figures", {}).get("results", {})
    theirs = [v["tokens_per_s"] for k, v in eager.items() if k.startswith("hf")]
    if theirs and ours:  # against HF + peft (eager, uncompiled), from the part before
        out["tokens/s x HF"] = target(ours["tokens_per_s"] / max(theirs), ">=", VS_HF)
    return out


def weight_bytes_check(run, figures):
    return {f"{mode} {key} device/cpu - 1": target(
        abs(figures[f"{mode} device"][key] / figures[f"{mode} cpu"][key] - 1), "<=", 0.001)
        for mode in ("int8", "nf4") for key in ("base_mb", "blocks_mb")}


PARTS = [  # cheapest and most important first
    Part("env", 5, 60, env_command),
    Part("tests", 45, 180, tests_command, tests_check, read_pytest_counts),
    Part("fp16", 10, 90, fp16_command, loss_check, train_losses),
    Part("packing", 10, 90, packing_command, loss_check, train_losses),
    Part("generate-smoke", 5, 60, generate_smoke_command, parse=lambda out: {"text": out.strip()[-200:]}),
    Part("weight-bytes", 10, 90, weight_bytes_command, weight_bytes_check),
    Part("quant-codes", 10, 90, quant_codes_command, quant_codes_check),
    Part("tf32", 5, 60, tf32_command, tf32_check),
    Part("packing-attention", 10, 90, packed_attention_command, packed_attention_check),
    Part("offload-generate", 15, 120, offload_generate_command, exact_match_check, train_figures),
    Part("lora-bf16-1.4b", 90, 240, lambda run: run.bench("neox-1.4b", "--mode", "lora-bf16", hf=True, profile=3),
         hf_check(speed=True)),
    Part("lora-bf16-1.4b-compile", 90, 240, compile_command, compile_check, read_compile),
    Part("nf4-1.4b", 70, 180, quantized_command("nf4"), hf_check(speed=False)),
    Part("int8-1.4b", 70, 180, quantized_command("int8"), hf_check(speed=False)),
    Part("fsdp-1.4b", 40, 120, fsdp_command("lora-bf16")),
    Part("fsdp-qlora-1.4b", 40, 120, fsdp_command("nf4")),
    Part("llama-1b", 80, 200, lambda run: run.bench("llama-1b", "--mode", "lora-bf16", hf=True),
         hf_check(speed=False)),
    Part("generate", 40, 150, generate_command),
    Part("qdora-1.4b", 90, 240, qdora_command),
    Part("gemma2", 10, 90, gemma2_command, gemma2_check),
    Part("dpo-nf4", 15, 120, dpo_command, finite_loss_check, train_peak),
    Part("grpo-g8", 20, 150, grpo_command, finite_loss_check, train_peak),
    Part("dpo-vs-trl", 60, 240, trl_bench("dpo.py", "--hidden", "64", "--layers", "2", "--max-len", "128",
                                          "--steps", "1"), dpo_trl_check, read_dpo),
    Part("grpo-vs-trl", 60, 240, trl_bench("grpo.py", "--hidden", "64", "--layers", "2", "--prompts", "1",
                                           "--new-tokens", "4", "--steps", "1"), parse=read_grpo),
    Part("load-13b", 120, 420, loading_command("llama-13b", "bf16-true", "bf16-mixed"), loading_check),
    Part("load-fsdp-1b", 30, 120, loading_command("llama-1b", "fsdp"), loading_check),
    Part("load-zero3-1b", 30, 120, loading_command("llama-1b", "zero3"), loading_check),
]


# ---- the driver ------------------------------------------------------------------------------------------

def run_part(part, run, log, timeout):
    """Start the part's command in its own process group, its output into the log; kill the group at timeout."""
    record = {"name": part.name, "status": "skipped"}
    try:
        notes = len(run.notes)
        cmd = part.command(run)
        record["notes"] = run.notes[notes:]
    except Skip as e:
        return {**record, "reason": str(e)}
    record["command"] = " ".join(cmd)
    log.write(f"\n===== {part.name}: {record['command']}\n")
    log.flush()
    start, offset = time.time(), os.path.getsize(log.name)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as e:
        return {**record, "status": "failed", "reason": f"could not start: {e}"}
    try:
        proc.wait(timeout=timeout)
        record["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: bench.py's memory children, torchrun's ranks
            with_group(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                pass
        record["status"] = "timeout"
    record.update(returncode=proc.returncode, seconds=round(time.time() - start, 1), timeout_s=round(timeout))
    log.flush()
    with open(log.name, "rb") as f:
        f.seek(offset)
        output = f.read().decode(errors="replace")
    try:
        record["figures"] = (part.parse or json_line)(output)
        record["targets"] = part.check(run, record["figures"]) if part.check else {}
    except (ValueError, KeyError, ZeroDivisionError) as e:  # output cut short or malformed
        record.update(figures=record.get("figures", {}), targets={}, parse_error=repr(e))
    return record


def with_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def headline(record):
    """One line of a part's figures for stdout."""
    figures, bits, nan = record.get("figures", {}), [], float("nan")
    results = figures.get("results", {})
    for name, r in results.items() if isinstance(results, dict) else ():  # bench.py's runners
        bits.append(f"{name} {r.get('tokens_per_s', nan):.0f} tok/s MFU {r.get('mfu', nan):.1%}"
                    + (f" {r['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in r else "")
                    + (f" base {r['base_mb']:.1f} MB, blocks {r['blocks_mb']:.1f} MB" if "base_mb" in r else ""))
    for r in results if isinstance(results, list) else ():  # bench/generate.py's rows
        bits.append(f"{r.get('runner')} batch {r.get('batch')} {r.get('decode_tokens_per_s', nan):.0f} decode tok/s")
    if "first_step_s" in figures:
        bits.append(f"first step {figures['first_step_s']}")
    if "results" not in figures:  # bench.py's other keys only repeat its flags
        bits += [f"{k} {v}" for k, v in figures.items() if not isinstance(v, (dict, list))]
        bits += [f"{k}: base {v['base_mb']:.1f} MB, blocks {v['blocks_mb']:.1f} MB" for k, v in figures.items()
                 if isinstance(v, dict) and "base_mb" in v]
    bits += [f"{name} {t['value'] if not isinstance(t['value'], float) else round(t['value'], 3)} "
             f"({t['target']}: {'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'})"
             for name, t in record.get("targets", {}).items()]
    return "; ".join(bits)[:400]


@contextlib.contextmanager
def cleanup(folder):
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path, report):
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def main(args, all_parts=PARTS):
    unknown = set(args.parts or ()) - {p.name for p in all_parts}
    if unknown:
        sys.exit(f"--parts: no part named {', '.join(sorted(unknown))}; "
                 f"the parts: {', '.join(p.name for p in all_parts)}")
    parts = [p for p in all_parts if not args.parts or p.name in args.parts]
    os.makedirs(args.out, exist_ok=True)
    run = Run(args)
    if os.path.isdir(CARRY):
        sys.path.insert(0, CARRY)  # so that run.has("bitsandbytes") sees what the children will import
    report = {"tiny": run.tiny, "device": run.device, "budget_s": args.budget, "root": ROOT,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": []}
    json_path, start = os.path.join(args.out, "gpu_check.json"), time.time()
    with open(os.path.join(args.out, "gpu_check.log"), "w") as log, cleanup(run.work):
        for part in parts:
            left = args.budget - (time.time() - start)
            need = 1 if run.tiny else part.need
            if left < need:
                record = {"name": part.name, "status": "skipped",
                          "reason": f"budget: {left:.0f} s left, the part needs about {need:.0f} s"}
            else:
                record = run_part(part, run, log, min(part.timeout, left))
            run.results[part.name] = record
            report["parts"].append(record)
            report["seconds"] = round(time.time() - start, 1)
            report["targets_met"] = {f"{r['name']}: {name}": t["met"] for r in report["parts"]
                                     for name, t in r.get("targets", {}).items()}
            write_json(json_path, report)
            try:
                line = record.get("reason") or headline(record)
            except (KeyError, TypeError, ValueError) as e:  # a figure of an unexpected form: the JSON has it all
                line = f"(figures not summarised: {e!r})"
            print(f"{part.name:<24} {record['status']:<8} {record.get('seconds', 0):>6.1f} s  {line}", flush=True)
            log.write(f"----- {part.name}: {record['status']} {json.dumps(record)}\n")
            log.flush()
            if part.name == "env" and record["status"] == "ok" and not run.tiny and not record["figures"].get("gpu"):
                print("no CUDA GPU is visible here (see env): the parts would only fail; on a CPU use --tiny")
                break
    missed = [k for k, met in report["targets_met"].items() if met is False]
    print(f"\n{len(parts)} parts in {report['seconds']:.0f} s (budget {args.budget:.0f} s); "
          f"{sum(r['status'] == 'ok' for r in report['parts'])} ok; targets missed: {', '.join(missed) or 'none'}")
    print(f"log {os.path.join(args.out, 'gpu_check.log')}, figures {json_path}")


def make_carry(folder):
    """Copy this interpreter's bitsandbytes (its files and dist-info, which transformers' version check
    reads) into `folder`, keeping only the libraries the GPU machine can load."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution("bitsandbytes")
    except PackageNotFoundError:
        sys.exit("--make-carry copies this interpreter's bitsandbytes, and it has none: pip install bitsandbytes")
    total = 0
    for file in dist.files:
        name = str(file)
        lib = os.path.basename(name).startswith("libbitsandbytes_")
        if name.startswith("..") or "__pycache__" in name or (lib and not name.split("/")[-1].startswith(KEEP_LIBS)):
            continue
        dest = os.path.join(folder, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(dist.locate_file(file), dest)
        total += os.path.getsize(dest)
    print(f"bitsandbytes {dist.version} in {folder}: {total / 2**20:.1f} MB; carry it (run's carry: "
          f"[\"{os.path.relpath(folder, ROOT)}\"])")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for gpu_check.log and gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="every part at a tiny shape on the CPU (CUDA-only ones skipped)")
    p.add_argument("--budget", type=float, help="seconds for all parts: no part is started whose need exceeds what "
                   "is left, and none runs past it (default: 480, with --tiny 1200)")
    p.add_argument("--parts", type=lambda s: s.split(","), help="comma-separated part names to run, in the usual "
                   "order (default: all): " + ", ".join(p.name for p in PARTS))
    p.add_argument("--make-carry", metavar="DIR", help="copy this interpreter's bitsandbytes into DIR and exit")
    args = p.parse_args(argv)
    args.budget = args.budget or (1200 if args.tiny else 480)
    if not args.make_carry and not args.out:
        p.error("give the folder for the log and the JSON (or --make-carry DIR)")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.make_carry:
        make_carry(args.make_carry)
    else:
        main(args)
