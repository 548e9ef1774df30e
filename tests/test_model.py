import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from conftest import ROOT, make_model_dir, tiny_config
from nanotune import UserError
from nanotune.lora import inject_lora
from nanotune.loss import LinearCrossEntropy, summed_cross_entropy
from nanotune.models import from_pretrained, save_pretrained
from nanotune.models.gpt_neox import GPTNeoX


def reference_logits(sd, cfg, ids):
    """GPT-NeoX written out naively from its definition, head by head and position by position,
    straight from the HF state dict: an independent check of the model's layout and math."""
    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p, bias=True):
        return x @ sd[p + ".weight"].T + (sd[p + ".bias"] if bias else 0)

    nh, C = cfg.num_attention_heads, cfg.hidden_size
    hs = C // nh
    rot = int(hs * cfg.rotary_pct)
    T = ids.shape[0]

    def rope(v, pos):  # v: (hs,), rotate pairs (i, i + rot/2) by angle pos * base^(-2i/rot)
        out = v.clone()
        for i in range(rot // 2):
            theta = pos * cfg.rotary_emb_base ** (-2 * i / rot)
            a, b = v[i], v[i + rot // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + rot // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    x = sd["gpt_neox.embed_in.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"gpt_neox.layers.{layer}."
        h = ln(x, p + "input_layernorm")
        qkv = lin(h, p + "attention.query_key_value")  # (T, 3C), per head [q k v]
        attn = torch.zeros(T, C)
        for head in range(nh):
            block = qkv[:, head * 3 * hs:(head + 1) * 3 * hs]
            q = torch.stack([rope(block[t, :hs], t) for t in range(T)])
            k = torch.stack([rope(block[t, hs:2 * hs], t) for t in range(T)])
            v = block[:, 2 * hs:]
            for t in range(T):
                w = torch.softmax((k[:t + 1] @ q[t]) / math.sqrt(hs), dim=0)
                attn[t, head * hs:(head + 1) * hs] = w @ v[:t + 1]
        a = lin(attn, p + "attention.dense")

        def mlp(y):
            return lin(torch.nn.functional.gelu(lin(y, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
        if cfg.use_parallel_residual:
            x = x + a + mlp(ln(x, p + "post_attention_layernorm"))
        else:
            x = x + a
            x = x + mlp(ln(x, p + "post_attention_layernorm"))
    x = ln(x, "gpt_neox.final_layer_norm")
    head = sd["gpt_neox.embed_in.weight"] if cfg.tie_word_embeddings else sd["embed_out.weight"]
    return x @ head.T


@pytest.mark.parametrize("overrides", [
    {},
    {"use_parallel_residual": False},
    {"rotary_pct": 1.0, "rotary_emb_base": 500.0},
    {"rotary_pct": 0.5, "layer_norm_eps": 1e-3},
    {"tie_word_embeddings": True},
])
def test_logits_match_naive_reference(tmp_path, overrides):
    path = make_model_dir(tmp_path / "m", **overrides)
    # Random non-trivial biases and norms, so a mix-up of any two parameters shows.
    sd = load_file(os.path.join(path, "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file(sd, os.path.join(path, "model.safetensors"))
    model = from_pretrained(path)
    ids = torch.randint(0, 320, (1, 9), generator=g)
    ref = reference_logits(sd, tiny_config(**overrides), ids[0])
    torch.testing.assert_close(model(ids)[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_loss_matches_autograd(device, dtype, tol, head_trains):
    """Loss and gradients of LinearCrossEntropy against F.linear + F.cross_entropy through autograd.
    300 rows in chunks of 64 (the last one ragged), each chunk in softmax blocks of CPU_ROWS on a CPU."""
    torch.manual_seed(0)
    N, C, V = 300, 32, 97
    h = torch.randn(N, C, device=device, requires_grad=True)
    w = torch.randn(V, C, device=device, requires_grad=head_trains)
    targets = torch.randint(0, V, (N,), device=device)
    ref = F.cross_entropy(F.linear(h.to(dtype), w.to(dtype)).float(), targets, reduction="sum")
    ref_grads = torch.autograd.grad(0.5 * ref, [h, w] if head_trains else [h])
    loss = LinearCrossEntropy.apply(h.to(dtype), w.to(dtype), targets, 64)
    grads = torch.autograd.grad(0.5 * loss, [h, w] if head_trains else [h])  # the backward scales by 0.5
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=tol, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(LinearCrossEntropy.apply(h.to(dtype), w.to(dtype), targets, 64), ref,
                                   rtol=tol, atol=0)


class Calls(TorchFunctionMode):
    """Every torch function a block of code calls, with the shape and storage of what it returned."""

    def __enter__(self):
        self.seen = []
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append((getattr(func, "__name__", str(func)),
                          (tuple(out.shape), out.data_ptr()) if torch.is_tensor(out) else None))
        return out


def test_fused_loss_under_no_grad_builds_no_gradient():
    """Evaluation of a full fine-tune (the head trains, autograd off): one GEMM per chunk and no
    (V, C) weight gradient, where the training call runs three GEMMs per chunk and allocates it."""
    torch.manual_seed(0)
    N, C, V, chunk = 300, 32, 97, 64
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    ref = F.cross_entropy(F.linear(h, w), targets, reduction="sum")
    gemms, head = ("matmul", "mm", "addmm", "addmm_"), _head(w)
    with torch.no_grad(), Calls() as calls:
        loss = summed_cross_entropy(h[None], targets[None], head, chunk)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    assert sum(name in gemms for name, _ in calls.seen) == math.ceil(N / chunk)
    assert not [out for _, out in calls.seen if out and out[0] == (V, C) and out[1] != w.data_ptr()]
    with Calls() as calls:  # the same call with autograd on: the checks above can tell them apart
        summed_cross_entropy(h[None], targets[None], head, chunk)
    assert sum(name in gemms for name, _ in calls.seen) == 3 * math.ceil(N / chunk)
    assert [out for _, out in calls.seen if out and out[0] == (V, C) and out[1] != w.data_ptr()]


def _head(w):
    """A bias-free Linear whose weight is w's storage (and trains if w does)."""
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(w.detach(), requires_grad=w.requires_grad)
    return head


@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_loss_fp16_gradients_keep_the_small_probabilities(head_trains):
    """fp16 h and W (fp16-mixed), gradients against autograd in float64 on the same fp16 values. Every
    target logit is 18 above the rest, so the other 8191 probabilities are about 1.5e-8, under fp16's
    smallest value: in fp16 they round to zero. Every row of W shares a component u orthogonal to h,
    which cancels from the exact gradient (sum_v p_v W_v - W_t) only when they are all kept; with
    fp16 dlogits, -(1 - p_t) u remains (76% of the gradient's largest entry before the fix)."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 8, 32, 8192
    h = torch.randn(N, C, generator=g)
    u = torch.randn(C, generator=g)
    u = u - torch.linalg.lstsq(h.T, u[:, None]).solution[:, 0] @ h  # u . h_i = 0 for every row
    u = 3 * u / u.norm()
    targets = torch.randperm(V, generator=g)[:N]
    w = 0.001 * torch.randn(V, C, generator=g) + u
    w[targets] = 18 * h / h.pow(2).sum(1, keepdim=True) + u  # the target logits: 18
    h16, w16 = h.half().requires_grad_(), w.half().requires_grad_(head_trains)
    h64, w64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (h16, w16))
    ref = F.cross_entropy(F.linear(h64, w64), targets, reduction="sum")
    ref_grads = torch.autograd.grad(1024 * ref, [h64, w64] if head_trains else [h64])  # 1024: a loss scale
    loss = LinearCrossEntropy.apply(h16, w16, targets, 4, True)
    grads = torch.autograd.grad(1024 * loss, [h16, w16] if head_trains else [h16])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("setup", ["lora", "full", "tied", "lora-on-head"])
def test_loss_sum_matches_cross_entropy_of_the_logits(setup):
    """model(ids, labels) is the summed cross-entropy of model(ids)'s logits where labels != -100,
    with the same gradients for every trainable parameter, whichever path the head takes."""
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config(tie_word_embeddings=setup == "tied"))
    if setup in ("lora", "lora-on-head"):
        inject_lora(model, ["query_key_value", "embed_out"] if setup == "lora-on-head" else ["query_key_value"],
                    r=4, alpha=8, dropout=0.0)
        for m in model.modules():  # B starts at zero; make the adapter do something
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    else:
        model.requires_grad_(True)
    ids = torch.randint(0, 320, (3, 20))
    labels = torch.cat((ids[:, 1:], torch.full((3, 1), -100)), dim=1)
    labels[0, :5] = -100  # a prompt that is not trained on
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(ids, labels)
    grads = torch.autograd.grad(loss, params)
    ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", ["lora", "dora", None])
def test_grad_checkpoint_keeps_less_and_changes_no_gradient(lora):
    """--grad-checkpoint: the tensors the forward keeps for the backward (seen through
    saved_tensors_hooks) shrink to a fraction, and every gradient is the same, LoRA's dropout
    included (the recomputed forward replays the same random mask; DoRA's own recomputed W x nests
    inside the block's)."""
    def run(checkpointed):
        torch.manual_seed(0)
        model = GPTNeoX(tiny_config(num_hidden_layers=4))
        if lora:
            inject_lora(model, ["query_key_value", "dense"], r=4, alpha=8, dropout=0.3, dora=lora == "dora")
        else:
            model.requires_grad_(True)
        model.grad_checkpoint = checkpointed
        ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
        labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            loss = model(ids, labels)
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(kept), loss, torch.autograd.grad(loss, params)

    (kept, loss, grads), (kept_ckpt, loss_ckpt, grads_ckpt) = run(False), run(True)
    assert kept_ckpt < kept / 4, (kept_ckpt, kept)
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=0, atol=0)


def test_hf_key_names_and_shapes():
    model = GPTNeoX(tiny_config(num_hidden_layers=1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "gpt_neox.embed_in.weight": (320, 32),
        "gpt_neox.layers.0.input_layernorm.weight": (32,), "gpt_neox.layers.0.input_layernorm.bias": (32,),
        "gpt_neox.layers.0.post_attention_layernorm.weight": (32,),
        "gpt_neox.layers.0.post_attention_layernorm.bias": (32,),
        "gpt_neox.layers.0.attention.query_key_value.weight": (96, 32),
        "gpt_neox.layers.0.attention.query_key_value.bias": (96,),
        "gpt_neox.layers.0.attention.dense.weight": (32, 32), "gpt_neox.layers.0.attention.dense.bias": (32,),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (64, 32), "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": (64,),
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (32, 64), "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": (32,),
        "gpt_neox.final_layer_norm.weight": (32,), "gpt_neox.final_layer_norm.bias": (32,),
        "embed_out.weight": (320, 32),
    }


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    model = from_pretrained(tiny_model_dir)
    save_pretrained(model, tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    ids = torch.randint(0, 320, (2, 7))
    torch.testing.assert_close(from_pretrained(str(tmp_path / "copy"))(ids), model(ids), atol=0, rtol=0)


def test_sharded_checkpoint_and_legacy_buffers(tiny_model_dir, tmp_path):
    sd = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:7], "model-00002-of-00002.safetensors": keys[7:]}
    os.makedirs(tmp_path / "s")
    for name, ks in shards.items():
        extra = {"gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
                 "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2)}
        save_file({**{k: sd[k] for k in ks}, **extra}, tmp_path / "s" / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "s" / "config.json").write_text(open(os.path.join(tiny_model_dir, "config.json")).read())
    ids = torch.randint(0, 320, (1, 5))
    torch.testing.assert_close(from_pretrained(str(tmp_path / "s"))(ids), from_pretrained(tiny_model_dir)(ids))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures Linux's VmHWM")
def test_loading_holds_no_more_than_it_keeps(tmp_path):
    """Peak resident memory while loading a bf16 checkpoint of N bytes for bf16-true, in a fresh process
    whose high-water mark is reset after its imports: the weights it keeps (N) and one tensor in flight,
    not a copy of the model beside them (before: 3 N, the mapped file and an fp32 copy of it) nor the
    file's pages mapped all at once (2 N)."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, vocab_size=4096)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPTNeoX(config).state_dict().items()}
    path = tmp_path / "m"
    os.makedirs(path)
    save_file({k: torch.randn(shape).mul(0.02).bfloat16() for k, shape in shapes.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config.to_hf()))
    n = os.path.getsize(path / "model.safetensors")
    script = (  # the peak above the interpreter's RSS once torch and nanotune are imported, in bytes
        "import torch; from nanotune.models import from_pretrained\n"
        "kb = lambda f: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':'))\n"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS')\n"
        f"model = from_pretrained({str(path)!r}, dtype=torch.bfloat16)\n"
        "assert all(p.dtype == torch.bfloat16 for p in model.parameters())\n"
        "print((kb('VmHWM') - base) * 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    assert n > 30e6 and peak <= 1.3 * n, f"peak {peak / n:.2f} N"


def test_num_layers_keeps_the_first_blocks(tiny_model_dir):
    full, cut = from_pretrained(tiny_model_dir), from_pretrained(tiny_model_dir, num_layers=1)
    assert len(cut.gpt_neox.layers) == 1 and cut.config.num_hidden_layers == 1
    torch.testing.assert_close(cut.gpt_neox.layers[0].state_dict(), full.gpt_neox.layers[0].state_dict())
    with pytest.raises(UserError, match="--num-layers 5 is out of range"):
        from_pretrained(tiny_model_dir, num_layers=5)


def test_new_rope_parameters_spelling(tiny_model_dir, tmp_path):
    config = json.loads(open(os.path.join(tiny_model_dir, "config.json")).read())
    for key in ("rotary_pct", "rotary_emb_base", "partial_rotary_factor", "rope_theta"):
        config.pop(key)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 777.0, "partial_rotary_factor": 0.5}
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    os.link(os.path.join(tiny_model_dir, "model.safetensors"), tmp_path / "m" / "model.safetensors")
    model = from_pretrained(str(tmp_path / "m"))
    assert (model.config.rotary_pct, model.config.rotary_emb_base) == (0.5, 777.0)


def test_bad_checkpoints_are_one_sentence_errors(tiny_model_dir, tmp_path):
    def folder(name, config=None, tensors=None):
        os.makedirs(tmp_path / name)
        cfg = json.loads(open(os.path.join(tiny_model_dir, "config.json")).read())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
        if tensors is not None:
            save_file(tensors, tmp_path / name / "model.safetensors")
        return str(tmp_path / name)

    sd = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    with pytest.raises(UserError, match="does not exist"):
        from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="model_type is 'gpt2', which nanotune does not support; it loads .*gpt_neox"):
        from_pretrained(folder("gpt2", {"model_type": "gpt2"}, sd))
    with pytest.raises(UserError, match=r"already quantized \(gptq\); nanotune quantizes from full-precision"):
        from_pretrained(folder("gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, sd))
    with pytest.raises(UserError, match="num_attention_heads must be a positive integer, got 0"):
        from_pretrained(folder("heads", {"num_attention_heads": 0}, sd))
    with pytest.raises(UserError, match="hidden_size must be a positive integer, got '32'"):
        from_pretrained(folder("string", {"hidden_size": "32"}, sd))
    with pytest.raises(UserError, match="'embed_out.weight' is missing"):
        from_pretrained(folder("missing", tensors={k: v for k, v in sd.items() if k != "embed_out.weight"}))
    with pytest.raises(UserError, match=r"has shape \(320, 31\)"):
        from_pretrained(folder("shape", tensors={**sd, "embed_out.weight": torch.zeros(320, 31)}))
    with pytest.raises(UserError, match="unexpected tensor 'transformer.wte.weight'"):
        from_pretrained(folder("extra", tensors={**sd, "transformer.wte.weight": torch.zeros(2)}))
    cut = folder("truncated", tensors=sd)
    data = open(os.path.join(cut, "model.safetensors"), "rb").read()
    for size in (len(data) // 2, 4):  # a partial download: tensor data, then even the header, cut off
        open(os.path.join(cut, "model.safetensors"), "wb").write(data[:size])
        with pytest.raises(UserError, match="cannot be read as safetensors .* damaged or incomplete"):
            from_pretrained(cut)


def test_pickle_weights_are_refused_never_loaded(tiny_model_dir, tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))
    path = tmp_path / "pickled"
    os.makedirs(path)
    (path / "config.json").write_text(open(os.path.join(tiny_model_dir, "config.json")).read())
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match="never unpickles"):
        from_pretrained(str(path))
    assert not (tmp_path / "PWNED").exists()
