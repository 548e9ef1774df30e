"""The Llama family (llama, mistral, qwen2, qwen3): logits against a naive forward written from the
definitions, against transformers' own classes (when installed) both ways, config refusals, and LoRA
adapters that PEFT reads."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanotune import UserError
from nanotune.lora import inject_lora, load_adapter, save_adapter
from nanotune.models import MODEL_TYPES, from_pretrained, save_pretrained
from nanotune.models.llama import ARCHITECTURES, Config

T = 12  # tokens per test sequence: longer than the sliding window below, so the window masks something
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # with hs 8, theta 500: one pair kept, one blended, two slowed
# One case per model type and switch: the model_type and what its config.json sets.
CASES = {
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama-head-dim": ("llama", {"head_dim": 16}),
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16, "attention_bias": True}),
}
# For transformers: every switch of a type at once.
HF_CASES = {
    "llama": ("llama", {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True, "rope_scaling": LLAMA3}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "head_dim": 16,
                             "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16, "attention_bias": True}),
}


def config_json(model_type, **overrides):
    """A config.json as a user's folder has it, in the transformers 4 spelling (rope_theta, rope_scaling)."""
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": 300,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500.0, "max_position_embeddings": 128,
            "bos_token_id": 1, "eos_token_id": 2, **overrides}


def perturb(model, seed=0):
    """Move every weight, norms and biases included, off its initial value, so a mix-up of any two shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_folder(path, hf):
    """A model folder with this config.json and random weights; returns the tensors as saved."""
    cls = MODEL_TYPES[hf["model_type"]]  # Llama, or a family built on it (Phi-3) or beside it (Gemma)
    model = cls(cls.config_class.from_hf(hf, "test"))
    perturb(model)
    save_pretrained(model, str(path))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return load_file(os.path.join(path, "model.safetensors"))


def token_ids():
    return torch.randint(0, 300, (1, T), generator=torch.Generator().manual_seed(1))


def reference_logits(sd, hf, ids):
    """The family written out naively from its definitions, position by position and head by head,
    straight from the checkpoint's tensors: an independent check of the layout and the math."""
    model_type, nh, eps = hf["model_type"], hf["num_attention_heads"], hf["rms_norm_eps"]
    nkv = hf.get("num_key_value_heads") or nh
    hs = hf.get("head_dim") or hf["hidden_size"] // nh
    window = hf.get("sliding_window") if model_type == "mistral" else None
    qkv_bias, o_bias = hf.get("attention_bias", False) or model_type == "qwen2", hf.get("attention_bias", False)
    scaling = hf.get("rope_scaling") or {"rope_type": "default"}

    def frequency(i):  # angle per position of the pair (i, i + hs/2)
        f = hf["rope_theta"] ** (-2 * i / hs)
        if scaling["rope_type"] == "linear":
            return f / scaling["factor"]
        if scaling["rope_type"] == "llama3":  # Meta's apply_scaling, one frequency at a time
            wavelength, context = 2 * math.pi / f, scaling["original_max_position_embeddings"]
            if wavelength < context / scaling["high_freq_factor"]:
                return f
            if wavelength > context / scaling["low_freq_factor"]:
                return f / scaling["factor"]
            s = (context / wavelength - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] -
                                                                      scaling["low_freq_factor"])
            return (1 - s) * f / scaling["factor"] + s * f
        return f

    def rope(v, pos):  # v: (hs,)
        out = v.clone()
        for i in range(hs // 2):
            c, s = math.cos(pos * frequency(i)), math.sin(pos * frequency(i))
            out[i], out[i + hs // 2] = v[i] * c - v[i + hs // 2] * s, v[i + hs // 2] * c + v[i] * s
        return out

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, name, bias):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)

    x = sd["model.embed_tokens.weight"][ids]  # (T, C)
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        def rotated(vec, norm, pos):  # Qwen3 normalises each head's query and key before rotating
            return rope(rms(vec, sd[p + f"self_attn.{norm}.weight"]) if model_type == "qwen3" else vec, pos)
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj", qkv_bias).view(T, nh, hs)
        k = lin(h, p + "self_attn.k_proj", qkv_bias).view(T, nkv, hs)
        v = lin(h, p + "self_attn.v_proj", qkv_bias).view(T, nkv, hs)
        attn = torch.zeros(T, nh * hs)
        for head in range(nh):
            kv = head // (nh // nkv)  # the key/value head this query head shares
            keys = torch.stack([rotated(k[s, kv], "k_norm", s) for s in range(T)])
            for t in range(T):
                first = max(0, t - window + 1) if window else 0  # keys at distance >= window are masked
                w = torch.softmax(keys[first:t + 1] @ rotated(q[t, head], "q_norm", t) / math.sqrt(hs), dim=0)
                attn[t, head * hs:(head + 1) * hs] = w @ v[first:t + 1, kv]
        x = x + lin(attn, p + "self_attn.o_proj", o_bias)
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        mlp_bias = hf.get("mlp_bias", False)
        gate = lin(h, p + "mlp.gate_proj", mlp_bias)
        x = x + lin(gate * torch.sigmoid(gate) * lin(h, p + "mlp.up_proj", mlp_bias), p + "mlp.down_proj", mlp_bias)
    x = rms(x, sd["model.norm.weight"])
    head = sd["model.embed_tokens.weight"] if hf.get("tie_word_embeddings") else sd["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("case", CASES)
def test_logits_match_naive_reference(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = config_json(model_type, **overrides)
    sd = make_folder(tmp_path, hf)
    assert ("lm_head.weight" in sd) != bool(hf.get("tie_word_embeddings"))  # a tied head is saved once
    model = from_pretrained(str(tmp_path))
    ids = token_ids()
    torch.testing.assert_close(model(ids)[0], reference_logits(sd, hf, ids[0]), atol=1e-4, rtol=1e-4)


def test_num_layers_keeps_the_first_blocks_and_old_rotary_buffers_are_skipped(tmp_path):
    hf = config_json("qwen2", num_key_value_heads=2)
    sd = make_folder(tmp_path, hf)
    # transformers < 4.36 saved each layer's rotary frequencies with the weights
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
    save_file({**sd, **extra}, os.path.join(tmp_path, "model.safetensors"))
    model = from_pretrained(str(tmp_path), num_layers=1)
    assert len(model.blocks) == 1
    ids = token_ids()
    ref = reference_logits(sd, {**hf, "num_hidden_layers": 1}, ids[0])
    torch.testing.assert_close(model(ids)[0], ref, atol=1e-4, rtol=1e-4)


def test_rope_spellings_agree_and_configs_round_trip():
    """transformers 5's rope_parameters, transformers 4's rope_scaling and the oldest 'type' key read
    alike; to_hf writes what from_hf reads back unchanged, for every case."""
    old = config_json("llama", rope_scaling=LLAMA3)
    new = {k: v for k, v in config_json("llama").items() if k != "rope_theta"}
    new["rope_parameters"] = {**LLAMA3, "rope_theta": 500.0}
    assert Config.from_hf(old, "old") == Config.from_hf(new, "new")
    assert Config.from_hf(old, "old").rope_scaling == LLAMA3
    linear = Config.from_hf(config_json("llama", rope_scaling={"type": "linear", "factor": 2.0}), "oldest")
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    for model_type, overrides in CASES.values():
        config = Config.from_hf(config_json(model_type, **overrides), "case")
        hf = config.to_hf()
        assert hf["architectures"] == [ARCHITECTURES[model_type]] and hf["model_type"] == model_type
        assert Config.from_hf(hf, "written") == config


@pytest.mark.parametrize("model_type,overrides,field,expected", [
    ("llama", {}, "head_dim", 8),  # hidden / heads
    ("qwen3", {}, "head_dim", 128),  # Qwen3Config's default, whatever hidden / heads is
    ("llama", {}, "num_key_value_heads", 4),  # MHA
    ("mistral", {}, "sliding_window", 4096),  # MistralConfig's default when the key is absent
    ("mistral", {"sliding_window": None}, "sliding_window", None),  # Mistral 7B v0.2 on: no window
    ("qwen2", {"sliding_window": 4}, "sliding_window", None),  # Qwen reads it only with use_sliding_window
    ("qwen2", {"attention_bias": True}, "attention_bias", False),  # Qwen2 ignores it: q, k, v biased, o not
])
def test_absent_and_ignored_fields_read_as_transformers_reads_them(model_type, overrides, field, expected):
    assert getattr(Config.from_hf(config_json(model_type, **overrides), "test"), field) == expected


@pytest.mark.parametrize("model_type,overrides,message", [
    ("llama", {"rope_parameters": {"rope_type": "mrope", "factor": 2.0}}, "rope type 'mrope' is not supported"),
    ("llama", {"rope_scaling": {**LLAMA3, "low_freq_factor": None}}, "needs a positive number low_freq_factor"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window is true"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ("llama", {"hidden_size": 30}, "not divisible by num_attention_heads"),
    ("llama", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive integer"),
    ("llama", {"head_dim": 7}, "head_dim 7 must be even"),
])
def test_refuses_what_it_does_not_implement(tmp_path, model_type, overrides, message):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_json(model_type, **overrides), f)
    with pytest.raises(UserError, match=message) as e:
        from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and ". " not in str(e.value)  # one sentence


@pytest.mark.parametrize("case", HF_CASES)
def test_matches_transformers_both_ways(tmp_path, case):
    """transformers' own class -> its save_pretrained -> nanotune: same logits; and nanotune's
    save_pretrained -> transformers' AutoModelForCausalLM: the right class, same logits."""
    transformers = pytest.importorskip("transformers")
    model_type, overrides = HF_CASES[case]
    config = transformers.AutoConfig.for_model(**config_json(model_type, **overrides))
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    ours = from_pretrained(str(tmp_path / "theirs"))
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        save_pretrained(ours, str(tmp_path / "ours"))
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager")
        assert type(back).__name__ == ARCHITECTURES[model_type]
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


def adapted_model(tmp_path):
    """A llama folder and a nanotune LoRA adapter on q_proj and v_proj, with lora_B moved off zero."""
    make_folder(tmp_path / "base", config_json("llama", num_key_value_heads=2))
    model = inject_lora(from_pretrained(str(tmp_path / "base")), ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    save_adapter(model, str(tmp_path / "adapter"))
    return model


def test_lora_adapter_keys_are_peft_keys(tmp_path):
    adapted_model(tmp_path)
    keys = set(load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
                    for i in range(2) for m in "qv" for ab in "AB"}


def test_lora_adapter_loads_in_peft(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    model = adapted_model(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def peft_adapter(base, peft):
    """peft's LoRA on every Linear of a transformers model, its head trained in full, moved off its init."""
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       modules_to_save=["lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    return theirs


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_peft_adapter_loads_here(tmp_path, model_type):
    """The other way: an adapter peft trained and saved (every Linear, the head trained in full) loads
    with nanotune's load_adapter and computes what peft's model computes."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    make_folder(tmp_path / "base", config_json(model_type, num_key_value_heads=2))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    theirs = peft_adapter(base, peft)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
