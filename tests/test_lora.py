import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from nanotune import UserError
from nanotune.lora import LoRALinear, inject_lora, load_adapter, merge, save_adapter, unload, unmerge
from nanotune.models import from_pretrained
from nanotune.models.gpt_neox import GPTNeoX


def seq():
    """A bare model that is not GPT-NeoX: lora.py must work on any module tree."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))


def test_zero_B_gives_the_base_output_exactly():
    base = seq()
    x = torch.randn(4, 6)
    expected = base(x)
    model = inject_lora(base, ["0"], r=2, alpha=4, dropout=0.0)  # exact name "0", and suffix of "2.0"
    assert isinstance(model[0], LoRALinear) and isinstance(model[2][0], LoRALinear)
    assert not isinstance(model[2][1], LoRALinear)
    assert torch.equal(model(x), expected)


def test_forward_and_merge_follow_the_formula():
    model = inject_lora(seq(), ["0"], r=3, alpha=6, dropout=0.0)
    randomize_lora(model)
    layer = model[0]
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ W.T + b + (x @ A.T @ B.T) * (6 / 3))
    merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + (6 / 3) * B @ A)
    merge(model)  # a second merge is a no-op
    torch.testing.assert_close(layer.base_layer.weight, W + (6 / 3) * B @ A)
    unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W)


def test_rslora_scales_by_sqrt_r():
    model = inject_lora(seq(), ["0"], r=4, alpha=6, rslora=True)
    assert model[0].scaling == pytest.approx(6 / math.sqrt(4))


def test_only_lora_parameters_receive_gradients():
    model = inject_lora(seq(), ["0"], r=2, alpha=2, dropout=0.0)
    randomize_lora(model)
    model(torch.randn(3, 6)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"0.lora_A.weight", "0.lora_B.weight", "2.0.lora_A.weight", "2.0.lora_B.weight"}


@pytest.mark.parametrize("bias,expected", [
    ("none", set()),
    ("lora_only", {"gpt_neox.layers.0.attention.query_key_value.base_layer.bias",
                   "gpt_neox.layers.1.attention.query_key_value.base_layer.bias"}),
    ("all", "every bias"),
])
def test_bias_modes_train_and_save_exactly_their_parameters(tiny_model_dir, tmp_path, bias, expected):
    model = inject_lora(from_pretrained(tiny_model_dir), bias=bias)
    if expected == "every bias":
        expected = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora | expected
    save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == {"base_model.model." + n for n in lora | expected}


def test_modules_to_save_round_trip(tiny_model_dir, tmp_path):
    model = inject_lora(from_pretrained(tiny_model_dir), modules_to_save=["embed_out"])
    assert model.embed_out.weight.requires_grad
    with torch.no_grad():
        model.embed_out.weight.add_(1.0)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    assert "base_model.model.embed_out.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    loaded = load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")
    ids = torch.randint(0, 320, (2, 6))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_lora_layers_adapts_only_those_blocks(tiny_model_dir):
    model = inject_lora(from_pretrained(tiny_model_dir), ["query_key_value", "dense"], layers=[1])
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.attention.dense"}


def test_all_linear_skips_the_output_head(tiny_model_dir):
    model = inject_lora(from_pretrained(tiny_model_dir), "all-linear")
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert not isinstance(model.embed_out, LoRALinear)


def test_adapter_files_are_peft_format(tiny_model_dir, tmp_path):
    model = inject_lora(from_pretrained(tiny_model_dir), r=4, alpha=8, dropout=0.05, rslora=True, layers=[0])
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "bias", "modules_to_save", "use_rslora", "layers_to_transform",
                                   "fan_in_fan_out", "inference_mode", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["query_key_value"], "bias": "none", "modules_to_save": None, "use_rslora": True,
        "layers_to_transform": [0], "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": tiny_model_dir}
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    assert shapes == {"base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight": (4, 32),
                      "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_B.weight": (96, 4)}


def test_save_load_gives_identical_logits_and_merge_matches(tiny_model_dir, tmp_path):
    model = inject_lora(from_pretrained(tiny_model_dir), bias="all")
    randomize_lora(model)
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias.add_(0.5)
    model.eval()
    ids = torch.randint(0, 320, (2, 6))
    expected = model(ids)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a").eval()
    torch.testing.assert_close(loaded(ids), expected, atol=0, rtol=0)
    merged = unload(loaded)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids), expected, atol=1e-4, rtol=1e-4)


def test_a_peft_written_adapter_with_adapter_names_loads(tiny_model_dir, tmp_path):
    """PEFT may store keys with the adapter name ('.default.'); loading strips it."""
    model = inject_lora(from_pretrained(tiny_model_dir), r=2, alpha=4)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in sd.items()}, tmp_path / "a" / "adapter_model.safetensors")
    loaded = load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")
    torch.testing.assert_close(loaded.eval()(torch.ones(1, 3, dtype=torch.long)),
                               model.eval()(torch.ones(1, 3, dtype=torch.long)))


def test_mismatched_adapter_is_a_clear_error(tiny_model_dir, tmp_path):
    model = inject_lora(from_pretrained(tiny_model_dir), r=2)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(UserError, match="has shape .* trained for another model"):
        load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["dense"]}))
    with pytest.raises(UserError, match="lacks"):
        load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "r"}))
    with pytest.raises(UserError, match="lacks r; it is not a complete PEFT LoRA adapter config"):
        load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")


@pytest.mark.parametrize("option", [{"alpha_pattern": {"layers.1.attention.query_key_value": 4}},
                                    {"rank_pattern": {"layers.0.attention.query_key_value": 2}},
                                    {"exclude_modules": ["layers.0.attention.query_key_value"]},
                                    {"lora_bias": True},
                                    {"target_modules": ".*query_key_value"}])
def test_peft_options_nanotune_does_not_implement_are_refused(tiny_model_dir, tmp_path, option):
    """An adapter that turns on a PEFT option nanotune does not compute is refused, never loaded
    into something else (alpha_pattern would otherwise load cleanly and change every logit)."""
    save_adapter(inject_lora(from_pretrained(tiny_model_dir), r=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **option}))
    (key,) = option
    with pytest.raises(UserError, match="regular expression" if key == "target_modules" else f"sets {key} "):
        load_adapter(from_pretrained(tiny_model_dir), tmp_path / "a")


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "--lora-r must be a positive integer"),
    ({"dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
    ({"bias": "some"}, "--lora-bias 'some' is not one of none, all, lora_only"),
    ({"target_modules": ["q_proj"]}, "matches no Linear module; the model's Linear modules are: "
                                     "dense, dense_4h_to_h, dense_h_to_4h, embed_out, query_key_value"),
    ({"modules_to_save": ["lm_head"]}, "--modules-to-save 'lm_head' matches no module"),
    ({"modules_to_save": ["embed_out"], "tied": True}, "cannot train embed_out.weight: it is one tensor with"),
    ({"layers": [7]}, "with --lora-layers"),
])
def test_bad_options_name_the_flag(tiny_model_dir, kwargs, message):
    model = GPTNeoX(tiny_config(tie_word_embeddings=True)) if kwargs.pop("tied", False) else \
        from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match=message):
        inject_lora(model, **kwargs)
