"""How long an elastic job (launch.sh with NNODES=1:2) takes to notice a node that died or joined, and to
train again: two torchrun agents on 127.0.0.1, one process each, the bundled tiny model (issue 27).

    python bench/elastic.py                                      # launch.sh's rendezvous settings
    python bench/elastic.py --rdzv-conf last_call_timeout=30,keep_alive_interval=5,keep_alive_max_attempt=3

leave: both nodes train; once checkpoint step-4 exists, node 1's agent and worker are SIGKILLed. Timed:
       the kill -> node 0's agent reports its worker failed (detected) -> its agent completes a
       rendezvous of one node -> "restart 1: ..." (the worker started, the checkpoint read) -> a step.
join:  node 0 trains alone; once checkpoint step-4 exists, node 1 starts. Timed: node 1 started ->
       node 0's worker stopped by SIGTERM with a checkpoint (node 1's start-up, the agent noticing
       it) -> a rendezvous of two nodes -> "restart 1: 1 -> 2 processes, ..." -> a step.
Each time is read when the line reaches this script, so it includes the start-up of a Python
process with torch on this machine: run it on a quiet one.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Node:
    """One node's launch.sh, its output lines kept with the time each arrived."""

    def __init__(self, rank, port, rdzv_conf, out, steps):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "NNODES": "1:2",
               "NODE_RANK": str(rank), "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "LOCAL_ADDR": "127.0.0.1", "RDZV_ID": f"bench-{port}", "MAX_RESTARTS": "1", "PYTHON": sys.executable,
               "LOGLEVEL": "INFO",  # the agents say when a rendezvous completes
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        if rdzv_conf:
            env["RDZV_CONF"] = rdzv_conf
        args = ["--out", out, "--max-steps", str(steps), "--batch-size", "2", "--global-batch", "4",
                "--save-every", "2", "--eval-every", "0", "--eval-exact-match", "0", "--val-fraction", "0",
                "--log-every", "1"]
        self.lines, self.started = [], time.time()
        self.proc = subprocess.Popen([os.path.join(ROOT, "launch.sh"), *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def when(self, text, after=0.0, timeout=300):
        """The time the first line holding `text` arrived after `after`, waiting for it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, line in list(self.lines):
                if t >= after and text in line:
                    return t
            time.sleep(0.01)
        raise TimeoutError(f"no line with {text!r}:\n" + "".join(line for _, line in self.lines[-30:]))

    def kill(self):
        """SIGKILL the agent and its workers (torchrun starts them in sessions of their own)."""
        for pid in children(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def wait_for(path, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def leave(port, rdzv_conf, out):
    first, second = Node(0, port, rdzv_conf, out, 200), Node(1, port, rdzv_conf, out, 200)
    try:
        wait_for(os.path.join(out, "checkpoints", "step-4"))
        killed = time.time()
        second.kill()
        failed = first.when("failed (exitcode", killed)
        met = first.when("Rendezvous complete", failed)
        resumed = first.when("restart 1:", met)
        stepped = first.when("| loss", resumed)
        return {"detected": failed - killed, "new rendezvous": met - failed,
                "worker started and resumed": resumed - met, "first step": stepped - resumed, "total": stepped - killed}
    finally:
        first.kill()
        second.kill()


def join(port, rdzv_conf, out):
    first, second = Node(0, port, rdzv_conf, out, 600), None
    try:
        wait_for(os.path.join(out, "checkpoints", "step-4"))
        second = Node(1, port, rdzv_conf, out, 600)
        stopped = first.when("stopped by SIGTERM", second.started)
        met = first.when("Rendezvous complete", stopped)
        resumed = first_of([first, second], "restart 1:", met)
        stepped = first_of([first, second], "| loss", resumed)
        return {"node 1 up, node 0 stopped and saved": stopped - second.started, "new rendezvous": met - stopped,
                "workers started and resumed": resumed - met, "first step": stepped - resumed,
                "total": stepped - second.started}
    finally:
        for node in (first, second):
            if node:
                node.kill()


def first_of(nodes, text, after):
    """The new rank 0 prints, and it may be either node: the first of them to show `text`."""
    deadline = time.time() + 300
    while time.time() < deadline:
        for node in nodes:
            for t, line in list(node.lines):
                if t >= after and text in line:
                    return t
        time.sleep(0.01)
    raise TimeoutError(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rdzv-conf", help="launch.sh's RDZV_CONF (None: launch.sh's default)")
    p.add_argument("--port", type=int, default=29881, help="the rendezvous port on 127.0.0.1")
    args = p.parse_args()
    for name, scenario in (("leave", leave), ("join", join)):
        out = tempfile.mkdtemp(prefix=f"nanotune-elastic-{name}-")
        try:
            times = scenario(args.port + (name == "join"), args.rdzv_conf, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
