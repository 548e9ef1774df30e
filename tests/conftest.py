"""Tiny fixtures built on the fly: a byte-level BPE tokenizer, a random 2-layer GPT-NeoX, Alpaca rows."""
import contextlib
import importlib.util
import io
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanotune import UserError
from nanotune.models import save_pretrained
from nanotune.models.gpt_neox import Config, GPTNeoX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "red green blue cat dog sun moon tree fish bird one two three".split()


def tiny_config(**overrides):
    return Config(**{"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 64, "max_position_embeddings": 128, **overrides})


def alpaca_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": "Reverse the words.", "input": " ".join(words),
                     "output": " ".join(reversed(words))})
    return rows


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [json.dumps(r) + " ### Instruction: ### Input: ### Response:" for r in alpaca_rows(200)]
    tok.train_from_iterator(text, trainer)
    return tok


def make_model_dir(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPTNeoX(tiny_config(**overrides))
    save_pretrained(model, str(path))
    make_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-neox"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(64)))
    return str(path)


# The environment of the runs the tests compare: no GPU, so they compute on the CPU as in CI (and on
# a 1-GPU machine a second process does not ask for a second GPU). A test that wants the GPU says so.
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run_train(*args, check=True, gpu=False, **kw):
    """Run train.py in a subprocess, as a user would, on the CPU unless gpu=True (then on the GPU if
    there is one). One thread, as torchrun gives each process: on these tiny models a second
    thread costs more in synchronisation than it gains."""
    env = {**(os.environ if gpu else CPU_ONLY), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_script():
    """train.py as a module (it is a script: nothing in the library imports it)."""
    if "train_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
        sys.modules["train_script"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["train_script"])
    return sys.modules["train_script"]


@contextlib.contextmanager
def group_of_one():
    """For code that sets up a process group of one in this process (compute_init without torchrun):
    afterwards no group is left, and the environment compute_init sets for it (RANK, MASTER_PORT, ...)
    is put back, so neither outlives the run."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        initialized = torch.distributed.is_initialized()
        if initialized:  # a run that failed before its own cleanup
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert not initialized, "the process group outlived the run"


def train_here(*args, gpu=False, refused=False):
    """train.py's main() in this process, for a single-process run where the process itself is not
    what is tested: no interpreter start or imports (~2 s a run on CI's machine). On the CPU unless
    gpu=True, and one thread, as run_train. Returns what the run printed; a bad flag raises UserError,
    which run_train's process prints as its one line. Under --strategy ddp or fsdp, a process group of
    one (gloo on the CPU) that main() ends (group_of_one). Runs under deepspeed use run_train
    (its engine keeps state of its own in the process), but for refusals that come before it starts."""
    train = train_script()
    args = train.parse_args([*([] if gpu else ["--device", "cpu"]), *map(str, args)])  # a later --device wins
    assert refused or args.strategy != "deepspeed", "DeepSpeed's state in the test process: use run_train"
    threads, printed = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with group_of_one(), contextlib.redirect_stdout(printed):
            train.main(args)
    finally:
        torch.set_num_threads(threads)
        sys.stdout.write(printed.getvalue())  # pytest shows it with a failure
    return printed.getvalue()


def train_refused(*args) -> str:
    """The sentence train_here(*args) stops with: run_train's process prints it as its one line."""
    with pytest.raises(UserError) as e:
        train_here(*args, refused=True)
    assert "\n" not in str(e.value)
    return str(e.value)


def run_torchrun(port, *args):
    """train.py under torchrun with 2 processes (gloo on CPU); fails the test if the job fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "train.py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=CPU_ONLY)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def trajectory(out):
    """The training and evaluation losses a run logged, in order."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r.get("loss", r.get("eval_loss")) for r in rows]


@contextlib.contextmanager
def marked(env):
    """`env` plus a mark that every process started with it, and each of their children, inherits;
    on leaving, whatever of them is still running is SIGKILLed, however the test ended. torchrun
    starts its workers in sessions of their own, so ending an agent (or its process group) would
    leave them running. Finds them through /proc (Linux; elsewhere it ends nothing)."""
    mark = f"{os.getpid()}-{random.getrandbits(48)}"
    try:
        yield {**env, "NANOTUNE_TEST_MARK": mark}
    finally:
        for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"NANOTUNE_TEST_MARK={mark}\0".encode() in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to read
                pass
