"""CUDA checks: the fused loss in bf16/fp16, train.py in each GPU precision, NCCL DDP/FSDP with one
process. Skipped without a CUDA GPU (CI has none); run them on a GPU machine with
`python -m pytest -q tests/test_gpu.py`."""
import pytest
import torch
import torch.nn.functional as F

from conftest import run_train
from nanotune.model import LinearCrossEntropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_loss_on_cuda(dtype):
    torch.manual_seed(0)
    h = torch.randn(600, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda") * 0.1
    targets = torch.randint(0, 1000, (600,), device="cuda")
    ref = F.cross_entropy(F.linear(h.to(dtype), w.to(dtype)).float(), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, [h])
    loss = LinearCrossEntropy.apply(h.to(dtype), w.to(dtype), targets, 256)
    (grad,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "16"], ["--precision", "bf16-true"],
                                   ["--strategy", "ddp"], ["--strategy", "fsdp", "--precision", "bf16"],
                                   ["--load-in-4bit", "--precision", "bf16"]])
def test_train_py_on_cuda(tiny_model_dir, tiny_data, tmp_path, flags):
    if any("load-in" in f for f in flags):
        pytest.importorskip("bitsandbytes")
    proc = run_train("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "out", "--max-steps", 12,
                     "--batch-size", 4, "--lr", 1e-2, "--log-every", 1, "--eval-exact-match", 0, *flags)
    assert "on cuda" in proc.stdout
    losses = [float(line.split("| loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "| loss " in line]
    assert losses[-1] < losses[0]
