"""Resume on another number of processes or another strategy, from a checkpoint any layout can read.
Each resumed run must log what the uninterrupted run logged over the same steps and end with its
weights, within a measured tolerance: not bitwise, since sums are taken in another order. Every run
has the same global batch of 8 rows, and --lora-dropout 0 (dropout's draws differ per rank).
  LoRA:  DDP x2 --(step 2)--> 1 process, grad-accum x2, past a half-written step-3
         DDP x2 --(step 2)--> 1 process under ZeRO-2
  full:  1 process --(step 2)--> FSDP x2, each rank reading only its rows --(step 3)--> 1 process
ZeRO-2 x2 -> FSDP and ZeRO-3's partitions are tested with the runs of test_deepspeed.py."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_ONLY, ROOT, run_torchrun, run_train, train_here, train_refused, trajectory
from test_deepspeed import needs_deepspeed

STEPS = ["--max-steps", 4, "--batch-size", 2, "--log-every", 1, "--eval-every", 2, "--eval-exact-match", 0,
         "--lora-dropout", 0, "--save-every", 1, "--keep", 0]
# Measured on CPU in fp32: LoRA losses within 1.9e-7 of the uninterrupted run's, adapters within 1.5e-8;
# the full fine-tune's losses within 7.5e-7, its weights within 2.7e-6 (Adam magnifies the float noise
# in tiny gradients).
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-6
FULL_LOSS_TOL, FULL_WEIGHT_TOL = 5e-6, 2e-5


def tail(out, reference, tolerance=LOSS_TOL):
    """Assert that the run in `out`, resumed partway, logged what `reference` logged over the same steps."""
    mine = trajectory(out)
    assert len(mine) >= 2 and mine == pytest.approx(trajectory(reference)[-len(mine):], abs=tolerance, rel=0)


def same_adapter(out, reference):
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (out, reference))
    assert mine.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=WEIGHT_TOL, rtol=0)


@pytest.fixture(scope="module")
def flags(tiny_model_dir, tiny_data):
    return ["--model", tiny_model_dir, "--data", tiny_data, *STEPS]


@pytest.fixture(scope="module")
def ddp(flags, tmp_path_factory):
    """The uninterrupted run: 2 processes x grad-accum 2 x micro-batch 2, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    run_torchrun(29850, *flags, "--out", out, "--grad-accum", 2, "--strategy", "ddp")
    return out


def test_ddp_resumes_on_one_process_with_twice_the_accumulation(flags, ddp, tmp_path):
    """Also: a checkpoint half-written when the run died (a .tmp folder, `latest` pointing at it) is skipped."""
    out = tmp_path / "out"
    shutil.copytree(ddp / "checkpoints", out / "checkpoints", ignore=shutil.ignore_patterns("step-3"))
    shutil.copytree(ddp / "checkpoints" / "step-3", out / "checkpoints" / ".step-3.tmp")
    (out / "checkpoints" / ".step-3.tmp" / "state-rank1.safetensors").write_bytes(b"garbage")
    (out / "checkpoints" / "latest").write_text(json.dumps({"checkpoint": "step-3"}))
    printed = train_here(*flags, "--out", out, "--grad-accum", 4, "--resume")
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in printed
    assert "written by 2 process(es), this run has 1: each rank's RNG is re-seeded" in printed
    tail(out, ddp)
    same_adapter(out, ddp)


@needs_deepspeed
def test_ddp_resumes_on_one_process_under_zero2(flags, ddp, tmp_path):
    """ZeRO-2 fills its flat partitions of the moments from the DDP ranks' even shares."""
    out = tmp_path / "out"
    proc = run_train(*flags, "--out", out, "--grad-accum", 4, "--strategy", "deepspeed", "--zero-stage", 2,
                     "--resume", ddp / "checkpoints" / "step-2")
    assert "strategy deepspeed ZeRO-2, 1 process(es)" in proc.stdout
    tail(out, ddp)
    same_adapter(out, ddp)


def test_full_fine_tune_moves_to_fsdp_each_rank_reading_its_rows_and_back(flags, tmp_path):
    single, fsdp, back = tmp_path / "single", tmp_path / "fsdp", tmp_path / "back"
    full = [*flags, "--no-lora"]
    train_here(*full, "--out", single, "--grad-accum", 4)
    checkpoint = single / "checkpoints" / "step-2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29853",
           "tests/checkpoint_reads_spy.py", *map(str, [*full, "--out", fsdp, "--grad-accum", 2, "--strategy", "fsdp",
                                                        "--resume", checkpoint])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**CPU_ONLY, "SPY_CHECKPOINT": str(checkpoint), "SPY_LOG": str(tmp_path / "reads")})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    tail(fsdp, single, FULL_LOSS_TOL)
    # What each rank read of the one file the single process wrote: slices, never a whole tensor;
    # each rank about half, together every element once.
    layout = json.loads((checkpoint / "state-rank0.json").read_text())
    total = sum(entry["end"] - entry["start"] for entry in layout.values())
    read = []
    for rank in (0, 1):
        reads = [json.loads(line) for line in open(tmp_path / f"reads.rank{rank}")]
        assert reads and all(stop is not None for _, _, _, stop in reads)
        read.append(sum(stop - start for _, _, start, stop in reads))
        assert read[-1] < 0.6 * total
    assert sum(read) == total
    # Back to one process, which reads both ranks' files.
    train_here(*full, "--out", back, "--grad-accum", 4, "--resume", fsdp / "checkpoints" / "step-3")
    tail(back, single, FULL_LOSS_TOL)
    mine = load_file(back / "model" / "model.safetensors")
    for key, value in load_file(single / "model" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, atol=FULL_WEIGHT_TOL, rtol=0)


def test_a_changed_global_batch_is_refused(flags, ddp, tmp_path):
    step = ddp / "checkpoints" / "step-2"
    assert train_refused(*flags, "--out", tmp_path / "a", "--grad-accum", 2, "--resume", step) == (
        "cannot resume: the global batch was 8 rows (--batch-size 2 x --grad-accum 2 x 2 process(es)) in the "
        "checkpoint but is 4 rows (2 x 2 x 1) now; another number of processes may continue a run only with the same "
        "global batch, so set --batch-size and --grad-accum to make it 8 again (or --global-batch 8)")
