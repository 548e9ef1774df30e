"""Rotary scalings (nanotune.models.rope) against transformers' own classes, at lengths below and above
the original context (dynamic and longrope change there), in a forward and in cached generation; and
the formulas the tables come from, written out in the test."""
import importlib
import json
import math

import pytest
import torch

from nanotune import UserError
from nanotune.generate import generate
from nanotune.models import from_pretrained, read_config, save_pretrained
from nanotune.models.rope import frequencies
from test_chatglm import glm_config
from test_gemma_phi3 import gemma_config
from test_llama import config_json, perturb

SHORT = [1.0, 1.1, 1.3, 1.6]  # longrope's per-pair factors for hs 8, while a sequence fits the original context
LONG = [1.0, 2.0, 4.0, 8.0]  # and beyond it
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 300, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500.0, "max_position_embeddings": 64,
        "original_max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# A case per scaling: the config.json, with an original context of 16 positions; the tests run 12 and 24.
CASES = {
    "yarn-qwen2": config_json("qwen2", num_key_value_heads=2, max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn-betas-llama": config_json("llama", max_position_embeddings=32, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "beta_fast": 8, "beta_slow": 2,
        "truncate": False, "attention_factor": 1.3}),
    "dynamic-llama": config_json("llama", max_position_embeddings=16, rope_scaling={"rope_type": "dynamic",
                                                                                    "factor": 2.0}),
    "dynamic-mistral": config_json("mistral", num_key_value_heads=2, sliding_window=8, max_position_embeddings=16,
                                   rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
    "longrope-qwen3": config_json("qwen3", num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                  rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                                "original_max_position_embeddings": 16}),
    "yarn-gpt_neox": {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 300,
                      "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                      "rotary_pct": 0.5, "max_position_embeddings": 64, "rope_scaling": {
                          "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "dynamic-glm": glm_config(vocab_size=300, max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
    "dynamic-gemma2": gemma_config(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn-gemma3_text": gemma_config("gemma3_text", rope_local_base_freq=20.0, sliding_window_pattern=2, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),  # the global layers only
    "longrope-phi3": {**PHI3, "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}},
    "longrope-partial-phi3": {**PHI3, "partial_rotary_factor": 0.5, "sliding_window": 10, "rope_scaling": {
        "type": "su", "short_factor": SHORT[:2], "long_factor": LONG[:2]}},  # 'su': Phi-3's first name for it
}


def theirs_and_ours(tmp_path, hf):
    """transformers' class on this config.json, perturbed, saved, and loaded by nanotune."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf),
                                                           attn_implementation="eager").eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    return theirs, from_pretrained(str(tmp_path / "theirs")).eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_below_and_above_the_original_context(tmp_path, case):
    """The folder transformers wrote loads to the same logits at 12 and 24 positions (the original
    context is 16), and the folder nanotune writes back loads in transformers to them too."""
    theirs, ours = theirs_and_ours(tmp_path, CASES[case])
    save_pretrained(ours, str(tmp_path / "ours"))
    back = type(theirs).from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
    for T in (12, 24):  # growing, as transformers' dynamic scaling keeps the longest length it has seen
        ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected = theirs(ids).logits
            torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


class Recorder(torch.nn.Module):
    """The model, wrapped as DDP wraps it (.module), keeping the logits of every call generate makes."""

    def __init__(self, model):
        super().__init__()
        self.module, self.logits = model, []

    def forward(self, *args, **kwargs):
        self.logits.append(self.module(*args, **kwargs))
        return self.logits[-1]


@pytest.mark.parametrize("case", ["dynamic-llama", "longrope-qwen3", "longrope-phi3", "longrope-partial-phi3"])
def test_cached_generation_past_the_original_context_matches_transformers(tmp_path, case):
    """Greedy generation from 10 tokens to 30, across the original context (16), step by step: each
    cached step rotates its token by the frequencies of the sequence so far while the cached keys
    keep theirs, and Phi-3 recomputes its cache once it passes the original context, as transformers."""
    theirs, ours = theirs_and_ours(tmp_path, CASES[case])
    prompt = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    theirs.generation_config.eos_token_id = None  # 20 new tokens, whatever they are
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    recorder = Recorder(ours)
    assert generate(recorder, [prompt[0].tolist()], max_new_tokens=20) == [expected.sequences[0, 10:].tolist()]
    torch.testing.assert_close(torch.cat(recorder.logits), torch.cat(expected.logits), atol=1e-5, rtol=1e-5)


def test_frequencies_follow_the_formulas():
    """Each type's inverse frequencies and attention factor from its paper's formula, pair by pair."""
    dim, theta, length = 8, 500.0, torch.tensor(40)
    plain = [theta ** (-2 * i / dim) for i in range(dim // 2)]

    def check(rope, expected, factor=1.0, max_positions=16):
        inv_freq, attention = frequencies({"rope_theta": theta, **rope}, dim, max_positions, length, "cpu")
        torch.testing.assert_close(inv_freq, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=0)
        assert attention == pytest.approx(factor)
    check({"rope_type": "linear", "factor": 4.0}, [f / 4 for f in plain])
    grown = theta * (2.0 * 40 / 16 - 1) ** (dim / (dim - 2))  # dynamic NTK at 40 positions of 16
    check({"rope_type": "dynamic", "factor": 2.0}, [grown ** (-2 * i / dim) for i in range(dim // 2)])
    check({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16},
          [f / s for f, s in zip(plain, LONG)], math.sqrt(1 + math.log(4) / math.log(16)), max_positions=64)
    # YaRN: pair i turns 16 f_i / 2 pi times over the original context; > 32 times kept, < once divided by 4
    turns = [16 * f / (2 * math.pi) for f in plain]
    assert turns[0] > 1 > turns[-1]  # the ramp ends inside these four pairs
    inv_freq, attention = frequencies({"rope_theta": theta, "rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 16}, dim, 64, length, "cpu")
    assert attention == pytest.approx(0.1 * math.log(4) + 1)
    assert inv_freq[-1] == pytest.approx(plain[-1] / 4) and plain[0] / 4 < inv_freq[0] <= plain[0]


@pytest.mark.parametrize("hf,message", [
    (config_json("llama", rope_scaling={"rope_type": "mrope", "factor": 2.0}), "rope type 'mrope' is not supported "
     "for llama, only 'default', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3'"),
    (config_json("llama", rope_scaling={"rope_type": "yarn"}), "yarn rope scaling needs a positive number factor"),
    ({**PHI3, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "only 'default', 'longrope'"),
    ({**PHI3, "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": [1.0]}},
     "long_factor must be a list of 4 positive numbers"),
    ({**PHI3, "partial_rotary_factor": 0.375}, "partial_rotary_factor 0.375 leaves 3"),
])
def test_refuses_scalings_it_cannot_compute(tmp_path, hf, message):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(UserError, match=message) as e:
        from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


# Published configs' rotary settings at their real sizes (the factor lists shortened to patterns).
REAL = {
    "Qwen2.5-7B-Instruct + YaRN": ("qwen2", "Qwen2RotaryEmbedding", {
        "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}),
    "Phi-3.5-mini": ("phi3", "Phi3RotaryEmbedding", {
        "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rope_scaling": {
            "type": "longrope", "short_factor": [1 + i / 40 for i in range(48)],
            "long_factor": [1 + i for i in range(48)]}}),
    "Phi-4-mini": ("phi3", "Phi3RotaryEmbedding", {
        "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_scaling": {
            "type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1 + i / 2 for i in range(48)]}}),
    "Llama-2 + dynamic NTK": ("llama", "LlamaRotaryEmbedding", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
}


@pytest.mark.parametrize("name", REAL)
def test_rotary_tables_at_real_sizes_match_transformers(tmp_path, name):
    """cos and sin at positions up to 40000, past each original context, from a model built on the meta
    device (no weights) against transformers' own rotary module for the same config."""
    transformers = pytest.importorskip("transformers")
    model_type, module, fields = REAL[name]
    hf = {"model_type": model_type, "vocab_size": 1000, "intermediate_size": 64, "num_hidden_layers": 1, **fields}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cls, ours_config = read_config(str(tmp_path))  # a config alone: no weights to read
    with torch.device("meta"):
        ours = cls(ours_config)
    config = transformers.AutoConfig.for_model(**hf)
    theirs = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), module)(config)
    for last in (1000, 40000):  # the longest position of a forward decides dynamic's base and longrope's factors
        positions = torch.arange(last - 8, last)[None]
        expected = theirs(torch.zeros(1, dtype=torch.float32), positions)
        for got, want in zip(ours.rotary(positions, torch.float32), expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
