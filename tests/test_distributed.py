"""DDP and FSDP on CPU with gloo: 2 processes match 1 process with the same global batch."""
import ast
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_ONLY, ROOT, make_tokenizer, run_torchrun, train_here, trajectory
from nanotune.lora import load_adapter
from nanotune.models import from_pretrained
from test_llama import config_json, make_folder as make_llama_folder

COMMON = ["--max-steps", 4, "--batch-size", 2, "--log-every", 1, "--eval-every", 2, "--eval-exact-match", 0,
          "--lora-dropout", 0]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tiny_data, tmp_path_factory):
    """One process, grad-accum 4: the same global batch of 8 rows as 2 processes x grad-accum 2."""
    out = tmp_path_factory.mktemp("single") / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *COMMON, "--grad-accum", 4)
    return out


# DDP without --grad-checkpoint is the reference of test_deepspeed.py, test_resume.py and test_resume_elsewhere.py.
@pytest.mark.parametrize("port,strategy,extra", [(29901, "ddp", ["--grad-checkpoint"]),
                                                 (29902, "fsdp", ["--fsdp-prefetch", "--merge"]),
                                                 (29903, "fsdp", ["--fsdp-sharding", "grad-op"]),
                                                 (29904, "fsdp", ["--fsdp-sharding", "hybrid", "--fsdp-prefetch"])])
def test_two_processes_match_one(tiny_model_dir, tiny_data, tmp_path, single, port, strategy, extra):
    out = tmp_path / "out"
    proc = run_torchrun(port, "--model", tiny_model_dir, "--data", tiny_data, "--out", out, *COMMON,
                        "--grad-accum", 2, "--strategy", strategy, *extra)
    assert "global batch 8 rows = micro-batch 2 x grad-accum 2 x 2 process(es)" in proc.stdout
    assert trajectory(out) == pytest.approx(trajectory(single), abs=1e-6)
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (out, single))
    assert mine.keys() == ref.keys() and len(mine) == 4  # complete: both layers' A and B, not one shard
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=1e-5)
    load_adapter(from_pretrained(tiny_model_dir), out / "adapter")  # loads single-process
    if "--merge" in extra:  # rank 0 merges after the process group is gone
        assert "the adapter folded into the base" in proc.stdout and (out / "merged" / "model.safetensors").exists()


def test_ranks_out_of_step_neither_hang_nor_time_out(tiny_model_dir, tiny_data, tmp_path):
    """FSDP, --timeout 6 s: rank 0 writes the adapter 8 s longer than rank 1 (no rank may wait at a barrier
    for it), and rank 1's generated tokens differ from rank 0's (every rank must take rank 0's, or the
    exact-match rows stop at other steps and the ranks' forwards, collectives under FSDP, fall apart)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29947",
           "tests/skewed_ranks.py", "--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 2,
           "--batch-size", 2, "--eval-exact-match", 6, "--strategy", "fsdp", "--timeout", 0.1]
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**CPU_ONLY, "SLOW_SAVE": "8"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("exact match") == 2 and (out / "adapter" / "adapter_model.safetensors").exists()


def test_fsdp_full_fine_tune_saves_the_whole_model(tiny_model_dir, tiny_data, tmp_path):
    """With --grad-checkpoint too: recomputing a sharded block in the backward gathers it again."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", single, *COMMON, "--grad-accum", 4,
               "--no-lora")
    run_torchrun(29911, "--model", tiny_model_dir, "--data", tiny_data, "--out", fsdp, *COMMON, "--grad-accum", 2,
             "--no-lora", "--strategy", "fsdp", "--grad-checkpoint")
    assert trajectory(fsdp) == pytest.approx(trajectory(single), abs=1e-6)
    base = from_pretrained(tiny_model_dir).state_dict()
    a, b = from_pretrained(str(single / "model")).state_dict(), from_pretrained(str(fsdp / "model")).state_dict()
    for key in base:  # every tensor gathered from its shards and trained (Adam moves each weight by ~lr)
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0)
        assert not torch.equal(b[key], base[key])


def test_fsdp_bf16_true_stores_and_computes_in_bf16(tiny_model_dir, tiny_data, tmp_path, single):
    """bf16-true under FSDP: the same trajectory as one bf16-true process, which is not the fp32 one."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    flags = ["--model", tiny_model_dir, "--data", tiny_data, *COMMON, "--precision", "bf16-true"]
    train_here(*flags, "--out", one, "--grad-accum", 4)
    run_torchrun(29946, *flags, "--out", fsdp, "--grad-accum", 2, "--strategy", "fsdp")
    assert trajectory(fsdp) == pytest.approx(trajectory(one), abs=1e-5)
    assert trajectory(fsdp) != pytest.approx(trajectory(single), abs=1e-5)


def gqa_llama_folder(tmp_path):
    """A Llama with grouped-query attention, width 64, in HF layout: the 4-bit tests' model."""
    model = str(tmp_path / "model")
    make_llama_folder(model, config_json("llama", vocab_size=320, eos_token_id=0, hidden_size=64,
                                         intermediate_size=128, num_key_value_heads=2))
    make_tokenizer().save(os.path.join(model, "tokenizer.json"))
    return model


def test_fsdp_shards_a_4bit_base(tiny_data, tmp_path):
    """QLoRA under FSDP, on a Llama with grouped-query attention (the family LLaMA-Factory's FSDP+QLoRA
    examples train): every rank reads and quantizes each base Linear in turn, FSDP shards the packed NF4
    codes and each rank reads its rows of the rest. Width 64: bitsandbytes' 4-bit blocks hold 64 weights."""
    pytest.importorskip("bitsandbytes")
    model = gqa_llama_folder(tmp_path)
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    flags = ["--model", model, "--data", tiny_data, *COMMON, "--load-in-4bit", "--double-quant"]
    train_here(*flags, "--out", single, "--grad-accum", 4)
    run_torchrun(29945, *flags, "--out", fsdp, "--grad-accum", 2, "--strategy", "fsdp")
    # Measured: within 4e-7 (float32 sums taken in another order), as without quantization.
    assert trajectory(fsdp) == pytest.approx(trajectory(single), abs=1e-5)
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (fsdp, single))
    assert mine.keys() == ref.keys() and len(mine) == 8  # complete: q and v, A and B, both layers; not one shard
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=1e-5)
    load_adapter(from_pretrained(model), fsdp / "adapter")


def test_fsdp_dora_on_a_4bit_base(tiny_data, tmp_path):
    """QDoRA under FSDP: each block's magnitudes are sharded like its LoRA weights and gathered into a
    complete adapter; the weight norm takes each NF4 Linear's codes as FSDP gathers them (without their
    quantization state, which the layer keeps). 2 processes follow 1, as plain LoRA does."""
    pytest.importorskip("bitsandbytes")
    model = gqa_llama_folder(tmp_path)
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    flags = ["--model", model, "--data", tiny_data, *COMMON, "--load-in-4bit", "--use-dora", "--lora-target",
             "all-linear"]
    train_here(*flags, "--out", single, "--grad-accum", 4)
    run_torchrun(29947, *flags, "--out", fsdp, "--grad-accum", 2, "--strategy", "fsdp", "--fsdp-prefetch")
    assert trajectory(fsdp) == pytest.approx(trajectory(single), abs=1e-5)
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (fsdp, single))
    assert mine.keys() == ref.keys() and len(mine) == 42  # 7 Linears x 2 blocks x (A, B, magnitude)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=1e-5)


def test_fsdp_ram_efficient_loading_gives_every_rank_identical_weights(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29921", "tests/fsdp_loading_worker.py", tiny_model_dir],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**CPU_ONLY, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tensors identical") == 2
    assert proc.stdout.count("generation through FSDP as without it") == 2


def test_two_nodes_simulated_with_launch_sh(tiny_model_dir, tiny_data, tmp_path):
    """Two launch.sh invocations on 127.0.0.1, NNODES=2, one process each, like two machines."""
    out = tmp_path / "out"
    env = {**CPU_ONLY, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29931"}
    args = [os.path.join(ROOT, "launch.sh"), *map(str, ["--model", tiny_model_dir, "--data", tiny_data,
                                                         "--out", out, *COMMON, "--grad-accum", 2])]
    nodes = [subprocess.Popen(args, cwd=ROOT, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs
    assert "x 2 process(es)" in logs[0] and os.path.exists(out / "adapter" / "adapter_model.safetensors")


def children(pid):
    """Process ids whose parent is pid (read from /proc; no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except OSError:
                pass
    return kids


def test_a_dead_rank_ends_the_job_and_the_checkpoint_survives(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 400, "--batch-size", 2,
            "--save-every", 2, "--eval-exact-match", 0, "--eval-every", 0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29941",
           "train.py", *map(str, args)]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CPU_ONLY)
    deadline = time.time() + 120
    while not os.path.exists(out / "checkpoints" / "step-4"):
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.01)
    workers = children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    assert job.wait(timeout=60) != 0  # torchrun's agent tears the surviving rank down
    assert time.time() - start < 60
    for pid in workers:  # the surviving worker is gone too
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    from nanotune.checkpoint import find_checkpoint
    latest = find_checkpoint(str(out), "latest")
    assert latest and all(load_file(os.path.join(latest, f)) is not None
                          for f in os.listdir(latest) if f.endswith(".safetensors"))


def test_library_imports_point_one_way():
    """No module of nanotune imports, even lazily inside a function, one that imports it back (checkpoint,
    distributed and zero once formed a circle): the import graph has no cycle."""
    package = os.path.join(ROOT, "nanotune")
    graph = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                tree = ast.parse(open(path).read())
                graph[module] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                                 and (n.module or "").startswith("nanotune")} - {module}
    assert "nanotune.distributed" in graph["nanotune.checkpoint"]  # the graph sees imports at all

    def visit(module, path):
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
        for dep in graph.get(module, ()):
            visit(dep, path + [module])
    for module in graph:
        visit(module, [])
