"""GRPO (--objective grpo): advantages and the clipped surrogate against their formulas on hand-made rewards
and log-probs, the logged KL against a recomputation from full logits, rewards from a user's file (what it
is called with), rewards that raise or miscount, the prompt formats, bitwise resume, 2 processes == 1 with
accumulation, and a reward that rises."""
import importlib.util
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, alpaca_rows, run_torchrun, run_train, tiny_config, train_here, train_refused
from nanotune.grpo import advantages, grpo, grpo_token_loss, prompt_turns
from nanotune.loss import IGNORE
from nanotune.models.gpt_neox import GPTNeoX
from nanotune.rewards import exact_match, length, load_rewards

STEPS = ["--objective", "grpo", "--max-steps", 2, "--batch-size", 2, "--num-generations", 4, "--max-new-tokens", 8,
         "--log-every", 1, "--eval-every", 0, "--eval-exact-match", 0, "--lora-dropout", 0, "--val-fraction", 0]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_advantages_are_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased, as TRL: the group 1, 0, 0, 1 has mean 0.5
    expect = [0.5 / (std + 1e-4) * s for s in (1, -1, -1, 1)] + [0.0] * 4  # equal rewards: no advantage
    assert advantages(rewards, 4).tolist() == pytest.approx(expect)
    assert advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_clipped_surrogate_and_kl_match_their_formulas():
    eps, beta = 0.2, 0.1
    ratios = [1.5, 0.7, 1.1, 0.5]  # above the band (A > 0: clipped), below (A < 0: clipped), inside, below (A > 0)
    A = torch.tensor([2.0, -1.0, 0.5, 3.0])
    old = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]])
    logps = (old + torch.log(torch.tensor(ratios))[:, None]).requires_grad_()
    ref = torch.tensor([[-1.2], [-1.0], [-0.7], [-2.0]])
    loss, kl, clipped = grpo_token_loss(logps, old, ref, A, eps, beta)
    for i, (r, a) in enumerate(zip(ratios, A.tolist())):
        d = ref[i, 0].item() - logps[i, 0].item()
        assert kl[i, 0].item() == pytest.approx(math.exp(d) - d - 1)
        assert loss[i, 0].item() == pytest.approx(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) + beta * kl[i, 0].item())
    assert clipped[:, 0].tolist() == [True, True, False, False]
    loss.sum().backward()
    # d/dlogp: a clipped token's surrogate is constant, only the KL term moves it; else -A * ratio.
    dkl = [1 - math.exp(ref[i, 0].item() - logps[i, 0].item()) for i in range(4)]
    expect = [beta * dkl[0], beta * dkl[1], -0.5 * 1.1 + beta * dkl[2], -3.0 * 0.5 + beta * dkl[3]]
    assert logps.grad[:, 0].tolist() == pytest.approx(expect, rel=1e-5)


@pytest.fixture(scope="module")
def rollout():
    """A tiny model and a micro-batch of 2 prompts x 2 completions as Rollouts builds it."""
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config())
    input_ids = torch.randint(0, 320, (4, 9))
    labels = torch.full((4, 9), IGNORE)
    for row, (start, end) in enumerate([(3, 9), (3, 5), (5, 9), (5, 7)]):  # completions of varied length
        labels[row, start - 1:end - 1] = input_ids[row, start:end]
    return model, input_ids, labels


def test_equal_rewards_give_no_update(rollout):
    model, input_ids, labels = rollout
    A = advantages(torch.tensor([0.5, 0.5, 1.0, 1.0]), 2)
    loss, figures = grpo(model, (input_ids, labels, A), 12, 2, G=2, eps=0.2, beta=0.0, per_sequence=False,
                         reused=False, reference=False)
    loss.backward()
    assert loss.item() == 0 and figures["clip_ratio"] == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad()


@pytest.mark.parametrize("per_sequence", [False, True])
def test_loss_and_kl_against_full_logits(rollout, per_sequence):
    """The loss value and the logged kl against log_softmax over the whole vocabulary, written here."""
    model, input_ids, labels = rollout
    reference = GPTNeoX(tiny_config())  # another model as the reference: the KL is then far from 0
    mask = labels != IGNORE

    def naive(m):
        logp = F.log_softmax(m(input_ids), -1)  # (R, T, V)
        return logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask

    with torch.no_grad():
        ref, pi = naive(reference), naive(model)
    A = torch.tensor([1.0, -1.0, 0.3, -0.3])
    n_tokens = int(mask.sum())
    loss, figures = grpo(model, (input_ids, labels, A, ref), n_tokens, 2, G=2, eps=0.2, beta=0.04,
                         per_sequence=per_sequence, reused=False, reference=True)
    kl = (torch.exp(ref - pi) - (ref - pi) - 1) * mask
    assert figures["kl"] == pytest.approx(float(kl.sum()) / n_tokens, rel=1e-5)
    per_token = (-A[:, None] + 0.04 * kl) * mask  # ratio 1 in value: the surrogate is -A
    expect = (per_token.sum(1) / mask.sum(1)).mean() if per_sequence else per_token.sum() / n_tokens
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_rewards_and_prompt_formats():
    assert exact_match(None, [" blue cat ", "cat"], ["blue cat", "blue cat"]) == [1.0, 0.0]
    (name, words_in_place), = load_rewards((os.path.join(ROOT, "examples", "word_rewards.py:words_in_place"),))
    assert name == "words_in_place" and words_in_place(None, ["b a", "b x c", ""], ["b a"] * 3) == [1.0, 1 / 3, 0.0]
    assert length(None, ["abcd", "", "abcdefghijkl"], ["abcd", "ab", "abcd"]) == [0.0, -1.0, -1.0]
    assert length(None, ["abc"], ["abcd"]) == [-0.25]
    alpaca = prompt_turns({"instruction": "Reverse.", "input": "a b", "output": "b a"}, "row")
    assert alpaca == (None, [("user", "Reverse.\n\n### Input:\na b")], "Reverse.\n\n### Input:\na b", "b a")
    share = prompt_turns({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}, "row")
    assert share[1][-1] == ("user", "2+2?") and len(share[1]) == 3 and share[3] == "4"
    assert prompt_turns({"prompt": "2+2?", "answer": "4"}, "row") == (None, [("user", "2+2?")], "2+2?", "4")
    trl = prompt_turns({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]}, "r")
    assert trl == ("Be brief.", [("user", "2+2?")], "2+2?", None)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(16)))
    return str(path)


def test_user_reward_file(tiny_model_dir, rows_file, tmp_path):
    """A user's reward is called once a step with every completion of the process, its prompt's user turn and
    the row's answer; its figure logs as reward_<function>, the sum of weighted rewards as reward."""
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "mine.py").write_text(
        "import json\n"
        "def brevity(prompts, completions, references):\n"
        f"    open({str(seen)!r}, 'a').write(json.dumps([prompts, completions, references]) + '\\n')\n"
        "    return [-len(c) for c in completions]\n")
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", rows_file, "--out", out, *STEPS,
               "--reward", f"{tmp_path / 'mine.py'}:brevity", "exact_match", "--reward-weights", 0.5, 2)
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2 and all(len(part) == 8 for call in calls for part in call)
    rows = {r["instruction"] + "\n\n### Input:\n" + r["input"]: r["output"] for r in alpaca_rows(16)}
    prompts, completions, references = calls[0]
    assert all(rows[p] == r for p, r in zip(prompts, references)) and prompts[0] == prompts[3] != prompts[4]
    logged = metrics(out)[0]
    brevity = sum(-len(c) for c in completions) / 8
    hits = sum(c.strip() == r for c, r in zip(completions, references)) / 8
    assert logged["reward_brevity"] == pytest.approx(brevity) and logged["reward_exact_match"] == pytest.approx(hits)
    assert logged["reward"] == pytest.approx(0.5 * brevity + 2 * hits)
    assert 1 <= logged["completion_length"] <= 8 and "kl" not in logged
    assert all(k in logged for k in ("reward_std", "clip_ratio", "generation_seconds", "update_seconds"))


@pytest.mark.parametrize("body, said", [("raise ValueError('no digits')", "reward broken raised ValueError: no digits"),
                                        ("return [1.0]", "reward broken returned 1 values for 8 completions")])
def test_bad_reward_stops_the_run(tiny_model_dir, rows_file, tmp_path, body, said):
    (tmp_path / "bad.py").write_text(f"def broken(prompts, completions, references):\n    {body}\n")
    message = train_refused("--model", tiny_model_dir, "--data", rows_file, "--out", tmp_path / "out", *STEPS,
                            "--reward", f"{tmp_path / 'bad.py'}:broken")
    assert said in message


def test_bad_flags(tiny_model_dir, rows_file, tmp_path):
    common = ["--model", tiny_model_dir, "--data", rows_file, "--out", tmp_path / "out"]
    assert "needs --reward" in train_refused(*common, "--objective", "grpo")
    assert "applies to --objective grpo" in train_refused(*common, "--num-generations", 4)
    assert "has no function 'nope'" in train_refused(*common, *STEPS, "--reward", f"{__file__}:nope")
    assert "2 weights for 1 rewards" in train_refused(*common, *STEPS, "--reward", "exact_match",
                                                      "--reward-weights", 1, 2)


def test_resume_is_bitwise(tiny_model_dir, rows_file, tmp_path):
    """Resumed from its step-2 checkpoint, a run samples the same completions and ends bit-identical."""
    full, again = tmp_path / "full", tmp_path / "again"
    common = ["--model", tiny_model_dir, "--data", rows_file, *STEPS, "--max-steps", 4, "--save-every", 2,
              "--reward", "exact_match", "length", "--lora-dropout", 0.1, "--beta", 0.1, "--grpo-iterations", 2]
    train_here(*common, "--out", full)
    os.makedirs(again)
    shutil.copytree(full / "checkpoints" / "step-2", again / "checkpoints" / "step-2")
    assert "resumed from" in train_here(*common, "--out", again, "--resume")
    name = "adapter/adapter_model.safetensors"
    assert (again / name).read_bytes() == (full / name).read_bytes()
    timing = ("seconds", "_per_s", "padding_efficiency")  # clocks, and figures counted since the process started
    assert [{k: v for k, v in row.items() if not k.endswith(timing)} for row in metrics(again)] == \
        [{k: v for k, v in row.items() if not k.endswith(timing)} for row in metrics(full)[2:]]
    assert metrics(full)[-1]["kl"] > 0


def test_two_processes_equal_one_with_accumulation(tiny_model_dir, rows_file, tmp_path):
    """DDP over 2 processes (gloo), each sampling for its own prompts, == 1 process with grad-accum 2: the same
    completions (seeded per micro-batch of the global batch), rewards, and update."""
    common = ["--model", tiny_model_dir, "--data", rows_file, *STEPS, "--reward", "length", "--device", "cpu"]
    run_torchrun(29731, *common, "--out", tmp_path / "ddp")
    train_here(*common, "--out", tmp_path / "one", "--grad-accum", 2)
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    for key in ("reward", "reward_std", "completion_length"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-6)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("stage,lora", [(2, True), (3, False)])  # ZeRO-3 LoRA swaps as its full fine-tune
def test_kl_under_deepspeed_is_to_the_start_and_resumes(tiny_model_dir, rows_file, tmp_path, stage, lora):
    """--beta > 0 under ZeRO-2 and ZeRO-3 (its partitions gathered to swap the reference in, every tensor
    partitioned): the logged KL is 0 at step 1 (the reference is the starting model), the losses and KLs are
    a single process's without DeepSpeed, and a run resumed at step 2 (whose engine is built on the restored
    weights) keeps the reference of step 0 and logs what the uninterrupted run did."""
    common = ["--model", tiny_model_dir, "--data", rows_file, *STEPS, "--max-steps", 3, "--save-every", 2,
              "--reward", "length", "--beta", 0.5, "--lr", 1e-2, "--warmup-steps", 0, *([] if lora else ["--no-lora"])]
    config = tmp_path / "zero.json"
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    ds = [*common, "--strategy", "deepspeed", "--zero-stage", stage, "--deepspeed-config", config]
    train_here(*common, "--out", tmp_path / "none")
    run_train(*ds, "--out", tmp_path / "ds")
    os.makedirs(tmp_path / "again")
    shutil.copytree(tmp_path / "ds" / "checkpoints" / "step-2", tmp_path / "again" / "checkpoints" / "step-2")
    assert "resumed from" in run_train(*ds, "--out", tmp_path / "again", "--resume").stdout
    none, full, again = (metrics(tmp_path / name) for name in ("none", "ds", "again"))
    assert full[0]["kl"] == pytest.approx(0, abs=1e-7) and full[-1]["kl"] > 1e-5
    for key in ("loss", "kl", "reward"):
        assert [r[key] for r in full] == pytest.approx([r[key] for r in none], rel=1e-4, abs=1e-7)
        assert [r[key] for r in again] == pytest.approx([r[key] for r in full[2:]], rel=1e-4, abs=1e-7)


def test_reward_rises(tiny_model_dir, rows_file, tmp_path):
    """The demo in small: GRPO raises a reward the random tiny model rarely earns at first (a completion
    with an 'e' in its two tokens) to most completions within 12 steps."""
    (tmp_path / "e.py").write_text("def has_e(prompts, completions, references):\n"
                                   "    return [float('e' in c) for c in completions]\n")
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", rows_file, "--out", out, *STEPS, "--max-steps", 12,
               "--batch-size", 4, "--num-generations", 8, "--max-new-tokens", 2, "--lr", 3e-2, "--warmup-steps", 0,
               "--no-lora", "--reward", f"{tmp_path / 'e.py'}:has_e")
    rewards = [row["reward"] for row in metrics(out)]
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.5, rewards


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", [["--precision", "bf16", "--beta", 0.05], ["--load-in-4bit", "--precision", "bf16"]])
def test_trains_on_the_gpu(tiny_model_dir, rows_file, tmp_path, flags):
    """On CUDA: generation on the device with sampling on the CPU, the reference swapped in, an NF4 base."""
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", rows_file, "--out", out, *STEPS, "--reward", "length", *flags,
               gpu=True)
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["reward"]) for row in metrics(out))
