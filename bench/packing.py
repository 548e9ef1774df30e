"""Packing and the tokenized store on real, variable-length data: alpaca_en_demo through the real Pythia
tokenizer, counted in trained tokens (the targets the loss sees), not in computed positions.

    python bench/packing.py --precision bf16 --compare-hf    # speed: padded vs packed, nanotune vs transformers + peft
    python bench/packing.py --store-rows 1000000             # the store: build rate, size, cached start, memory
    python bench/packing.py --attention                      # packed attention: per row vs one masked call

Speed. A random Pythia-70m-shaped GPT-NeoX (hidden 512, 6 layers, 8 heads, vocab 50304; seeded) with the
real tokenizer.json, LoRA r=8 alpha=16 on query_key_value, trains on the rows of --data rendered with the
alpaca template and cut to --max-seq-len, in the seeded order of data.Batches:
  nanotune padded     --batch rows per step, right-padded to the longest (train.py without --packing)
  nanotune packed     --packed-batch sequences of --max-seq-len positions (train.py --packing)
  hf padded           GPTNeoXForCausalLM (SDPA) + peft on the very rows of nanotune padded, attention_mask
  hf padding-free     the very sequences of nanotune packed, each row's tokens back to back with position_ids
                      restarting at each row and no attention_mask, as transformers 5 trains padding-free
                      (DataCollatorWithFlattening): it then gives SDPA a block-diagonal mask
                      (masking_utils.find_packed_sequence_indices). One flattened row per sequence, not one
                      for the whole batch, which would give SDPA a mask of the whole batch squared.
Every runner takes the same optimizer step (AdamW, clipping) over its loss divided by its trained tokens.
They take turns, --block steps each, so a shared machine's noise falls on all alike; the table gives
trained tokens per wall-clock second and per CPU-second of this process (steadier when the machine is
busy), each runner's padding efficiency (trained tokens / computed positions), and for nanotune the CPU
time per trained token inside the output head and loss (LinearCrossEntropy computes the head's
gradients in its forward, so a timer around its call holds all of it) and in the rest of the step.

Attention (--attention). On the first --packed-batch sequences of the packing plan, at the model's
head shape (8 heads of 64), the CPU time of a forward and backward of models/base.py's Context.attend
(each row's causal attention on its own slice) against one SDPA call with the (B, 1, T, T) block-diagonal
causal mask, in fp32 and bf16; the best of 3.

Store (--store-rows N). N Alpaca-shaped rows: the rows of --data again and again, each instruction
behind a distinct prefix ("[row 123] "), as .jsonl in --work. Then, each in a fresh process:
  build    load_store with an empty cache: rows, tokens, seconds, tokens/s (wall and per CPU-second)
  cached   load_store again (the same inputs): seconds from the call to a mapped store (hashing included)
  memory   map the store and collate every packed sequence of one epoch, as training reads them; the RSS
           it adds (the store's pages read, the packing plan and row indices) per token of the store
  train    (--train-steps K) torchrun --nproc_per_node 2 train.py --packing on the rows, from the cache, with a
           small model (hidden 64, 2 layers) and the real tokenizer, so the data rather than the model shows in
           memory: each process's peak RSS (polled from /proc) and the start-up log
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # nanotune, when run from a venv that does not install it

from nanotune.data import Batches  # noqa: E402
from nanotune.lora import inject_lora  # noqa: E402
from nanotune.loss import LinearCrossEntropy  # noqa: E402
from nanotune.models import from_pretrained, save_pretrained  # noqa: E402
from nanotune.models.gpt_neox import Config, GPTNeoX  # noqa: E402
from nanotune.precision import cast_frozen, resolve  # noqa: E402
from nanotune.store import load_store  # noqa: E402
from nanotune.templates import load_template  # noqa: E402
from nanotune.tokenizer import load_tokenizer  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=os.path.join(SHARED, "sft", "alpaca_en_demo.json"), help="rows (default: %(default)s)")
    a("--tokenizer", default=os.path.join(SHARED, "gpt-neox-20b", "tokenizer.json"), help="(default: %(default)s)")
    a("--precision", default="bf16", help="32 or bf16: nanotune's --precision; HF runs autocast the same way")
    a("--max-seq-len", type=int, default=1024, help="(default: %(default)s)")
    a("--batch", type=int, default=8, help="rows per padded step (default: %(default)s)")
    a("--packed-batch", type=int, default=2, help="sequences per packed step (default: %(default)s)")
    a("--hidden", type=int, default=512, help="(default: Pythia-70m's %(default)s)")
    a("--layers", type=int, default=6, help="(default: %(default)s)")
    a("--heads", type=int, default=8, help="(default: %(default)s)")
    a("--steps", type=int, default=6, help="timed steps per runner (default: %(default)s)")
    a("--warmup", type=int, default=1, help="untimed steps per runner first (default: %(default)s)")
    a("--block", type=int, default=1, help="steps a runner takes before the next (default: %(default)s)")
    a("--compare-hf", action="store_true", help="also transformers + peft, padded and padding-free")
    a("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a("--store-rows", type=int, help="measure the store on this many Alpaca-shaped rows instead of speed")
    a("--attention", action="store_true", help="time packed attention, per row against one masked call")
    a("--train-steps", type=int, default=0, help="with --store-rows: also train K steps with 2 processes")
    a("--work", help="folder for the model, the rows and the store (default: a temporary folder)")
    a("--only", help=argparse.SUPPRESS)  # a --store-rows child: build | cached | memory
    return p.parse_args(argv)


def write_model(args, folder):
    """The random Pythia-shaped model (std 0.02 as HF initialises it) and the real tokenizer, in HF layout."""
    torch.manual_seed(0)
    model = GPTNeoX(Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           intermediate_size=4 * args.hidden, max_position_embeddings=max(2048, args.max_seq_len)))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    save_pretrained(model, folder)
    shutil.copy(args.tokenizer, os.path.join(folder, "tokenizer.json"))


def store_of(args, model_dir, data, log=print):
    template = load_template("alpaca", model_dir, load_tokenizer(model_dir))
    return load_store(data, template, model_dir, os.path.join(args.work, "cache"), args.max_seq_len,
                      log=log)


# ---- speed -------------------------------------------------------------------------------------------

HEAD_CPU = [0.0]  # CPU seconds spent inside LinearCrossEntropy: nanotune's output head, forward and backward


def timed_head(apply):
    def timed(*args):
        cpu = time.process_time()
        out = apply(*args)
        HEAD_CPU[0] += time.process_time() - cpu
        return out
    return timed


LinearCrossEntropy.apply = timed_head(LinearCrossEntropy.apply)

class Runner:
    def __init__(self, name, model, context, batches, hf_format=None):
        self.name, self.model, self.context, self.batches, self.hf_format = name, model, context, batches, hf_format
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.wall = self.cpu = self.head_cpu = self.trained = self.computed = 0

    def step(self, step, timed=True):
        micro, n_trained = self.batches.step(step)
        batch = micro[0] if self.hf_format is None else self.hf_format(self.batches, step)
        t, cpu, head = time.perf_counter(), time.process_time(), HEAD_CPU[0]
        with self.context():
            if self.hf_format is None:  # train.py: the summed loss over the step's trained tokens
                loss = self.model(*batch) / n_trained
            else:  # transformers' own loss: the mean over the targets of the batch
                loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.wall += time.perf_counter() - t
            self.cpu += time.process_time() - cpu
            self.head_cpu += HEAD_CPU[0] - head
            self.trained += n_trained
            self.computed += batch[0].numel() if self.hf_format is None else batch["input_ids"].numel()
        return loss.item()


def hf_padded(batches, step):
    """The rows of nanotune's padded step as transformers takes them: whole rows (it shifts the labels
    itself), right-padded, with an attention_mask."""
    rows = [batches.rows[int(unit[0])] for unit in batches.global_rows(step)]
    T = max(len(ex.tokens) for ex in rows)
    input_ids, labels, mask = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    labels.fill_(-100)
    for i, ex in enumerate(rows):
        tokens = torch.as_tensor(ex.tokens.astype("int64"))
        input_ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
        labels[i, 1:len(tokens)] = torch.where(torch.as_tensor(ex.trained[1:].astype(bool)), tokens[1:], -100)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def hf_padding_free(batches, step):
    """The sequences of nanotune's packed step as transformers trains padding-free: each row's whole tokens
    back to back, position_ids restarting at each row, the first label of each row -100 (no target crosses
    a row), no attention_mask."""
    sequences = [[batches.rows[int(r)] for r in unit] for unit in batches.global_rows(step)]
    T = max(sum(len(ex.tokens) for ex in rows) for rows in sequences)
    input_ids, positions = (torch.zeros(len(sequences), T, dtype=torch.long) for _ in range(2))
    labels = torch.full((len(sequences), T), -100)
    for b, rows in enumerate(sequences):
        t = 0
        for ex in rows:
            tokens, n = torch.as_tensor(ex.tokens.astype("int64")), len(ex.tokens)
            input_ids[b, t:t + n], positions[b, t:t + n] = tokens, torch.arange(n)
            labels[b, t + 1:t + n] = torch.where(torch.as_tensor(ex.trained[1:].astype(bool)), tokens[1:], -100)
            t += n
        positions[b, t:] = torch.arange(T - t)  # the padding: one more row, without targets
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def nanotune_runner(name, args, model_dir, precision, batches):
    model = from_pretrained(model_dir)
    inject_lora(model, model.lora_targets, 8, 16, dropout=0.0)
    model = cast_frozen(model, precision).train()
    return Runner(name, model, lambda: precision.context(torch.device("cpu")), batches)


def hf_runner(name, args, model_dir, precision, batches, hf_format):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query_key_value"],
                                             task_type="CAUSAL_LM")).train()
    dtype = precision.autocast_dtype
    context = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    return Runner(name, model, context, batches, hf_format)


def speed(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.work, "model")
    write_model(args, model_dir)
    rows = store_of(args, model_dir, args.data)
    precision = resolve(args.precision, torch.device("cpu"))
    padded = Batches(rows, args.batch, 1, seed=0, pad_id=1)
    packed = Batches(rows, args.packed_batch, 1, seed=0, pad_id=1, seq_len=args.max_seq_len)
    runners = [nanotune_runner("nanotune padded", args, model_dir, precision, padded),
               nanotune_runner("nanotune packed", args, model_dir, precision, packed)]
    if args.compare_hf:
        runners += [hf_runner("hf padded", args, model_dir, precision, padded, hf_padded),
                    hf_runner("hf padding-free", args, model_dir, precision, packed, hf_padding_free)]
    for r in runners:
        for i in range(args.warmup):
            r.step(i, timed=False)
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for r in runners if (done // args.block) % 2 == 0 else runners[::-1]:
            for i in range(done, done + n):
                r.step(args.warmup + i)
        done += n
    print(f"\n{len(rows)} rows of {args.data}, alpaca template, Pythia tokenizer, --max-seq-len {args.max_seq_len}; "
          f"hidden {args.hidden}, {args.layers} layers; precision {precision.name}; {torch.get_num_threads()} threads; "
          f"{args.steps} timed steps each after {args.warmup} warm-up; padded {args.batch} rows per step, packed "
          f"{args.packed_batch} sequences per step")
    head = (f"{'runner':<16} {'trained tok/s':>13} {'trained tok/CPU-s':>17} {'padding efficiency':>18} {'s/step':>6} "
            f"{'CPU ms per trained token: head+loss, rest':>41}")
    print(head + "\n" + "-" * len(head))
    results = {}
    for r in runners:
        results[r.name] = {"trained_tokens_per_s": r.trained / r.wall, "trained_tokens_per_cpu_s": r.trained / r.cpu,
                           "padding_efficiency": r.trained / r.computed}
        split = ""
        if r.hf_format is None:  # nanotune's: the head and loss, and the rest of the step
            head, rest = 1000 * r.head_cpu / r.trained, 1000 * (r.cpu - r.head_cpu) / r.trained
            results[r.name].update(head_cpu_ms_per_trained_token=head, rest_cpu_ms_per_trained_token=rest)
            split = f"{head:>7.2f}, {rest:.2f}"
        print(f"{r.name:<16} {r.trained / r.wall:>13.0f} {r.trained / r.cpu:>17.0f} {r.trained / r.computed:>18.1%} "
              f"{r.wall / args.steps:>6.1f} {split:>41}")
    ours = results["nanotune packed"]
    for name, other in results.items():
        if name != "nanotune packed":
            print(f"nanotune packed / {name}: trained tokens/s x"
                  f"{ours['trained_tokens_per_s'] / other['trained_tokens_per_s']:.2f}, per CPU-second x"
                  f"{ours['trained_tokens_per_cpu_s'] / other['trained_tokens_per_cpu_s']:.2f}")
    print("json " + json.dumps({"precision": precision.name, "results": results}))


def attention(args):
    """Context.attend on packed rows against SDPA with the block-diagonal mask (docstring)."""
    from nanotune.models.base import Context
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.work, "model")
    write_model(args, model_dir)
    batches = Batches(store_of(args, model_dir, args.data), args.packed_batch, 1, seed=0, seq_len=args.max_seq_len)
    input_ids, _, _, row_lengths = batches.step(0)[0][0]  # (B, T) and (R,)
    B, T, nh = input_ids.shape[0], args.max_seq_len, args.heads
    # The CPU's way (Context.attend there: a call per row) and the GPU's (Context.masked: one SDPA call
    # with the (B, 1, T, T) block-diagonal mask, built once per forward as a GPU run builds it).
    ways = {"per row (Context.attend)": lambda q, k, v: Context(None, None, row_lengths).attend(None, q, k, v),
            "one masked call": lambda q, k, v: Context(None, None, row_lengths).masked(q, k, v, None)}
    print(f"{B} packed sequences of {T} positions, {len(row_lengths)} rows; {nh} heads "
          f"of {args.hidden // nh}; {torch.get_num_threads()} threads; CPU ms for forward + backward, best of 3")
    for dtype in (torch.float32, torch.bfloat16):
        # q, k, v as the models hand them over: (B, nh, T, hs) views of a (B, T, nh, hs) projection
        qkv = [torch.randn(B, T, nh, args.hidden // nh, dtype=dtype, requires_grad=True) for _ in range(3)]
        times = {}
        for name, attend in ways.items():
            best = float("inf")
            for _ in range(3):
                cpu = time.process_time()
                attend(*(x.transpose(1, 2) for x in qkv)).float().square().sum().backward()
                best = min(best, time.process_time() - cpu)
            times[name] = best
        print(f"{str(dtype)[6:]:>8}: " + ", ".join(f"{name} {1000 * t:.0f} ms" for name, t in times.items())
              + f"; x{times['one masked call'] / times['per row (Context.attend)']:.2f}")


# ---- the store --------------------------------------------------------------------------------------

def write_rows(args, path):
    """args.store_rows Alpaca rows as .jsonl: --data's rows in turn, each instruction behind its own prefix."""
    with open(args.data) as f:
        base = json.load(f)
    with open(path, "w") as f:
        for i in range(args.store_rows):
            row = dict(base[i % len(base)])
            row["instruction"] = f"[row {i}] " + row["instruction"]
            f.write(json.dumps(row) + "\n")


def child(args, model_dir, data):
    """One measurement in a fresh process (--only): prints one JSON line."""
    start, cpu, load = time.time(), time.process_time(), os.getloadavg()[0]
    store = store_of(args, model_dir, data, log=lambda line: print(line, file=sys.stderr))
    out = {"seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "rows": len(store),
           "tokens": store.meta["tokens"], "store_mb": store.meta["bytes"] / 2**20,
           "load": [round(load, 1), round(os.getloadavg()[0], 1)]}
    if args.only == "memory":
        before = rss_kb()
        batches = Batches(store, 16, 1, seed=0, pad_id=1, seq_len=args.max_seq_len)
        for step in range(batches.steps_per_epoch):  # every row once, as an epoch of training reads them
            batches.step(step)
        out.update(rss_added_mb=(rss_kb() - before) / 1024, bytes_per_token=(rss_kb() - before) * 1024 / out["tokens"],
                   epoch_seconds=time.time() - start - out["seconds"])
    print(json.dumps(out))


def rss_kb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def store(args):
    model_dir, data = os.path.join(args.work, "model"), os.path.join(args.work, f"alpaca-{args.store_rows}.jsonl")
    if not os.path.exists(model_dir):
        write_model(args, model_dir)
    if not os.path.exists(data):
        write_rows(args, data)
    shutil.rmtree(os.path.join(args.work, "cache"), ignore_errors=True)
    found = {}
    for what in ("build", "cached", "memory"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", what, "--work", args.work],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
        found[what] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stderr.strip().splitlines()[-1])
    b, c, m = found["build"], found["cached"], found["memory"]
    print(f"\n{b['rows']:,} rows, {b['tokens']:,} tokens, {os.path.getsize(data) / 2**20:,.0f} MB of .jsonl, "
          f"store {b['store_mb']:,.0f} MB ({b['store_mb'] * 2**20 / b['tokens']:.2f} bytes per token)")
    print(f"build: {b['seconds']:.1f} s, {b['tokens'] / b['seconds']:,.0f} tokens/s "
          f"({b['tokens'] / b['cpu_seconds']:,.0f} per CPU-second of the process, all its threads), "
          f"on {os.cpu_count()} cores; load average before and after: {b['load']}")
    print(f"cached start: {c['seconds']:.2f} s")
    print(f"one epoch of packed batches: {m['epoch_seconds']:.1f} s, resident memory added {m['rss_added_mb']:,.0f} MB "
          f"= {m['bytes_per_token']:.2f} bytes per token")
    if args.train_steps:
        found["train"] = train_two(args, data)
    print("json " + json.dumps(found))


def train_two(args, data):
    """train.py --packing under torchrun, 2 processes, on the rows: each process's peak RSS."""
    small = argparse.Namespace(**{**vars(args), "hidden": 64, "layers": 2, "heads": 2})
    model, out = os.path.join(args.work, "small-model"), os.path.join(args.work, "out")
    write_model(small, model)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(HERE, "..", "train.py"),
           "--model", model, "--data", data, "--packing", "--max-seq-len", str(args.max_seq_len), "--batch-size", "2",
           "--max-steps", str(args.train_steps), "--log-every", "1", "--val-fraction", "0.0001", "--eval-every", "0",
           "--eval-exact-match", "0", "--data-cache", os.path.join(args.work, "cache"), "--out", out, "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks, start = {}, time.time()
    while proc.poll() is None:
        for pid in workers(proc.pid):
            with contextlib.suppress(OSError, AttributeError):
                with open(f"/proc/{pid}/status") as f:
                    peaks[pid] = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
        time.sleep(0.2)
    log = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"train.py failed:\n{log[-3000:]}")
    print("\n".join(line for line in log.splitlines() if line.startswith(("data:", "training:", "step "))))
    print(f"train.py --packing, 2 processes, {args.train_steps} steps in {time.time() - start:.0f} s: peak RSS "
          + ", ".join(f"{mb:,.0f} MB" for mb in peaks.values()))
    return {"peak_rss_mb": list(peaks.values())}


def workers(parent):
    """The train.py processes torchrun started under `parent`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == parent and any(part.endswith(b"train.py") for part in cmdline):
                found.append(int(pid))
    return found


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        if args.only:
            return child(args, os.path.join(args.work, "model"),
                         os.path.join(args.work, f"alpaca-{args.store_rows}.jsonl"))
        return store(args) if args.store_rows else attention(args) if args.attention else speed(args)


if __name__ == "__main__":
    main()
