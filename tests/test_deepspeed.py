"""--strategy deepspeed on CPU with gloo: ZeRO-2 and ZeRO-3, LoRA and full fine-tune, 2 processes,
against one process with the same global batch; complete saved files; resume, bitwise with the same flags and
under FSDP on one process. Skipped without deepspeed (but for the test of the message a user
without it gets)."""
import importlib.util
import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_torchrun, run_train, train_here, train_refused, trajectory
from nanotune import UserError
from nanotune.checkpoint import Pieces
from nanotune.distributed import World
from nanotune.zero import deepspeed_config, wrap_deepspeed
from nanotune.lora import load_adapter
from nanotune.models import from_pretrained

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def test_missing_deepspeed_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(UserError, match=r"needs DeepSpeed: pip install nanotune\[deepspeed\]"):
        wrap_deepspeed(None, None, World(), {})


STEPS = ["--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--log-every", 1, "--eval-every", 2,
         "--eval-exact-match", 0, "--lora-dropout", 0, "--save-every", 2]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data, tmp_path_factory):
    """The reference runs, LoRA and full, with the same global batch: one process (in the test process)
    with twice the accumulation, the math a 2-process DDP run gives too (test_distributed)."""
    runs = {}
    for lora in (True, False):
        runs[lora] = tmp_path_factory.mktemp("one") / "out"
        train_here("--model", tiny_model_dir, "--data", tiny_data, *STEPS, "--grad-accum", 4, "--out", runs[lora],
                   *([] if lora else ["--no-lora"]))
    return runs


@needs_deepspeed
@pytest.mark.parametrize("stage,lora", [(2, True), (3, True), (3, False)])
def test_zero_matches_one_process_and_saves_complete_files(tiny_model_dir, tiny_data, tmp_path, reference, stage,
                                                           lora):
    common = ["--model", tiny_model_dir, "--data", tiny_data, *STEPS, "--strategy", "deepspeed",
              "--zero-stage", stage] + ([] if lora else ["--no-lora"])
    if stage == 3:  # partition even the tiny tensors (by default ZeRO-3 keeps those under 100k elements
        # whole), so the loss's direct use of embed_out.weight meets a partitioned parameter
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        common += ["--deepspeed-config", config]
    if stage == 3 and not lora:  # recomputing a block in the backward gathers its partitions again
        common += ["--grad-checkpoint"]
    ds, ref_out = tmp_path / "ds", reference[lora]
    proc = run_torchrun(29970 + stage + 5 * lora, *common, "--out", ds)
    assert f"strategy deepspeed ZeRO-{stage}, 2 process(es)" in proc.stdout
    assert trajectory(ds) == pytest.approx(trajectory(ref_out), abs=1e-5)
    if lora:
        mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (ds, ref_out))
        assert mine.keys() == ref.keys() and all(v.numel() > 0 for v in mine.values())  # not ZeRO-3 placeholders
        for key in ref:
            torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=1e-5)
        load_adapter(from_pretrained(tiny_model_dir), ds / "adapter")
    else:
        mine = from_pretrained(str(ds / "model")).state_dict()
        ref = from_pretrained(str(ref_out / "model")).state_dict()
        for key in ref:  # Adam turns float noise in near-zero gradients into steps of up to lr
            torch.testing.assert_close(mine[key], ref[key], atol=2e-3, rtol=0)
    if stage == 2 and lora:  # ZeRO-2's checkpoint (each rank an even share of the gathered moments) read by
        # one process under FSDP with twice the accumulation: the same steps, within float noise (measured 2e-7)
        fsdp = tmp_path / "fsdp"
        train_here("--model", tiny_model_dir, "--data", tiny_data, *STEPS, "--grad-accum", 4, "--strategy", "fsdp",
                   "--out", fsdp, "--resume", ds / "checkpoints" / "step-2")
        assert trajectory(fsdp) == pytest.approx(trajectory(ds)[-len(trajectory(fsdp)):], abs=1e-6, rel=0)
        mine, ref = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (fsdp, ds))
        for key in ref:
            torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=0)
    if stage == 3 and lora:  # each rank wrote its partitions of the flattened tensors: put together, the reference's
        zero3, ref_step = (Pieces(o / "checkpoints" / "step-2") for o in (ds, ref_out))
        assert zero3.shapes == ref_step.shapes
        for key, shape in ref_step.shapes.items():
            n = math.prod(shape)
            torch.testing.assert_close(zero3.read(key, 0, n), ref_step.read(key, 0, n), atol=1e-6, rtol=1e-5)
    if stage == 3 and lora:  # resume from the step-2 checkpoint: same trajectory, same final adapter
        again = tmp_path / "again"
        os.makedirs(again)
        shutil.copytree(ds / "checkpoints", again / "checkpoints")
        run_torchrun(29990, *common, "--out", again, "--resume", again / "checkpoints" / "step-2")
        assert trajectory(again) == trajectory(ds)[-len(trajectory(again)):]
        name = "adapter/adapter_model.safetensors"
        assert (again / name).read_bytes() == (ds / name).read_bytes()


@needs_deepspeed
def test_deepspeed_config_file_is_merged_and_checked(tiny_model_dir, tiny_data, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    assert "train_micro_batch_size_per_gpu is 4 but the flags give 2; set it with the flag" in train_refused(
        "--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--strategy", "deepspeed",
        "--batch-size", 2, "--deepspeed-config", config)


@needs_deepspeed
def test_bf16_autocast_runs_inside_the_engine(tiny_model_dir, tiny_data, tmp_path):
    """The engine switches off a CUDA autocast opened outside it unless its torch_autocast is on,
    which left bf16 frozen weights meeting fp32 activations. bf16-mixed turns it on, in bf16, with
    gradients reduced in fp32; a ZeRO run follows the single-process bf16 run (a group of one here)."""
    config = deepspeed_config(2, 1, 1, 1.0, 2, False, autocast_dtype=torch.bfloat16)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not deepspeed_config(2, 1, 1, 1.0, 2, False)["torch_autocast"]["enabled"]
    common = ["--model", tiny_model_dir, "--data", tiny_data, *STEPS, "--precision", "bf16"]
    train_here(*common, "--out", tmp_path / "one")
    run_train(*common, "--out", tmp_path / "ds", "--strategy", "deepspeed", "--zero-stage", 2)
    assert trajectory(tmp_path / "ds") == pytest.approx(trajectory(tmp_path / "one"), abs=1e-5)
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"torch_autocast": {"enabled": False}}))
    with pytest.raises(UserError, match="'torch_autocast' is nanotune's to choose"):
        deepspeed_config(2, 1, 1, 1.0, 2, False, file, torch.bfloat16)
