"""Fine-tune a GPT-NeoX (Pythia) model with LoRA or in full. The one entry point for every setup.

    python train.py                                    # the default job: LoRA on the bundled tiny model
    python train.py --model pythia-410m --data my.json --out runs/x --precision bf16
    torchrun --nproc_per_node 4 train.py --strategy fsdp ...    # or ./launch.sh, for many nodes

Read top to bottom: flags -> distributed init -> model -> LoRA -> precision -> wrap (DDP/FSDP)
-> optimizer -> data -> resume -> loop (checkpoints) -> save.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

from nanotune import UserError
from nanotune.checkpoint import (atomic_dir, check_writable, damaged, find_checkpoint, local_state, read_state,
                                 read_trainer, restore_local_state, restore_rng, save_checkpoint)
from nanotune.data import Batches, collate, eos_id, load_examples, load_tokenizer, split
from nanotune.distributed import (all_reduce_sum, barrier, broadcast_from_rank0, compute_cleanup, compute_init,
                                  deepspeed_config, ds_load_optimizer_state, ds_optimizer_state, full_state_dict,
                                  print0, wrap_ddp, wrap_deepspeed, wrap_fsdp)
from nanotune.generate import generate
from nanotune.lora import inject_lora, load_adapter, save_adapter
from nanotune.merge import merge_adapter
from nanotune.model import from_pretrained, save_pretrained
from nanotune.precision import ALIASES, CHOICES as PRECISIONS, cast_frozen, resolve
from nanotune.quantize import quant_bits, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
# No fp16: AdamW adds eps = 1e-8 to sqrt(v), which is 0 in fp16, so fp16 weights turn NaN on their first
# update; and fp16-mixed's gradient scaler refuses fp16 gradients. Under --precision 16 fp32 LoRA
# weights compute in fp16 anyway.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Flags that do not change the math of a run: a resume may change these and nothing else.
RESUMABLE = {"out", "overwrite", "resume", "device", "log_every", "eval_every", "eval_exact_match", "save_every",
             "keep", "merge", "local_rank"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the docstring's line breaks."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("model and data").add_argument
    a("--model", default=os.path.join(HERE, "assets", "tiny-neox"),
      help="HF-layout GPT-NeoX folder: config.json, *.safetensors, tokenizer.json")
    a("--num-layers", type=int, default=-1, help="keep only the first N transformer blocks (-1: all)")
    a("--data", default=os.path.join(HERE, "assets", "data", "train.jsonl"),
      help="training rows, .json or .jsonl: Alpaca, ShareGPT or {text}")
    a("--val-data", help="held-out rows for evaluation (None: hold out --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.05, help="share of --data held out when --val-data is not given")
    a("--max-seq-len", type=int, default=256, help="rows are cut to this many tokens")
    a("--train-on-prompt", action="store_true", help="also train on prompt tokens, not only responses")
    a = p.add_argument_group("LoRA").add_argument
    a("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA; --no-lora fine-tunes every weight")
    a("--lora-r", type=int, default=8, help="rank r of the update B A")
    a("--lora-alpha", type=float, default=32, help="the update is scaled by alpha / r")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the input of A")
    a("--lora-target", nargs="+", default=["query_key_value"],
      help="Linear modules to adapt, by name or dotted suffix; 'all-linear' = all but the output head")
    a("--lora-bias", default="none", choices=["none", "all", "lora_only"],
      help="which biases train with the adapter: none, every bias, or those of adapted layers")
    a("--modules-to-save", nargs="+", default=[], help="modules trained in full and saved with the adapter")
    a("--lora-dtype", default="fp32", choices=list(DTYPES), help="dtype of the LoRA weights (no fp16: AdamW's "
      "eps underflows there; under --precision 16 fp32 weights compute in fp16)")
    a("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    a("--lora-layers", type=int, nargs="+", help="adapt only these block indices (None: every block)")
    a("--adapter", help="start from this PEFT-format adapter folder instead of a fresh LoRA")
    a("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")
    a = p.add_argument_group("optimisation").add_argument
    a("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs passes over the data)")
    a("--epochs", type=float, default=4, help="passes over the training rows, when --max-steps is -1")
    a("--batch-size", type=int, default=16, help="rows per micro-batch, per process")
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup-steps", type=int, default=20, help="linear warm-up steps, then cosine decay to lr / 10")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    a("--grad-checkpoint", action="store_true", help="keep only each block's input and recompute its "
      "activations in the backward: activation memory of one block instead of all, ~1/3 more compute")
    a("--seed", type=int, default=42, help="seed for LoRA init, data order and dropout")
    a("--precision", default="32", choices=PRECISIONS, help="32 | bf16 (bf16-mixed) | 16 (fp16-mixed) | bf16-true")
    a = p.add_argument_group("quantized base (needs bitsandbytes: pip install nanotune[int8])").add_argument
    a("--load-in-8bit", action="store_true", help="hold the frozen base Linears in int8 (LLM.int8())")
    a("--load-in-4bit", action="store_true", help="hold the frozen base Linears in 4-bit NF4 (QLoRA)")
    a("--double-quant", action="store_true", help="with --load-in-4bit, also quantize the block scales")
    a = p.add_argument_group("distributed").add_argument
    a("--strategy", default="auto", choices=["auto", "none", "ddp", "fsdp", "deepspeed"],
      help="auto: ddp when torchrun starts several processes, else none")
    a("--fsdp-sharding", default="full", choices=["full", "grad-op", "hybrid"],
      help="FULL_SHARD, SHARD_GRAD_OP, or HYBRID_SHARD (shard in a node, replicate across nodes)")
    a("--fsdp-prefetch", action="store_true", help="prefetch the next block's weights in forward and backward")
    a("--fsdp-offload", action="store_true", help="keep sharded parameters and gradients in CPU memory")
    a("--zero-stage", type=int, choices=[0, 1, 2, 3],
      help="DeepSpeed ZeRO stage: partition optimizer state (1), + gradients (2), + parameters (3) (None: 0)")
    a("--zero-offload", action="store_true", help="DeepSpeed: keep the optimizer partitions in CPU memory")
    a("--deepspeed-config", help="a DeepSpeed JSON config merged over the one the flags build")
    a("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    a = p.add_argument_group("run").add_argument
    a("--out", default="out", help="output folder: metrics.jsonl, checkpoints/, adapter/ or model/")
    a("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    a("--resume", nargs="?", const="latest",
      help="continue from the newest checkpoint in --out, or from the checkpoint folder given")
    a("--save-every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    a("--keep", type=int, default=2, help="keep the newest K checkpoints (0: all)")
    a("--device", help="cpu, cuda or cuda:N (None: cuda if available)")
    a("--log-every", type=int, default=10, help="print and record the training loss every N steps")
    a("--eval-every", type=int, default=50, help="evaluate every N steps (0: only at the end)")
    a("--eval-exact-match", type=int, default=64,
      help="held-out rows scored by greedy generation == reference, before and after training (0: off)")
    return p.parse_args(argv)


def check_args(args):
    for flag, value in (("--lr", args.lr), ("--lora-alpha", args.lora_alpha), ("--epochs", args.epochs)):
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} must be > 0 and finite, got {value}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--grad-accum", args.grad_accum, 1),
                             ("--max-seq-len", args.max_seq_len, 2), ("--log-every", args.log_every, 1),
                             ("--eval-every", args.eval_every, 0), ("--eval-exact-match", args.eval_exact_match, 0),
                             ("--save-every", args.save_every, 0), ("--keep", args.keep, 0),
                             ("--max-grad-norm", args.max_grad_norm, 0), ("--weight-decay", args.weight_decay, 0)):
        if not (value >= low and math.isfinite(value)):
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.max_steps != -1 and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1 (or -1 to use --epochs), got {args.max_steps}")
    if args.load_in_8bit and args.load_in_4bit:
        raise UserError("--load-in-8bit and --load-in-4bit contradict each other; choose one")
    if quant_bits(args) and not (args.lora or args.adapter):
        raise UserError("a quantized base cannot be trained in full; drop --no-lora or the --load-in-* flag")
    if args.double_quant and not args.load_in_4bit:
        raise UserError("--double-quant applies to --load-in-4bit only")
    if args.merge and not (args.lora or args.adapter):
        raise UserError("--merge folds a LoRA adapter into the base; a full fine-tune (--no-lora) writes the whole "
                        "model already, so drop --merge")
    if args.strategy == "deepspeed" and ALIASES.get(args.precision, args.precision) == "16-mixed":
        raise UserError("--precision 16 is not offered with --strategy deepspeed: DeepSpeed runs the backward pass "
                        "itself, so nanotune's fp16 loss scaling cannot guard it; use --precision bf16 or 32")
    if (args.zero_stage is not None or args.zero_offload or args.deepspeed_config) and args.strategy != "deepspeed":
        raise UserError("--zero-stage, --zero-offload and --deepspeed-config apply to --strategy deepspeed only")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")) and not (args.overwrite or args.resume):
        raise UserError(f"--out {args.out} holds a previous run; pass --resume to continue it, --overwrite to "
                        "replace it, or choose another --out")
    check_writable(args.out)


# What --adapter takes from the adapter's adapter_config.json: flag -> (args name, config key).
ADAPTER_SHAPE = {"--lora-r": ("lora_r", "r"), "--lora-alpha": ("lora_alpha", "lora_alpha"),
                 "--lora-target": ("lora_target", "target_modules"), "--lora-bias": ("lora_bias", "bias"),
                 "--modules-to-save": ("modules_to_save", "modules_to_save"), "--rslora": ("rslora", "use_rslora"),
                 "--lora-layers": ("lora_layers", "layers_to_transform"),
                 "--lora-dropout": ("lora_dropout", "lora_dropout")}


def check_adapter_flags(args, config):
    """A flag changed from its default that contradicts the loaded adapter would be silently ignored."""
    defaults = parse_args([])
    for flag, (name, key) in ADAPTER_SHAPE.items():
        given, default, saved = getattr(args, name), getattr(defaults, name), config[key]
        if key == "target_modules" and saved == "all-linear":
            saved = ["all-linear"]
        if given != default and given != saved:
            raise UserError(f"{flag} {given} contradicts the adapter's {key} = {saved} in {args.adapter}; "
                            f"--adapter continues the adapter as it was configured, so drop {flag}")


def check_combination(args, strategy, d):
    """Flags that contradict the strategy or the device, once both are known."""
    if quant_bits(args) and strategy == "deepspeed":
        raise UserError("a quantized base (--load-in-8bit/4bit) is not supported with --strategy deepspeed; "
                        "use --strategy ddp")
    if args.load_in_8bit and strategy == "fsdp":
        raise UserError("--load-in-8bit cannot be sharded by FSDP (bitsandbytes' int8 weights carry row scales "
                        "FSDP cannot split); use --strategy ddp")
    if args.load_in_4bit and strategy == "fsdp" and args.precision == "bf16-true":
        raise UserError("--precision bf16-true with --load-in-4bit is not supported under --strategy fsdp (FSDP2 "
                        "cannot all-gather a block whose packed 4-bit codes sit beside both bf16 weights and fp32 "
                        "LoRA weights); use --precision bf16")
    if args.fsdp_offload and (strategy != "fsdp" or d.device.type != "cuda"):
        raise UserError("--fsdp-offload moves FSDP's shards from GPU to CPU memory; it needs --strategy fsdp "
                        "on CUDA (on a CPU run the weights are in CPU memory already)")


def check_resume(saved: dict, args, world_size: int):
    """Refuse a resume whose flags would change the math of the run it continues."""
    now = {**vars(args), "world_size": world_size}
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE and saved.get(key) != now.get(key):
            flag = "the number of processes" if key == "world_size" else "--" + key.replace("_", "-")
            raise UserError(f"cannot resume: {flag} was {saved.get(key)!r} in the checkpoint but is "
                            f"{now.get(key)!r} now; a resumed run must repeat the original's flags")


def checkpoint_state(model, strategy, d, named_trainable, optimizer):
    """The tensors this rank writes into a checkpoint (every rank must call: ZeRO-3 gathers).
    FSDP: each rank its shards. DeepSpeed: rank 0 the whole trainable weights, each rank its ZeRO
    optimizer partition. Otherwise every rank holds the same values and rank 0 writes them."""
    if strategy == "deepspeed":
        weights = full_state_dict(model, strategy, trainable_only=True)
        return {**{f"param.{k}": v for k, v in weights.items()}, **ds_optimizer_state(model, optimizer)}
    return local_state(named_trainable, optimizer) if strategy == "fsdp" or d.is_main else None


def lr_at(step, args, total):
    """Linear warm-up to --lr, then cosine decay to lr / 10 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer_step(optimizer, scaler, params, max_grad_norm, step):
    """Unscale (fp16), clip, step, and clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the step if a gradient overflowed, then lowers the scale
        scaler.update()
        if scaler.get_scale() < scale:
            print0(f"step {step + 1}: fp16 gradients overflowed; step skipped, loss scale now {scaler.get_scale()}")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, d, precision):
    """Mean loss per response token over the held-out rows, each rank scoring a strided share.
    Shares are padded to equal length with a row that trains nothing, so under FSDP every rank
    runs the same number of forwards (each one is a collective)."""
    model.eval()
    mine = examples[d.rank::d.world_size]
    blank = type(examples[0])(examples[0].tokens, [False] * len(examples[0].tokens), [], "")
    mine += [blank] * (math.ceil(len(examples) / d.world_size) - len(mine))
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        input_ids, labels = collate(mine[i:i + batch_size], pad_id)
        with precision.context(d.device):
            total += float(model(input_ids.to(d.device), labels.to(d.device)))
        count += int((labels != -100).sum())
    model.train()
    total, count = all_reduce_sum([total, count])
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, examples, tokenizer, d, precision):
    """Share of rows whose greedy answer equals the reference response exactly. Every rank
    generates for every row: a sharded model needs all ranks in each forward."""
    model.eval()
    hits = 0
    for ex in examples:
        answer_len = len(tokenizer.encode(ex.reference, add_special_tokens=False).ids)
        with precision.context(d.device):
            new = generate(model, ex.prompt, max_new_tokens=answer_len + 4, eos=eos_id(tokenizer))
        hits += tokenizer.decode(new).strip() == ex.reference.strip()
    model.train()
    return hits / max(len(examples), 1)


class Metrics:
    """Every logged figure goes to the terminal and, as one JSON object per line, to OUT/metrics.jsonl
    (rank 0 only). A resumed run first drops the lines the interrupted run wrote after its checkpoint
    (resume_step), all of them when it stopped before its first checkpoint (-1)."""

    def __init__(self, out, enabled, resume_step=None):
        self.path, self.enabled = os.path.join(out, "metrics.jsonl"), enabled
        if enabled and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def log(self, text, **figures):
        print0(text)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(figures) + "\n")


def main(args):
    check_args(args)
    strategy, d = compute_init(args.strategy, args.device, cpu_collectives=args.fsdp_offload)
    try:
        train(args, strategy, d)
    finally:
        compute_cleanup()
    if args.merge and d.is_main:  # after the group is gone, so no rank waits (and times out) while rank 0 merges
        merge_adapter(args.model, os.path.join(args.out, "adapter"), os.path.join(args.out, "merged"),
                      args.num_layers, quant_bits(args), args.double_quant)
        print(f"saved {os.path.join(args.out, 'merged')} (the adapter folded into the base)", flush=True)


def train(args, strategy, d):
    precision = resolve(args.precision, d.device)
    check_combination(args, strategy, d)
    torch.manual_seed(args.seed)

    # Resume? Decided first, so a resume with other flags fails before anything is loaded.
    if args.overwrite and not args.resume and d.is_main:
        for name in ("metrics.jsonl", "checkpoints", "adapter", "model", "merged"):
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    barrier()
    checkpoint = find_checkpoint(args.out, args.resume) if args.resume else None
    if checkpoint:
        with damaged(checkpoint):
            trainer = read_trainer(checkpoint)
        check_resume(trainer["args"], args, d.world_size)
    elif args.resume:
        finished = [name for name in ("adapter", "model") if os.path.isdir(os.path.join(args.out, name))]
        if finished:
            raise UserError(f"--resume: {args.out} holds a finished run ({finished[0]}/) but no checkpoint to continue "
                            "from (it ran without --save-every); pass --overwrite to train again from step 0, or "
                            "choose another --out")
        print0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")

    # Model. Under FSDP only rank 0 reads the checkpoint, into CPU memory; the others build it on the
    # meta device and receive their shards from rank 0 when it is wrapped (CPU-RAM-efficient loading).
    # A quantized base is also read into CPU memory, and each Linear reaches the GPU only quantized,
    # so a base that fits the GPU only in 4 bits never sits there whole in fp32. A 4-bit base under
    # FSDP needs its quantization state on every rank: rank 0 broadcasts each base Linear's weight in
    # turn and every rank quantizes it (the same codes from the same weights), so the other ranks hold
    # at most one full-precision Linear at a time, next to the 4-bit ones until they are sharded.
    bits = quant_bits(args)
    on_meta = strategy == "fsdp" and not d.is_main
    load_to = "meta" if on_meta else "cpu" if bits or strategy == "fsdp" else d.device
    model = from_pretrained(args.model, num_layers=args.num_layers, device=load_to)
    model.grad_checkpoint = args.grad_checkpoint
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    if bits:  # before LoRA, so each LoRALinear wraps a quantized base layer
        quantize(model, bits, precision.compute_dtype, args.double_quant,
                 fetch=broadcast_from_rank0 if strategy == "fsdp" else None, device=d.device)
    if args.adapter:
        load_adapter(model, args.adapter, dtype=DTYPES[args.lora_dtype])
        check_adapter_flags(args, model.lora_config)
    elif args.lora:
        inject_lora(model, args.lora_target, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_bias,
                    args.modules_to_save, DTYPES[args.lora_dtype], args.rslora, args.lora_layers)
    else:
        model.requires_grad_(True)
    if bits and precision.autocast and model.lora_config["bias"] != "none":
        raise UserError(f"trained biases (bias mode {model.lora_config['bias']!r}) on a quantized base need "
                        "--precision 32: bitsandbytes casts its layers' biases to the compute dtype in place, so under "
                        f"{precision.name} they would train in {str(precision.compute_dtype)[6:]}; "
                        "or use --lora-bias none")
    core = model  # the unwrapped model: its config, lora_config and parameter names
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    # Precision, then the distributed wrapper, then the optimizer over what is trainable.
    model = cast_frozen(model, precision)
    mixed = precision.compute_dtype if precision.autocast else None  # the autocast dtype, if any
    if strategy == "fsdp":  # rank 0's full state lives only for the call: each rank then keeps its shards
        model = wrap_fsdp(model, d, args.fsdp_sharding, args.fsdp_prefetch, args.fsdp_offload, mixed,
                          model.state_dict() if d.is_main else None)
    else:
        model = model.to(d.device)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # sharded under FSDP
    params = [p for _, p in named_trainable]
    if strategy == "ddp":
        model = wrap_ddp(model, d)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = precision.scaler(d.device)
    if checkpoint and strategy == "deepspeed":  # ZeRO builds its fp32 partitions from the weights it is given
        restore_local_state(read_state(checkpoint, 0), named_trainable)
    if strategy == "deepspeed":
        config = deepspeed_config(args.batch_size, args.grad_accum, d.world_size, args.max_grad_norm,
                                  args.zero_stage, args.zero_offload, args.deepspeed_config, mixed)
        model = wrap_deepspeed(model, optimizer, d, config)
    model.train()
    print0(f"model: {args.model}, {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable "
           f"({100 * n_train / n_all:.2f}%); precision {precision.name}; strategy {strategy}"
           f"{' ZeRO-' + str(config['zero_optimization']['stage']) if strategy == 'deepspeed' else ''}, "
           f"{d.world_size} process(es) on {d.device.type}")

    # Data: tokenized once, then read in a seeded order that is a pure function of the step.
    pad_id = tokenizer.token_to_id("<|padding|>") or eos_id(tokenizer)
    examples = load_examples(args.data, tokenizer, args.max_seq_len, args.train_on_prompt, log=print0)
    if args.val_data:
        train_rows, val = examples, load_examples(args.val_data, tokenizer, args.max_seq_len,
                                                  args.train_on_prompt, log=print0)
    else:
        train_rows, val = split(examples, args.val_fraction, args.seed)
        if args.val_fraction and not val:
            print0(f"note: --val-fraction {args.val_fraction} of {len(examples)} rows holds out none, so there is "
                   "no evaluation; raise it or pass --val-data")
    batches = Batches(train_rows, args.batch_size, args.grad_accum, d.world_size, d.rank, args.seed, pad_id)
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * batches.steps_per_epoch))
    print0(f"training: {len(train_rows)} rows, {len(val)} held out; global batch {batches.global_batch} rows "
           f"= micro-batch {args.batch_size} x grad-accum {args.grad_accum} x {d.world_size} process(es); "
           f"{total} steps")

    # Resume: weights, AdamW moments, RNG, loss scale; the data position is the step itself.
    start_step = 0
    if checkpoint:
        with damaged(checkpoint):
            if strategy == "deepspeed":
                ds_load_optimizer_state(model, optimizer, read_state(checkpoint, d.rank))
            else:  # under FSDP each rank reads its own shard; otherwise rank 0 wrote the one copy
                restore_local_state(read_state(checkpoint, d.rank if strategy == "fsdp" else 0), named_trainable,
                                    optimizer)
            restore_rng(checkpoint, d.rank)
        if scaler and trainer["scaler"]:
            scaler.load_state_dict(trainer["scaler"])
        start_step = trainer["step"]
        print0(f"resumed from {checkpoint} at step {start_step}")
    metrics = Metrics(args.out, d.is_main, start_step if checkpoint else -1 if args.resume else None)

    scored = [ex for ex in val if ex.prompt][:args.eval_exact_match]
    if val and not checkpoint:
        val_loss = evaluate(model, val, args.batch_size, pad_id, d, precision)
        metrics.log(f"before training: eval loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}",
                    step=0, eval_loss=val_loss, perplexity=math.exp(min(val_loss, 50)))
    if scored and not checkpoint:
        acc = exact_match(model, scored, tokenizer, d, precision)
        metrics.log(f"before training: exact match {acc:.1%} on {len(scored)} held-out rows", step=0,
                    exact_match=acc)

    clock, tokens_seen = time.time(), 0
    for step in range(start_step, total):
        lr = lr_at(step, args, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro, n_tokens = batches.step(step)
        step_loss = 0.0
        for i, (input_ids, labels) in enumerate(micro):
            # Dividing by the global batch's token count (times the world size, since DDP and FSDP
            # average gradients over ranks) makes the gradient the mean over every trained token of
            # the step, however rows are split over micro-batches and ranks.
            last = i == len(micro) - 1
            if strategy == "ddp":  # all-reduce gradients only on the last micro-batch
                model.require_backward_grad_sync = last
            elif strategy == "fsdp":
                model.set_requires_gradient_sync(last)
            with precision.context(d.device):
                loss = model(input_ids.to(d.device), labels.to(d.device)) * (d.world_size / n_tokens)
            if strategy == "deepspeed":  # our loss is already scaled for accumulation; step() on every
                model.backward(loss, scale_wrt_gas=False)  # micro-batch, the engine updates on the last
                model.step()
            else:
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item() / d.world_size
            tokens_seen += input_ids.numel() * d.world_size
        step_loss = all_reduce_sum([step_loss])[0]
        if not math.isfinite(step_loss):
            last_good = find_checkpoint(args.out, "latest")
            raise UserError(f"the training loss is {step_loss} at step {step + 1}; stopping. Last good checkpoint: "
                            f"{last_good or 'none'}. Lower --lr, or use --precision 32 or bf16")
        if strategy != "deepspeed":  # DeepSpeed clipped and stepped inside model.step()
            optimizer_step(optimizer, scaler, params, args.max_grad_norm, step)

        done = step + 1
        if done % args.log_every == 0 or done == total:
            elapsed = time.time() - clock
            metrics.log(f"step {done}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | "
                        f"{tokens_seen / elapsed:.0f} tok/s | {elapsed:.0f}s elapsed, "
                        f"ETA {elapsed / (done - start_step) * (total - done):.0f}s",
                        step=done, loss=step_loss, lr=lr, tokens_per_s=tokens_seen / elapsed)
        if val and ((args.eval_every and done % args.eval_every == 0) or done == total):
            val_loss = evaluate(model, val, args.batch_size, pad_id, d, precision)
            metrics.log(f"step {done}: eval loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}",
                        step=done, eval_loss=val_loss, perplexity=math.exp(min(val_loss, 50)))
        if args.save_every and done % args.save_every == 0 and done < total:
            trainer = {"step": done, "args": {**vars(args), "world_size": d.world_size},
                       "scaler": scaler.state_dict() if scaler else None}
            path = save_checkpoint(args.out, done, checkpoint_state(model, strategy, d, named_trainable, optimizer),
                                   trainer, d.rank, args.keep)
            print0(f"step {done}: checkpoint {path}")
    if scored:
        acc = exact_match(model, scored, tokenizer, d, precision)
        metrics.log(f"after training: exact match {acc:.1%} on {len(scored)} held-out rows", step=total,
                    exact_match=acc)

    # Outputs: gathered to rank 0 (FSDP), written to a temporary folder, renamed into place.
    state = full_state_dict(model, strategy, trainable_only=bool(args.lora or args.adapter))
    if d.is_main:
        name = "adapter" if args.lora or args.adapter else "model"
        with atomic_dir(os.path.join(args.out, name)) as tmp:
            (save_adapter if name == "adapter" else save_pretrained)(core, tmp, state)
        print0(f"saved {os.path.join(args.out, name)}")
    barrier()


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
        code = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoints written so far are complete: continue with --resume --out {args.out}",
              file=sys.stderr)
        code = 130
    # Skip the interpreter's teardown: everything is written, fsynced and flushed. After a gloo run,
    # gloo's worker threads may still be freeing finished collectives that hold Python tensors, and
    # one that takes the GIL while the interpreter shuts down aborts the process (SIGABRT after a
    # successful run; seen in about one 2-process test in 20 here; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
