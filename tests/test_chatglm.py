"""ChatGLM2/3 / GLM-4 in THUDM's layout (model_type 'chatglm') and in transformers' (model_type 'glm'):
a naive forward written from the definitions, transformers' GlmForCausalLM, the SentencePiece tokenizer,
the refusals, and a LoRA adapter on the fused query_key_value."""
import io
import json
import math
import os
import random
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanotune import UserError
from nanotune.lora import inject_lora, load_adapter, save_adapter
from nanotune.models import from_pretrained, read_config, save_pretrained
from nanotune.models.chatglm import MODEL_TYPES
from nanotune.tokenizer import CHATGLM_SPECIAL_TOKENS, load_tokenizer
from test_llama import peft_adapter


def thudm_config(**overrides):
    """A config.json as THUDM ships it (ChatGLM3-6B's fields, tiny sizes), remote-code pointers included."""
    return {"_name_or_path": "THUDM/chatglm3-6b", "architectures": ["ChatGLMModel"],
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
            "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
            "ffn_hidden_size": 48, "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 32,
            "kv_channels": 8, "layernorm_epsilon": 1e-5, "multi_query_attention": True, "multi_query_group_num": 2,
            "num_attention_heads": 4, "num_layers": 2, "original_rope": True, "padded_vocab_size": 120,
            "post_layer_norm": True, "prefix_projection": False, "quantization_bit": 0, "rmsnorm": True,
            "rope_ratio": 50, "seq_length": 128, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.40.2", "use_cache": True, "eos_token_id": 2, "pad_token_id": 0,
            **overrides}


def glm_config(**overrides):
    """A config.json as transformers 5 writes it for GlmForCausalLM (glm-4-9b-chat-hf's fields, tiny sizes)."""
    return {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": 120, "attention_bias": True,
            "attention_dropout": 0.0, "eos_token_id": [2, 3], "pad_token_id": 0, "head_dim": 12, "hidden_act": "silu",
            "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 128,
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
            "tie_word_embeddings": False, "use_cache": True, **overrides}


CASES = {  # (model_type, config.json): each qkv layout, bias and rotary choice once
    "chatglm-gqa-bias": thudm_config(),
    "chatglm-per-head-qkv": thudm_config(multi_query_attention=False, add_qkv_bias=False, rope_ratio=0.5,
                                         kv_channels=12),  # per-head rows, and nh * d != C
    "chatglm-mqa-linear-bias": thudm_config(multi_query_group_num=1, add_bias_linear=True, add_qkv_bias=False,
                                            post_layer_norm=False),
    "glm-gqa": glm_config(),
    "glm-tied-v4-spelling": glm_config(attention_bias=False, tie_word_embeddings=True, rope_parameters=None,
                                       rope_theta=2000.0, partial_rotary_factor=0.5, head_dim=8),
}


def make_folder(path, hf: dict, seed=0):
    """A model folder as a user downloads it: random weights (norms and biases too, so a mix-up of any
    two shows) saved by save_pretrained, then the config.json as its authors wrote it."""
    cls = MODEL_TYPES[hf["model_type"]]
    torch.manual_seed(seed)
    model = cls(cls.config_class.from_hf(hf, "test"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_pretrained(model, str(path))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(path)


def naive_logits(sd, hf, ids):
    """The forward written out from the definitions (THUDM's modeling_chatglm.py, transformers'
    modeling_glm.py), position by position and head by head, straight from the state dict."""
    thudm = hf["model_type"] == "chatglm"
    nh = hf["num_attention_heads"]
    if thudm:
        d, ng, eps = hf["kv_channels"], hf["multi_query_group_num"] if hf["multi_query_attention"] else nh, \
            hf["layernorm_epsilon"]
        base, r, layers = 10000 * hf["rope_ratio"], d // 2, hf["num_layers"]
    else:
        rope = hf.get("rope_parameters") or hf
        d, ng, eps, layers = hf["head_dim"], hf["num_key_value_heads"], hf["rms_norm_eps"], hf["num_hidden_layers"]
        base, r = rope["rope_theta"], int(d * rope["partial_rotary_factor"])
    T = len(ids)

    def rms(x, name):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * sd[name + ".weight"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd.get(name + ".bias", 0)

    def rotate(vec, pos):  # pair (2i, 2i+1) of the first r dimensions turns by pos * base^(-2i/r)
        out = vec.clone()
        for i in range(r // 2):
            a = pos * base ** (-2 * i / r)
            out[2 * i] = vec[2 * i] * math.cos(a) - vec[2 * i + 1] * math.sin(a)
            out[2 * i + 1] = vec[2 * i + 1] * math.cos(a) + vec[2 * i] * math.sin(a)
        return out

    x = sd["transformer.embedding.word_embeddings.weight" if thudm else "model.embed_tokens.weight"][ids]
    for layer in range(layers):
        p = f"transformer.encoder.layers.{layer}." if thudm else f"model.layers.{layer}."
        h = rms(x, p + "input_layernorm")
        if thudm:
            qkv = lin(h, p + "self_attention.query_key_value")
            if hf["multi_query_attention"]:  # [q heads | k groups | v groups]
                q, k, v = qkv[:, :nh * d], qkv[:, nh * d:(nh + ng) * d], qkv[:, (nh + ng) * d:]
            else:  # head j owns rows [3jd, 3jd + 3d): its q, k, v in turn
                q, k, v = (torch.cat([qkv[:, 3 * j * d + s * d:3 * j * d + (s + 1) * d] for j in range(nh)], dim=1)
                           for s in range(3))
        else:
            q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
        out = torch.zeros(T, nh * d)
        for head in range(nh):
            g = head // (nh // ng)  # the key/value group this query head reads
            qs = [rotate(q[t, head * d:(head + 1) * d], t) for t in range(T)]
            ks = [rotate(k[t, g * d:(g + 1) * d], t) for t in range(T)]
            for t in range(T):
                w = torch.softmax(torch.stack([qs[t] @ ks[s] for s in range(t + 1)]) / math.sqrt(d), dim=0)
                out[t, head * d:(head + 1) * d] = sum(w[s] * v[s, g * d:(g + 1) * d] for s in range(t + 1))
        x = x + lin(out, p + ("self_attention.dense" if thudm else "self_attn.o_proj"))
        h = rms(x, p + "post_attention_layernorm")
        gate, up = lin(h, p + ("mlp.dense_h_to_4h" if thudm else "mlp.gate_up_proj")).chunk(2, dim=-1)
        x = x + lin(gate * torch.sigmoid(gate) * up, p + ("mlp.dense_4h_to_h" if thudm else "mlp.down_proj"))
    if not thudm:
        x = rms(x, "model.norm")
    elif hf["post_layer_norm"]:
        x = rms(x, "transformer.encoder.final_layernorm")
    head = "transformer.output_layer.weight" if thudm else \
        "model.embed_tokens.weight" if hf["tie_word_embeddings"] else "lm_head.weight"
    return x @ sd[head].T


@pytest.mark.parametrize("case", CASES)
def test_logits_match_naive_reference(tmp_path, case):
    hf = CASES[case]
    path = make_folder(tmp_path / "m", hf)
    model = from_pretrained(path)
    assert type(model) is MODEL_TYPES[hf["model_type"]]
    ids = torch.randint(0, 120, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = naive_logits(load_file(os.path.join(path, "model.safetensors")), hf, ids[0])
    torch.testing.assert_close(model(ids)[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["chatglm-gqa-bias", "chatglm-per-head-qkv", "chatglm-mqa-linear-bias", "glm-gqa"])
def test_save_writes_back_the_folder_it_read(tmp_path, case):
    """Same tensor names and the same config.json (auto_map and unknown fields kept), --num-layers aside."""
    hf = {**CASES[case], "some_future_field": [1, 2]}
    path = make_folder(tmp_path / "m", hf)
    save_pretrained(from_pretrained(path), str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        saved = json.load(f)
    if hf["model_type"] == "glm":  # written in both rotary spellings, for transformers 4 and 5
        assert saved.pop("rope_theta") == 500.0 and saved.pop("partial_rotary_factor") == 0.5
    assert {k: v for k, v in saved.items() if k != "torch_dtype"} == {k: v for k, v in hf.items() if k != "torch_dtype"}
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(f"{path}/model.safetensors").keys()
    save_pretrained(from_pretrained(path, num_layers=1), str(tmp_path / "one"))
    with open(tmp_path / "one" / "config.json") as f:
        assert json.load(f)["num_layers" if hf["model_type"] == "chatglm" else "num_hidden_layers"] == 1


# --- transformers' GlmForCausalLM --------------------------------------------------------------------

def glm_from_thudm(sd, hf):
    """THUDM's checkpoint in transformers' layout, mapped as transformers' own conversion script maps it
    (src/transformers/models/glm/convert_glm_weights_to_hf.py): renamed keys, query_key_value's rows
    split into q | k | v, rope_theta = 10000 * rope_ratio."""
    from transformers import GlmConfig
    nh, ng, d = hf["num_attention_heads"], hf["multi_query_group_num"], hf["kv_channels"]
    out = {}
    for key, value in sd.items():
        new = key.replace("transformer.output_layer.", "lm_head.").replace("transformer.", "model.")
        for old, name in ((".embedding.word_embeddings.", ".embed_tokens."), (".encoder.layers.", ".layers."),
                          (".encoder.final_layernorm.", ".norm."), ("self_attention.", "self_attn."),
                          ("self_attn.dense.", "self_attn.o_proj."), ("dense_h_to_4h.", "gate_up_proj."),
                          ("dense_4h_to_h.", "down_proj.")):
            new = new.replace(old, name)
        if "query_key_value." in new:
            for proj, rows in zip("qkv", value.split([nh * d, ng * d, ng * d])):
                out[new.replace("query_key_value.", f"{proj}_proj.")] = rows
        else:
            out[new] = value
    config = GlmConfig(vocab_size=hf["padded_vocab_size"], hidden_size=hf["hidden_size"],
                       intermediate_size=hf["ffn_hidden_size"], num_hidden_layers=hf["num_layers"],
                       num_attention_heads=nh, num_key_value_heads=ng, head_dim=d,
                       max_position_embeddings=hf["seq_length"], rms_norm_eps=hf["layernorm_epsilon"],
                       attention_bias=hf["add_qkv_bias"], tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * hf["rope_ratio"],
                                        "partial_rotary_factor": 0.5})
    return config, out


def test_glm_matches_transformers_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = glm_config()
    config = transformers.GlmConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    theirs = transformers.GlmForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
        ours = from_pretrained(str(tmp_path / "theirs"))
        print(f"glm, theirs -> ours: max abs logit difference {(ours(ids) - want).abs().max():.2e}")
        torch.testing.assert_close(ours(ids), want, atol=1e-5, rtol=1e-5)
        save_pretrained(ours, str(tmp_path / "ours"))
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(back).__name__ == "GlmForCausalLM"
        print(f"glm, ours -> theirs: max abs logit difference {(back(ids).logits - want).abs().max():.2e}")
        torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_chatglm_matches_transformers_glm_on_converted_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = CASES["chatglm-gqa-bias"]
    path = make_folder(tmp_path / "m", hf)
    config, state = glm_from_thudm(load_file(os.path.join(path, "model.safetensors")), hf)
    theirs = transformers.GlmForCausalLM(config).eval()
    theirs.load_state_dict(state, strict=True)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs(ids).logits, from_pretrained(path)(ids)
    print(f"chatglm vs converted GlmForCausalLM: max abs logit difference {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- the tokenizer ------------------------------------------------------------------------------------

def tokenizer_folder(path, vocab_size=200):
    """A ChatGLM3-style folder: a tiny SentencePiece tokenizer.model (unk 0, bos 1, eos 2, as THUDM's),
    no tokenizer.json, and generation_config.json stopping on <|user|> and <|observation|> too."""
    spm = pytest.importorskip("sentencepiece")
    words = "the red green blue cat dog sun moon tree fish bird sat on a mat ran far away came back home".split()
    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(rng.choices(words, k=12)) for _ in range(60)]),
                                   model_writer=model, vocab_size=40, minloglevel=2)
    os.makedirs(path, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "config.json").write_text(json.dumps(thudm_config(padded_vocab_size=vocab_size)))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 46, 48]}))
    return str(path)


def test_chatglm_tokenizer_special_tokens_and_round_trip(tmp_path):
    tok = load_tokenizer(tokenizer_folder(tmp_path), vocab_size=120)
    n = 40  # the SentencePiece vocabulary; ChatGLM3's special tokens follow it, in THUDM's order
    assert [tok.token_to_id(t) for t in CHATGLM_SPECIAL_TOKENS] == list(range(n, n + 9))
    assert tok.bos == [tok.token_to_id("[gMASK]"), tok.token_to_id("sop")] == [n + 1, n + 3]
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 0, n + 9)
    assert tok.stop_ids == {2, tok.token_to_id("<|user|>"), tok.token_to_id("<|observation|>")}
    text = "the red cat sat on a mat then ran far away"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.bos + tok.encode(text) + [tok.token_to_id("<|user|>")]
    assert tok.decode(ids, keep_special=True) == f"[gMASK]sop{text}<|user|>" and tok.decode(ids) == text
    assert n + 1 not in tok.encode("[gMASK] sop")  # special names in a text stay text
    assert tok.token_to_id("no-such-piece") is None
    assert tok.decode(tok.encode("the cat") + [n + 9, 119]) == "the cat"  # padding rows of the embedding: no text


def tiktoken_folder(path):
    """GLM-4's tokenizer.model in THUDM's layout: base64 tokens and their ranks, not SentencePiece."""
    path.mkdir()
    (path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    (path / "config.json").write_text(json.dumps(thudm_config()))
    return str(path)


def test_chatglm_tokenizer_refusals(tmp_path):
    with pytest.raises(UserError, match="belongs to another model"):
        load_tokenizer(tokenizer_folder(tmp_path / "small"), vocab_size=45)
    with pytest.raises(UserError, match="cannot be read as a SentencePiece model.*tokenizer.json"):
        load_tokenizer(tiktoken_folder(tmp_path / "tiktoken"))


def test_missing_sentencepiece_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` now fails
    with pytest.raises(UserError, match=r"pip install nanotune\[chatglm\]$"):
        load_tokenizer(tiktoken_folder(tmp_path / "m"))


# --- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hf,message", [
    (thudm_config(pre_seq_len=16), "P-tuning"),
    (thudm_config(quantization_bit=4), "int4/int8"),
    (thudm_config(rmsnorm=False), "rmsnorm is false"),
    (thudm_config(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    (thudm_config(multi_query_group_num=3), "not a multiple of multi_query_group_num 3"),
    (thudm_config(kv_channels=6), "kv_channels 6 leaves 3 rotary dimensions"),
    (thudm_config(num_layers=0), "num_layers must be a positive integer"),
    ({k: v for k, v in thudm_config().items() if k != "padded_vocab_size"}, "'padded_vocab_size' is missing"),
    (thudm_config(rope_ratio="big"), "rope_ratio must be a positive number"),
    (glm_config(hidden_act="gelu"), "hidden_act 'gelu'"),
    (glm_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "yarn rope scaling needs a positive number"),
    (glm_config(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (glm_config(head_dim=0), "head_dim must be a positive integer"),
])
def test_refusals_are_one_sentence(tmp_path, hf, message):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message) as e:
        read_config(str(tmp_path))
    assert "\n" not in str(e.value)


def test_prefix_encoder_tensors_are_refused(tmp_path):
    path = make_folder(tmp_path / "m", thudm_config())
    sd = load_file(os.path.join(path, "model.safetensors"))
    save_file({**sd, "transformer.prefix_encoder.embedding.weight": torch.zeros(16, 2 * 2 * 2 * 8)},
              os.path.join(path, "model.safetensors"))
    with pytest.raises(UserError, match="unexpected tensor 'transformer.prefix_encoder.embedding.weight'"):
        from_pretrained(path)


# --- LoRA on the fused query_key_value ---------------------------------------------------------------

def test_lora_adapter_on_query_key_value_round_trips(tmp_path):
    path = make_folder(tmp_path / "m", thudm_config())
    model = inject_lora(from_pretrained(path), ["query_key_value"], r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_adapter(model, str(tmp_path / "adapter"))
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight" in keys
    assert len(keys) == 2 * 2  # lora_A and lora_B in each of the 2 blocks
    ids = torch.randint(0, 120, (1, 8), generator=torch.Generator().manual_seed(2))
    base = from_pretrained(path)
    with torch.no_grad():
        plain = base(ids)
        loaded = load_adapter(base, str(tmp_path / "adapter"))(ids)
        torch.testing.assert_close(loaded, model(ids))
    assert not torch.allclose(loaded, plain)  # the adapter changes the logits, so the check can fail


def test_glm_adapters_load_both_ways_with_peft(tmp_path):
    """peft's adapter on GlmForCausalLM (every Linear, the head in full) loads here and computes the
    same logits; nanotune's adapter loads in peft the same way."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    path = make_folder(tmp_path / "base", glm_config())
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    theirs = peft_adapter(base, peft)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(from_pretrained(path), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    save_adapter(ours, str(tmp_path / "ours"))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    back = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
