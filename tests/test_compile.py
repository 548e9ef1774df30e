"""--compile (nanotune.compile): compiled blocks compute what eager ones do, share one graph, and work
under LoRA, gradient checkpointing, FSDP2 and DDP, and in train.py.

The tests compile with the aot_eager backend: dynamo traces the blocks (Context, LoRA, autocast,
checkpointing, FSDP's hooks: what nanotune controls) and AOTAutograd builds the joint forward and
backward graph, but no C++ is generated. Inductor's first compile on a CPU builds C++ kernels with
the system compiler and takes 25 s here for a one-line function, over this suite's budget; its
results are compared with eager in the bench runs BENCHMARKS.md records (the loss[0] column)."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist

from conftest import CPU_ONLY, ROOT, tiny_config
from nanotune import UserError
from nanotune.checks import check_combination
from nanotune.compile import compile_blocks
from nanotune.distributed import World, wrap_ddp, wrap_fsdp
from nanotune.lora import inject_lora
from nanotune.models.gpt_neox import GPTNeoX
from nanotune.precision import cast_frozen, resolve
from nanotune.quantize import quantize

CPU = torch.device("cpu")


def tiny(layers=1, precision="32", grad_checkpoint=False, bits=None):
    """A tiny GPT-NeoX (width 64 with a quantized base: bitsandbytes' 4-bit blocks hold 64 weights) with
    LoRA on query_key_value whose B is not zero, so LoRA changes the output."""
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config(num_hidden_layers=layers, **({"hidden_size": 64} if bits else {})))
    model.grad_checkpoint = grad_checkpoint
    if bits:
        quantize(model, bits, resolve(precision, CPU).compute_dtype)
    inject_lora(model, None, 4, 8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return cast_frozen(model, resolve(precision, CPU))


def step(model, precision, seq=16):
    """Loss and the trained parameters' gradients of one forward and backward."""
    ids = torch.randint(0, 320, (2, seq), generator=torch.Generator().manual_seed(seq))
    model.zero_grad(set_to_none=True)
    with resolve(precision, CPU).context(CPU):
        loss = model(ids, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [None, 4])
def test_compiled_blocks_match_eager_in_bf16(bits):
    """bf16-mixed (autocast entered outside the compiled block): the loss and every LoRA gradient within
    bf16's noise (relative to the tensor's largest value) of eager blocks. Without a quantized base the
    compiled model also checkpoints its blocks, whose backward runs the compiled forward again; with a
    4-bit base (QLoRA's setting) bitsandbytes' layers trace into the compiled block (its ops are
    registered with torch; an int8 base traces too, checked by hand, left out of the suite for time).
    fp32 is compared under FSDP and DDP below."""
    if bits:
        pytest.importorskip("bitsandbytes")
    torch.compiler.reset()
    eager = tiny(precision="bf16", bits=bits)
    compiled = compile_blocks(tiny(precision="bf16", bits=bits, grad_checkpoint=not bits))
    with torch.compiler.set_stance(force_backend="aot_eager"):
        (loss, grads), (ref_loss, ref_grads) = step(compiled, "bf16"), step(eager, "bf16")
    assert grads.keys() == ref_grads.keys() and len(grads) == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= 2e-2 * ref.abs().max(), name


def test_every_block_shares_one_graph():
    """Regional compilation: 4 blocks trace 2 graphs (the first block's input needs no gradient under
    LoRA, the others' do), not 4; a new sequence length traces both again with the length symbolic,
    and a third length traces nothing. So compile time does not grow with depth, and a deep model
    stays within dynamo's limit of 8 graphs per function (beyond it, blocks would silently run eager)."""
    torch.compiler.reset()
    graphs = []

    def count(gm, example_inputs):  # a backend that records each graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    model = compile_blocks(tiny(layers=4))
    with torch.compiler.set_stance(force_backend=count):
        step(model, "32", seq=16)
        assert len(graphs) == 2
        step(model, "32", seq=12)
        assert len(graphs) == 4
        step(model, "32", seq=20)
        assert len(graphs) == 4


def test_packed_rows_compile_once():
    """Packed rows (nanotune.packing): attention runs each row eagerly, outside the graph, so rows of
    new lengths in every step trace nothing new (inside, each step's lengths would trace again until
    dynamo gave up), and the loss is eager's."""
    torch.compiler.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager, model = tiny(layers=2), compile_blocks(tiny(layers=2))
    ids, counts = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)), []
    for split in (5, 9, 12):  # each sequence packs two rows: positions 0..split-1, then split..15
        positions = torch.arange(16) - split * (torch.arange(16) >= split).long().expand(2, 16)
        row_lengths = torch.tensor([split, 16 - split] * 2)
        with torch.compiler.set_stance(force_backend=count):
            loss = model(ids, ids, positions, row_lengths)
        torch.testing.assert_close(loss, eager(ids, ids, positions, row_lengths), rtol=1e-5, atol=0)
        counts.append(len(graphs))
    assert counts[0] > 0 and counts == counts[:1] * 3


@pytest.fixture
def group(tmp_path):
    """A one-process gloo group in this process: FSDP2's and DDP's wrapping and hooks run as in a job."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_compiled_then_wrapped_matches_eager(group, strategy):
    """Compiled as train.py's wrap() does, before FSDP shards the blocks (fully_shard) or DDP wraps the
    model: the same loss and gradients as the same wrapper over eager blocks."""
    torch.compiler.reset()
    world = World(strategy=strategy)

    def wrapped(compile):
        model = compile_blocks(tiny(layers=2)) if compile else tiny(layers=2)
        if strategy == "fsdp":
            return wrap_fsdp(model, world)
        return wrap_ddp(model, world)

    eager, compiled = wrapped(False), wrapped(True)
    with torch.compiler.set_stance(force_backend="aot_eager"):
        (loss, grads), (ref_loss, ref_grads) = step(compiled, "32"), step(eager, "32")
    assert grads.keys() == ref_grads.keys() and len(grads) == 4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6)


def test_train_py_compile_matches_eager(tiny_model_dir, tiny_data, tmp_path):
    """train.py --compile, with rows of varied length (a recompile within the first step), evaluation
    and exact-match generation kept eager: the same losses as without the flag, and the cost said once."""
    flags = ["--model", tiny_model_dir, "--data", tiny_data, "--max-steps", 3, "--batch-size", 2, "--grad-accum", 2,
             "--log-every", 1, "--eval-every", 3, "--eval-exact-match", 2]
    # TORCH_COMPILE_OVERRIDE_BACKENDS: torch's switch for the backend of every graph (see the docstring)
    env = {**CPU_ONLY, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}
    runs = {}
    for name in ("eager", "compile"):  # side by side: one core each
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, flags), "--out", str(tmp_path / name)]
        with open(tmp_path / f"{name}.log", "w") as log:  # the child writes to its own copy of the file
            runs[name] = subprocess.Popen(cmd + (["--compile"] if name == "compile" else []), cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
    losses = {}
    for name, proc in runs.items():
        proc.wait(timeout=300)
        output = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 0, output[-3000:]
        assert (output.count("--compile: step 1 took") == 1) == (name == "compile")
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        losses[name] = [r.get("loss", r.get("eval_loss", r.get("exact_match"))) for r in rows]
    assert len(losses["eager"]) == 7  # eval and exact match before, 3 steps, eval and exact match after
    assert losses["compile"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)  # fp32 noise, were it inductor


def test_deepspeed_is_refused_in_one_sentence():
    args = Namespace(compile=True, load_in_8bit=False, load_in_4bit=False, fsdp_offload=False, precision="bf16",
                     lora=True, adapter=None, lora_dtype="fp32")
    with pytest.raises(UserError, match="--compile is not offered with --strategy deepspeed"):
        check_combination(args, World(strategy="deepspeed"))
    check_combination(args, World(strategy="fsdp"))
