"""Gemma 2, Gemma 3 text and Phi-3 against transformers' own classes (logits both ways) and peft
(adapters both ways), on tiny configs where every switch shows: windows shorter than the sequence,
soft-capping that bites, a local rotary base far from the global one; config refusals; and Gemma's
chat template, which has no system role."""
import json

import pytest
import torch

from nanotune import UserError
from nanotune.lora import inject_lora, load_adapter, save_adapter
from nanotune.models import from_pretrained, save_pretrained
from nanotune.templates import load_template
from nanotune.tokenizer import load_tokenizer
from test_llama import make_folder, peft_adapter, perturb


def gemma_config(model_type="gemma2", **overrides):
    """A Gemma config.json; a local window of 4 and a query_pre_attn_scalar unlike hs (16)."""
    return {"architectures": [{"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[model_type]],
            "model_type": model_type, "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
            "query_pre_attn_scalar": 12, "sliding_window": 4, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0, **overrides}


def phi3_config(**overrides):
    return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500.0, "max_position_embeddings": 64,
            "original_max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            **overrides}


CASES = {
    "gemma2": gemma_config(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=500.0),
    "gemma2-untied-defaults": gemma_config(tie_word_embeddings=False),  # Gemma2Config's soft-caps, 50 and 30
    # Three layers, the third global (pattern 3); global rope_theta 1000 scaled linearly, local base 20
    "gemma3_text": gemma_config("gemma3_text", num_hidden_layers=3, sliding_window_pattern=3, rope_theta=1000.0,
                                rope_local_base_freq=20.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gemma3_text-layer-types": gemma_config("gemma3_text", tie_word_embeddings=False, final_logit_softcapping=5.0,
                                            layer_types=["full_attention", "sliding_attention"]),
    "phi3": phi3_config(sliding_window=5),
    "phi3-partial": phi3_config(partial_rotary_factor=0.5, tie_word_embeddings=True),  # Phi-4-mini's layout
}


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers_both_ways(tmp_path, case):
    """transformers' class -> its save_pretrained -> nanotune: same logits over 12 positions (3 windows);
    nanotune's save_pretrained -> transformers: its class again, same logits."""
    transformers = pytest.importorskip("transformers")
    hf = CASES[case]
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf),
                                                           attn_implementation="eager").eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(str(tmp_path / "theirs"))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        save_pretrained(ours, str(tmp_path / "ours"))
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager")
        assert type(back) is type(theirs)
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_soft_capped_loss_and_its_gradients_match_transformers(tmp_path):
    """Gemma 2's training loss goes through the soft-capped logits (each chunk recomputed in the
    backward): the mean over the batch and the head's gradient equal transformers'."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CASES["gemma2"]),
                                                           attn_implementation="eager")
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)  # ours come shifted
    expected = theirs(ids, labels=ids).loss
    expected.backward()
    loss = ours(ids, labels=labels) / labels.ne(-100).sum()
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lm_head.weight.grad, theirs.lm_head.weight.grad, atol=1e-5, rtol=1e-4)


def test_switches_change_the_logits(tmp_path):
    """Each Gemma switch the parity test relies on bites on these configs: without it, other logits."""
    make_folder(tmp_path, CASES["gemma2"])
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = from_pretrained(str(tmp_path))(ids)
        for switch in ("final_logit_softcapping", "cap", "sliding_window"):
            model = from_pretrained(str(tmp_path))
            for m in [model] if switch == "final_logit_softcapping" else [b.self_attn for b in model.blocks]:
                setattr(m, switch, None)
            assert not torch.allclose(model(ids), expected, atol=1e-3), switch


@pytest.mark.parametrize("case", ["gemma3_text-layer-types", "phi3"])  # untied: peft trains the head
def test_adapters_move_between_peft_and_nanotune(tmp_path, case):
    """nanotune's adapter (the family's default targets) loads in peft, and peft's (every Linear, the
    head trained in full) loads here, each computing what the other does."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    make_folder(tmp_path / "base", CASES[case])
    ours = inject_lora(from_pretrained(str(tmp_path / "base")), None, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    save_adapter(ours, str(tmp_path / "ours"))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    with torch.no_grad():
        in_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
        torch.testing.assert_close(ours.eval()(ids), in_peft(ids).logits, atol=1e-5, rtol=1e-5)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    theirs = peft_adapter(base, peft)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    here = load_adapter(from_pretrained(str(tmp_path / "base")), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(here(ids), theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hf,message", [
    ({"model_type": "qwen3_moe", "num_experts": 8}, "'qwen3_moe' is a mixture-of-experts model, which nanotune "
     "does not implement; it loads the dense types .*gemma2, gemma3_text"),
    ({"model_type": "mixtral", "num_local_experts": 8}, "'mixtral' is a mixture-of-experts model"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}, "vision_config": {}},
     "'gemma3' is a multimodal model .* point --model at a folder of gemma3_text"),
    (gemma_config(use_bidirectional_attention=True), "use_bidirectional_attention is true"),
    (gemma_config(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    (gemma_config("gemma3_text", layer_types=["full_attention"]), "layer_types must name"),
    (phi3_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear' is not supported for phi3"),
    (phi3_config(sliding_window=0), "sliding_window must be a positive integer"),
])
def test_refuses_in_one_sentence(tmp_path, hf, message):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message) as e:
        from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and ". " not in str(e.value)


# Gemma 2's chat template: no system role (it raises), the assistant is 'model', turns end in <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content']"
    " | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def test_gemma_template_trains_the_answer_and_refuses_a_system_text_as_the_folder_does(tmp_path):
    from conftest import make_tokenizer
    tok = make_tokenizer()
    tok.add_special_tokens(["<bos>", "<start_of_turn>", "<end_of_turn>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": GEMMA_TEMPLATE,
                                                                "bos_token": "<bos>", "eos_token": "<end_of_turn>"}))
    tokenizer = load_tokenizer(str(tmp_path), 320)
    template = load_template("auto", str(tmp_path), tokenizer)
    tokens, trained = template.encode(None, [("user", "Say ok."), ("assistant", "ok")])
    assert tokenizer.decode([t for t, keep in zip(tokens, trained) if keep], keep_special=True) == "ok<end_of_turn>"
    with pytest.raises(UserError, match="System role not supported"):
        template.encode("Be brief.", [("user", "Say ok."), ("assistant", "ok")])
