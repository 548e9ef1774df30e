"""Run by test_resume.py in place of train.py: train.py, whose rank $SIGNAL_RANK sends itself $SIGNAL as it
starts step $SIGNAL_AT_STEP (counted from 1), and again (SIGTERM and SIGUSR1) as it starts to write that
step's checkpoint's first file: a stop asked for at a known step, and a second one during the save,
however fast or loaded the machine."""
import os
import runpy
import signal
import sys

import nanotune.checkpoint
import nanotune.data

at, rank = int(os.environ["SIGNAL_AT_STEP"]), int(os.environ.get("SIGNAL_RANK", 0))
sig = getattr(signal, os.environ.get("SIGNAL", "SIGTERM"))
real_step, real_save_file = nanotune.data.Batches.step, nanotune.checkpoint.save_file


def step(self, index):
    if index + 1 == at and self.rank == rank:
        os.kill(os.getpid(), sig)
    return real_step(self, index)


def save_file(tensors, path, *args, **kwargs):
    if f"step-{at}" in path and os.path.basename(path) == f"state-rank{rank}.safetensors":
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_save_file(tensors, path, *args, **kwargs)


nanotune.data.Batches.step, nanotune.checkpoint.save_file = step, save_file
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
