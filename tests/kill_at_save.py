"""Run by test_resume.py in place of train.py: train.py, whose rank 0 SIGKILLs itself as it starts to
write checkpoint $KILL_AT_STEP (under torchrun the agent then ends the other ranks). The run dies
mid-run, as in a crash, with the checkpoints before that step complete, at the same place however
fast or loaded the machine: no race between the test and the run's own end.
With KILL_NODE=1 (test_elastic.py, on one node of an elastic job) every rank of this node does so,
SIGKILLing its torchrun agent first: the whole node dies without warning."""
import os
import runpy
import signal
import sys

import nanotune.checkpoint

real_save_checkpoint, kill_at = nanotune.checkpoint.save_checkpoint, int(os.environ["KILL_AT_STEP"])


def save_checkpoint(out, step, tensors, layout, trainer, rank, keep):
    if step == kill_at and (rank == 0 or os.environ.get("KILL_NODE")):
        if os.environ.get("KILL_NODE"):
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_checkpoint(out, step, tensors, layout, trainer, rank, keep)


nanotune.checkpoint.save_checkpoint = save_checkpoint
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
