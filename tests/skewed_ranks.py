"""Run by test_distributed.py under torchrun in place of train.py: train.py with two ranks that do not
keep pace. Rank 0 takes $SLOW_SAVE seconds longer to write the final adapter (a large model's write),
longer than --timeout; rank 1 picks every generated token one id above its argmax, as if its logits
differed, so exact-match rows stop at other steps on each rank unless rank 0's tokens decide for both.
Either would leave a rank waiting in a collective until the timeout."""
import os
import runpy
import sys
import time

import torch.distributed as dist

import nanotune.generate
import nanotune.lora

real_save_adapter, real_pick = nanotune.lora.save_adapter, nanotune.generate.pick


def save_adapter(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_SAVE"]))
    return real_save_adapter(*args, **kwargs)


def pick(logits, *args):
    token = real_pick(logits, *args)
    return (token + 1) % logits.shape[-1] if dist.get_rank() == 1 else token


nanotune.lora.save_adapter, nanotune.generate.pick = save_adapter, pick
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
