"""Fine-tune a GPT-NeoX (Pythia) model with LoRA or in full. The one entry point for every setup.

    python train.py                                  # the default job: LoRA on the bundled tiny model
    python train.py --model pythia-410m --data my.json --out runs/x

Read top to bottom: flags -> model -> LoRA -> optimizer -> data -> loop -> save.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

from nanotune import UserError
from nanotune.checkpoint import atomic_dir
from nanotune.data import Batches, collate, eos_id, load_examples, load_tokenizer, split
from nanotune.generate import generate
from nanotune.lora import inject_lora, load_adapter, save_adapter, unload
from nanotune.model import from_pretrained, save_pretrained

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("model and data").add_argument
    a("--model", default=os.path.join(HERE, "assets", "tiny-neox"),
      help="HF-layout GPT-NeoX folder: config.json, *.safetensors, tokenizer.json")
    a("--num-layers", type=int, default=-1, help="keep only the first N transformer blocks (-1: all)")
    a("--data", default=os.path.join(HERE, "assets", "data", "train.jsonl"),
      help="training rows, .json or .jsonl: Alpaca, ShareGPT or {text}")
    a("--val-data", help="held-out rows for evaluation (default: --val-fraction of --data)")
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
    a("--lora-dtype", default="fp32", choices=list(DTYPES), help="dtype of the LoRA weights")
    a("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    a("--lora-layers", type=int, nargs="+", help="adapt only these block indices (default: all)")
    a("--adapter", help="start from this PEFT-format adapter folder instead of a fresh LoRA")
    a("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")
    a = p.add_argument_group("optimisation").add_argument
    a("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs passes over the data)")
    a("--epochs", type=float, default=3, help="passes over the training rows, when --max-steps is -1")
    a("--batch-size", type=int, default=16, help="rows per micro-batch, per process")
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup-steps", type=int, default=10, help="linear warm-up steps, then cosine decay to lr / 10")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    a("--seed", type=int, default=42, help="seed for LoRA init, data order and dropout")
    a = p.add_argument_group("run").add_argument
    a("--out", default="out", help="output folder: metrics.jsonl, adapter/ or model/")
    a("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--log-every", type=int, default=10, help="print and record the training loss every N steps")
    a("--eval-every", type=int, default=50, help="evaluate every N steps (0: only at the end)")
    a("--eval-exact-match", type=int, default=64,
      help="held-out rows scored by greedy generation == reference, before and after training (0: off)")
    return p.parse_args(argv)


def check_args(args):
    for flag, value, low in (("--lr", args.lr, 0), ("--batch-size", args.batch_size, 1),
                             ("--grad-accum", args.grad_accum, 1), ("--max-seq-len", args.max_seq_len, 2)):
        if not value >= low or (low == 0 and value == 0):
            raise UserError(f"{flag} must be {'> 0' if low == 0 else f'>= {low}'}, got {value}")
    if args.max_steps != -1 and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1 (or -1 to use --epochs), got {args.max_steps}")
    if args.max_steps == -1 and not args.epochs > 0:
        raise UserError(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")) and not args.overwrite:
        raise UserError(f"--out {args.out} holds a previous run; pass --overwrite to replace it or choose another --out")


def lr_at(step, args, total):
    """Linear warm-up to --lr, then cosine decay to lr / 10 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device):
    """Mean loss per response token over the held-out rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        input_ids, labels = collate(examples[i:i + batch_size], pad_id)
        total += float(model.loss_sum(input_ids.to(device), labels.to(device)))
        count += int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, examples, tokenizer, device):
    """Share of rows whose greedy answer equals the reference response exactly."""
    model.eval()
    hits = 0
    for ex in examples:
        answer_len = len(tokenizer.encode(ex.reference, add_special_tokens=False).ids)
        new = generate(model, ex.prompt, max_new_tokens=answer_len + 4, eos=eos_id(tokenizer))
        hits += tokenizer.decode(new).strip() == ex.reference.strip()
    model.train()
    return hits / max(len(examples), 1)


class Metrics:
    """Every logged figure goes to the terminal and, as one JSON object per line, to OUT/metrics.jsonl."""

    def __init__(self, out):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a")

    def log(self, text, **figures):
        print(text, flush=True)
        self.file.write(json.dumps(figures) + "\n")
        self.file.flush()


def main(args):
    check_args(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Model, then LoRA on top of it: the model file knows nothing of LoRA.
    model = from_pretrained(args.model, num_layers=args.num_layers)
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        load_adapter(model, args.adapter, dtype=DTYPES[args.lora_dtype])
    elif args.lora:
        inject_lora(model, args.lora_target, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_bias,
                    args.modules_to_save, DTYPES[args.lora_dtype], args.rslora, args.lora_layers)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    print(f"model: {args.model}, {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable "
          f"({100 * n_train / n_all:.2f}%), on {device}")
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)

    # Data: tokenized once, then read in a seeded order that is a pure function of the step.
    pad_id = tokenizer.token_to_id("<|padding|>") or eos_id(tokenizer)
    examples = load_examples(args.data, tokenizer, args.max_seq_len, args.train_on_prompt)
    if args.val_data:
        train, val = examples, load_examples(args.val_data, tokenizer, args.max_seq_len, args.train_on_prompt)
    else:
        train, val = split(examples, args.val_fraction, args.seed)
    batches = Batches(train, args.batch_size, args.grad_accum, seed=args.seed, pad_id=pad_id)
    total = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * batches.steps_per_epoch))
    print(f"training: {len(train)} rows, {len(val)} held out; global batch {batches.global_batch} rows "
          f"(micro-batch {args.batch_size} x grad-accum {args.grad_accum}); {total} steps")

    os.makedirs(args.out, exist_ok=True)
    if args.overwrite and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        os.remove(os.path.join(args.out, "metrics.jsonl"))
    metrics = Metrics(args.out)
    scored = [ex for ex in val if ex.prompt][:args.eval_exact_match]
    if scored:
        acc = exact_match(model, scored, tokenizer, device)
        metrics.log(f"before training: exact match {acc:.1%} on {len(scored)} held-out rows",
                    step=0, exact_match=acc)

    start = time.time()
    tokens_seen = 0
    for step in range(total):
        lr = lr_at(step, args, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro, n_tokens = batches.step(step)
        step_loss = 0.0
        for input_ids, labels in micro:
            # Dividing by the global batch's token count makes the accumulated gradient the mean
            # over every trained token of the step, however the rows are split.
            loss = model.loss_sum(input_ids.to(device), labels.to(device)) / n_tokens
            loss.backward()
            step_loss += loss.item()
            tokens_seen += input_ids.numel()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % args.log_every == 0 or done == total:
            elapsed = time.time() - start
            metrics.log(f"step {done}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | "
                        f"{tokens_seen / elapsed:.0f} tok/s | {elapsed:.0f}s elapsed, "
                        f"ETA {elapsed / done * (total - done):.0f}s",
                        step=done, loss=step_loss, lr=lr, tokens_per_s=tokens_seen / elapsed)
        if val and ((args.eval_every and done % args.eval_every == 0) or done == total):
            val_loss = evaluate(model, val, args.batch_size, pad_id, device)
            metrics.log(f"step {done}: eval loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}",
                        step=done, eval_loss=val_loss, perplexity=math.exp(min(val_loss, 50)))
    if scored:
        acc = exact_match(model, scored, tokenizer, device)
        metrics.log(f"after training: exact match {acc:.1%} on {len(scored)} held-out rows",
                    step=total, exact_match=acc)

    # Outputs, each written to a temporary folder and renamed into place when complete.
    if args.lora or args.adapter:
        with atomic_dir(os.path.join(args.out, "adapter")) as tmp:
            save_adapter(model, tmp)
        print(f"saved the adapter to {os.path.join(args.out, 'adapter')}")
    if not (args.lora or args.adapter) or args.merge:
        name = "merged" if (args.lora or args.adapter) else "model"
        with atomic_dir(os.path.join(args.out, name)) as tmp:
            save_pretrained(unload(model), tmp)
        print(f"saved the {'merged ' if name == 'merged' else ''}model to {os.path.join(args.out, name)}")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
