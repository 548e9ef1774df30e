"""What one evaluation batch of a full fine-tune costs: time and memory of model(ids, labels) under
torch.no_grad() with every weight trainable, as train.py's evaluate() runs it (issue #25, item 4).

    python bench/eval_loss.py --threads 1                        # the nanotune on PYTHONPATH
    PYTHONPATH=/path/to/older/checkout python bench/eval_loss.py --threads 1   # before, to compare

A random model of bench.py's shape (default Pythia-70m: vocabulary 50304, hidden 512, 6 layers)
evaluates --batch rows of --seq tokens: --warmup untimed batches, then the median of --rounds timed
ones, in wall-clock and in CPU seconds of the process (which other work on a shared machine disturbs
less). Memory, measured on the first batch (before freed buffers sit in the allocator's pools): the
process's peak RSS over it above its RSS before it (the kernel's high-water mark reset through
/proc/self/clear_refs, as bench.py measures), i.e. what a batch allocates beyond the model:
activations, the loss's buffers and any gradient it builds. Under bf16-mixed the head's weight
reaches the loss as autocast's bf16 copy, which needs no gradient, so the change shows in fp32 and
bf16-true.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FAMILIES, VOCAB, make_config, rss_kb  # noqa: E402  bench.py beside this file
from nanotune.precision import resolve  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--family", default="gpt_neox", choices=list(FAMILIES))
    a("--hidden", type=int, default=512)
    a("--layers", type=int, default=6)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int)
    a("--intermediate", type=int)
    a("--vocab", type=int)
    a("--seq", type=int, default=512)
    a("--batch", type=int, default=4)
    a("--precision", default="32", help="32, bf16 (bf16-mixed) or bf16-true")
    a("--warmup", type=int, default=1)
    a("--rounds", type=int, default=5)
    a("--threads", type=int)
    args = p.parse_args(argv)
    args.vocab = args.vocab or VOCAB[args.family]
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = resolve(args.precision, torch.device("cpu"))
    model = FAMILIES[args.family](make_config(args)).requires_grad_(True).eval()  # a full fine-tune
    if precision.name == "bf16-true":
        model.to(torch.bfloat16)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = torch.cat((ids[:, 1:], torch.full((args.batch, 1), -100)), dim=1)

    @torch.no_grad()
    def evaluate():
        with precision.context(torch.device("cpu")):
            return float(model(ids, labels))

    base = rss_kb("VmRSS")  # memory first, while no batch has left freed memory in the allocator's pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    evaluate()
    peak = rss_kb("VmHWM")
    for _ in range(args.warmup):
        evaluate()
    times, cpu_times = [], []
    for _ in range(args.rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = evaluate()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    out = {"precision": precision.name, "vocab": args.vocab, "hidden": args.hidden, "tokens": ids.numel(),
           "loss": loss, "eval_batch_s": statistics.median(times),
           "eval_batch_cpu_s": statistics.median(cpu_times), "eval_batch_rss_mb": (peak - base) / 1024,
           "head_fp32_mb": args.vocab * args.hidden * 4 / 2**20}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
