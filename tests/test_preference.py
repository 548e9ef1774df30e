"""Preference training (--objective dpo, ipo, simpo, orpo): each loss against its paper's formula on
hand-computed log-probs, the per-row log-probs and their gradients against a plain log_softmax, the pair
formats against the SFT rows of the same conversations, the figures train.py logs against a recomputation
with per-row cross_entropy, the reference = the starting model, 2 processes (ZeRO-3) == 1 with
accumulation, an NF4 base, bitwise resume, and bad input."""
import importlib.util
import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import alpaca_rows, run_torchrun, train_here, train_refused
from nanotune import UserError
from nanotune.data import encode, load_examples, main as data_main, pair_turns, turns
from nanotune.loss import IGNORE, token_logprobs
from nanotune.lora import load_adapter
from nanotune.models import from_pretrained
from nanotune.objectives import dpo_loss, ipo_loss, orpo_odds_loss, preference, simpo_loss
from nanotune.templates import load_template
from nanotune.tokenizer import load_tokenizer

STEPS = ["--max-steps", 4, "--batch-size", 2, "--log-every", 1, "--eval-every", 2, "--eval-exact-match", 0,
         "--lora-dropout", 0, "--val-fraction", 0.125]


def pair_rows(n, seed=0):
    """LLaMA-Factory's Alpaca pairs: the reversed words chosen, the words as given rejected."""
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": r["input"]}
            for r in alpaca_rows(n, seed)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(32)))
    return str(path)


@pytest.fixture(scope="module")
def alpaca(tiny_model_dir):
    return load_template("auto", tiny_model_dir, load_tokenizer(tiny_model_dir))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_losses_match_their_formulas():
    c, r, rc, rr, beta = -3.0, -5.5, -3.4, -5.0, 0.3  # logp(chosen), logp(rejected), the reference's
    t = [torch.tensor([v]) for v in (c, r, rc, rr)]
    d = beta * ((c - rc) - (r - rr))
    loss, rew_c, rew_r = dpo_loss(*t, beta)
    assert loss.item() == pytest.approx(-math.log(sig(d)))
    assert (rew_c.item(), rew_r.item()) == pytest.approx((beta * (c - rc), beta * (r - rr)))
    loss, _, _ = dpo_loss(*t, beta, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.log(sig(d)) - 0.2 * math.log(sig(-d)))
    loss, _, _ = ipo_loss(*t, beta)  # the caller passes mean log-probs here
    assert loss.item() == pytest.approx(((c - rc) - (r - rr) - 1 / (2 * beta)) ** 2)
    loss, rew_c, rew_r = simpo_loss(t[0], t[1], 2.0, 0.5)
    assert loss.item() == pytest.approx(-math.log(sig(2.0 * (c - r) - 0.5)))
    assert (rew_c.item(), rew_r.item()) == pytest.approx((2.0 * c, 2.0 * r))
    m_c, m_r = -0.4, -1.3  # mean log-probs: odds = p / (1 - p) with p = exp(m)
    loss, _, _ = orpo_odds_loss(torch.tensor([m_c]), torch.tensor([m_r]), beta)
    odds = [math.exp(m) / (1 - math.exp(m)) for m in (m_c, m_r)]
    assert loss.item() == pytest.approx(-beta * math.log(sig(math.log(odds[0] / odds[1]))))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head", ["frozen", "trains", "wrapped"])
def test_token_logprobs_and_gradients_match_log_softmax(device, dtype, tol, head):
    """token_logprobs against log_softmax through autograd, with per-token upstream gradients as a pair loss
    gives: 3 x 100 positions in chunks of 64 (the last ragged), CPU_ROWS softmax blocks on a CPU; a head
    that trains (its gradient recomputed in the backward), and a wrapped head (plain autograd)."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 97, bias=False, device=device).requires_grad_(head != "frozen")
    h = torch.randn(3, 100, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 97, (3, 100), device=device)
    labels[0, :20] = labels[2, 90:] = IGNORE
    g = torch.randn(3, 100, device=device)
    wanted = [h, linear.weight] if head != "frozen" else [h]
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        mine = token_logprobs(h, labels, nn.Sequential(linear) if head == "wrapped" else linear, chunk=64)
        logits = F.linear(h.to(dtype), linear.weight.to(dtype)).float()
    ref = torch.where(labels != IGNORE, F.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad((mine * g).sum(), wanted), torch.autograd.grad((ref * g).sum(), wanted)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        torch.testing.assert_close(token_logprobs(h, labels, linear, chunk=64), ref, rtol=tol, atol=tol)  # evaluation


def test_pair_formats_are_the_sft_rows_of_the_conversation(tmp_path, alpaca, tiny_model_dir, capsys):
    """TRL's strings and messages, LLaMA-Factory's Alpaca and ShareGPT: the same pair, the same ids; the
    chosen row is the SFT row of the conversation ending in it, trained on its final answer (and EOS)."""
    history = [{"from": "human", "value": "cat dog"}, {"from": "gpt", "value": "dog cat"},
               {"from": "human", "value": "Reverse the words."}]
    forms = {
        "trl_messages": {"prompt": [{"role": "user", "content": "cat dog"}, {"role": "assistant", "content": "dog cat"},
                                    {"role": "user", "content": "Reverse the words."}],
                         "chosen": [{"role": "assistant", "content": "red"}],
                         "rejected": [{"role": "assistant", "content": "blue"}]},
        "sharegpt": {"conversations": history, "chosen": {"from": "gpt", "value": "red"},
                     "rejected": {"from": "gpt", "value": "blue"}},
    }
    single = {"trl_strings": {"prompt": "Reverse the words.", "chosen": "red", "rejected": "blue"},
              "alpaca": {"instruction": "Reverse the words.", "chosen": "red", "rejected": "blue"}}
    read = {}
    for name, row in {**forms, **single}.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([row]))
        read[name] = [(list(ex.tokens), list(ex.trained)) for ex in load_examples(str(path), alpaca, 256, pairs=True)]
    assert read["trl_messages"] == read["sharegpt"] and read["trl_strings"] == read["alpaca"]
    for history_rows, name in ((history, "sharegpt"), (history[-1:], "alpaca")):
        for k, answer in enumerate(("red", "blue")):
            sft = {"conversations": history_rows + [{"from": "gpt", "value": answer}]}
            ex = encode(alpaca, *turns(sft, "x"), mask_history=True)
            assert read[name][k] == (ex.tokens, ex.trained)
            trained = [t for t, keep in zip(ex.tokens, ex.trained) if keep]
            assert alpaca.tokenizer.decode(trained[:-1]) == answer and trained[-1] == 0  # the answer and EOS
    capsys.readouterr()
    data_main(["--model", tiny_model_dir, "--data", str(tmp_path / "sharegpt.json"), "--show", "1"])
    shown = capsys.readouterr().out
    assert shown.startswith("chosen:\n") and "\nrejected:\n" in shown and "[[blue<|endoftext|>]]" in shown


@pytest.mark.parametrize("row,message", [
    ({"instruction": "a", "chosen": "x"}, "a preference pair needs 'chosen' and 'rejected', and 'rejected' is missing"),
    ({"instruction": "a", "output": "x"}, "this is an SFT row, which trains with --objective sft"),
    ({"prompt": "a", "chosen": "  ", "rejected": "y"}, "chosen: the completion is empty"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
     "chosen: the completion must be an assistant message, not 'user'"),
    ({"conversations": [{"from": "gpt", "value": "a"}], "chosen": "x", "rejected": "y"},
     "the prompt must end with a user turn"),
    ({"chosen": "x", "rejected": "y"}, "needs its prompt as 'prompt' (TRL)"),
])
def test_bad_pairs_are_one_sentence(row, message):
    with pytest.raises(UserError, match=r"^f\.jsonl line 3\b.*" + re.escape(message)):
        pair_turns(row, "f.jsonl line 3")


def test_pairs_to_sft_and_bad_flags_are_refused(tiny_model_dir, tiny_data, pairs_file, tmp_path):
    common = ["--model", tiny_model_dir, "--out", tmp_path / "o", *STEPS]
    assert "a preference pair (chosen/rejected) cannot train --objective sft" in \
        train_refused(*common, "--data", pairs_file)
    assert "line 1: a preference pair needs 'chosen' and 'rejected'" in \
        train_refused(*common, "--data", tiny_data, "--objective", "dpo")
    for flags, message in ((["--objective", "dpo", "--beta", 0], "--beta must be > 0"),
                           (["--objective", "dpo", "--label-smoothing", 0.5], "--label-smoothing must be in [0, 0.5)"),
                           (["--objective", "simpo", "--simpo-gamma", -1], "--simpo-gamma must be >= 0"),
                           (["--objective", "ipo", "--label-smoothing", 0.1], "applies to --objective dpo only"),
                           (["--beta", 0.2], "apply to the preference objectives")):
        assert message in train_refused(*common, "--data", pairs_file, *flags)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_objective_figures_match_per_row_cross_entropy(tiny_model_dir, name):
    """preference() on a tiny model against per-row cross_entropy of its logits and the formulas above."""
    torch.manual_seed(0)
    model = from_pretrained(tiny_model_dir)
    input_ids = torch.randint(0, 300, (4, 9))  # 2 pairs: rows 0, 2 chosen, rows 1, 3 rejected
    labels = torch.randint(0, 300, (4, 9))
    labels[:, :3] = IGNORE
    labels[1, 7:] = IGNORE
    reference = torch.tensor([-30.0, -31.0, -32.0, -29.0])
    beta = 0.5
    loss_fn, mean = {"dpo": (lambda *a: dpo_loss(*a, beta), False), "ipo": (lambda *a: ipo_loss(*a, beta), True),
                     "simpo": (lambda *a: simpo_loss(*a, beta, 0.3), True),
                     "orpo": (lambda *a: orpo_odds_loss(*a, beta), True)}[name]
    batch = (input_ids, labels, reference) if name in ("dpo", "ipo") else (input_ids, labels)
    n_tokens = 40  # the global batch's chosen tokens, as Batches counts them
    loss, figures = preference(loss_fn, mean, name == "orpo", name in ("dpo", "ipo"), model, batch, n_tokens, 2)

    ce = F.cross_entropy(model(input_ids).transpose(1, 2), labels, reduction="none")  # (4, 9), 0 where IGNORE
    logp, n = -ce.sum(1), (labels != IGNORE).sum(1)
    m, mref = logp / n, reference / n
    c, r = slice(0, 4, 2), slice(1, 4, 2)
    if name == "dpo":
        d = beta * ((logp[c] - reference[c]) - (logp[r] - reference[r]))
        expect = -F.logsigmoid(d).mean()
        rew_c, rew_r = beta * (logp[c] - reference[c]), beta * (logp[r] - reference[r])
    elif name == "ipo":
        expect = (((m[c] - mref[c]) - (m[r] - mref[r]) - 1 / (2 * beta)) ** 2).mean()
        rew_c, rew_r = beta * (m[c] - mref[c]), beta * (m[r] - mref[r])
    elif name == "simpo":
        expect = -F.logsigmoid(beta * (m[c] - m[r]) - 0.3).mean()
        rew_c, rew_r = beta * m[c], beta * m[r]
    else:
        odds = m - torch.log(1 - torch.exp(m))
        expect = ce[c].sum() / n_tokens - beta * F.logsigmoid(odds[c] - odds[r]).mean()
        rew_c, rew_r = beta * m[c], beta * m[r]
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    want = {"rewards_chosen": rew_c.mean(), "rewards_rejected": rew_r.mean(), "reward_margin": (rew_c - rew_r).mean(),
            "reward_accuracy": (rew_c > rew_r).float().mean(), "logps_chosen": logp[c].mean(),
            "logps_rejected": logp[r].mean()}
    assert figures == pytest.approx({k: v.item() for k, v in want.items()}, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_packed_pairs_compute_what_padded_ones_do(tiny_model_dir, pairs_file, alpaca, name):
    """Pairs packed back to back (--packing), each row attending to itself: the same loss, figures and
    gradients as the same pairs right-padded."""
    from nanotune.objectives import objective
    from nanotune.pairs import Pairs
    from nanotune.store import Store
    pairs = Pairs(Store.of(load_examples(pairs_file, alpaca, 256, pairs=True, log=lambda _: None)))
    if name == "dpo":  # orpo has none: train.py attaches it for dpo and ipo only
        pairs.reference = torch.randn(len(pairs), 2).numpy() - 40
    model = from_pretrained(tiny_model_dir)
    args = type("Args", (), {"objective": name, "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": None})
    results, sequences = [], [[0, 1, 2], [3, 4]]
    seq_len = max(int(sum(pairs.lengths[s] - 1)) for s in sequences) + 3  # the second sequence ends in padding
    for batch in (pairs.collate([0, 1, 2, 3, 4], 1), pairs.collate(sequences, 1, seq_len)):
        model.zero_grad()
        loss, figures = objective(args)(model, batch, 50, 5)
        loss.backward()
        results.append((loss.item(), figures, [p.grad.clone() for p in model.parameters()]))
    (loss_a, figures_a, grads_a), (loss_b, figures_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and figures_a == pytest.approx(figures_b, rel=1e-5, abs=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def held_out_logps(model, alpaca, pairs_file, seed=42, fraction=0.125):
    """The mean over the held-out pairs (train.py's seeded split) of the summed log-probs of their chosen
    and rejected rows, by per-row cross_entropy."""
    examples = load_examples(pairs_file, alpaca, 256, pairs=True, log=lambda _: None)
    n = len(examples) // 2
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:int(n * fraction)]
    sums = []
    for k in (0, 1):
        rows = [examples[2 * i + k] for i in order]
        total = 0.0
        for ex in rows:
            ids = torch.tensor(ex.tokens)
            labels = torch.where(torch.tensor(ex.trained[1:]), ids[1:], IGNORE)
            with torch.no_grad():
                total -= F.cross_entropy(model(ids[None, :-1])[0], labels, reduction="sum").item()
        sums.append(total / len(rows))
    return sums


def test_reference_is_the_starting_model(tiny_model_dir, tiny_data, pairs_file, alpaca, tmp_path):
    """dpo from a fresh LoRA and from an SFT adapter: before training and at step 1 the loss is ln 2 and
    the rewards 0, and the logged log-probs are those of the starting model, recomputed here."""
    sft = tmp_path / "sft"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", sft, "--max-steps", 6, "--batch-size", 4,
               "--eval-exact-match", 0, "--lr", 1e-2, "--lora-dropout", 0)
    for start in ([], ["--adapter", sft / "adapter"]):
        out = tmp_path / ("dpo" + str(len(start)))
        train_here("--model", tiny_model_dir, "--data", pairs_file, "--out", out, "--objective", "dpo", *STEPS, *start)
        before, step1 = metrics(out)[:2]
        assert before["step"] == 0 and step1["step"] == 1
        for figures, prefix in ((before, "eval_"), (step1, "")):
            assert figures[prefix + "loss"] == pytest.approx(math.log(2), abs=1e-6)
            for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
                assert figures[prefix + key] == pytest.approx(0, abs=1e-6)
        model = from_pretrained(tiny_model_dir)
        if start:
            load_adapter(model, str(sft / "adapter"))
        model.eval()
        expect = held_out_logps(model, alpaca, pairs_file)
        assert [before["eval_logps_chosen"], before["eval_logps_rejected"]] == pytest.approx(expect, rel=1e-5)
    assert metrics(tmp_path / "dpo0")[0]["eval_logps_chosen"] != metrics(tmp_path / "dpo2")[0]["eval_logps_chosen"]


@pytest.mark.parametrize("name,flags", [("ipo", []), ("simpo", []), ("orpo", []), ("dpo", ["--packing"])])
def test_every_objective_trains(tiny_model_dir, pairs_file, tmp_path, name, flags):
    out = tmp_path / name
    log = train_here("--model", tiny_model_dir, "--data", pairs_file, "--out", out, "--objective", name, *STEPS,
                     "--max-steps", 2, "--eval-every", 0, *flags)
    if flags:  # the first step's loss is the mean over its pairs, ln 2 (policy = reference), however many it packs
        assert "global batch 2 sequences of 512 tokens (packed from 28 pairs)" in log
        step1 = metrics(out)[1]
        assert step1["step"] == 1 and step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    rows = metrics(out)
    assert rows[-1]["step"] == 2 and all(math.isfinite(rows[-1][k]) for k in ("eval_loss", "eval_reward_margin"))
    assert os.path.exists(out / "adapter" / "adapter_model.safetensors")


def test_resume_is_bitwise(tiny_model_dir, pairs_file, tmp_path):
    """A run resumed from its step-2 checkpoint (the reference read back, not recomputed) ends bit-identical."""
    full, again = tmp_path / "full", tmp_path / "again"
    common = ["--model", tiny_model_dir, "--data", pairs_file, "--objective", "dpo", *STEPS, "--lora-dropout", 0.1,
              "--save-every", 2]
    train_here(*common, "--out", full)
    os.makedirs(again)
    shutil.copytree(full / "checkpoints" / "step-2", again / "checkpoints" / "step-2")
    assert "reference.safetensors is missing" in train_refused(*common, "--out", again, "--resume")
    shutil.copy(full / "reference.safetensors", again)
    assert "resumed from" in train_here(*common, "--out", again, "--resume")
    name = "adapter/adapter_model.safetensors"
    assert (again / name).read_bytes() == (full / name).read_bytes()
    assert metrics(again)[-1] == {**metrics(full)[-1], **{k: metrics(again)[-1][k] for k in metrics(again)[-1]
                                                          if k.endswith("_per_s") or k == "padding_efficiency"}}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_base_trains(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "nf4"
    train_here("--model", tiny_model_dir, "--data", pairs_file, "--out", out, "--objective", "dpo", *STEPS,
               "--load-in-4bit", "--max-steps", 2, "--eval-every", 0)
    rows = metrics(out)
    assert rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(rows[-1]["eval_loss"])
    assert load_file(out / "adapter" / "adapter_model.safetensors")


def test_two_processes_equal_one_with_accumulation(tiny_model_dir, pairs_file, tmp_path):
    """torchrun, 2 processes (ZeRO-3 where deepspeed is installed, else DDP): the same losses and figures
    as one process with twice the accumulation, and a complete adapter. dpo, so the reference pass runs
    sharded too (4 held-out pairs over 2 ranks), with --packing, whose steps hold varying numbers of pairs."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", tiny_model_dir, "--data", pairs_file, "--objective", "dpo", *STEPS, "--batch-size", 1,
              "--packing", "--max-seq-len", 64]
    train_here(*common, "--out", one, "--grad-accum", 2)
    if importlib.util.find_spec("deepspeed"):
        config = tmp_path / "zero3.json"  # partition even tiny tensors, as tests/test_deepspeed.py
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        layout = ["--strategy", "deepspeed", "--zero-stage", 3, "--deepspeed-config", config]
    else:
        layout = ["--strategy", "ddp"]
    run_torchrun(29940, *common, "--out", two, *layout)
    timing = ("tokens_per_s", "trained_tokens_per_s", "padding_efficiency", "lr", "grad_norm")
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == \
            pytest.approx({k: v for k, v in b.items() if k not in timing}, abs=1e-5)
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (two, one))
    assert mine.keys() == ref.keys() and all(v.numel() > 0 for v in mine.values())
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("buffer", [False, True])
def test_one_hot_minus_softmax_in_fp32_with_and_without_a_buffer(buffer):
    """A GPU works on the fp32 logits in place (no buffer): the target's log-prob is read before."""
    from nanotune.loss import one_hot_minus_softmax
    z, t = torch.randn(5, 11), torch.randint(0, 11, (5,))
    p, logp = one_hot_minus_softmax(z.clone(), t, torch.empty(5, 11) if buffer else None)
    torch.testing.assert_close(logp, F.log_softmax(z, 1).gather(1, t[:, None])[:, 0])
    torch.testing.assert_close(p, F.one_hot(t, 11) - F.softmax(z, 1))


def test_the_demo_reward_accuracy_rises(tmp_path):
    """The README's demo, shortened: DPO on the bundled pairs from a fresh LoRA on the bundled model. Before
    training every reward is 0 (accuracy 0); a few steps make the chosen answers win on held-out pairs."""
    out, data = tmp_path / "demo", tmp_path / "pairs.jsonl"
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "data",
                           "pairs.jsonl")) as f:
        data.write_text("".join(f.readlines()[:80]))  # the reference pass scores every pair: a few are enough
    train_here("--data", data, "--out", out, "--objective", "dpo", "--max-steps", 6, "--batch-size", 8,
               "--warmup-steps", 2, "--lr", 3e-3, "--eval-every", 0, "--eval-exact-match", 0, "--val-fraction", 0.2)
    evals = [row for row in metrics(out) if "eval_reward_accuracy" in row]
    assert evals[0]["eval_reward_accuracy"] == 0 and evals[-1]["eval_reward_accuracy"] >= 0.6, evals  # measured 0.75
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05  # measured 0.693 -> 0.584
