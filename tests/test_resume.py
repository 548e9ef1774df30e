"""Checkpoints: atomic, exact resume after SIGKILL or a stop by SIGTERM/SIGUSR1, refusal of a resume that changes
the math."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import CPU_ONLY, ROOT, marked, train_here, train_refused
from nanotune.elastic import PREEMPTED

STEPS = ["--max-steps", 12, "--batch-size", 2, "--log-every", 1, "--eval-every", 4, "--eval-exact-match", 0,
         "--save-every", 3]


def losses(out):
    """Every logged figure but the timing ones, which differ between runs."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "trained_tokens_per_s", "padding_efficiency")}
            for r in rows]


def killed_at_save(cmd, step, env=CPU_ONLY):
    """Run cmd (tests/kill_at_save.py, alone or under torchrun), whose rank 0 SIGKILLs itself as it starts
    to write checkpoint `step`: the run must have died of that kill. Returns the finished process."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": str(step)})
    alone = proc.returncode == -signal.SIGKILL
    assert alone or (proc.returncode == 1 and "Signal 9 (SIGKILL) received by PID" in proc.stderr), proc.stderr
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS)
    return out


def test_sigkill_then_resume_is_bit_identical(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS]
    killed_at_save([sys.executable, "tests/kill_at_save.py", *map(str, args)], 9)
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6" in train_here(*args, "--resume")
    same_run(out, uninterrupted)


def torchrun(port, script, out, flags, *more):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            script, *map(str, [*flags, "--out", out, *STEPS, *more])]


@pytest.fixture(scope="module")
def ddp_uninterrupted(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    with marked(CPU_ONLY) as env:
        subprocess.run(torchrun(29811, "train.py", out, ["--model", tiny_model_dir, "--data", tiny_data]), cwd=ROOT,
                       check=True, capture_output=True, env=env, timeout=300)
    return out


def same_run(out, reference):
    with open(out / "adapter" / "adapter_model.safetensors", "rb") as a, \
            open(reference / "adapter" / "adapter_model.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert losses(out) == losses(reference)


def stopped_by_signal(cmd, step, signal_name, rank, env=CPU_ONLY):
    """Run cmd (tests/signal_at_step.py, alone or under torchrun), whose rank `rank` sends itself `signal_name`
    as it starts step `step`, and SIGTERM and SIGUSR1 again while it writes that step's checkpoint: the run
    must checkpoint the step, complete, and stop with PREEMPTED; returns its (exit status, stdout, stderr)."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "SIGNAL_AT_STEP": str(step),
                               "SIGNAL_RANK": str(rank), "SIGNAL": signal_name})
    return proc.returncode, proc.stdout, proc.stderr


def test_sigterm_checkpoints_the_step_then_resume_is_bit_identical(tiny_model_dir, tiny_data, tmp_path,
                                                                    uninterrupted):
    """Also: the second signal, during the save, leaves the checkpoint complete."""
    step = random.randint(1, 11)  # any step but the last (12), which ends the run anyway
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS]
    code, stdout, stderr = stopped_by_signal([sys.executable, "tests/signal_at_step.py", *map(str, args)], step,
                                             "SIGTERM", 0)
    checkpoint = out / "checkpoints" / f"step-{step}"
    assert code == PREEMPTED and not stderr, (step, stderr)
    assert stdout.splitlines()[-1] == (f"stopped by SIGTERM after step {step}, checkpoint {checkpoint}: continue with "
                                       f"--resume --out {out}")
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]
    resumed = train_here(*args, "--resume")
    assert f"resumed from {checkpoint} at step {step}" in resumed
    assert f"restart 1: 1 -> 1 processes, gradient accumulation 1 -> 1, resuming from step-{step}\n" in resumed
    same_run(out, uninterrupted)


def test_ddp_stopped_by_sigusr1_then_killed_then_resumed_is_bit_identical(tiny_model_dir, tiny_data, tmp_path,
                                                                          ddp_uninterrupted):
    """DDP x2, three runs in one --out (each torchrun run costs seconds): SIGUSR1 to rank 1 alone at a random
    step stops both ranks after it, with its checkpoint; the run resumed from it has its rank 0 SIGKILLed as
    it starts checkpoint 9; the last one resumes from step-6 and ends byte-for-byte like the uninterrupted run."""
    step = random.randint(1, 5)  # before checkpoint 6, which the second run writes
    out, flags = tmp_path / "out", ["--model", tiny_model_dir, "--data", tiny_data]
    checkpoint = out / "checkpoints" / f"step-{step}"
    with marked(CPU_ONLY) as env:  # ends the workers of a run that timed out
        code, stdout, stderr = stopped_by_signal(torchrun(29812, "tests/signal_at_step.py", out, flags), step,
                                                 "SIGUSR1", 1, env)
        assert code != 0 and stderr.count(f"exitcode  : {PREEMPTED} ") == 2, (step, stderr)  # both ranks
        assert (f"stopped by a signal to another rank after step {step}, checkpoint {checkpoint}: continue with "
                f"--resume --out {out}") in stdout
        killed = killed_at_save(torchrun(29813, "tests/kill_at_save.py", out, flags, "--resume"), 9, env)
        assert f"resumed from {checkpoint} at step {step}" in killed.stdout
        proc = subprocess.run(torchrun(29814, "train.py", out, flags, "--resume"), cwd=ROOT, capture_output=True,
                              text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6" in proc.stdout
    same_run(out, ddp_uninterrupted)


def test_half_written_checkpoints_are_never_picked(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    """A kill mid-save leaves a .tmp folder (never renamed), or, between rename and pointer update,
    a stale `latest`. Resume must take the newest complete checkpoint and succeed."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "adapter")
    ckpt = out / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["latest", "step-6", "step-9"]  # --keep 2
    shutil.copytree(ckpt / "step-9", ckpt / ".step-12.tmp")
    (ckpt / ".step-12.tmp" / "state-rank0.safetensors").write_bytes(b"garbage")
    (ckpt / "latest").write_text(json.dumps({"checkpoint": "step-12"}))  # points nowhere complete
    printed = train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS, "--resume")
    assert f"resumed from {ckpt / 'step-9'} at step 9" in printed
    with open(out / "adapter" / "adapter_model.safetensors", "rb") as a, \
            open(uninterrupted / "adapter" / "adapter_model.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_checkpoint_holds_no_pickle_and_the_run_flags(uninterrupted):
    step = uninterrupted / "checkpoints" / "step-9"
    assert sorted(os.listdir(step)) == ["rng-rank0.json", "rng-rank0.safetensors", "state-rank0.json",
                                        "state-rank0.safetensors", "trainer.json"]
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["step"] == 9 and trainer["args"]["lora_r"] == 8 and trainer["args"]["world_size"] == 1


def test_resume_with_other_math_is_refused(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    message = train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS, "--resume",
                            "--lora-r", 4)
    assert message == ("cannot resume: --lora-r was 8 in the checkpoint but is 4 now; "
                       "a resumed run must repeat the original's flags")


def test_previous_run_needs_resume_or_overwrite(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    assert "holds a previous run; pass --resume" in train_refused("--model", tiny_model_dir, "--data", tiny_data,
                                                                  "--out", out, *STEPS)
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 2, "--batch-size", 2,
               "--eval-exact-match", 0, "--overwrite")
    assert not os.path.exists(out / "checkpoints")  # the old run is gone
    assert [r["step"] for r in losses(out)] == [0, 2, 2]  # eval before training, then step 2's loss and eval


def test_resume_without_a_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    """--resume finds no checkpoint: over a finished run it refuses (it would replace the run's adapter
    with one trained on other flags); after a run that died before its first checkpoint it starts
    again, and metrics.jsonl holds the new run's lines only."""
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 2, "--batch-size", 2,
            "--eval-exact-match", 0]
    train_here(*args)
    assert "holds a finished run (adapter/) but no checkpoint" in train_refused(*args, "--resume", "--lr", 1e-2)
    shutil.rmtree(out / "adapter")  # as if it had died before writing it
    assert "no checkpoint in" in train_here(*args, "--resume")
    assert [r["step"] for r in losses(out)] == [0, 2, 2]


@pytest.mark.parametrize("damage", ["delete rng", "truncate state", "truncate trainer.json"])
def test_a_damaged_checkpoint_is_one_sentence(tiny_model_dir, tiny_data, tmp_path, uninterrupted, damage):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    step = out / "checkpoints" / "step-9"
    if damage == "delete rng":
        os.remove(step / "rng-rank0.safetensors")
    else:
        file = step / ("trainer.json" if "trainer" in damage else "state-rank0.safetensors")
        file.write_bytes(file.read_bytes()[:40])
    message = train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS, "--resume")
    assert message.startswith(f"checkpoint {step} is damaged or incomplete")


def interrupt_when(cmd, ready):
    """Start a run and send it Ctrl-C (SIGINT) once ready() holds; returns (exit status, stdout, stderr).
    The run is far longer than the test waits, so the signal always lands mid-run, however slow the
    machine: no race with the run's own end. The child starts with Ctrl-C's default action, as in a
    terminal: a process started in the background by a shell inherits SIGINT ignored, and Python then
    never raises KeyboardInterrupt."""
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**CPU_ONLY, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not ready(proc):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_ctrl_c_is_one_line_and_the_checkpoints_resume(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "--model", tiny_model_dir, "--data", tiny_data, "--out", out,
           "--max-steps", 100000, "--batch-size", 2, "--eval-every", 0, "--eval-exact-match", 0, "--save-every", 3]
    code, _, err = interrupt_when(cmd, lambda proc: os.path.exists(out / "checkpoints" / "step-3"))
    assert code == 130 and "Traceback" not in err and "interrupted;" in err, err
    # The resumed run continues from a checkpoint of the interrupted one; interrupt it once it says so.
    resumed = []
    code, stdout, err = interrupt_when(cmd + ["--resume"], lambda proc: resumed.append(proc.stdout.readline()) or
                                       "resumed from" in resumed[-1])
    assert code == 130 and "Traceback" not in err, err
    assert "/checkpoints/step-" in resumed[-1]


def test_non_finite_loss_stops_with_the_step(tiny_model_dir, tiny_data, tmp_path):
    message = train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--lr", 1e30,
                            "--max-steps", 10, "--batch-size", 2, "--warmup-steps", 0, "--save-every", 1,
                            "--eval-exact-match", 0)
    assert message.startswith("the training loss is nan at step 2; stopping. Last good checkpoint:")
    assert "step-1" in message
