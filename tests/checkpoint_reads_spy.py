"""Run under torchrun by test_resume_elsewhere.py in place of train.py: train.py, with every read from
a file under $SPY_CHECKPOINT recorded in $SPY_LOG.rank{RANK}, one JSON line [file, key, start, stop]
per slice read (stop None for a whole tensor). safetensors.safe_open is wrapped before nanotune
imports it, so the run reads exactly as it would without the spy."""
import json
import os
import runpy
import sys

import safetensors

real_safe_open, watched = safetensors.safe_open, os.path.abspath(os.environ["SPY_CHECKPOINT"])
log = open(f"{os.environ['SPY_LOG']}.rank{os.environ['RANK']}", "a")


def record(*entry):
    log.write(json.dumps(entry) + "\n")
    log.flush()


class Slice:
    def __init__(self, file, key, real):
        self.file, self.key, self.real = file, key, real

    def __getitem__(self, index):
        record(self.file, self.key, index.start, index.stop)
        return self.real[index]


class File:
    def __init__(self, path, *args, **kwargs):
        self.path, self.real = os.path.abspath(path), real_safe_open(path, *args, **kwargs)

    def get_slice(self, key):
        real = self.real.get_slice(key)
        return Slice(self.path, key, real) if self.path.startswith(watched) else real

    def get_tensor(self, key):
        if self.path.startswith(watched):
            record(self.path, key, 0, None)
        return self.real.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)


safetensors.safe_open = File
train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
sys.argv = [train, *sys.argv[1:]]
runpy.run_path(train, run_name="__main__")
