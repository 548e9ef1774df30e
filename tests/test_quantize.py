"""int8 / NF4 base weights under LoRA, on CPU: quantization against reference rounding, training,
evaluation inside training, adapter export, dequantize + merge. Skipped without bitsandbytes."""
import logging
import sys

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")

from conftest import make_tokenizer, tiny_config  # noqa: E402
from nanotune import UserError  # noqa: E402
from nanotune.lora import LoRALinear, inject_lora, load_adapter, save_adapter, unload  # noqa: E402
from nanotune.merge import main as merge_main  # noqa: E402
from nanotune.models import from_pretrained, save_pretrained  # noqa: E402
from nanotune.models.gpt_neox import GPTNeoX  # noqa: E402
from nanotune.quantize import dequantize, dequantized_weight, quantize, weight_bytes  # noqa: E402

# The 16 NF4 levels, QLoRA (arXiv:2305.14314) appendix E: quantiles of N(0, 1) scaled to [-1, 1].
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236328, 1.0])
BITS = [8, 4]
# Width 64, not conftest's 32: bitsandbytes' 4-bit blocks hold 64 weights, and its CPU inference repack
# (the pitfall quantize() disables) needs in_features >= 64 to trigger at all.
CONFIG = dict(hidden_size=64, intermediate_size=128)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTNeoX(tiny_config(**CONFIG))


def lora_model(bits, seed=0, double_quant=False):
    model = quantize(tiny_model(seed), bits, double_quant=double_quant)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    return model


def train(model, steps, lr=1e-2):
    """A few AdamW steps on fixed random tokens; returns the losses, measured before each step."""
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (4, 17))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], ids[:, 1:]) / ids[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, ids


def base_state(model):
    """Every frozen tensor: embeddings, norms, biases and the quantized bases (codes, scales, absmax)."""
    return {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}


def test_missing_bitsandbytes_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(UserError, match=r"need bitsandbytes: pip install nanotune\[int8\]"):
        quantize(nn.Sequential(nn.Linear(4, 4)), 8)


@pytest.mark.parametrize("bits", BITS)
def test_rounding_matches_reference_and_forward_error_is_small(bits):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(256, 128))
    nn.init.normal_(fp[0].weight, std=0.02)  # a trained LLM's weights are roughly normal
    w = fp[0].weight.detach()
    q = nn.Sequential(nn.Linear(256, 128))
    q.load_state_dict(fp.state_dict())
    quantize(q, bits)
    assert type(q[0]) is (bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    if bits == 8:  # LLM.int8() row-wise absmax: codes round(127 w / max|w_row|), from the fp16 weight
        w16 = w.half().float()
        assert torch.equal(q[0].weight.data, torch.round(127 * w16 / w16.abs().amax(1, keepdim=True)).to(torch.int8))
    else:  # NF4: blocks of 64 consecutive weights, each scaled by its absmax and rounded to the nearest level
        blocks = w.reshape(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        ref = NF4[(blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)] * absmax
        assert torch.equal(dequantized_weight(bnb, q[0]), ref.reshape(w.shape))
    x = torch.randn(32, 256)
    with torch.no_grad():
        err = rel_err(q(x), fp(x))
    # Measured: int8 ~0.7%, NF4 ~9% (16 levels for a normal weight: the error QLoRA's adapter trains around).
    assert err < (0.015 if bits == 8 else 0.12), err


@pytest.mark.parametrize("bits", BITS)
def test_lora_on_quantized_base_trains_only_the_adapter(bits):
    model = lora_model(bits)
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    bases = [m.base_layer for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(bases) == 8 and all(type(b) is kind for b in bases)  # 4 Linears x 2 blocks, all wrapped
    assert type(model.embed_out) is nn.Linear  # the output head stays in full precision
    before = base_state(model)
    losses, _ = train(model, 6)
    assert losses[-1] < losses[0] - 0.1, losses
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {n for n, _ in model.named_parameters() if ".lora_" in n}
    after = base_state(model)
    assert before.keys() == after.keys()
    for name in before:  # bit-identical: the quantized base never moves
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name


@pytest.mark.parametrize("bits", BITS)
def test_evaluation_inside_training_keeps_gradients(bits):
    """bitsandbytes' CPU 4-bit inference path (eval() + no grad) used to repack the weight for good, after
    which training either crashed or left LoRA layers below without gradient. quantize() turns it off."""
    model = lora_model(bits)
    losses, ids = train(model, 2)
    model.eval()
    with torch.no_grad():
        eval_loss = (model(ids[:, :-1], ids[:, 1:]) / ids[:, 1:].numel()).item()
    later, _ = train(model, 4)
    if bits == 4:  # evaluation computes exactly as training does (no dropout here)
        assert eval_loss == later[0]
    assert later[-1] < later[0] < losses[0], (losses, later)
    lora = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for g in lora.values())


@pytest.mark.parametrize("bits", BITS)
def test_grad_checkpoint_on_a_quantized_base_under_bf16(bits):
    """--grad-checkpoint recomputes the bitsandbytes layers' forward under the same autocast and
    replays LoRA's dropout: the loss and every gradient are unchanged."""
    def run(checkpointed):
        model = quantize(tiny_model(), bits, torch.bfloat16)
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.2)
        model.grad_checkpoint = checkpointed
        torch.manual_seed(1)
        ids = torch.randint(0, 320, (4, 17))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:])
        return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    (loss, grads), (loss_ckpt, grads_ckpt) = run(False), run(True)
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_adapter_moves_to_the_unquantized_base(bits, tmp_path):
    model = lora_model(bits)
    _, ids = train(model, 6)
    save_adapter(model, str(tmp_path))
    fp = load_adapter(tiny_model(), str(tmp_path))  # the same base weights, never quantized
    model.train()  # int8 eval() would also quantize activations; train() with dropout 0 is the trained forward
    with torch.no_grad():
        q_logits, fp_logits = model(ids), fp(ids)
        fp_base = tiny_model()(ids)
    for (name, p), (_, p_fp) in zip(model.named_parameters(), fp.named_parameters()):
        if ".lora_" in name:
            assert torch.equal(p, p_fp), name
    # The logits differ by the base's rounding, which the adapter (trained around it) does not undo:
    # measured 0.2% int8, 4% NF4, as between the bare quantized and fp bases. Hence loose tolerances,
    # still far below the adapter's own effect on the logits (~55% here).
    err = rel_err(q_logits, fp_logits)
    assert err < (0.01 if bits == 8 else 0.1), err
    assert rel_err(fp_logits, fp_base) > 5 * err


@pytest.mark.parametrize("bits, double_quant", [(8, False), (4, False), (4, True)])
def test_dequantize_and_unload_export_a_plain_model(bits, double_quant, tmp_path):
    model = lora_model(bits, double_quant=double_quant)
    _, ids = train(model, 4)
    model.train()  # see test_adapter_moves_to_the_unquantized_base
    with torch.no_grad():
        expected = model(ids)
    with pytest.warns(UserWarning, match="quantization rounding"):
        dequantize(model)
    unload(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_pretrained(model, str(tmp_path))
    exported = from_pretrained(str(tmp_path))
    with torch.no_grad():
        got = exported(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merge_cli_rebuilds_the_double_quantized_base(tmp_path):
    """python -m nanotune.merge --load-in-4bit --double-quant (merge_adapter, as train.py --merge calls it)
    merges onto the rounding the adapter trained on."""
    save_pretrained(tiny_model(), str(tmp_path / "base"))
    make_tokenizer().save(str(tmp_path / "base" / "tokenizer.json"))  # the merged folder carries it
    model = lora_model(4, double_quant=True)
    _, ids = train(model, 4)
    save_adapter(model, str(tmp_path / "adapter"))
    model.train()  # see test_adapter_moves_to_the_unquantized_base
    with torch.no_grad():
        expected = model(ids)
    with pytest.warns(UserWarning, match="quantization rounding"):
        merge_main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                    str(tmp_path / "merged"), "--load-in-4bit", "--double-quant"])
    with torch.no_grad():
        got = from_pretrained(str(tmp_path / "merged"))(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_weight_bytes_of_a_pythia_width_block():
    """Pythia-70m's block shape (hidden 512, 8 heads, intermediate 2048): the benchmark's targets."""
    torch.manual_seed(0)
    block = GPTNeoX(tiny_config(vocab_size=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                                num_hidden_layers=1)).gpt_neox.layers
    fp32 = weight_bytes(block)
    ratios = {}
    for bits, double_quant in [(8, False), (4, False), (4, True)]:
        q = GPTNeoX(tiny_config(vocab_size=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                                num_hidden_layers=1)).gpt_neox.layers
        ratios[bits, double_quant] = weight_bytes(quantize(q, bits, double_quant=double_quant)) / fp32
    # int8: 1 byte + an fp32 scale per row; NF4: half a byte + an fp32 absmax per 64 (double quant: ~1 byte).
    assert ratios[8, False] <= 0.27 and ratios[4, False] <= 0.15 and ratios[4, True] < ratios[4, False], ratios


@pytest.mark.parametrize("bits", BITS)
def test_codes_survive_a_dtype_cast(bits):
    """Integer codes: model.to(bf16), bf16-true's cast and FSDP2's param_dtype leave them alone."""
    model = quantize(tiny_model(), bits, compute_dtype=torch.bfloat16)
    ids = torch.randint(0, 320, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).float()
    model.to(torch.bfloat16)
    with torch.no_grad():
        after = model(ids).float()
    assert rel_err(after, before) < 0.02  # bf16 norms and embeddings, against autocast's fp32 ones


def test_int8_cast_warning_is_dropped_and_no_other(caplog):
    """bitsandbytes logs 'inputs will be cast ... to float16' at every int8 call on fp32 input (here: a CPU
    evaluation); that one message is dropped, other warnings of the same logger still come through."""
    model = quantize(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), 8).eval()
    with torch.no_grad():
        model(torch.randn(3, 64))
    logging.getLogger("bitsandbytes.autograd._functions").warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "another warning" in messages and not [m for m in messages if "inputs will be cast" in m]
