"""Training throughput, peak memory and FLOP utilisation of nanotune, optionally against transformers + peft.

    python bench/bench.py --mode lora-bf16                      # nanotune alone, Pythia-70m shape
    python bench/bench.py --mode lora-fp32 --compare-hf         # side by side with GPTNeoXForCausalLM + peft
    python bench/bench.py --mode nf4 --hidden 768 --layers 12 --heads 12 --seq 512
    python bench/bench.py --family llama --kv-heads 2 --compare-hf  # Llama-3.2-1B's proportions, LlamaForCausalLM
    python bench/bench.py --mode lora-bf16 --compile --profile 3    # eager and compiled nanotune; where a step goes
    python bench/bench.py --mode nf4 --dora --lora-dropout 0.1      # DoRA beside LoRA, both on the NF4 base

What one run does:
  1. Builds a random model of the requested family and shape (seeded) and writes it once with
     nanotune.models.save_pretrained to a temporary folder. Every framework loads that same folder,
     so both train the identical model on the identical random token batches. --family gpt_neox is
     Pythia's layout; --family llama has Llama 3.2's proportions (SwiGLU MLP 4 x hidden, grouped-query
     attention, vocabulary 128256, the head tied to the embedding, rope_theta 500000). LoRA goes on
     the family's default targets (PEFT's): query_key_value for GPT-NeoX, q_proj and v_proj for Llama.
  2. Speed, in this process: each runner (nanotune; with --compile also nanotune with its blocks
     compiled as train.py --compile compiles them; with --compare-hf also transformers + peft, in
     its bf16 variants) is built exactly as its users would build it, runs --warmup untimed steps
     (with --compile the first step of each is printed: the compiled runner's compiles; --dora adds
     nanotune with DoRA on the same targets, and its ratio to LoRA), then the
     runners take turns running --block timed steps each until every one has run --steps.
     Interleaving spreads the noise of a shared machine evenly over the frameworks, so the
     ratios stay meaningful even when the absolute numbers drift. Besides tokens per
     wall-clock second the table gives tokens per CPU-second of the process (user + system time),
     which another program on the same cores disturbs far less; with --threads 1 it is the
     steadier ratio on a shared machine.
  3. Memory, one subprocess per runner (bench.py re-invokes itself with --only RUNNER and reads
     back one JSON line), because peak RSS is a per-process figure. Each child resets the
     kernel's high-water mark (/proc/self/clear_refs) after its imports and reports the peak RSS
     over building and training, and that peak minus its RSS before building the model (the
     training footprint: weights, gradients, optimizer state, activations). Lazy imports
     (torch._dynamo on the first AdamW step, bitsandbytes, transformers) are paid before that
     baseline. On CUDA it also reports torch.cuda.max_memory_allocated.
  4. FLOP utilisation: model FLOPs per token / measured peak, counted from the Linear layers the
     model holds (a tied head once: it is one Linear whose weight the embedding shares). A Linear of
     N weights costs 2N per token forward; training touches it ~4N when it is frozen (forward + input
     gradient; no weight gradient) and ~6N when it trains (full fine-tune, and the LoRA matrices).
     Causal attention's two (T x hs) matmuls cost 2*2*T*(heads*hs) per token per layer forward
     (counted unmasked, as in PaLM's MFU; grouped-query attention shares k and v between query
     heads but runs every query head's matmuls) and 3x that in training, LoRA included: q, k and v
     need gradients either way. The peak is the best throughput of a dense GEMM at the
     model's own matmul shapes, forward (B*T, in) x (in, out) and backward (B*T, out) x (out, in),
     measured here in fp32 and bf16. On a CPU both sides are counted per CPU-second (training
     FLOPs per CPU-second / GEMM FLOPs per CPU-second), so a busy machine lowers neither alone;
     on an idle machine with every thread busy that equals the wall-clock MFU. On CUDA it is
     wall-clock and per GPU: the tokens/s of all processes divided by their number.

With --strategy ddp|fsdp, under torchrun, each process trains nanotune wrapped as train.py wraps it
on its own --batch rows (data parallelism: N processes train N times the rows per step), and
tokens/s counts all of them; bench/scaling.py runs that for 1 and 2 processes side by side.

transformers and peft are imported only for --compare-hf; nanotune never depends on them. HF loads
the folder with AutoModelForCausalLM, which picks GPTNeoXForCausalLM or LlamaForCausalLM from its
config. For HF's bf16 the bench runs both of its usual settings, autocast over fp32 weights and the
model loaded in bf16 (dtype=torch.bfloat16, peft keeps LoRA in fp32), and ratios use the faster one.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

import torch.nn as nn

from nanotune.compile import compile_blocks
from nanotune.lora import inject_lora
from nanotune.models import from_pretrained, gpt_neox, llama, save_pretrained
from nanotune.precision import cast_frozen, resolve
from nanotune.quantize import quantize, weight_bytes

MODES = {  # mode -> (LoRA?, default precision, quantized bits)
    "lora-fp32": (True, "32", None), "lora-bf16": (True, "bf16", None), "full": (False, "32", None),
    "int8": (True, "32", 8), "nf4": (True, "32", 4)}
FAMILIES = {"gpt_neox": gpt_neox.GPTNeoX, "llama": llama.Llama}  # --family -> model class
VOCAB = {"gpt_neox": 50304, "llama": 128256}  # --vocab's default: Pythia's, Llama 3's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", default="lora-bf16", choices=list(MODES), help="what to train (default: %(default)s)")
    a("--family", default="gpt_neox", choices=list(FAMILIES), help="architecture: GPT-NeoX (Pythia) or Llama "
      "(3.2's proportions: SwiGLU, grouped-query attention, tied head) (default: %(default)s)")
    a("--precision", help="override the mode's precision (32, bf16, bf16-true); int8/nf4 default to 32")
    a("--hidden", type=int, default=512, help="hidden size C (default: Pythia-70m's 512)")
    a("--layers", type=int, default=6, help="transformer blocks (default: %(default)s)")
    a("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    a("--kv-heads", type=int, help="--family llama: key/value heads, which query heads share in groups "
      "(default: heads / 4, as Llama 3.2's 32 and 8)")
    a("--intermediate", type=int, help="MLP width (default: 4 x hidden)")
    a("--vocab", type=int, help="vocabulary size (default: 50304 for gpt_neox, Llama 3's 128256 for llama)")
    a("--seq", type=int, default=256, help="tokens per row T (default: %(default)s)")
    a("--batch", type=int, default=4, help="rows per step B (default: %(default)s)")
    a("--lora-r", type=int, default=8, help="LoRA rank on the family's default targets, query_key_value or "
      "q_proj and v_proj (default: %(default)s)")
    a("--lora-alpha", type=float, default=16, help="LoRA alpha (default: %(default)s)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on LoRA's input; DoRA then computes W x a second "
      "time, on the dropped input (default: %(default)s)")
    a("--dora", action="store_true", help="also time nanotune with DoRA (train.py's --use-dora) beside LoRA in the "
      "same run (with --compare-hf, peft's DoRA beside peft's LoRA too); with --strategy, only DoRA")
    a("--grad-checkpoint", action="store_true", help="recompute each block in the backward (train.py's flag; "
      "transformers' gradient_checkpointing_enable for HF)")
    a("--steps", type=int, default=12, help="timed steps per runner (default: %(default)s)")
    a("--warmup", type=int, default=2, help="untimed steps per runner first (default: %(default)s)")
    a("--block", type=int, default=3, help="steps a runner runs before the next takes its turn (default: %(default)s)")
    a("--compare-hf", action="store_true", help="also train the same model in transformers + peft")
    a("--compile", action="store_true", help="also time nanotune with train.py's --compile (each block compiled, "
      "nanotune.compile) beside eager nanotune in the same run; with --strategy, only compiled")
    a("--no-memory", action="store_true", help="skip the per-runner subprocesses that measure peak memory")
    a("--profile", type=int, default=0, metavar="N", help="after timing, profile N steps of each runner "
      "with torch.profiler and print the top operators by self time")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a("--strategy", default="none", choices=["none", "ddp", "fsdp"], help="under torchrun: nanotune wrapped "
      "as train.py wraps it, --batch rows per process; tokens/s counts every process (default: %(default)s)")
    a("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core); on a machine "
      "shared with other work, 1 avoids OpenMP threads waiting on a descheduled sibling")
    a("--seed", type=int, default=0, help="seed for the model weights and the token batches")
    # Internal: the memory children.
    a("--only", help=argparse.SUPPRESS)  # run only this runner, print one JSON line
    a("--model-dir", help=argparse.SUPPRESS)  # the folder the parent wrote
    args = p.parse_args(argv)
    args.vocab = args.vocab or VOCAB[args.family]
    if args.family == "llama":
        args.kv_heads = max(1, args.heads // 4) if args.kv_heads is None else args.kv_heads
        if args.kv_heads < 1 or args.heads % args.kv_heads:
            p.error(f"--kv-heads {args.kv_heads} must be a positive divisor of --heads {args.heads}: query "
                    "heads share key/value heads in equal groups")
    elif args.kv_heads is not None:
        p.error("--kv-heads applies to --family llama only (GPT-NeoX gives every query head its own k and v)")
    return args


# ---- the model, the data, the FLOP count -------------------------------------------------------

def make_config(args):
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, intermediate_size=args.intermediate or 4 * args.hidden,
                 max_position_embeddings=max(2048, args.seq))
    if args.family == "gpt_neox":
        return gpt_neox.Config(**shape)
    return llama.Config(model_type="llama", num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
                        rope_theta=500000.0, rms_norm_eps=1e-5, **shape)  # Llama 3.2 1B's settings


def write_model(args, path):
    """A random model with both families' init (normal, std 0.02; biases zero), saved in HF layout."""
    torch.manual_seed(args.seed)
    model = FAMILIES[args.family](make_config(args))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    save_pretrained(model, path)


def batches(args, n=4):
    """n fixed (B, T) token batches. nanotune takes labels already shifted (-100 where no next token);
    transformers shifts them itself, so it gets the ids: both train on the same B*(T-1) targets."""
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        labels = torch.cat((ids[:, 1:], torch.full((args.batch, 1), -100)), dim=1)
        out.append((ids, labels))
    return out


def flops_per_token(model, seq):
    """Training FLOPs per token of a nanotune model, from its Linear layers (LoRA's, quantized ones
    and the head included) and its attention width (docstring, point 4)."""
    linears = sum((6 if m.weight.requires_grad else 4) * m.in_features * m.out_features
                  for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    attention = config.num_hidden_layers * 2 * 2 * seq * config.num_attention_heads * config.head_dim
    return linears + 3 * attention


def base_bytes(module):
    """Bytes of the frozen base as this mode stores it: the state dict (quantization state included,
    a tied tensor once) less LoRA's matrices."""
    return weight_bytes(module) - sum(p.nbytes for name, p in module.named_parameters() if ".lora_" in name)


def linear_shapes(model):
    """The distinct (in, out) shapes of the model's Linear layers, LoRA's low-rank ones aside."""
    return sorted({(m.in_features, m.out_features) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and ".lora_" not in name})


def matmul_peak(shapes, tokens, dtype, device):
    """Best FLOP/s of a GEMM at the model's shapes (M = B*T tokens), forward and input-gradient;
    per wall-clock second on CUDA, per CPU-second of this process on a CPU. A CUDA GEMM at these
    shapes can take microseconds, so there each timing spans 20 queued GEMMs, not one launch and sync."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    reps = 20 if device.type == "cuda" else 1
    best = 0.0
    for k, n in shapes:
        for k_, n_ in ((k, n), (n, k)):  # forward x W^T, then the input gradient dy W
            x, w = torch.randn(tokens, k_, dtype=dtype, device=device), torch.randn(k_, n_, dtype=dtype, device=device)
            times = []
            for _ in range(3):
                sync(device)
                t = clock()
                for _ in range(reps):
                    x @ w
                sync(device)
                times.append((clock() - t) / reps)
            best = max(best, 2 * tokens * k_ * n_ / min(times[1:]))
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the runners: nanotune as train.py wires it, and transformers + peft ----------------------

class Runner:
    """One model + optimizer + the precision context of its forward; step() is one training step."""

    def __init__(self, name, model, context, compute_dtype, hf):
        self.name, self.model, self.context, self.compute_dtype, self.hf = name, model, context, compute_dtype, hf
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.times, self.cpu_times, self.losses = [], [], []

    def step(self, input_ids, labels):
        """One step; returns (wall seconds, CPU seconds of this process)."""
        sync(input_ids.device)
        t, cpu = time.perf_counter(), time.process_time()
        with self.context():
            if self.hf:  # mean over the shifted targets
                loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            else:  # train.py: the summed loss over the batch's token count
                loss = self.model(input_ids, labels) / (labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        sync(input_ids.device)
        return time.perf_counter() - t, time.process_time() - cpu


def nanotune_model(args, path, device, dora=False):
    """The model as train.py builds it for this mode (with DoRA if dora), and its precision."""
    lora, precision_name, bits = MODES[args.mode]
    precision = resolve(args.precision or precision_name, device)
    model = from_pretrained(path, device="cpu" if bits else device)  # a base reaches the GPU quantized
    model.grad_checkpoint = args.grad_checkpoint
    if bits:
        quantize(model, bits, precision.compute_dtype, device=device)
    if lora:
        inject_lora(model, model.lora_targets, args.lora_r, args.lora_alpha, dropout=args.lora_dropout, dora=dora)
    else:
        model.requires_grad_(True)
    return cast_frozen(model, precision).to(device).train(), precision


def build_nanotune(args, path, device, name="nanotune"):
    model, precision = nanotune_model(args, path, device, dora=name == "nanotune-dora")
    if name == "nanotune-compile":
        compile_blocks(model)
    return Runner(name, model, lambda: precision.context(device), precision.compute_dtype, hf=False)


def hf_variants(args, device):
    """The transformers settings to run for this mode: name -> (weight dtype, autocast dtype or None)."""
    precision = resolve(args.precision or MODES[args.mode][1], device)
    if precision.name == "bf16-mixed":
        return {"hf-autocast": (torch.float32, torch.bfloat16), "hf-bf16-weights": (torch.bfloat16, None)}
    if precision.name == "bf16-true":
        return {"hf-bf16-weights": (torch.bfloat16, None)}
    return {"hf": (torch.float32, None)}


def build_hf(args, path, device, name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    lora, _, bits = MODES[args.mode]
    dtype, autocast = hf_variants(args, device)[name.removesuffix("-dora")]
    quant = None
    if bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    elif bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=autocast or dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                 quantization_config=quant, device_map={"": device})
    if args.grad_checkpoint:  # non-reentrant, as nanotune's: no need for inputs that require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:  # peft keeps the adapter in fp32 over a bf16 base (autocast_adapter_dtype=True)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout,
                                                 target_modules=list(FAMILIES[args.family].lora_targets),
                                                 use_dora=name.endswith("-dora"), task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    model.train()
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    return Runner(name, model, context, autocast or dtype, hf=True)


def build(args, path, device, name):
    if name.startswith("nanotune"):
        return build_nanotune(args, path, device, name)
    return build_hf(args, path, device, name)


# ---- memory ---------------------------------------------------------------------------------------

def rss_kb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def measure_memory(args, device, batch_list):
    """The child: build one runner, train warm-up + a few steps, print its peaks as one JSON line."""
    # Pay for lazy imports before the baseline, alike for every runner: they are not training memory.
    # The first AdamW step imports torch._dynamo (~80 MB), a quantized mode bitsandbytes (~50 MB).
    warm = torch.nn.Linear(8, 8, device=device)
    optimizer = torch.optim.AdamW(warm.parameters())
    warm(torch.randn(2, 8, device=device)).sum().backward()
    optimizer.step()
    if MODES[args.mode][2]:
        import bitsandbytes  # noqa: F401
    if not args.only.startswith("nanotune"):
        import peft  # noqa: F401
        import transformers  # noqa: F401
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS (Linux >= 4.0)
    runner = build(args, args.model_dir, device, args.only)
    for i in range(args.warmup + args.steps):
        ids, labels = batch_list[i % len(batch_list)]
        runner.step(ids.to(device), labels.to(device))
    peak = rss_kb("VmHWM")
    out = {"runner": args.only, "peak_rss_mb": peak / 1024, "train_rss_mb": (peak - base) / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def memory_children(args, names):
    found = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--only", name, "--model-dir",
               args.model_dir, "--steps", "2", "--warmup", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"memory run of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        found[name] = json.loads(lines[-1])
    return found


# ---- the parent: interleaved timing, table ---------------------------------------------------------

def profile(runner, batch_list, steps, device, gemm_flops):
    """The top operators by self time, then the step by family of operator (op_family); gemm_flops: the
    Linear layers' FLOPs per step, whose rate the GEMMs' line gives (to set against the matmul peak)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            ids, labels = batch_list[i % len(batch_list)]
            runner.step(ids.to(device), labels.to(device))
    print(f"\n== profile: {runner.name}, {steps} steps ==")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # CPU time on CUDA is launches
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40))
    families = {}
    for event in prof.events():
        family = op_family(event)
        families[family] = families.get(family, 0) + getattr(event, sort) / 1e3 / steps  # ms per step
    total = sum(families.values())
    print(f"by family, {'GPU' if device.type == 'cuda' else 'CPU'} ms per step:")
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        rate = f" ({gemm_flops / ms / 1e6:.0f} GFLOP/s)" if family == "GEMMs" and ms else ""
        print(f"  {family + rate:<64} {ms:8.1f} {ms / total:6.1%}")
    print(f"  {'total':<64} {total:8.1f}")


def op_family(event):
    """Where a profiled operator's self time goes: its family, by its name and its callers'."""
    name, callers, parent = event.name, [], event.cpu_parent
    while parent is not None:
        callers.append(parent.name)
        parent = parent.cpu_parent
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "GEMMs"
    if "attention" in name:
        return "attention (SDPA's kernels)"
    if "LinearCrossEntropy" in callers or any(s in name for s in ("softmax", "nll_loss", "cross_entropy")):
        return "the loss around the head's GEMMs (softmax passes, casts, fills)"
    if "_foreach_" in name or any(c.startswith("Optimizer.") for c in callers):
        return "AdamW and gradient clipping"
    if "Compiled" in name or "TorchDynamo" in name:
        return "compiled blocks: inductor's fused kernels"
    if name in ("aten::copy_", "aten::_to_copy"):
        return "casts (autocast's, .to(dtype))"
    if "norm" in name:
        return "norms"
    if any(s in name for s in ("gelu", "silu", "sigmoid")):
        return "activations"
    return "the rest: rotary, residual adds, RMSNorm's parts, embedding, fills"


def run_distributed(args):
    """One rank of `torchrun --nproc_per_node N bench.py --strategy ddp|fsdp`. Each rank trains its
    own rows; every step ends in a collective, so rank 0's step time is the slowest rank's."""
    from nanotune.distributed import compute_cleanup, compute_init, wrap_ddp, wrap_fsdp
    world = compute_init(args.strategy, args.device)
    with tempfile.TemporaryDirectory() as tmp:  # the same seeded weights on every rank
        write_model(args, tmp)
        model, precision = nanotune_model(args, tmp, world.device, dora=args.dora)
    flops, shapes = flops_per_token(model, args.seq), linear_shapes(model)
    if args.compile:  # before the wrapper, as train.py does
        compile_blocks(model)
    if world.strategy == "ddp":
        model = wrap_ddp(model, world)
    else:
        model = wrap_fsdp(model, world, autocast_dtype=precision.autocast_dtype)
    name = f"nanotune{'-compile' if args.compile else ''}{'-dora' if args.dora else ''} {world.strategy} x{world.size}"
    runner = Runner(name, model, lambda: precision.context(world.device), precision.compute_dtype, hf=False)
    args.seed += world.rank
    batch_list = batches(args)
    for i in range(args.warmup + args.steps):
        wall, cpu = runner.step(*(t.to(world.device) for t in batch_list[i % len(batch_list)]))
        if i >= args.warmup:
            runner.times.append(wall)
            runner.cpu_times.append(cpu)
    if world.is_main:
        report(args, [runner], flops, shapes, {}, world.device, world.size)
    compute_cleanup()


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # synchronize() and the peak-memory calls take the current GPU
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.strategy != "none":
        return run_distributed(args)
    batch_list = batches(args)
    if args.only:
        return measure_memory(args, device, batch_list)
    names = ["nanotune"] + (["nanotune-compile"] if args.compile else []) + (["nanotune-dora"] if args.dora else [])
    if args.compare_hf:
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            sys.exit("--compare-hf needs transformers and peft: pip install transformers peft")
        variants = list(hf_variants(args, device))
        names += variants + ([f"{n}-dora" for n in variants] if args.dora else [])
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = tmp
        write_model(args, tmp)
        memory = {} if args.no_memory else memory_children(args, names)
        runners = [build(args, tmp, device, name) for name in names]
        flops, shapes = flops_per_token(runners[0].model, args.seq), linear_shapes(runners[0].model)
        first = {}  # each runner's first step (wall seconds): nanotune-compile's includes compiling
        for r in runners:  # warm-up: first-call allocations, oneDNN kernel selection, compilation
            for i in range(args.warmup):
                wall, _ = r.step(*(t.to(device) for t in batch_list[i % len(batch_list)]))
                first.setdefault(r.name, wall)
        if args.compile and "nanotune" in first:
            print(f"first step: nanotune {first['nanotune']:.1f} s, nanotune-compile {first['nanotune-compile']:.1f} s "
                  "(compiling the blocks' forward and backward)")
        done = 0
        while done < args.steps:  # take turns, reversing the order each round
            n = min(args.block, args.steps - done)
            for r in runners if (done // args.block) % 2 == 0 else runners[::-1]:
                for i in range(done, done + n):
                    wall, cpu = r.step(*(t.to(device) for t in batch_list[i % len(batch_list)]))
                    r.times.append(wall)
                    r.cpu_times.append(cpu)
            done += n
        if args.profile:
            gemm_flops = flops_per_token(runners[0].model, 0) * args.batch * args.seq  # seq 0: Linears only
            for r in runners:
                profile(r, batch_list, args.profile, device, gemm_flops)

    report(args, runners, flops, shapes, memory, device)


def report(args, runners, flops, shapes, memory, device, world_size=1):
    """The table. tokens/s counts all `world_size` processes; tokens per CPU-second and MFU are this process's.
    flops: nanotune's training FLOPs per token, which every runner is credited with (the same model)."""
    tokens, nan, config = args.batch * args.seq, float("nan"), make_config(args)
    peaks = {dt: matmul_peak(shapes, tokens, dt, device) for dt in {r.compute_dtype for r in runners}}
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)  # GPT-NeoX: one per head
    print(f"\n{args.family}, mode {args.mode}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads, {kv_heads} kv heads, vocab {config.vocab_size}"
          f"{', tied head' if config.tie_word_embeddings else ''}, batch {args.batch} x seq {args.seq}, "
          f"{args.steps} timed steps each ({args.block} per turn) after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads on {device.type}")
    print(f"matmul peak at the model's shapes, per {'second' if device.type == 'cuda' else 'CPU-second'}: " + ", ".join(
        f"{str(dt).removeprefix('torch.')} {peak / 1e9:.0f} GFLOP/s" for dt, peak in peaks.items()))
    print(f"model FLOPs per training token: {flops / 1e6:.0f} M")
    head = f"{'runner':<16} {'tokens/s':>8} {'tok/CPU-s':>9} {'step ms':>7} {'MFU':>6} {'loss[0]':>8} " \
           f"{'peak RSS MB':>11} {'train RSS MB':>12}" + (" CUDA MB" if device.type == "cuda" else "")
    print(head + "\n" + "-" * len(head))
    results = {}
    for r in runners:
        tps = world_size * tokens * len(r.times) / sum(r.times)
        cpu_tps = tokens * len(r.cpu_times) / sum(r.cpu_times)
        rate = tps / world_size if device.type == "cuda" else cpu_tps  # per GPU or per process: docstring, point 4
        mfu = flops * rate / peaks[r.compute_dtype]
        mem = memory.get(r.name, {})
        results[r.name] = {"tokens_per_s": tps, "tokens_per_cpu_s": cpu_tps, "mfu": mfu, **mem}
        print(f"{r.name:<16} {tps:>8.0f} {cpu_tps:>9.0f} {1000 * sorted(r.times)[len(r.times) // 2]:>7.0f} "
              f"{mfu:>6.1%} {r.losses[0]:>8.4f} {mem.get('peak_rss_mb', nan):>11.0f} "
              f"{mem.get('train_rss_mb', nan):>12.0f}"
              + (f" {mem.get('cuda_max_allocated_mb', nan):>7.0f}" if device.type == "cuda" else ""))
    if args.strategy == "none":  # a DDP- or FSDP-wrapped model has other names, and FSDP's holds shards
        model = runners[0].model  # the quantized Linears live in the transformer blocks
        whole, blocks = base_bytes(model), base_bytes(model.blocks)
        results["nanotune"].update(base_mb=whole / 2**20, blocks_mb=blocks / 2**20)
        print(f"\nnanotune's base weights as this mode stores them: {whole / 2**20:.1f} MB, "
              f"of which the transformer blocks {blocks / 2**20:.1f} MB")
    ours, theirs = [r.name for r in runners if not r.hf], [r.name for r in runners if r.hf]
    pairs = [("nanotune-compile", "nanotune", "eager")] if "nanotune-compile" in ours else []
    pairs += [("nanotune-dora", "nanotune", "LoRA")] if "nanotune-dora" in ours else []
    for name in ours if theirs else ():  # LoRA against peft's LoRA, DoRA against peft's DoRA
        alike = [t for t in theirs if t.endswith("-dora") == name.endswith("-dora")]
        pairs.append((name, max(alike, key=lambda t: results[t]["tokens_per_s"]), "the fastest HF setting"))
    for a, b, what in pairs:
        nt, hf = results[a], results[b]
        print(f"\n{a} / {b} ({what}): "
              f"tokens/s x{nt['tokens_per_s'] / hf['tokens_per_s']:.2f}"
              f", tokens per CPU-second x{nt['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}"
              + (f", peak RSS x{nt['peak_rss_mb'] / hf['peak_rss_mb']:.2f}, "
                 f"train RSS x{nt['train_rss_mb'] / hf['train_rss_mb']:.2f}" if "peak_rss_mb" in nt and
                 "peak_rss_mb" in hf else ""), end="")
    print()
    print("json " + json.dumps({"family": args.family, "mode": args.mode, "seq": args.seq, "hidden": args.hidden,
                                "kv_heads": kv_heads, "results": results}))


if __name__ == "__main__":
    main(parse_args())
