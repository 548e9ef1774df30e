"""The precision switch: 32 / bf16-mixed / bf16-true (and int8 / NF4 bases) train LoRA only, on CPU."""
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train, tiny_config, train_here, train_refused
from nanotune import UserError
from nanotune.lora import inject_lora
from nanotune.models.gpt_neox import GPTNeoX
from nanotune.precision import cast_frozen, matmul_precision, resolve

CPU = torch.device("cpu")


def test_names_and_aliases():
    assert [resolve(n, CPU).name for n in ("32", "bf16", "bf16-true", "32-true", "bf16-mixed")] == \
        ["32-true", "bf16-mixed", "bf16-true", "32-true", "bf16-mixed"]
    fp16 = resolve("16", torch.device("cuda"))  # resolving touches no GPU
    assert (fp16.name, fp16.compute_dtype, fp16.autocast) == ("16-mixed", torch.float16, True)
    with pytest.raises(UserError, match="--precision 16 is refused on a CPU"):
        resolve("16", CPU)
    with pytest.raises(UserError, match="is not one of"):
        resolve("fp8", CPU)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_mixed_keeps_embeddings_and_a_tied_head_in_fp32(tied):
    """A head tied to the embedding is the embedding's tensor: storing it in bf16 would put the residual
    stream in bf16 too, which autocast over fp32 weights never does. An untied frozen head is cast."""
    model = cast_frozen(inject_lora(GPTNeoX(tiny_config(tie_word_embeddings=tied))), resolve("bf16", CPU))
    assert model.gpt_neox.embed_in.weight.dtype == torch.float32
    assert model.embed_out.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    assert (model.embed_out.weight is model.gpt_neox.embed_in.weight) == tied


@pytest.mark.parametrize("name", ["32", "bf16", "bf16-true"])
def test_lora_trains_only_lora_and_leaves_the_base(name):
    torch.manual_seed(0)
    precision = resolve(name, CPU)
    model = cast_frozen(inject_lora(GPTNeoX(tiny_config()), dropout=0.0), precision)
    frozen_linear = model.gpt_neox.layers[0].attention.query_key_value.base_layer
    assert frozen_linear.weight.dtype == (torch.float32 if name == "32" else torch.bfloat16)
    assert model.gpt_neox.layers[0].attention.query_key_value.lora_A.weight.dtype == torch.float32
    assert model.gpt_neox.final_layer_norm.weight.dtype == (torch.bfloat16 if name == "bf16-true" else torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    ids = torch.randint(0, 320, (4, 17))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        with precision.context(CPU):
            loss = model(ids[:, :-1], ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == \
            {n for n, _ in model.named_parameters() if ".lora_" in n}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_frozen_bf16_weights_change_no_autocast_result():
    """cast_frozen's claim: under autocast a frozen Linear computes the same from bf16 storage."""
    torch.manual_seed(0)
    model = inject_lora(GPTNeoX(tiny_config()), dropout=0.0)
    ids = torch.randint(0, 320, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids)
        after = cast_frozen(model, resolve("bf16", CPU))(ids)
    assert torch.equal(before, after)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "bf16-true"],
                                   ["--load-in-8bit", "--merge"], ["--load-in-4bit", "--precision", "bf16"],
                                   pytest.param(["--precision", "16"], marks=CUDA),  # fp16 + loss scaling
                                   pytest.param(["--strategy", "ddp"], marks=CUDA),  # NCCL, a group of one
                                   pytest.param(["--strategy", "fsdp", "--precision", "bf16"], marks=CUDA)])
def test_train_py_modes_lower_the_loss_and_save_lora_only(tiny_model_dir, tiny_data, tmp_path, flags):
    if any("load-in" in f for f in flags):
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 12, "--batch-size", 4,
            "--lr", 1e-2, "--log-every", 1, "--eval-exact-match", 0, *flags]  # on a GPU machine, on the GPU
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        printed = run_train(*args, gpu=True).stdout if "--strategy" in flags else train_here(*args, gpu=True)
    assert "precision " + resolve(flags[flags.index("--precision") + 1] if "--precision" in flags else "32",
                                  torch.device("cuda")).name in printed
    losses = [float(line.split("| loss ")[1].split()[0]) for line in printed.splitlines() if "| loss " in line]
    assert losses[-1] < losses[0]
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    if "--merge" in flags:
        assert any("quantization rounding" in str(w.message) for w in warned)
        assert os.path.exists(out / "merged" / "model.safetensors")


@pytest.mark.parametrize("flags,message", [
    (["--precision", "16"], "--precision 16 is refused on a CPU"),
    (["--load-in-8bit", "--load-in-4bit"], "contradict each other"),
    (["--load-in-8bit", "--no-lora"], "cannot be trained in full"),
    (["--load-in-8bit", "--strategy", "fsdp"], "--load-in-8bit cannot be sharded by FSDP"),
    (["--load-in-4bit", "--strategy", "fsdp", "--precision", "bf16-true"], "bf16-true with --load-in-4bit is not"),
    (["--load-in-4bit", "--lora-bias", "all", "--precision", "bf16"], "trained biases (bias mode 'all') on a"),
    (["--fsdp-offload", "--strategy", "fsdp"], "--fsdp-offload moves FSDP's shards from GPU to CPU memory"),
    (["--no-lora", "--merge"], "--merge folds a LoRA adapter into the base"),
    (["--precision", "16", "--strategy", "deepspeed"], "--precision 16 is not offered with --strategy deepspeed"),
    (["--strategy", "fsdp", "--precision", "bf16", "--lora-dtype", "bf16", "--lora-bias", "all"],
     "but gpt_neox.layers.0 trains input_layernorm.bias in float32 and attention.query_key_value.lora_A.weight in "
     "bfloat16"),
    (["--strategy", "fsdp", "--precision", "bf16-true", "--lora-bias", "all"], "FSDP needs one dtype for the trained"),
])
def test_contradicting_flags_are_one_sentence(tiny_model_dir, tiny_data, tmp_path, flags, message):
    args = ["--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", *flags]
    assert message in train_refused(*args)  # under --strategy, some once its process group (of one) exists


def test_tf32_on_cuda_except_under_precision_32():
    """--precision 32 is the exact mode (IEEE fp32 matmuls); the others let CUDA's fp32 matmuls use TF32.
    Setting the flag needs no GPU; a CPU run leaves it alone."""
    try:
        matmul_precision(resolve("bf16", torch.device("cpu")), torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # torch's default, untouched
        for name, expected in (("bf16", "high"), ("32", "highest"), ("bf16-true", "high"), ("16", "high")):
            matmul_precision(resolve(name, torch.device("cuda")), torch.device("cuda"))
            assert torch.get_float32_matmul_precision() == expected, name
    finally:
        torch.set_float32_matmul_precision("highest")
