"""Fine-tune a causal language model (Llama, Qwen, Mistral, ChatGLM, GPT-NeoX, ...) with LoRA or in
full. The one entry point for every setup.

    python train.py                                    # the default job: LoRA on the bundled tiny model
    python train.py --model Llama-3.2-1B --data my.json --out runs/x --precision bf16
    torchrun --nproc_per_node 4 train.py --strategy fsdp ...    # or ./launch.sh, for many nodes

Read top to bottom: flags -> distributed init -> model -> quantize -> LoRA -> precision -> wrap
(DDP / FSDP / DeepSpeed) and optimizer -> data -> resume -> loop (checkpoints) -> save.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback

import torch

from nanotune import UserError
from nanotune.checkpoint import atomic_dir, damaged, find_checkpoint, read_trainer, restore, restore_weights, save
from nanotune.checks import check_adapter_flags, check_args, check_combination, check_resume
from nanotune.compile import compile_blocks
from nanotune.data import Batches, collate, show, split
from nanotune.distributed import (all_reduce_sum, barrier, broadcast_from_rank0, compute_cleanup, compute_init,
                                  full_state_dict, grad_sync, load_device, print0, scalar, wrap_ddp, wrap_fsdp)
from nanotune.elastic import PREEMPTED, Preempted, StopSignals, grad_accum_for, restart_line
from nanotune.generate import generate
from nanotune.grpo import Rollouts, evaluate_rewards, load_prompts, start_weights
from nanotune.lora import inject_lora, load_adapter, save_adapter
from nanotune.merge import merge_adapter
from nanotune.models import MAX_SHARD_SIZE, SAVE_DTYPES, from_pretrained, load_weights, parse_size, save_pretrained
from nanotune.objectives import NAMES as OBJECTIVES, WITH_REFERENCE, check_objective_flags, objective
from nanotune.pairs import PairBatches, Pairs, attach_reference, evaluate_pairs, load_reference, save_reference
from nanotune.plot import report
from nanotune.precision import CHOICES as PRECISIONS, cast_frozen, load_dtype, matmul_precision, resolve
from nanotune.quantize import quant_bits, quantize
from nanotune.store import load_store
from nanotune.templates import NAMES as TEMPLATES, export, load_template
from nanotune.tokenizer import load_tokenizer
from nanotune.zero import deepspeed_config, ds_full_state_dict, wrap_deepspeed

HERE = os.path.dirname(os.path.abspath(__file__))
# No fp16: AdamW adds eps = 1e-8 to sqrt(v), which is 0 in fp16, so fp16 weights turn NaN on their first
# update; and fp16-mixed's gradient scaler refuses fp16 gradients. Under --precision 16 fp32 LoRA
# weights compute in fp16 anyway.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the docstring's line breaks."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("model and data").add_argument
    a("--model", default=os.path.join(HERE, "assets", "tiny-neox"),
      help="Hugging Face model folder: config.json, *.safetensors, tokenizer.json (see the README's families)")
    a("--num-layers", type=int, default=-1, help="keep only the first N transformer blocks (-1: all)")
    a("--data", default=os.path.join(HERE, "assets", "data", "train.jsonl"),
      help="training rows, .json or .jsonl: Alpaca, ShareGPT or {text}")
    a("--val-data", help="held-out rows for evaluation (None: hold out --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.05, help="share of --data held out when --val-data is not given")
    a("--max-seq-len", type=int, default=256, help="rows are cut to this many tokens")
    a("--template", default="auto", choices=TEMPLATES, help="chat template: auto = the model folder's own "
      "(alpaca for a folder without one); built-ins for base models: " + ", ".join(TEMPLATES[1:]))
    a("--train-on-prompt", action="store_true", help="also train on prompt tokens, not only responses")
    a("--mask-history", action="store_true", help="train only on the last assistant turn of each conversation")
    a("--packing", action="store_true", help="pack rows into sequences of --max-seq-len tokens, each row attending "
      "only to itself: no padding (for data of rows of varied length)")
    a("--data-cache", help="folder of tokenized stores, reused by runs with the same data, tokenizer and data "
      "flags (None: OUT/data-cache)")
    a = p.add_argument_group("objective (README: preference training)").add_argument
    a("--objective", default="sft", choices=OBJECTIVES, help="sft: next-token loss on the answers of --data; "
      "dpo, ipo, simpo, orpo: preference pairs in --data (chosen and rejected answers); grpo: completions of the "
      "prompts of --data sampled and scored by --reward each step (README: GRPO)")
    a("--beta", type=float, help="strength of the preference term (None: 0.1 for dpo, ipo, orpo as TRL; "
      "2.0 for simpo as its paper)")
    a("--label-smoothing", type=float, default=0.0, help="dpo: the assumed share of flipped labels (cDPO), in [0, 0.5)")
    a("--simpo-gamma", type=float, help="simpo: the target reward margin gamma (None: 0.5, as TRL)")
    a = p.add_argument_group("grpo (README: GRPO; --beta is the KL weight, None: 0.0 as TRL)").add_argument
    a("--reward", nargs="+", help="reward functions, summed: built-ins exact_match, length, or FILE.py:FUNCTION, "
      "def f(prompts, completions, references) -> list[float] (nanotune.rewards)")
    a("--reward-weights", type=float, nargs="+", help="one weight per --reward (None: 1 each)")
    a("--num-generations", type=int, help="completions G sampled per prompt, a group (None: 8)")
    a("--max-new-tokens", type=int, help="most tokens per completion (None: 64)")
    a("--temperature", type=float, help="sampling temperature (None: 1.0)")
    a("--top-p", type=float, help="sample among the fewest likeliest tokens reaching p (None: 1.0)")
    a("--no-scale-rewards", dest="scale_rewards", action="store_false", help="advantages only centred in the "
      "group, not divided by its std (Dr. GRPO)")
    a("--clip-eps", type=float, help="the ratio is clipped to [1 - eps, 1 + eps] (None: 0.2)")
    a("--grpo-iterations", type=int, help="optimizer steps on each set of completions, mu (None: 1)")
    a("--loss-norm", choices=["token", "sequence"], help="token: mean over the global batch's completion tokens "
      "(DAPO, TRL's default); sequence: mean per completion, then over completions (the paper) (None: token)")
    a = p.add_argument_group("LoRA").add_argument
    a("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA; --no-lora fine-tunes every weight")
    a("--lora-r", type=int, default=8, help="rank r of the update B A")
    a("--lora-alpha", type=float, default=32, help="the update is scaled by alpha / r")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the input of A")
    a("--lora-target", nargs="+", help="Linear modules to adapt, by name or dotted suffix; 'all-linear' = all "
      "but the output head (None: PEFT's default for the family, e.g. query_key_value, or q_proj v_proj)")
    a("--lora-bias", default="none", choices=["none", "all", "lora_only"],
      help="which biases train with the adapter: none, every bias, or those of adapted layers")
    a("--modules-to-save", nargs="+", default=[], help="modules trained in full and saved with the adapter")
    a("--lora-dtype", default="fp32", choices=list(DTYPES), help="dtype of the LoRA weights (no fp16: AdamW's "
      "eps underflows there; under --precision 16 fp32 weights compute in fp16)")
    a("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    a("--lora-layers", type=int, nargs="+", help="adapt only these block indices (None: every block)")
    a("--use-dora", action="store_true", help="DoRA: also train a magnitude per output feature of each adapted "
      "Linear (README: what it costs per step)")
    a("--adapter", help="start from this PEFT-format adapter folder instead of a fresh LoRA")
    a("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")
    a("--save-dtype", choices=list(SAVE_DTYPES), help="dtype of the weights in OUT/model and OUT/merged (None: the "
      "--model checkpoint's own, as transformers saves)")
    a("--max-shard-size", default=MAX_SHARD_SIZE, help="OUT/model and OUT/merged are split into "
      "model-0000X-of-0000N.safetensors files of at most this size, as transformers splits (5GB, 500MB, 2GiB)")
    a = p.add_argument_group("optimisation").add_argument
    a("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs passes over the data)")
    a("--epochs", type=float, default=4, help="passes over the training rows, when --max-steps is -1")
    a("--batch-size", type=int, default=16, help="rows per micro-batch, per process")
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    a("--global-batch", type=int, help="rows (or packed sequences) per optimizer step over all processes; "
      "--grad-accum becomes N / (--batch-size x processes), so a job that restarts on another number of "
      "processes keeps its trajectory (None: --batch-size x --grad-accum x processes)")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup-steps", type=int, default=20, help="linear warm-up steps, then cosine decay to lr / 10")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    a("--grad-checkpoint", action="store_true", help="keep only each block's input and recompute its "
      "activations in the backward: activation memory of one block instead of all, ~1/3 more compute")
    a("--compile", action="store_true", help="torch.compile each transformer block: faster steps after compiling "
      "for tens of seconds to minutes at the start (README: when it pays)")
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
    a("--timeout", type=float, default=30, help="minutes a collective waits for the slowest process before the "
      "run stops with an error (a process that died); raise it if one process works alone longer")
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
      help="held-out rows scored by greedy generation == reference, before and after training (0: off); "
      "generated --batch-size rows at a time with a KV cache")
    return p.parse_args(argv)


def main(args):
    check_args(args)
    check_objective_flags(args)
    world = compute_init(args.strategy, args.device, cpu_collectives=args.fsdp_offload, timeout_minutes=args.timeout)
    try:
        with StopSignals() as stop:  # SIGTERM / SIGUSR1: checkpoint the current step, exit PREEMPTED
            train(args, world, stop)
    finally:
        compute_cleanup()
    if args.merge and world.is_main:  # after the group is gone, so no rank waits (and times out) while rank 0 merges
        merge_adapter(args.model, os.path.join(args.out, "adapter"), os.path.join(args.out, "merged"),
                      args.num_layers, quant_bits(args), args.double_quant, args.template,
                      SAVE_DTYPES.get(args.save_dtype), parse_size(args.max_shard_size))
        print(f"saved {os.path.join(args.out, 'merged')} (the adapter folded into the base)", flush=True)


def train(args, world, stop):
    precision = resolve(args.precision, world.device)
    matmul_precision(precision, world.device)  # TF32 on CUDA but under --precision 32
    check_combination(args, world)
    if args.global_batch is not None:
        args.grad_accum = grad_accum_for(args.global_batch, args.batch_size, world.size, args.grad_accum)
    torch.manual_seed(args.seed)
    checkpoint = find_resume(args, world)  # first, so a resume with other flags fails before anything loads

    # Model: built on the meta device, then each weight read from the checkpoint into the form it is kept
    # in: a quantized base Linear by Linear, the rest cast as it is read (precision.load_dtype).
    bits = quant_bits(args)
    model = from_pretrained(args.model, num_layers=args.num_layers, device="meta", dtype=load_dtype(precision))
    model.grad_checkpoint = args.grad_checkpoint
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    template = load_template(args.template, args.model, tokenizer)
    if bits:  # before LoRA, so each LoRALinear wraps a quantized base layer. Every rank (FSDP too) reads
        # and quantizes each Linear in turn: the same codes from the same weights, one fp32 Linear at a time.
        quantize(model, bits, precision.compute_dtype, args.double_quant, device=world.device)
    where = load_device(world, bits, args.zero_stage)
    if where != "meta":  # FSDP and ZeRO-3 ranks read only their own shards, once the model is sharded (wrap)
        load_weights(model, where)
    adapt(model, args, precision)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    model = cast_frozen(model, precision)

    start = start_weights(model, args, world)  # grpo's reference under DeepSpeed, before wrap restores a resume
    # The strategy's wrapper and the optimizer over what trains (their order is the lesson: see wrap).
    wrapped, optimizer, named_trainable = wrap(model, args, world, precision, checkpoint)
    scaler = precision.scaler(world.device)
    wrapped.train()
    zero = f" ZeRO-{wrapped.zero_optimization_stage()}" if world.strategy == "deepspeed" else ""
    print0(f"model: {args.model}, {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable "
           f"({100 * n_train / n_all:.2f}%); precision {precision.name}; strategy {world.strategy}{zero}, "
           f"{world.size} process(es) on {world.device.type}")

    # Data: tokenized once into a memory-mapped store, then read in a seeded order that is a pure
    # function of the step: rows, or with --packing sequences of --max-seq-len tokens packed with rows.
    train_rows, val = load_data(args, template)
    pairs = args.objective not in ("sft", "grpo")  # a unit of data is then a pair: chosen, rejected (nanotune.pairs)
    first = train_rows[0] if pairs else [train_rows[0]]
    print0(f"the first {'pair' if pairs else 'row'} as the model sees it, {'trained tokens in [[brackets]]'} "
           f"(template {args.template}):\n" + "\n".join(show(ex, tokenizer, color=False) for ex in first))
    seq_len = (2 if pairs else 1) * args.max_seq_len if args.packing else None  # a packed pair fits 2 x max_seq_len
    if args.objective == "grpo":  # its data: the prompts with completions sampled and scored each step
        batches = Rollouts(train_rows, wrapped, template, args, world, precision, named_trainable, start)
    else:
        batches = (PairBatches if pairs else Batches)(train_rows, args.batch_size, args.grad_accum, world.size,
                                                      world.rank, args.seed, tokenizer.pad_id, seq_len)
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * batches.steps_per_epoch))
    rows = "pairs" if pairs else "prompts" if args.objective == "grpo" else "rows"
    unit = f"sequences of {batches.seq_len} tokens (packed from {len(train_rows)} {rows})" if args.packing else rows
    print0(f"training: {len(train_rows)} {rows}, {len(val)} held out; global batch {batches.global_batch} {unit} "
           f"= micro-batch {args.batch_size} x grad-accum {args.grad_accum} x {world.size} process(es); "
           f"{total} steps")

    # The reference of dpo and ipo: the starting model's log-probs of every pair, kept with the pairs.
    if args.objective in WITH_REFERENCE:
        reference_file = os.path.join(args.out, "reference.safetensors")
        if checkpoint:  # the model has moved on since step 1: read what the run computed then
            load_reference(reference_file, train_rows, val)
        else:
            clock = time.time()
            for rows in (train_rows, val) if val else (train_rows,):
                attach_reference(wrapped, rows, args.batch_size, tokenizer.pad_id, world, precision)
            if world.is_main:
                save_reference(reference_file, train_rows, val)
            print0(f"reference: log-probs of {len(train_rows) + len(val)} pairs computed in {time.time() - clock:.1f}s")
    step_objective = objective(args)

    # Resume: weights, AdamW moments, RNG, loss scale; the data position is the step itself.
    start_step = restore(checkpoint, wrapped, world, named_trainable, optimizer, scaler) if checkpoint else 0
    restarts = 0  # how many times this run has continued from a checkpoint, kept in its checkpoints
    if checkpoint:
        print0(f"resumed from {checkpoint} at step {start_step}")
        saved = read_trainer(checkpoint)
        restarts = saved.get("restarts", 0) + 1  # "restart 1: 2 -> 1 processes, gradient accumulation 1 -> 2, ..."
        print0(restart_line(restarts, saved["args"], args.grad_accum, world.size, checkpoint))
    metrics = Metrics(args.out, world.is_main, start_step if checkpoint else -1 if args.resume else None)
    scored = val.scored(args.eval_exact_match, template) if val else []
    if not checkpoint:
        report_eval(wrapped, val, scored, 0, "before training", args, template, world, precision, metrics)

    clock, tokens_seen, trained_seen = time.time(), 0, 0
    for step in range(start_step, total):
        lr = lr_at(step, args, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro, n_tokens = batches.step(step)  # grpo: sampled now (nanotune.grpo.Rollouts)
        n_units = batches.pairs(step) if pairs else batches.global_batch  # pairs: a packed step's vary in number
        update_clock = time.time()
        step_loss, step_figures = 0.0, {}  # the objective's figures, summed over the micro-batches
        for i, batch in enumerate(micro):  # (input_ids, labels), packed ones also (positions, row_lengths)
            grad_sync(wrapped, world, enabled=i == len(micro) - 1)  # all-reduce on the last micro-batch only
            # The objective gives this micro-batch's share of the global batch's mean: its summed loss over
            # the global batch's trained tokens (SFT) or pairs (nanotune.objectives). Times the world size,
            # since DDP and FSDP average gradients over ranks, the gradient is the mean over the step,
            # however rows are split over micro-batches and ranks.
            with precision.context(world.device):
                loss, figures = step_objective(wrapped, [t.to(world.device) for t in batch], n_tokens, n_units)
                loss = loss * world.size
            for key, value in figures.items():
                step_figures[key] = step_figures.get(key, 0.0) + value
            if world.strategy == "deepspeed":  # our loss is already scaled for accumulation; step() on every
                wrapped.backward(loss, scale_wrt_gas=False)  # micro-batch, the engine updates on the last
                wrapped.step()
            else:
                scaler.scale(loss).backward()
            step_loss += loss.item() / world.size
            tokens_seen += batch[0].numel() * world.size  # computed positions, padding included
        trained_seen += n_tokens
        # The stop request rides on the step's sums: any rank signalled, every rank stops after this step.
        step_loss, stopping, *figures = all_reduce_sum([step_loss, float(stop.received is not None),
                                                        *step_figures.values()])
        step_figures = dict(zip(step_figures, figures))
        if not math.isfinite(step_loss):
            last_good = find_checkpoint(args.out, "latest")
            raise UserError(f"the training loss is {step_loss} at step {step + 1}; stopping. Last good checkpoint: "
                            f"{last_good or 'none'}. Lower --lr, or use --precision 32 or bf16")
        if world.strategy != "deepspeed":
            grad_norm = optimizer_step(optimizer, scaler, [p for _, p in named_trainable], args.max_grad_norm, step)
        else:  # DeepSpeed clipped and stepped inside wrapped.step()
            norm = wrapped.get_global_grad_norm()
            grad_norm = math.nan if norm is None else float(norm)
        if args.objective == "grpo":  # the rollout's reward, reward_std, ..., generation_seconds, and the update's time
            step_figures |= {**batches.figures, "update_seconds": time.time() - update_clock}

        done = step + 1
        if args.compile and done == start_step + 1:  # the step that compiled: what it cost, said once
            print0(f"--compile: step {done} took {time.time() - clock:.1f}s, compiling the blocks included; the first "
                   "step with a new sequence length compiles once more")
        if done % args.log_every == 0 or done == total:
            elapsed = time.time() - clock
            metrics.log(f"step {done}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                        f"{tokens_seen / elapsed:.0f} tok/s, {trained_seen / elapsed:.0f} trained tok/s "
                        f"({trained_seen / tokens_seen:.0%} of computed) | {elapsed:.0f}s elapsed, "
                        f"ETA {elapsed / (done - start_step) * (total - done):.0f}s"
                        + "".join(f" | {key} {value:.4f}" for key, value in step_figures.items()),
                        step=done, loss=step_loss, **step_figures, lr=lr, tokens_per_s=tokens_seen / elapsed,
                        grad_norm=grad_norm if math.isfinite(grad_norm) else None,  # JSON has no inf or nan
                        trained_tokens_per_s=trained_seen / elapsed, padding_efficiency=trained_seen / tokens_seen)
        if val and ((args.eval_every and done % args.eval_every == 0) or done == total):
            report_eval(wrapped, val, [], done, f"step {done}", args, template, world, precision, metrics)
        if done < total and ((args.save_every and done % args.save_every == 0) or stopping):
            path = save(args.out, done, wrapped, world, named_trainable, optimizer, scaler, vars(args), args.keep,
                        restarts)
            if stopping:
                print0(f"stopped by {stop.received or 'a signal to another rank'} after step {done}, checkpoint "
                       f"{path}: continue with --resume --out {args.out}")
                raise Preempted
            print0(f"step {done}: checkpoint {path}")
    if scored:
        report_eval(wrapped, [], scored, total, "after training", args, template, world, precision, metrics)

    # Outputs: gathered to rank 0 (FSDP, ZeRO-3: every rank takes part), written by rank 0 alone to a temporary
    # folder, renamed into place. No barrier after it: the other ranks close the group and exit while rank 0
    # writes, so none waits (and times out, --timeout) on the write of a large model.
    gather = ds_full_state_dict if world.strategy == "deepspeed" else full_state_dict
    state = gather(wrapped, world, trainable_only=bool(args.lora or args.adapter))
    if world.is_main:
        name = "adapter" if args.lora or args.adapter else "model"
        with atomic_dir(os.path.join(args.out, name)) as tmp:
            if name == "adapter":
                save_adapter(model, tmp, state)
            else:  # a whole model: with the tokenizer files, and the chat template and stop ids training used
                save_pretrained(model, tmp, state, SAVE_DTYPES.get(args.save_dtype), parse_size(args.max_shard_size))
                export(template, tmp)
        print0(f"saved {os.path.join(args.out, name)}")
        print0(report(args.out))  # OUT/loss.png


# --- The steps of train(), in its order ------------------------------------------------------------

def find_resume(args, world):
    """Clear --out for --overwrite; for --resume, the checkpoint to continue from (None: start at step 0)
    after checking that its flags are this run's."""
    if args.overwrite and not args.resume and world.is_main:
        for name in ("metrics.jsonl", "checkpoints", "adapter", "model", "merged"):
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    barrier()
    if not args.resume:
        return None
    checkpoint = find_checkpoint(args.out, args.resume)
    if checkpoint:
        with damaged(checkpoint):
            check_resume(read_trainer(checkpoint)["args"], args, world.size, vars(parse_args([])))
        return checkpoint
    finished = [name for name in ("adapter", "model") if os.path.isdir(os.path.join(args.out, name))]
    if finished:
        raise UserError(f"--resume: {args.out} holds a finished run ({finished[0]}/) but no checkpoint to continue "
                        "from (it ran without --save-every); pass --overwrite to train again from step 0, or "
                        "choose another --out")
    print0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
    return None


def adapt(model, args, precision):
    """What trains: a fresh LoRA adapter, the --adapter to continue, or (--no-lora) every weight."""
    if args.adapter:
        load_adapter(model, args.adapter, dtype=DTYPES[args.lora_dtype])
        check_adapter_flags(args, parse_args([]), model.lora_config)
    elif args.lora:
        inject_lora(model, args.lora_target, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_bias,
                    args.modules_to_save, DTYPES[args.lora_dtype], args.rslora, args.lora_layers, args.use_dora,
                    base_weight=lambda name: model.weights.read(name + ".weight", torch.float32))
    else:
        model.requires_grad_(True)
    if quant_bits(args) and precision.autocast and model.lora_config["bias"] != "none":
        raise UserError(f"trained biases (bias mode {model.lora_config['bias']!r}) on a quantized base need "
                        "--precision 32: bitsandbytes casts its layers' biases to the compute dtype in place, so under "
                        f"{precision.name} they would train in {str(precision.compute_dtype)[6:]}; "
                        "or use --lora-bias none")


def wrap(model, args, world, precision, checkpoint):
    """The model as the strategy runs it, its AdamW, and the (name, parameter) pairs that train.

    The order differs by strategy, and that is the lesson:
      FSDP       shards the model first; the optimizer is then built over the shards (DTensors), so
                 each rank's AdamW holds moments for its own slice only.
      DDP        keeps whole parameters (the optimizer sees them as they are) and wraps the module to
                 all-reduce gradients from backward hooks.
      DeepSpeed  takes the model and the optimizer and wraps both: ZeRO copies the weights it is given
                 into its fp32 partitions, so a resumed run restores its weights before that."""
    if args.compile:  # in place, before FSDP shards the blocks (as the PyTorch docs order it): nanotune.compile
        compile_blocks(model)
    if world.strategy == "fsdp":  # shards the model on the meta device, then each rank reads its shards
        model = wrap_fsdp(model, world, args.fsdp_sharding, args.fsdp_prefetch, args.fsdp_offload,
                          precision.autocast_dtype)
    elif world.strategy != "deepspeed" or args.zero_stage != 3:  # ZeRO-3 reads and partitions it (wrap_deepspeed)
        model = model.to(world.device)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # sharded under FSDP
    optimizer = torch.optim.AdamW([p for _, p in named_trainable], lr=args.lr, weight_decay=args.weight_decay)
    if world.strategy == "ddp":
        model = wrap_ddp(model, world)
    elif world.strategy == "deepspeed":
        if checkpoint:
            restore_weights(checkpoint, named_trainable)
        config = deepspeed_config(args.batch_size, args.grad_accum, world.size, args.max_grad_norm, args.zero_stage,
                                  args.zero_offload, args.deepspeed_config, precision.autocast_dtype)
        model = wrap_deepspeed(model, optimizer, world, config)
    return model, optimizer, named_trainable


def load_data(args, template):
    """(training rows, held-out rows), views of tokenized stores (nanotune.store): --val-data, or a seeded
    --val-fraction of --data. Under a preference objective the rows are pairs (nanotune.pairs)."""
    def load(path):
        if args.objective == "grpo":  # prompts and reference answers, not tokenized answers (nanotune.grpo)
            return load_prompts(path, template, args.max_seq_len)
        store = load_store(path, template, args.model, args.data_cache or os.path.join(args.out, "data-cache"),
                           args.max_seq_len, args.train_on_prompt, args.mask_history, log=print0,
                           pairs=args.objective != "sft")
        return store if args.objective == "sft" else Pairs(store)
    examples = load(args.data)
    if args.val_data:
        return examples, load(args.val_data)
    train_rows, val = split(examples, args.val_fraction, args.seed)
    if args.val_fraction and not val:
        print0(f"note: --val-fraction {args.val_fraction} of {len(examples)} rows holds out none, so there is "
               "no evaluation; raise it or pass --val-data")
    return train_rows, val


def lr_at(step, args, total):
    """Linear warm-up to --lr, then cosine decay to lr / 10 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer_step(optimizer, scaler, params, max_grad_norm, step):
    """Unscale (fp16), clip, step, and clear the gradients; return the gradient norm before clipping.
    A disabled scaler (every mode but fp16) passes each call through."""
    scaler.unscale_(optimizer)
    # The norm over every trained parameter (all shards, under FSDP); a limit of inf measures without clipping.
    grad_norm = scalar(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # fp16: skips the step if a gradient overflowed, then lowers the scale
    scaler.update()
    if scaler.get_scale() < scale:
        print0(f"step {step + 1}: fp16 gradients overflowed; step skipped, loss scale now {scaler.get_scale()}")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.compiler.set_stance("force_eager")
def report_eval(model, val, scored, step, when, args, template, world, precision, metrics):
    """Log the held-out loss (if `val`) and the exact-match score (if `scored`) at `step`, with the blocks
    eager under --compile: a no-grad forward, and generation at each cached length, would compile again."""
    if val and args.objective != "sft":  # grpo: rewards of sampled completions; the pair objectives: their figures
        figures = evaluate_rewards(model, val, args, template, world, precision) if args.objective == "grpo" else \
            evaluate_pairs(model, val, objective(args), args.batch_size, template.tokenizer.pad_id, world, precision)
        metrics.log(f"{when}: " + ", ".join(f"{key} {value:.4f}" for key, value in figures.items()), step=step,
                    **figures)
    elif val:
        val_loss = evaluate(model, val, args.batch_size, template.tokenizer.pad_id, world, precision)
        metrics.log(f"{when}: eval loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}",
                    step=step, eval_loss=val_loss, perplexity=math.exp(min(val_loss, 50)))
    if scored:
        clock = time.time()
        acc = exact_match(model, scored, template, world, precision, args.batch_size, args.max_seq_len)
        seconds = time.time() - clock
        metrics.log(f"{when}: exact match {acc:.1%} on {len(scored)} held-out rows ({seconds:.1f}s)", step=step,
                    exact_match=acc, exact_match_seconds=seconds)


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, world, precision):
    """Mean loss per response token over the held-out rows, each rank scoring a strided share.
    Shares are padded to equal length with a row that trains nothing, so under FSDP every rank
    runs the same number of forwards (each one is a collective)."""
    model.eval()
    mine = [examples[i] for i in range(world.rank, len(examples), world.size)]
    blank = type(examples[0])(examples[0].tokens, [False] * len(examples[0].tokens), [], "")
    mine += [blank] * (math.ceil(len(examples) / world.size) - len(mine))
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        input_ids, labels = collate(mine[i:i + batch_size], pad_id)
        with precision.context(world.device):
            total += float(model(input_ids.to(world.device), labels.to(world.device)))
        count += int((labels != -100).sum())
    model.train()
    total, count = all_reduce_sum([total, count])
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, examples, template, world, precision, batch_size, max_seq_len):
    """Share of rows whose greedy answer equals the reference response exactly (spaces around it aside).
    Rows go through cached generation batch_size at a time, and a row stops as soon as it cannot match:
    when its text so far is no prefix of the reference (an unfinished UTF-8 character at its end aside),
    when it has as many tokens as the reference plus 4, or when it fills max_seq_len with its prompt
    (training cut every row there: the model never learned to go on). A batch ends when all its rows
    have stopped, so a model that is wrong early costs a few steps per row, not a whole answer.
    Every rank generates for every row: a sharded model needs all ranks in each forward, and rank 0's
    tokens, broadcast at each step, decide for all when each row stops."""
    model.eval()
    tokenizer = template.tokenizer
    references = [ex.reference.strip() for ex in examples]
    budget = [max(1, min(len(tokenizer.encode(ex.reference)) + 4, max_seq_len - len(ex.prompt))) for ex in examples]
    order = sorted(range(len(examples)), key=budget.__getitem__)  # a batch's rows need about as many steps

    def may_match(i, ids):
        """Can example i, having generated `ids`, still equal its reference?"""
        return len(ids) < budget[i] and references[i].startswith(tokenizer.decode(ids).rstrip("\ufffd").strip())
    hits = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        with precision.context(world.device):
            new = generate(model, [examples[i].prompt for i in rows], max(budget[i] for i in rows),
                           eos=template.stop_ids, keep=lambda row, ids: may_match(rows[row], ids),
                           device=world.device, agree=broadcast_from_rank0 if world.size > 1 else None)
        hits += sum(tokenizer.decode(ids).strip() == references[i] for i, ids in zip(rows, new))
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
    except Preempted:
        code = PREEMPTED
    except Exception:  # a bug, or a collective that failed with a rank that died: the traceback, then a quick exit
        traceback.print_exc()  # (an elastic agent restarts the job once this process is gone)
        code = 1
    # Skip the interpreter's teardown: everything is written, fsynced and flushed. After a gloo run,
    # gloo's worker threads may still be freeing finished collectives that hold Python tensors, and
    # one that takes the GIL while the interpreter shuts down aborts the process (SIGABRT after a
    # successful run; seen in about one 2-process test in 20 here; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
