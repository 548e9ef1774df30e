"""Flag checks: every contradiction or out-of-range value becomes one sentence before any work.

check_args runs on the flags alone, check_combination once the strategy and device are known,
check_adapter_flags against a loaded adapter's config, check_resume against a checkpoint's flags.
"""
import math
import os
import re

import torch

from nanotune import UserError
from nanotune.checkpoint import check_writable
from nanotune.models import parse_size
from nanotune.precision import ALIASES
from nanotune.quantize import quant_bits

# Flags that do not change the math of a run: a resume may change these and nothing else.
RESUMABLE = {"out", "overwrite", "resume", "device", "log_every", "eval_every", "eval_exact_match", "save_every",
             "keep", "merge", "local_rank", "data_cache", "compile", "save_dtype", "max_shard_size", "timeout"}
# How the work is spread over processes: a resume may change these too, if the global batch (micro-batch x
# grad-accum x processes) stays the same, so that every step reads the very same rows (data.Batches).
LAYOUT = {"world_size", "batch_size", "grad_accum", "global_batch", "strategy", "fsdp_sharding", "fsdp_prefetch",
          "fsdp_offload", "zero_stage", "zero_offload", "deepspeed_config"}

# The torch releases FSDP2 (fully_shard) needs for what nanotune shards, read in each release's
# torch/distributed/fsdp/_fully_shard: 2.8 requires one dtype of a unit's *trained* parameters only
# (2.6 and 2.7 of all of them, so frozen bf16 weights beside fp32 LoRA weights failed); 2.12 takes
# non-float parameters such as the packed 4-bit codes (pytorch#177844, fixed by pytorch#177948).
FSDP_MIXED_DTYPES, FSDP_NON_FLOAT = (2, 8), (2, 12)


def torch_version():
    """(major, minor) of the running torch."""
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def check_args(args):
    for flag, value in (("--lr", args.lr), ("--lora-alpha", args.lora_alpha), ("--epochs", args.epochs),
                        ("--timeout", args.timeout)):
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
    if args.use_dora and not (args.lora or args.adapter):
        raise UserError("--use-dora trains a DoRA adapter, and --no-lora trains every weight instead; drop one of them")
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
    parse_size(args.max_shard_size)
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")) and not (args.overwrite or args.resume):
        raise UserError(f"--out {args.out} holds a previous run; pass --resume to continue it, --overwrite to "
                        "replace it, or choose another --out")
    check_writable(args.out)


# What --adapter takes from the adapter's adapter_config.json: flag -> (args name, config key).
ADAPTER_SHAPE = {"--lora-r": ("lora_r", "r"), "--lora-alpha": ("lora_alpha", "lora_alpha"),
                 "--lora-target": ("lora_target", "target_modules"), "--lora-bias": ("lora_bias", "bias"),
                 "--modules-to-save": ("modules_to_save", "modules_to_save"), "--rslora": ("rslora", "use_rslora"),
                 "--lora-layers": ("lora_layers", "layers_to_transform"),
                 "--lora-dropout": ("lora_dropout", "lora_dropout"), "--use-dora": ("use_dora", "use_dora")}


def check_adapter_flags(args, defaults, config):
    """A flag changed from its default that contradicts the loaded adapter would be silently ignored."""
    for flag, (name, key) in ADAPTER_SHAPE.items():
        given, default, saved = getattr(args, name), getattr(defaults, name), config[key]
        if key == "target_modules" and saved == "all-linear":
            saved = ["all-linear"]
        if given != default and given != saved:
            raise UserError(f"{flag} {given} contradicts the adapter's {key} = {saved} in {args.adapter}; "
                            f"--adapter continues the adapter as it was configured, so drop {flag}")


def check_combination(args, world):
    """Flags that contradict the strategy or the device, once both are known."""
    strategy = world.strategy
    if args.compile and strategy == "deepspeed":
        raise UserError("--compile is not offered with --strategy deepspeed (its engine runs its own hooks around "
                        "every block, and ZeRO-3 gathers parameters in them); use --strategy fsdp or ddp")
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
    if strategy == "fsdp" and args.load_in_4bit and torch_version() < FSDP_NON_FLOAT:
        raise UserError(f"--load-in-4bit under --strategy fsdp needs torch >= {'.'.join(map(str, FSDP_NON_FLOAT))} "
                        "(fully_shard fails on the packed 4-bit codes, a non-float parameter, before the fix of "
                        f"pytorch#177844), and this is torch {torch.__version__}; upgrade torch or use --strategy ddp")
    mixed = (args.lora or args.adapter) and ALIASES.get(args.precision, args.precision) != "32-true" \
        and not (args.precision == "bf16-true" and args.lora_dtype == "bf16")
    if strategy == "fsdp" and mixed and torch_version() < FSDP_MIXED_DTYPES:
        raise UserError(f"--strategy fsdp with LoRA under --precision {args.precision} needs torch >= "
                        f"{'.'.join(map(str, FSDP_MIXED_DTYPES))} (each block then holds frozen weights in 16 bits "
                        "beside fp32 LoRA weights, and older FSDP2 wants one dtype for all of a block's parameters), "
                        f"and this is torch {torch.__version__}; upgrade torch or use --precision 32")
    if args.fsdp_offload and (strategy != "fsdp" or world.device.type != "cuda"):
        raise UserError("--fsdp-offload moves FSDP's shards from GPU to CPU memory; it needs --strategy fsdp "
                        "on CUDA (on a CPU run the weights are in CPU memory already)")


def check_resume(saved: dict, args, world_size: int, defaults=None):
    """Refuse a resume whose flags would change the math of the run it continues: it may spread the
    same global batch over another number of processes or another strategy, and change nothing else.
    defaults: every flag's default, standing in for a flag the checkpoint's nanotune did not have yet."""
    saved = {**(defaults or {}), **saved}
    now = {**vars(args), "world_size": world_size}
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE | LAYOUT and saved.get(key) != now.get(key):
            raise UserError(f"cannot resume: --{key.replace('_', '-')} was {saved.get(key)!r} in the checkpoint but "
                            f"is {now.get(key)!r} now; a resumed run must repeat the original's flags")
    before, after = ([run["batch_size"], run["grad_accum"], run["world_size"]] for run in (saved, now))
    if math.prod(before) != math.prod(after):
        raise UserError("cannot resume: the global batch was {0} rows (--batch-size {1} x --grad-accum {2} x {3} "
                        "process(es)) in the checkpoint but is {4} rows ({5} x {6} x {7}) now; another number of "
                        "processes may continue a run only with the same global batch, so set --batch-size and "
                        "--grad-accum to make it {0} again (or --global-batch {0})".format(
                            math.prod(before), *before, math.prod(after), *after))
