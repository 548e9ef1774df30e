"""Run by test_elastic.py in place of train.py on the node that a second node joins: once checkpoint
$HOLD_AT_STEP is written, train.py waits (120 s at most) until it is told to stop, as torchrun's agent
does (SIGTERM) when the new node arrives. The join thus lands mid-run however slow the machine."""
import os
import runpy
import sys
import time

import nanotune.checkpoint
import nanotune.elastic

hold_at, signalled = int(os.environ["HOLD_AT_STEP"]), []
real_save_checkpoint, real_handle = nanotune.checkpoint.save_checkpoint, nanotune.elastic.StopSignals.handle


def handle(self, signum, frame):
    signalled.append(signum)
    real_handle(self, signum, frame)


def save_checkpoint(out, step, *args):
    path = real_save_checkpoint(out, step, *args)
    deadline = time.time() + 120
    while step == hold_at and not signalled and time.time() < deadline:
        time.sleep(0.05)
    return path


nanotune.checkpoint.save_checkpoint, nanotune.elastic.StopSignals.handle = save_checkpoint, handle
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
