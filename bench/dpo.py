"""A DPO step, nanotune against TRL's DPOTrainer + peft: tokens/s and peak memory, same model, same pairs.

    python bench/dpo.py --precision bf16 --threads 1
    python bench/dpo.py --precision 32 --threads 1

What one run does:
  1. Writes a random Llama-shaped model (hidden 256, 4 layers, 4 query heads sharing 1 key/value head,
     the head tied to the embedding) with Qwen2.5's vocabulary (151,936), and beside it the real Qwen2.5
     tokenizer folder (../shared/data/tokenizers/qwen2.5-0.5b-instruct: tokenizer.json and its chat
     template), so both frameworks render the pairs with the same chat template.
  2. Takes the first --warmup + --steps micro-batches of --batch pairs of LLaMA-Factory's dpo_en_demo.json
     (ShareGPT pairs) whose chosen and rejected conversations both fit --max-len tokens (so neither
     framework truncates), and hands TRL the same pairs in its conversational format (prompt messages,
     chosen and rejected assistant messages).
  3. Each framework trains in a subprocess of its own (peak RSS is per process): LoRA r=8, alpha=16 on
     q_proj and v_proj, dropout 0, beta 0.1, AdamW, --warmup untimed steps then --steps timed ones.
     The reference: nanotune computes its log-probs once, before step 1 (timed apart, and counted in
     the "with reference" figure); TRL, given a peft model, switches the adapter off for a second
     forward in every step (its default; precompute_ref_log_probs=True is its once-before variant).
  4. Tokens are the real tokens of the pairs' chosen and rejected rows (no padding), the same count
     for both; tokens/s is that over the timed steps' wall time. Memory: the process's peak RSS after
     its imports, and that peak minus the RSS after the imports ("training": model, data, optimizer, activations).

transformers, peft and trl are imported only in the TRL child; nanotune never depends on them.
"""
import argparse
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
sys.path.insert(0, os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")

from nanotune.data import load_examples  # noqa: E402
from nanotune.models import llama, save_pretrained  # noqa: E402
from nanotune.templates import load_template  # noqa: E402
from nanotune.tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=os.path.join(SHARED, "pref", "dpo_en_demo.json"), help="ShareGPT pairs (default: %(default)s)")
    a("--tokenizer", default=os.path.join(SHARED, "tokenizers", "qwen2.5-0.5b-instruct"),
      help="a tokenizer folder with a chat template (default: %(default)s)")
    a("--precision", default="bf16", choices=["32", "bf16"], help="fp32, or bf16 autocast over fp32 weights")
    a("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    a("--layers", type=int, default=4, help="blocks (default: %(default)s)")
    a("--max-len", type=int, default=512, help="pairs whose rows fit this many tokens (default: %(default)s)")
    a("--batch", type=int, default=2, help="pairs per step (default: %(default)s)")
    a("--steps", type=int, default=6, help="timed steps (default: %(default)s)")
    a("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    a("--only", choices=["nanotune", "trl"], help=argparse.SUPPRESS)  # the child
    a("--work", help=argparse.SUPPRESS)  # the folder the parent wrote
    return p.parse_args(argv)


def write_model(args, folder):
    """A random Llama-shaped model with the tokenizer folder's vocabulary and special ids, in HF layout
    (bench/grpo.py's too)."""
    config = json.load(open(os.path.join(args.tokenizer, "config.json")))
    torch.manual_seed(0)
    model = llama.Llama(llama.Config(
        model_type="llama", vocab_size=config["vocab_size"], hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=1, intermediate_size=4 * args.hidden, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"]))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, folder)
    for name in os.listdir(args.tokenizer):
        if name.startswith("tokenizer") or name == "generation_config.json":
            shutil.copy(os.path.join(args.tokenizer, name), folder)


def pick_pairs(args, folder):
    """The first pairs whose chosen and rejected rows both fit --max-len, as nanotune renders them; their token
    count (positions computed without padding: each row's tokens minus one)."""
    rows = json.load(open(args.data))
    template = load_template("auto", folder, load_tokenizer(folder))
    need = (args.warmup + args.steps) * args.batch
    kept, timed_tokens = [], 0
    for row in rows:
        path = os.path.join(folder, "one.json")
        json.dump([row], open(path, "w"))
        chosen, rejected = load_examples(path, template, 10**6, pairs=True, log=lambda _: None)
        if max(len(chosen.tokens), len(rejected.tokens)) <= args.max_len:
            if len(kept) >= args.warmup * args.batch:
                timed_tokens += len(chosen.tokens) + len(rejected.tokens) - 2
            kept.append(row)
            if len(kept) == need:
                break
    if len(kept) < need:
        sys.exit(f"only {len(kept)} pairs of {args.data} fit --max-len {args.max_len}; {need} are needed")
    json.dump(kept, open(os.path.join(folder, "pairs.json"), "w"))
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    trl_rows = [{"prompt": [{"role": role[m["from"]], "content": m["value"]} for m in row["conversations"]],
                 "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
                 "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]} for row in kept]
    json.dump(trl_rows, open(os.path.join(folder, "trl_pairs.json"), "w"))
    return timed_tokens


def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak():
    """The high-water mark starts again from the current RSS (Linux >= 4.0), which is returned."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")


def nanotune_child(args):
    from nanotune.distributed import World
    from nanotune.lora import inject_lora
    from nanotune.models import from_pretrained
    from nanotune.objectives import dpo_loss, preference
    from nanotune.pairs import Pairs, attach_reference
    from nanotune.precision import cast_frozen, resolve
    from nanotune.store import Store
    from functools import partial
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # pay AdamW's lazy imports first
    optimizer.step()
    base = reset_peak()
    precision = resolve(args.precision, torch.device("cpu"))
    model = from_pretrained(args.work)
    inject_lora(model, ["q_proj", "v_proj"], 8, 16, dropout=0.0)
    model = cast_frozen(model, precision).train()
    template = load_template("auto", args.work, load_tokenizer(args.work, model.config.vocab_size))
    pairs = Pairs(Store.of(load_examples(os.path.join(args.work, "pairs.json"), template, args.max_len, pairs=True,
                                         log=lambda _: None)))
    clock, cpu_clock = time.perf_counter(), time.process_time()
    attach_reference(model, pairs, args.batch, template.tokenizer.pad_id, World(), precision)
    share = args.steps / (args.warmup + args.steps)  # the timed steps' pairs' share of the reference pass
    reference_s, reference_cpu_s = (time.perf_counter() - clock) * share, (time.process_time() - cpu_clock) * share
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = partial(preference, partial(dpo_loss, beta=0.1), False, False, True)  # sums, no NLL, a reference
    times, cpu = [], []
    for step in range(args.warmup + args.steps):
        batch = pairs.collate(list(range(step * args.batch, (step + 1) * args.batch)), template.tokenizer.pad_id)
        clock, cpu_clock = time.perf_counter(), time.process_time()
        with precision.context(torch.device("cpu")):
            loss, _ = objective(model, batch, int(pairs.targets[:args.batch].sum()), args.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - clock)
        cpu.append(time.process_time() - cpu_clock)
    return {"step_s": sum(times[args.warmup:]), "cpu_s": sum(cpu[args.warmup:]), "reference_s": reference_s,
            "reference_cpu_s": reference_cpu_s, "train_mb": (rss_kb("VmHWM") - base) / 1024}


def trl_child(args):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    optimizer.step()
    base = reset_peak()
    times, cpu = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu)

    model = AutoModelForCausalLM.from_pretrained(args.work, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.Dataset.from_list(json.load(open(os.path.join(args.work, "trl_pairs.json"))))
    config = DPOConfig(output_dir=os.path.join(args.work, "trl"), per_device_train_batch_size=args.batch,
                       max_steps=args.warmup + args.steps, learning_rate=1e-4, beta=0.1, max_length=args.max_len,
                       bf16=args.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                       logging_steps=10**6, dataloader_num_workers=0, max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(args.work),
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    trainer.train()
    return {"step_s": sum(times[args.warmup:]), "cpu_s": sum(cpu[args.warmup:]),
            "train_mb": (rss_kb("VmHWM") - base) / 1024}


def child(args):
    torch.set_num_threads(args.threads)
    out = nanotune_child(args) if args.only == "nanotune" else trl_child(args)
    out["peak_mb"] = rss_kb("VmHWM") / 1024
    print(json.dumps(out))


def main(args):
    with tempfile.TemporaryDirectory() as work:
        write_model(args, work)
        tokens = pick_pairs(args, work)
        found = {}
        for name in ("nanotune", "trl"):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--only", name, "--work", work]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            found[name] = json.loads(lines[-1])
    n, t = found["nanotune"], found["trl"]
    print(f"DPO, {args.steps} timed steps of {args.batch} pairs ({tokens} tokens) of {os.path.basename(args.data)}, "
          f"Llama shape hidden {args.hidden} x {args.layers} layers, vocabulary 151,936, precision {args.precision}, "
          f"{args.threads} thread(s)")
    print(f"{'':28s}{'tokens/s':>10s}{'tokens/CPU-s':>14s}{'training MB':>13s}{'peak RSS MB':>13s}")
    rows = [("nanotune (steps)", tokens / n["step_s"], tokens / n["cpu_s"], n),
            ("nanotune (with reference)", tokens / (n["step_s"] + n["reference_s"]),
             tokens / (n["cpu_s"] + n["reference_cpu_s"]), n),
            ("TRL DPOTrainer + peft", tokens / t["step_s"], tokens / t["cpu_s"], t)]
    for name, speed, per_cpu, run in rows:
        print(f"{name:28s}{speed:10.0f}{per_cpu:14.0f}{run['train_mb']:13.0f}{run['peak_mb']:13.0f}")
    print(f"nanotune / TRL: {rows[0][1] / rows[2][1]:.2f}x tokens/s, {rows[0][2] / rows[2][2]:.2f}x tokens/CPU-s; with "
          f"its reference pass {rows[1][1] / rows[2][1]:.2f}x and {rows[1][2] / rows[2][2]:.2f}x; "
          f"{n['train_mb'] / t['train_mb']:.2f}x the training memory")


if __name__ == "__main__":
    args = parse_args()
    child(args) if args.only else main(args)
