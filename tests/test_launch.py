"""launch.sh, checked through LAUNCH_DRY_RUN=1: the printed torchrun command for each convention.

Runs in a controlled environment (no inherited Slurm/torchrun variables, CUDA_VISIBLE_DEVICES fixed,
no scontrol/nvidia-smi on PATH unless a test fakes them), so results do not depend on the machine.
"""
import os
import shlex
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
TRAIN = os.path.join(ROOT, "train.py")


def host_path():
    """The caller's PATH without directories that hold scontrol or nvidia-smi."""
    dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    keep = [d for d in dirs if not any(os.path.exists(os.path.join(d, t)) for t in ("scontrol", "nvidia-smi"))]
    return os.pathsep.join(keep)


def launch(*args, path=None, **env):
    base = {"PATH": path or host_path(), "LAUNCH_DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""}
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}  # None = leave the variable unset
    return subprocess.run([LAUNCH, *args], env=base, capture_output=True, text=True, timeout=30)


def command(*args, **env):
    """The flags launch.sh hands torchrun as a dict, plus everything after train.py."""
    r = launch(*args, **env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("launch.sh: ")]
    assert len(lines) == 1, r.stdout
    words = shlex.split(lines[0])
    i = words.index(TRAIN)
    start = next(j for j, w in enumerate(words) if w.startswith("--"))
    flags = dict(zip(words[start:i:2], words[start + 1:i:2]))
    return flags, words[i + 1:]


def fails(**env):
    r = launch(**env)
    assert r.returncode != 0 and r.stdout == ""
    assert "launch.sh: error:" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_defaults_single_cpu_node():
    flags, rest = command()
    assert flags == {"--nnodes": "1", "--nproc_per_node": "1", "--node_rank": "0",
                     "--master_addr": "127.0.0.1", "--master_port": "29500"}
    assert rest == []


def test_nnodes_node_rank_master():
    flags, _ = command(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29611")
    assert (flags["--nnodes"], flags["--node_rank"]) == ("2", "1")
    assert (flags["--master_addr"], flags["--master_port"]) == ("10.0.0.1", "29611")


def test_num_nodes_alias():
    assert command(NUM_NODES="4", NODE_RANK="3")[0]["--nnodes"] == "4"


def test_rank_alias_only_when_multi_node():
    assert command(NNODES="2", RANK="1")[0]["--node_rank"] == "1"
    assert command(NNODES="2", RANK="1", NODE_RANK="0")[0]["--node_rank"] == "0"  # NODE_RANK wins
    assert command(RANK="5")[0]["--node_rank"] == "0"  # one node: a stray per-process RANK is ignored


def test_world_size_is_all_processes():
    flags, _ = command(WORLD_SIZE="12", NNODES="3", RANK="2")
    assert (flags["--nproc_per_node"], flags["--nnodes"], flags["--node_rank"]) == ("4", "3", "2")
    assert command(WORLD_SIZE="12", NNODES="3", NPROC_PER_NODE="4")[0]["--nproc_per_node"] == "4"


def test_world_size_errors():
    assert "not divisible" in fails(WORLD_SIZE="10", NNODES="3")
    assert "contradicting NPROC_PER_NODE" in fails(WORLD_SIZE="12", NNODES="3", NPROC_PER_NODE="2")


def test_gpu_count_from_cuda_visible_devices():
    assert command(CUDA_VISIBLE_DEVICES="0,1")[0]["--nproc_per_node"] == "2"
    assert command(CUDA_VISIBLE_DEVICES="")[0]["--nproc_per_node"] == "1"  # no GPU: one CPU process
    assert command(CUDA_VISIBLE_DEVICES="0,1", NPROC_PER_NODE="1")[0]["--nproc_per_node"] == "1"


def test_gpu_count_from_nvidia_smi(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\necho 'GPU 2: H100'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    flags, _ = command(CUDA_VISIBLE_DEVICES=None, PATH=f"{tmp_path}{os.pathsep}{host_path()}")
    assert flags["--nproc_per_node"] == "3"


def test_slurm_without_scontrol():
    flags, _ = command(SLURM_JOB_ID="42", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]")
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"]) == ("2", "1", "gpu07")
    flags, _ = command(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="3", SLURM_NODEID="2", SLURM_JOB_NODELIST="a,b,c")
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"]) == ("3", "2", "a")
    # Slurm variables are ignored outside a job, and explicit ones override them inside one.
    assert command(SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]")[0]["--master_addr"] == "127.0.0.1"
    assert command(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu[07-08]", MASTER_ADDR="x")[0]["--master_addr"] == "x"


@pytest.mark.parametrize("env, words", [
    ({"NNODES": "2", "NODE_RANK": "2"}, "out of range"),
    ({"NODE_RANK": "1"}, "out of range"),
    ({"NNODES": "0"}, "NNODES must be a positive integer"),
    ({"NNODES": "two"}, "NNODES must be a positive integer"),
    ({"NPROC_PER_NODE": "-1"}, "NPROC_PER_NODE must be a positive integer"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT must be a positive integer"),
    ({"NNODES": "3:2"}, "NNODES=3:2: MIN must not exceed MAX"),
    ({"NNODES": "1:x"}, "NNODES's MAX must be a positive integer"),
    ({"NNODES": "1:2", "WORLD_SIZE": "2"}, "WORLD_SIZE fixes the process count, which an elastic job changes; set NPROC_PER_NODE"),
    ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer"),
])
def test_validation(env, words):
    r = launch(**env)
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_help_documents_every_variable():
    r = launch("--help", LAUNCH_DRY_RUN=None)
    assert r.returncode == 0 and "torchrun" in r.stdout and "launch.sh: " not in r.stdout
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NUM_NODES", "NODE_RANK", "RANK", "NPROC_PER_NODE",
                "WORLD_SIZE", "LAUNCH_DRY_RUN", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_NNODES",
                "SLURM_NODEID", "SLURM_JOB_NODELIST", "srun", "MAX_RESTARTS", "RDZV_ID", "RDZV_CONF", "LOCAL_ADDR"):
        assert var in r.stdout, var


def test_arguments_pass_through_to_train_py():
    _, rest = command("--max-steps", "3", "--lora-r", "4", "--help")  # a later --help is train.py's
    assert rest == ["--max-steps", "3", "--lora-r", "4", "--help"]


def test_falls_back_to_python_module_without_torchrun(tmp_path):
    for tool in ("bash", "dirname", "tr", "wc", "grep"):  # a PATH with only what launch.sh needs
        (tmp_path / tool).symlink_to(shutil.which(tool))
    r = launch(path=str(tmp_path), PYTHON="/opt/py/bin/python")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("launch.sh: /opt/py/bin/python -m torch.distributed.run --nnodes 1 ")


def test_elastic_job_rendezvous_and_resume():
    r = launch("--max-steps", "3", NNODES="1:4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29611")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("launch.sh: env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")  # see launch.sh for why
    flags, rest = command("--max-steps", "3", NNODES="1:4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29611")
    assert flags == {"--nnodes": "1:4", "--nproc_per_node": "1", "--max-restarts": "3", "--rdzv-backend": "c10d",
                     "--rdzv-endpoint": "10.0.0.1:29611", "--rdzv-id": "nanotune",
                     "--rdzv-conf": "last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3,is_host=1",
                     "--signals-to-handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    assert rest == ["--resume", "--max-steps", "3"]  # a user's own --resume DIR comes later, and wins


def test_elastic_settings():
    flags, _ = command(MAX_RESTARTS="0", NNODES="2", NODE_RANK="1", RDZV_CONF="last_call_timeout=2",
                       LOCAL_ADDR="10.0.0.2", SLURM_JOB_ID="42")
    assert (flags["--nnodes"], flags["--max-restarts"], flags["--rdzv-id"]) == ("2", "0", "42")
    assert (flags["--rdzv-conf"], flags["--local-addr"]) == ("last_call_timeout=2,is_host=0", "10.0.0.2")
    assert command(RDZV_ID="job7", NNODES="2:2", SLURM_JOB_ID="42")[0]["--rdzv-id"] == "job7"
    assert "--rdzv-backend" not in command(NNODES="2")[0]  # a static job stays static
