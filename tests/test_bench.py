"""bench/bench.py, the script behind BENCHMARKS.md: its FLOP count against torch's FLOP counter, and
every mode run end to end on a tiny shape. Its speed figures themselves are measured, not tested."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, group_of_one

BENCH = os.path.join(ROOT, "bench", "bench.py")
spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ["--hidden", "32", "--heads", "4", "--layers", "2", "--vocab", "96", "--seq", "64", "--batch", "2",
        "--device", "cpu"]


def json_line(out):
    (line,) = [line for line in out.splitlines() if line.startswith("json ")]
    return json.loads(line[5:])["results"]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_flop_count_of_a_full_fine_tune_matches_torchs_flop_counter(family):
    """torch's FlopCounterMode counts the matmuls one training step really runs (attention through
    the math backend, whose batched matmuls it sees). It does not see the head's in-place
    grad_W.addmm_ (2*C*V per token), and each row's last position has no label (6*C*V per row), so it
    may count that much less than the formula; a wrong multiplier (4x or 6x, attention's 3x) lands
    far outside. Llama's tied head changes none of this: the head is one Linear (the embedding's
    gradient, a scatter, and the sum of the two gradients cost no matmul), and grouped-query attention
    runs the math backend's matmuls for every query head, as the formula counts them."""
    args = bench.parse_args(["--mode", "full", "--family", family, *TINY])
    with tempfile.TemporaryDirectory() as tmp:
        bench.write_model(args, tmp)
        runner = bench.build_nanotune(args, tmp, torch.device("cpu"))
    ids, labels = bench.batches(args)[0]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner.step(ids, labels)
    config, tokens = runner.model.config, args.batch * args.seq
    formula = bench.flops_per_token(runner.model, args.seq) * tokens
    missed = 2 * config.hidden_size * config.vocab_size * (tokens + 3 * args.batch)
    assert formula - missed <= counter.get_total_flops() <= formula


def modes():
    quantized = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
    return ["lora-fp32", "lora-bf16", "full", pytest.param("int8", marks=quantized),
            pytest.param("nf4", marks=quantized)]


@pytest.mark.parametrize("mode", modes())
def test_every_mode_trains_and_reports(mode, capsys):
    bench.main(bench.parse_args(["--mode", mode, "--steps", "2", "--warmup", "1", "--no-memory", *TINY]))
    result = json_line(capsys.readouterr().out)["nanotune"]
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 2 and result["blocks_mb"] < result["base_mb"]


def test_llama_trains_and_reports(capsys):
    """--family llama: grouped-query attention (4 query heads on 1 kv head), the head tied to the
    embedding, LoRA on q_proj and v_proj; --dora times DoRA on them beside it."""
    bench.main(bench.parse_args(["--family", "llama", "--mode", "lora-bf16", "--steps", "2", "--warmup", "1",
                                 "--no-memory", "--dora", "--lora-dropout", "0.1", *TINY]))
    out = capsys.readouterr().out
    assert "llama, mode lora-bf16: hidden 32, 2 layers, 4 heads, 1 kv heads, vocab 96, tied head" in out
    assert "nanotune-dora / nanotune (LoRA): tokens/s x" in out
    result = json_line(out)["nanotune"]
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 2 and result["blocks_mb"] < result["base_mb"]
    assert json_line(out)["nanotune-dora"]["tokens_per_s"] > 0


def test_base_bytes_leave_lora_out():
    """bf16-true stores every base weight in bf16 and keeps LoRA in fp32: exactly half the fp32 base."""
    sizes = {}
    for precision in ("32", "bf16-true"):
        args = bench.parse_args(["--mode", "lora-bf16", "--precision", precision, *TINY])
        with tempfile.TemporaryDirectory() as tmp:
            bench.write_model(args, tmp)
            model, _ = bench.nanotune_model(args, tmp, torch.device("cpu"))
        sizes[precision] = bench.base_bytes(model)
    assert sizes["bf16-true"] * 2 == sizes["32"]


def test_memory_children_report_peaks():
    """The per-runner subprocesses that measure peak memory, as BENCHMARKS.md's tables run them."""
    proc = subprocess.run([sys.executable, BENCH, "--mode", "lora-fp32", "--steps", "1", "--warmup", "0", *TINY],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json_line(proc.stdout)["nanotune"]
    assert math.isfinite(result["peak_rss_mb"]) and 0 < result["train_rss_mb"] < result["peak_rss_mb"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp_in_a_group_of_one(strategy, capsys):
    """bench.py --strategy ddp|fsdp as bench/scaling.py runs it, with one process (gloo): here a group of one
    in the test process, without torchrun's start-up (the same code as under torchrun from compute_init on)."""
    with group_of_one():
        bench.main(bench.parse_args(["--mode", "lora-fp32", "--steps", "1", "--warmup", "0", "--no-memory",
                                     "--strategy", strategy, *TINY]))
    (result,) = json_line(capsys.readouterr().out).values()
    assert result["tokens_per_s"] > 0
