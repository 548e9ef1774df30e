"""A GRPO step, nanotune's train.py against TRL's GRPOTrainer + peft: completions per second, same model,
same prompts, same G and lengths.

    python bench/grpo.py --threads 1

What one run does:
  1. Writes a random Llama-shaped model (hidden 256, 4 layers, 4 query heads sharing 1 key/value head, the
     head tied to the embedding) with Qwen2.5's vocabulary (151,936) and its real tokenizer folder
     (../shared/data/tokenizers/qwen2.5-0.5b-instruct), so both frameworks render the prompts with the
     same chat template.
  2. Takes the first prompts of Alpaca's alpaca_en_demo.json that fit --max-prompt tokens, in TRL's
     conversational format ({"prompt": [{"role": "user", "content": ...}]}), which both read.
  3. Each framework trains in a subprocess of its own: LoRA r=8, alpha=16 on q_proj and v_proj, dropout 0,
     fp32, beta 0 (no reference), --prompts prompts x --generations completions per step, each sampled at
     temperature 1 up to --new-tokens tokens, one update per generation (TRL: num_iterations 1, its
     default loss dapo = nanotune's --loss-norm token), rewards from one cheap function (minus the
     completion's length in characters). TRL runs without gradient checkpointing, as nanotune does.
     --warmup untimed steps, then --steps timed ones.
  4. The random model rarely samples an end token, so both generate --new-tokens tokens per completion:
     the same work. Completions/s = completions of the timed steps / their wall time, a step being
     generation, scoring and the update (nanotune: train.py's main() in the child, from one step's start to
     the next's; TRL: from on_step_begin to on_step_end, which holds its generation), in wall time and in
     the process's CPU time (the measure that holds on a shared machine).

transformers, peft and trl are imported only in the TRL child; nanotune never depends on them.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")

from dpo import write_model  # noqa: E402  dpo.py beside this file: the same random Llama and tokenizer folder
from nanotune.templates import load_template  # noqa: E402
from nanotune.tokenizer import load_tokenizer  # noqa: E402

REWARD = '''def reward(prompts, completions, references=None, **kwargs):
    """Minus the completion's length in characters (TRL passes conversational completions as messages)."""
    return [-float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=os.path.join(SHARED, "sft", "alpaca_en_demo.json"), help="Alpaca rows (default: %(default)s)")
    a("--tokenizer", default=os.path.join(SHARED, "tokenizers", "qwen2.5-0.5b-instruct"),
      help="a tokenizer folder with a chat template (default: %(default)s)")
    a("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    a("--layers", type=int, default=4, help="blocks (default: %(default)s)")
    a("--prompts", type=int, default=2, help="prompts per step (default: %(default)s)")
    a("--generations", type=int, default=8, help="completions per prompt, G (default: %(default)s)")
    a("--new-tokens", type=int, default=32, help="tokens per completion (default: %(default)s)")
    a("--max-prompt", type=int, default=128, help="prompts of at most this many tokens (default: %(default)s)")
    a("--steps", type=int, default=4, help="timed steps (default: %(default)s)")
    a("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    a("--only", choices=["nanotune", "trl"], help=argparse.SUPPRESS)  # the child
    a("--work", help=argparse.SUPPRESS)  # the folder the parent wrote
    return p.parse_args(argv)


def write_prompts(args, folder):
    """The first prompts that fit --max-prompt tokens, as TRL's conversational rows, and the reward file."""
    template = load_template("auto", folder, load_tokenizer(folder))
    rows = []
    for row in json.load(open(args.data)):
        content = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        if len(template.prompt(None, [("user", content)])) <= args.max_prompt:
            rows.append({"prompt": [{"role": "user", "content": content}]})
        if len(rows) == (args.warmup + args.steps) * args.prompts:
            break
    json.dump(rows, open(os.path.join(folder, "prompts.json"), "w"))
    with open(os.path.join(folder, "length_reward.py"), "w") as f:
        f.write(REWARD)


def nanotune_child(args):
    """train.py's main() in this process, over --warmup + --steps + 1 steps: a step's time runs from its start
    (Rollouts.step, which samples) to the next step's start, so it holds generation, scoring, the update and
    the step's logging line; the run's report is the extra step's."""
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from nanotune.grpo import Rollouts
    starts, step = [], Rollouts.step

    def timed_step(self, s):
        starts.append((time.perf_counter(), time.process_time()))
        return step(self, s)
    Rollouts.step = timed_step
    out = os.path.join(args.work, "nanotune")
    train.main(train.parse_args([str(c) for c in [
        "--model", args.work, "--data", os.path.join(args.work, "prompts.json"), "--out", out, "--objective", "grpo",
        "--reward", os.path.join(args.work, "length_reward.py:reward"), "--num-generations", args.generations,
        "--batch-size", args.prompts, "--max-new-tokens", args.new_tokens, "--temperature", 1.0,
        "--max-steps", args.warmup + args.steps + 1, "--lr", 1e-5, "--warmup-steps", 0, "--lora-target", "q_proj",
        "v_proj", "--lora-r", 8, "--lora-alpha", 16, "--lora-dropout", 0, "--val-fraction", 0,
        "--eval-exact-match", 0, "--eval-every", 0, "--log-every", 1, "--device", "cpu", "--max-seq-len", args.max_prompt]]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][args.warmup:args.warmup + args.steps]
    (wall0, cpu0), (wall1, cpu1) = starts[args.warmup], starts[args.warmup + args.steps]
    return {"step_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "generation_s": sum(r["generation_seconds"] for r in rows),
            "completion_length": sum(r["completion_length"] for r in rows) / len(rows)}


def trl_child(args):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    sys.path.insert(0, args.work)
    from length_reward import reward
    times, cpu, lengths = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    model = AutoModelForCausalLM.from_pretrained(args.work, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.Dataset.from_list(json.load(open(os.path.join(args.work, "prompts.json"))))
    config = GRPOConfig(output_dir=os.path.join(args.work, "trl"), per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens, temperature=1.0,
                        max_steps=args.warmup + args.steps, learning_rate=1e-5, beta=0.0, use_cpu=True, report_to=[],
                        save_strategy="no", logging_steps=1, dataloader_num_workers=0, gradient_checkpointing=False,
                        bf16=False, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(args.work, padding_side="left"),
                          peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"), callbacks=[Clock()])
    trainer.train()
    timed = lengths[args.warmup:]
    return {"step_s": sum(times[args.warmup:]), "cpu_s": sum(cpu[args.warmup:]),
            "completion_length": sum(timed) / max(len(timed), 1)}


def main():
    args = parse_args()
    if args.only:
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps((nanotune_child if args.only == "nanotune" else trl_child)(args)))
        return
    work = tempfile.mkdtemp(prefix="bench-grpo-")
    try:
        write_model(args, work)
        write_prompts(args, work)
        completions = args.steps * args.prompts * args.generations
        hf = os.path.join(os.path.dirname(os.path.dirname(HERE)), "hfvenv", "bin", "python")
        results = []
        for name, python in (("nanotune", sys.executable), ("trl", hf if os.path.exists(hf) else sys.executable)):
            proc = subprocess.run([python, __file__, "--only", name, "--work", work, *sys.argv[1:]], capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                                  "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT})
            if proc.returncode:
                sys.exit(f"the {name} run failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.split("RESULT ")[-1]))
        ours, trl = results
        print(f"GRPO step, {args.prompts} prompts x G {args.generations}, {args.new_tokens} new tokens, hidden "
              f"{args.hidden}, {args.layers} layers, vocabulary 151,936, {args.threads} thread(s), fp32, LoRA r8 q/v:")
        for name, r in (("nanotune", ours), ("TRL GRPOTrainer + peft", trl)):
            print(f"  {name:24s} {completions / r['step_s']:6.2f} completions/s of wall time, {completions / r['cpu_s']:6.2f} "
                  f"of CPU time  ({r['step_s'] / args.steps:.2f} s, {r['cpu_s'] / args.steps:.2f} CPU s a step; mean "
                  f"completion {r['completion_length']:.1f} tokens)"
                  + (f"; generation {ours['generation_s'] / ours['step_s']:.0%} of the step" if r is ours else ""))
        print(f"  nanotune / TRL: {trl['step_s'] / ours['step_s']:.2f}x (wall), {trl['cpu_s'] / ours['cpu_s']:.2f}x (CPU)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
