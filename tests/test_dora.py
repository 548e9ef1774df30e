"""DoRA: the forward against the paper's formula written out here, merge, quantized bases, adapters
both ways with peft (when installed), --use-dora and --adapter in train.py, resume."""
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import make_tokenizer, train_here, train_refused, trajectory
from nanotune.lora import DoRALinear, inject_lora, load_adapter, merge, save_adapter, unload, unmerge
from nanotune.models import from_pretrained
from nanotune.precision import cast_frozen, resolve
from nanotune.quantize import quantize
from test_gemma_phi3 import phi3_config
from test_llama import config_json, make_folder, token_ids

R, ALPHA = 4, 8


def moved(model, seed=0):
    """lora_B off zero and the magnitudes off their init, so every term of DoRA's forward shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def naive_dora(x, W, b, A, B, m, scaling):
    """Liu et al. 2024, eq. 5, as written: W' = m (W + s B A) / ||W + s B A||_c, with the norm of each
    output row held constant (sec. 4.3: no gradient through it); y = W' x + b."""
    V = W + scaling * B @ A
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + b


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_are_the_formula(rslora):
    torch.manual_seed(0)
    model = moved(inject_lora(nn.Sequential(nn.Linear(16, 12)), ["0"], r=R, alpha=ALPHA, dropout=0.0,
                              rslora=rslora, dora=True))
    layer = model[0]
    assert isinstance(layer, DoRALinear) and layer.lora_magnitude_vector.requires_grad
    x = torch.randn(3, 5, 16)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]
    expected = naive_dora(x, layer.base_layer.weight, layer.base_layer.bias, *params, layer.scaling)
    out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    ours = torch.autograd.grad(out.square().sum(), params)
    theirs = torch.autograd.grad(expected.square().sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dropout_drops_the_input_of_both_terms():
    """Training with dropout: peft recomputes W x on the dropped input, so y = W x + b + (m/n - 1) W d(x)
    + (m/n) s B A d(x), where d is the dropout the layer draws. In eval mode dropout is off: the formula."""
    torch.manual_seed(0)
    layer = moved(inject_lora(nn.Sequential(nn.Linear(16, 12)), ["0"], r=R, alpha=ALPHA, dropout=0.5,
                              dora=True))[0]
    x = torch.randn(4, 16)
    W, b, A, B, m = (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight,
                     layer.lora_magnitude_vector)
    with torch.no_grad():
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        dropped = nn.functional.dropout(x, 0.5)
        scale = m / (W + layer.scaling * B @ A).norm(dim=1)
        expected = x @ W.T + b + (scale - 1) * (dropped @ W.T) + scale * (dropped @ A.T @ B.T) * layer.scaling
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        layer.eval()
        torch.testing.assert_close(layer(x), naive_dora(x, W, b, A, B, m, layer.scaling), atol=1e-5, rtol=1e-5)


def test_starts_equal_to_the_base_and_merges(tiny_model_dir):
    base = from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 320, (2, 7))
    model = inject_lora(from_pretrained(tiny_model_dir), "all-linear", r=R, alpha=ALPHA, dora=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), atol=1e-5, rtol=1e-5)  # B = 0, m = ||W||
        moved(model)
        adapted = model(ids)
        weights = {n: p.clone() for n, p in model.named_parameters()}
        merge(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
        unmerge(model)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-5)
        merged = unload(model)
        assert not any(isinstance(m, DoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_on_a_quantized_base_the_norm_is_the_dequantized_weights(bits):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = inject_lora(quantize(nn.Sequential(nn.Linear(64, 48)), bits), ["0"], r=R, alpha=ALPHA, dropout=0.0,
                        dora=True)
    layer = model[0]
    q = layer.base_layer.weight
    W = (q.data.float() * q.SCB[:, None] / 127 if bits == 8 else  # int8: rows of codes times absmax / 127
         bnb.functional.dequantize_4bit(q.data, q.quant_state).float())
    torch.testing.assert_close(layer.lora_magnitude_vector, W.norm(dim=1))  # m starts at ||W||_c
    moved(model).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        A, B, m, b = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias
        y = layer.base_layer(x)  # int8 also rounds the input (LLM.int8()): DoRA scales what the base computes
        scale = m / (W + layer.scaling * B @ A).norm(dim=1)
        expected = y + (scale - 1) * (y - b) + scale * layer.scaling * (x @ A.T @ B.T)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        if bits == 4:  # NF4 computes with exactly the dequantized weights
            torch.testing.assert_close(model(x), naive_dora(x, W, b, A, B, m, layer.scaling), atol=1e-4, rtol=1e-4)


def test_adapter_files_are_peft_keys_and_load_back(tiny_model_dir, tmp_path):
    model = moved(inject_lora(from_pretrained(tiny_model_dir), r=R, alpha=ALPHA, dora=True)).eval()
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    path = "base_model.model.gpt_neox.layers.{}.attention.query_key_value."
    assert shapes == {**{path.format(i) + "lora_A.weight": (R, 32) for i in range(2)},
                      **{path.format(i) + "lora_B.weight": (96, R) for i in range(2)},
                      **{path.format(i) + "lora_magnitude_vector": (96,) for i in range(2)}}
    loaded = load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a").eval()
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def peft_dora(base, peft, dropout=0.0):
    """peft's DoRA on every Linear of a transformers model, moved off its init."""
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                       lora_dropout=dropout, use_dora=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return theirs


# A Llama and a Phi-3 (fused qkv_proj and gate_up_proj: 7 and 4 Linears a block)
CONFIGS = {"llama": config_json("llama", num_key_value_heads=2),
           "phi3": phi3_config()}


@pytest.mark.parametrize("family,linears", [("llama", 14), ("phi3", 8)])
def test_peft_dora_adapter_loads_here(tmp_path, family, linears):
    """peft writes the adapter; nanotune loads it and computes peft's logits, in evaluation and, with
    dropout drawing the same masks in the same order, in training."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    make_folder(tmp_path / "base", CONFIGS[family])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    torch.manual_seed(0)
    theirs = peft_dora(base, peft, dropout=0.2)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    assert sum(isinstance(m, DoRALinear) for m in ours.modules()) == linears  # every Linear of 2 blocks
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        for seed in (1, 2):
            torch.manual_seed(seed)
            mine = ours.train()(ids)
            torch.manual_seed(seed)
            torch.testing.assert_close(mine, theirs.train()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_our_dora_adapter_loads_in_peft(tmp_path, family):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    make_folder(tmp_path / "base", {**CONFIGS[family], **({"attention_bias": True} if family == "llama" else {})})
    torch.manual_seed(0)
    ours = moved(inject_lora(from_pretrained(str(tmp_path / "base")), "all-linear", r=R, alpha=ALPHA, rslora=True,
                             dora=True)).eval()
    save_adapter(ours, str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.merge_and_unload()(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_qdora_matches_peft_on_an_nf4_base(tmp_path, device):
    """QDoRA both ways: transformers quantizes the same weights to the same NF4 codes, peft puts DoRA on
    them; its adapter loaded here computes its logits, in evaluation and in training with dropout.
    Needs transformers, peft and bitsandbytes in one environment (bench/gpu_check.py's GPU machine)."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    make_folder(tmp_path / "base", config_json("llama", num_key_value_heads=2, hidden_size=64, intermediate_size=128))
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=nf4,
                                                             device_map={"": device}, dtype=torch.float32,
                                                             attn_implementation="eager")
    for m in base.modules():  # as nanotune.quantize does: no bf16 repacking for CPU inference, fp32 as in training
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    torch.manual_seed(0)
    theirs = peft_dora(base, peft, dropout=0.2)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = quantize(from_pretrained(str(tmp_path / "base")), 4, device=device).to(device)
    ours = load_adapter(ours, str(tmp_path / "adapter"))
    ids = token_ids().to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs.eval()(ids).logits, atol=1e-4, rtol=1e-4)
        torch.manual_seed(1)
        mine = ours.train()(ids)
        torch.manual_seed(1)
        torch.testing.assert_close(mine, theirs.train()(ids).logits, atol=1e-4, rtol=1e-4)


def llama_folder(path, width=64):
    """A tiny Llama folder with a tokenizer, `width` wide (bitsandbytes' 4-bit blocks hold 64 weights)."""
    make_folder(path, config_json("llama", vocab_size=320, eos_token_id=0, hidden_size=width,
                                  intermediate_size=2 * width, num_key_value_heads=2))
    make_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return str(path)


def test_trains_on_an_nf4_base_and_merges(tiny_data, tmp_path):
    """QDoRA: every Linear adapted over an NF4 base, dropout on (the recomputed W x takes the
    dequantized weights again in the backward); the loss falls, the magnitudes train, --merge writes
    a model equal to the adapted one on the same rounding."""
    pytest.importorskip("bitsandbytes")
    model, out = llama_folder(tmp_path / "model"), tmp_path / "out"
    train_here("--model", model, "--data", tiny_data, "--out", out, "--load-in-4bit", "--use-dora", "--lora-target",
               "all-linear", "--max-steps", 8, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 2, "--eval-every", 0,
               "--eval-exact-match", 0, "--merge")
    evals = [r["eval_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 1  # measured: 6.26 before, 3.42 after
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    init = inject_lora(quantize(from_pretrained(model), 4), "all-linear", dora=True).state_dict()
    magnitudes = [k for k in adapter if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14
    assert all(not torch.equal(adapter[k], init[k.removeprefix("base_model.model.")]) for k in magnitudes)
    adapted = load_adapter(quantize(from_pretrained(model), 4), out / "adapter").eval()
    ids = torch.randint(0, 320, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(out / "merged"))(ids), adapted(ids), atol=1e-4, rtol=1e-4)


def test_adapter_continues_a_dora_adapter_and_resumes_bitwise(tiny_model_dir, tiny_data, tmp_path):
    common = ["--model", tiny_model_dir, "--data", tiny_data, "--batch-size", 4, "--eval-exact-match", 0,
              "--log-every", 1, "--eval-every", 2]
    first = tmp_path / "first"
    train_here(*common, "--out", first, "--use-dora", "--max-steps", 4, "--save-every", 2)
    # resume from step 2 in a copy: the same losses, the same adapter bytes (magnitudes, moments, dropout's RNG)
    again = tmp_path / "again"
    os.makedirs(again)
    shutil.copytree(first / "checkpoints", again / "checkpoints")
    train_here(*common, "--out", again, "--use-dora", "--max-steps", 4, "--save-every", 2, "--resume",
               again / "checkpoints" / "step-2")
    assert trajectory(again) == trajectory(first)[-len(trajectory(again)):]
    name = "adapter/adapter_model.safetensors"
    assert (again / name).read_bytes() == (first / name).read_bytes()
    # --adapter continues it as DoRA: its first evaluation is the first run's last
    train_here(*common, "--out", tmp_path / "next", "--adapter", first / "adapter", "--max-steps", 2)
    assert trajectory(tmp_path / "next")[0] == pytest.approx(trajectory(first)[-1], abs=1e-6)
    assert json.loads((tmp_path / "next" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert "lora_magnitude_vector" in "".join(load_file(tmp_path / "next" / name))


def test_use_dora_with_a_plain_lora_adapter_or_without_lora_is_refused(tiny_model_dir, tiny_data, tmp_path):
    save_adapter(inject_lora(from_pretrained(tiny_model_dir)), tmp_path / "plain")
    common = ["--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--use-dora"]
    message = train_refused(*common, "--adapter", tmp_path / "plain")
    assert message.startswith("--use-dora True contradicts the adapter's use_dora = False")
    assert train_refused(*common, "--no-lora").startswith("--use-dora trains a DoRA adapter, and --no-lora")


def test_bf16_true_keeps_the_magnitudes_in_the_adapters_dtype(tiny_model_dir):
    """bf16-true casts the base, not the adapter: the magnitudes stay fp32 beside lora_A and lora_B (FSDP
    needs one dtype for what a block trains)."""
    model = inject_lora(from_pretrained(tiny_model_dir), dora=True)
    model = cast_frozen(model, resolve("bf16-true", torch.device("cpu")))
    layer = model.gpt_neox.layers[0].attention.query_key_value
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    model(torch.randint(0, 320, (1, 5)), torch.randint(0, 320, (1, 5))).backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32
