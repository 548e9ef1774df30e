"""Jobs that survive their machines: --global-batch, and elastic jobs (torchrun's c10d rendezvous through
launch.sh) that lose or gain a node mid-run and finish on the trajectory of an uninterrupted run.
The stop on SIGTERM/SIGUSR1 itself is tested in test_resume.py."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_ONLY, ROOT, marked, train_here, train_refused


def test_global_batch_derives_the_accumulation(tiny_model_dir, tiny_data, tmp_path):
    printed = train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--max-steps", 1,
                         "--batch-size", 2, "--global-batch", 8, "--eval-exact-match", 0, "--val-fraction", 0)
    assert "global batch 8 rows = micro-batch 2 x grad-accum 4 x 1 process(es)" in printed


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", 4, "--global-batch", 6], "--global-batch 6 is not a multiple of --batch-size 4 x 1 process(es) "
     "= 4 rows; choose a multiple of 4 (for an elastic job, of --batch-size x each process count it may run on)"),
    (["--batch-size", 4, "--global-batch", 2], "--global-batch 2 is not a multiple of --batch-size 4 x 1"),
    (["--global-batch", 0], "--global-batch must be >= 1, got 0"),
    (["--global-batch", 8, "--grad-accum", 2], "--global-batch 8 sets --grad-accum itself (global batch / "
     "(--batch-size x processes)); drop --grad-accum"),
])
def test_global_batch_refusals(tiny_model_dir, tiny_data, tmp_path, flags, message):
    assert train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o",
                         *flags).startswith(message)


# --- Elastic jobs: two nodes as two torchrun agents on this machine, each started by launch.sh -------
# Short rendezvous settings (torchrun's defaults wait 30 s for late nodes and notice a dead one after
# 15 s); a lost node is noticed at once here anyway, since its sockets close.
STEPS = ["--max-steps", 10, "--batch-size", 2, "--global-batch", 4, "--lora-dropout", 0, "--log-every", 1,
         "--eval-every", 0, "--eval-exact-match", 0, "--val-fraction", 0, "--save-every", 2]
RDZV_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
LAUNCH, TRAIN = os.path.join(ROOT, "launch.sh"), os.path.join(ROOT, "train.py")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data, tmp_path_factory):
    """The uninterrupted run: 1 process, the same global batch of 4 rows (grad-accum 2)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS)
    return out


class Nodes:
    """Nodes of one elastic job (NNODES=1:2, one process each, up to 2 at a time), started as `./launch.sh`
    would be on each machine, with `env` from conftest.marked (which ends them all, workers included)."""

    def __init__(self, port, folder, env):
        self.folder = folder
        self.env = {**env, "OMP_NUM_THREADS": "1", "NNODES": "1:2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_ADDR": "127.0.0.1",
                    "RDZV_ID": f"test-{port}", "RDZV_CONF": RDZV_CONF, "PYTHON": sys.executable,
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

    def start(self, rank, args, script=None, **env):
        """Node `rank`'s launch.sh; with `script`, the torchrun command launch.sh prints, running script in
        place of train.py (a test double that misbehaves at a known step)."""
        env = {**self.env, "NODE_RANK": str(rank), **env}
        cmd = [LAUNCH, *map(str, args)]
        if script:
            printed = subprocess.run(cmd, env={**env, "LAUNCH_DRY_RUN": "1"}, capture_output=True, text=True,
                                     check=True, timeout=30).stdout
            cmd = shlex.split(printed.removeprefix("launch.sh:"))
            cmd[cmd.index(TRAIN)] = os.path.join(ROOT, script)
        with open(self.folder / f"node{rank}.log", "w") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def log(self):
        return "".join(log.read_text() for log in sorted(self.folder.glob("node*.log")))


def close_to(out, reference):
    """The job's adapter equals the uninterrupted run's within 1e-5: the same rows in every step, summed
    in another order on another number of processes."""
    mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (out, reference))
    assert mine.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=0)


def test_a_node_dies_then_another_joins(tiny_model_dir, tiny_data, tmp_path, reference):
    """One job, both scenarios (each run of a node costs seconds of start-up):
    1. Nodes 0 and 1 train; node 1 (its agent and its worker) dies by SIGKILL as it starts checkpoint 4.
       Node 0's collective fails, its agent gathers a rendezvous of one node, and node 0 goes on alone
       from step-2 with twice the accumulation.
    2. Once node 0 has written checkpoint 6 it waits until told to stop, and node 2 starts: node 0's
       agent stops its worker with SIGTERM, which checkpoints step 7, and the job ends on nodes 0 and 2.
    Node 0 hosts the rendezvous; nodes 0 and 1 run the torchrun command launch.sh prints, with a test
    double of train.py, node 2 runs launch.sh itself."""
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, *STEPS]
    with marked(CPU_ONLY) as env:
        nodes = Nodes(29871, tmp_path, env)
        first = nodes.start(0, args, "tests/hold_at_save.py", HOLD_AT_STEP="6")
        second = nodes.start(1, args, "tests/kill_at_save.py", KILL_AT_STEP="4", KILL_NODE="1")
        assert second.wait(timeout=240) == -signal.SIGKILL, nodes.log()
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-6").exists():
            assert first.poll() is None and time.time() < deadline, nodes.log()
            time.sleep(0.1)
        third = nodes.start(2, args)
        assert first.wait(timeout=240) == 0 and third.wait(timeout=60) == 0, nodes.log()
    log = nodes.log()
    assert f"--resume: no checkpoint in {out} yet, starting from step 0" in log  # launch.sh's --resume, first start
    # Numbered by the run's own count ("restart 1", "restart 2"); should node 1 come late to the first
    # rendezvous, its join is one more restart.
    left = re.search(r"restart (\d+): 2 -> 1 processes, gradient accumulation 1 -> 2, resuming from step-2\n", log)
    assert f"stopped by SIGTERM after step 7, checkpoint {out / 'checkpoints' / 'step-7'}" in log
    joined = re.search(r"restart (\d+): 1 -> 2 processes, gradient accumulation 2 -> 1, resuming from step-7\n", log)
    assert left and joined and int(joined[1]) == int(left[1]) + 1, log
    close_to(out, reference)
