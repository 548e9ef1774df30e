"""Decode speed of nanotune.generate, optionally against transformers' generate.

    python bench/generate.py                                  # nanotune alone: Pythia-70m shape, batch 1 and 8
    python bench/generate.py --compare-hf --threads 1         # side by side with transformers' generate
    python bench/generate.py --family llama --compare-hf      # a Llama-family shape (GQA, SwiGLU, tied head)

What one run does:
  1. Builds a random model of the family and shape with bench.py's builder (the same flags: --family,
     --hidden, --layers, ...; Pythia-70m's shape by default, Llama 3.2's proportions with --family
     llama) and saves it once; nanotune loads that folder with from_pretrained, transformers with
     AutoModelForCausalLM (attn_implementation="sdpa"), both in fp32 on --device.
  2. For each --batch: one prompt of --prompt-len random tokens, the same in every row (no padding:
     both frameworks do the same work), generated greedily with the KV cache each has (nanotune's
     Cache; transformers' default DynamicCache) for exactly --new-tokens tokens: no stop id, none in
     transformers' generation_config either. One untimed call warms each up.
  3. Decode time is the time of generating --new-tokens tokens minus the time of generating one (the
     prefill and the first token), so the prompt's cost cancels: decode tokens/s = batch x
     (new tokens - 1) / that difference. The runners take turns, --rounds times, and each figure is
     the median of its rounds, which keeps a shared machine's noise from favouring either side.
     With --compare-hf it also checks that both generated the same tokens (greedy, fp32).
The last line, `json {...}`, holds every figure, for scripts.

    python bench/generate.py --eval-share                     # what train.py's exact match costs on real data

--eval-share measures train.py's evaluation instead: a 30-step LoRA run (train.py's defaults
otherwise) of a random 2-layer, 64-wide GPT-NeoX with the real Pythia tokenizer on the first 335
rows of alpaca_en_demo (../shared/data), in a subprocess; it reports the run's wall time and the
seconds its two exact-match scores took (their log lines). Then the most one score could cost on
this data: 16 of its rows generated to their full budget (reference + 4 tokens, within
--max-seq-len), as if every row matched to its last token.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # nanotune, if not installed
from bench import FAMILIES, VOCAB, write_model  # noqa: E402  bench.py beside this file: the same shapes, weights
from nanotune.data import alpaca_user  # noqa: E402
from nanotune.generate import generate  # noqa: E402
from nanotune.models import from_pretrained  # noqa: E402
from nanotune.templates import load_template  # noqa: E402
from nanotune.tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--family", default="gpt_neox", choices=list(FAMILIES), help="architecture (default: %(default)s)")
    a("--hidden", type=int, default=512, help="hidden size (default: Pythia-70m's 512)")
    a("--layers", type=int, default=6, help="transformer blocks (default: %(default)s)")
    a("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    a("--kv-heads", type=int, help="--family llama: key/value heads (default: heads / 4, as Llama 3.2)")
    a("--intermediate", type=int, help="MLP width (default: 4 x hidden)")
    a("--vocab", type=int, help="vocabulary size (default: 50304 for gpt_neox, 128256 for llama)")
    a("--batch", type=int, nargs="+", default=[1, 8], help="rows generated together (default: 1 8)")
    a("--prompt-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    a("--new-tokens", type=int, default=128, help="tokens generated per row (default: %(default)s)")
    a("--rounds", type=int, default=5, help="timed rounds per runner and batch (default: %(default)s)")
    a("--compare-hf", action="store_true", help="also time transformers' generate on the same folder")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a("--seed", type=int, default=0, help="seed for the weights and the prompt")
    a("--eval-share", action="store_true", help="instead: the share of a train.py run its exact match takes")
    args = p.parse_args(argv)
    args.vocab = args.vocab or VOCAB[args.family]
    args.kv_heads = args.kv_heads or (max(1, args.heads // 4) if args.family == "llama" else None)
    args.seq = args.prompt_len + args.new_tokens  # what bench.py's builder sizes positions by
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2: decode time is that of N tokens minus that of 1")
    return args


def nanotune_runner(path, device):
    model = from_pretrained(path).to(device).eval()

    def run(ids, n):
        return generate(model, ids.tolist(), n)
    return run


def hf_runner(path, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # exactly n tokens, as nanotune with no stop ids
    model.generation_config.pad_token_id = 0

    @torch.no_grad()
    def run(ids, n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].tolist()
    return run


def timed(run, ids, n, device):
    """(wall seconds, CPU seconds of this process, the new tokens) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = run(ids, n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main(args):
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as path:
        write_model(args, path)
        runners = {"nanotune": nanotune_runner(path, device)}
        if args.compare_hf:
            runners["transformers"] = hf_runner(path, device)
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)
        results = []
        for batch in args.batch:
            ids = prompt.repeat(batch, 1).to(device)
            times = {name: {"full": [], "one": [], "full_cpu": [], "one_cpu": []} for name in runners}
            outputs = {}
            for name, run in runners.items():  # warm-up
                run(ids, args.new_tokens)
            for _ in range(args.rounds):
                for name, run in runners.items():
                    t_full, cpu_full, outputs[name] = timed(run, ids, args.new_tokens, device)
                    t_one, cpu_one, _ = timed(run, ids, 1, device)
                    for key, value in (("full", t_full), ("one", t_one), ("full_cpu", cpu_full), ("one_cpu", cpu_one)):
                        times[name][key].append(value)
            for name in runners:
                t = {key: statistics.median(values) for key, values in times[name].items()}
                decoded = batch * (args.new_tokens - 1)
                results.append({"runner": name, "batch": batch, "decode_tokens_per_s": decoded / (t["full"] - t["one"]),
                                "decode_tokens_per_cpu_s": decoded / (t["full_cpu"] - t["one_cpu"]),
                                "prefill_ms": 1000 * t["one"], "total_s": t["full"]})
            if args.compare_hf:
                results[-1]["same_tokens"] = results[-2]["same_tokens"] = outputs["nanotune"] == outputs["transformers"]
    report(args, results)


def report(args, results):
    shape = (f"{args.family}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads"
             + (f" ({args.kv_heads} k/v)" if args.kv_heads else "") + f", vocab {args.vocab}; prompt "
             f"{args.prompt_len} tokens, {args.new_tokens} new, greedy, fp32, {args.device}, "
             f"{torch.get_num_threads()} thread(s), median of {args.rounds} rounds")
    print(shape)
    print("| runner | batch | decode tokens/s | per CPU-second | prefill + 1st token ms | "
          "vs transformers (per CPU-s) |")
    print("|---|---:|---:|---:|---:|---:|")
    hf = {r["batch"]: r for r in results if r["runner"] == "transformers"}
    for r in results:
        ratio = "-"
        if r["batch"] in hf:
            other = hf[r["batch"]]
            r["vs_transformers"] = r["decode_tokens_per_s"] / other["decode_tokens_per_s"]
            r["vs_transformers_cpu"] = r["decode_tokens_per_cpu_s"] / other["decode_tokens_per_cpu_s"]
            ratio = f"{r['vs_transformers']:.2f}x ({r['vs_transformers_cpu']:.2f}x)"
        print(f"| {r['runner']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | {r['decode_tokens_per_cpu_s']:.0f} | "
              f"{r['prefill_ms']:.0f} | {ratio} |")
    if hf:
        print("same greedy tokens in both: " + ", ".join(f"batch {r['batch']}: {'yes' if r['same_tokens'] else 'no'}"
                                                         for r in results if r["runner"] == "nanotune"))
    print("json " + json.dumps({"shape": shape, "results": results}))


def eval_share(args):
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data, out = (os.path.join(tmp, name) for name in ("model", "data.json", "out"))
        shape = argparse.Namespace(family="gpt_neox", vocab=50304, hidden=64, layers=2, heads=4, intermediate=256,
                                   seq=256, kv_heads=None, seed=args.seed)
        write_model(shape, model_dir)
        shutil.copy(os.path.join(SHARED, "gpt-neox-20b", "tokenizer.json"), model_dir)
        with open(os.path.join(SHARED, "sft", "alpaca_en_demo.json")) as f:
            rows = json.load(f)[:335]
        with open(data, "w") as f:
            json.dump(rows, f)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_dir, "--data", data,
                               "--out", out, "--max-steps", "30"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-3000:])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            scores = [r["exact_match_seconds"] for r in map(json.loads, f) if "exact_match_seconds" in r]
        print("\n".join(line for line in proc.stdout.splitlines() if "exact match" in line or "step 30/30" in line))

        # The most one score could cost: every row generated to its budget, no row stopping early.
        model = from_pretrained(model_dir).eval()
        tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
        template = load_template("auto", model_dir, tokenizer)
        prompts = [template.prompt(None, [("user", alpaca_user(r["instruction"], r["input"]))]) for r in rows[:16]]
        budget = max(min(len(tokenizer.encode(r["output"])) + 4, 256 - len(p)) for r, p in zip(rows, prompts))
        start = time.perf_counter()
        generate(model, prompts, budget)
        full = time.perf_counter() - start
    figures = {"run_s": wall, "exact_match_s": scores, "share": sum(scores) / wall, "full_budget_s": full,
               "full_budget_steps": budget, "full_budget_share": 2 * full / wall}
    print(f"run {wall:.1f}s, of which the two exact-match scores {' + '.join(f'{s:.1f}' for s in scores)}s = "
          f"{figures['share']:.1%}; 16 rows generated to their full budget ({budget} steps): {full:.1f}s each score, "
          f"{figures['full_budget_share']:.1%} of the run for two; {torch.get_num_threads()} thread(s)")
    print("json " + json.dumps(figures))


if __name__ == "__main__":
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_share(args) if args.eval_share else main(args)
