"""Every feature on every family: a tiny folder of each model_type fine-tuned end to end by train.py,
as a user runs it. The architectures themselves are pinned to naive forwards and to transformers in
test_model.py, test_llama.py and test_chatglm.py; here the whole pipeline meets each family's names."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_ONLY, ROOT, make_tokenizer, run_train, train_here
from nanotune.lora import inject_lora, load_adapter, unload
from nanotune.models import from_pretrained
from nanotune.quantize import quantize
from test_chatglm import glm_config, make_folder as make_glm_folder, thudm_config, tokenizer_folder
from test_gemma_phi3 import gemma_config, phi3_config
from test_llama import LLAMA3, config_json, make_folder as make_llama_folder

# config.json of each family's tiny folder (vocabulary 320 holds the test tokenizer's 300 tokens; its
# <|endoftext|> is id 0, the EOS), and the names its adapter must use.
FAMILIES = {
    "llama": config_json("llama", vocab_size=320, eos_token_id=0, num_key_value_heads=2, rope_scaling=LLAMA3),
    "mistral": config_json("mistral", vocab_size=320, eos_token_id=0, num_key_value_heads=2, sliding_window=8),
    "qwen2": config_json("qwen2", vocab_size=320, eos_token_id=0, num_key_value_heads=2),
    "qwen3": config_json("qwen3", vocab_size=320, eos_token_id=0, num_key_value_heads=2, head_dim=16),
    "chatglm": thudm_config(padded_vocab_size=120),  # with ChatGLM3's SentencePiece tokenizer.model
    "glm": glm_config(vocab_size=320, eos_token_id=[0]),
    # untied, so --modules-to-save can train the head (a tied one is refused); windows shorter than a row
    "gemma2": gemma_config(vocab_size=320, eos_token_id=0, tie_word_embeddings=False, attn_logit_softcapping=5.0,
                           final_logit_softcapping=8.0),
    "gemma3_text": gemma_config("gemma3_text", vocab_size=320, eos_token_id=0, tie_word_embeddings=False,
                                sliding_window_pattern=2, rope_local_base_freq=20.0),
    "phi3": phi3_config(vocab_size=320, eos_token_id=0, partial_rotary_factor=0.5, sliding_window=8),
}
TARGETS = {"llama": ("model.layers", ("q_proj", "v_proj"), "lm_head"),
           "chatglm": ("transformer.encoder.layers", ("query_key_value",), "transformer.output_layer"),
           "phi3": ("model.layers", ("qkv_proj",), "lm_head")}
for name in ("mistral", "qwen2", "qwen3", "glm", "gemma2", "gemma3_text"):
    TARGETS[name] = TARGETS["llama"]


def family_folder(path, family):
    hf = FAMILIES[family]
    if family == "chatglm":
        tokenizer_folder(path, vocab_size=120)
        make_glm_folder(path, hf)
    else:
        (make_glm_folder if family == "glm" else make_llama_folder)(path, hf)
        make_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_the_family_defaults_trains_merges_and_resumes_bitwise(family, tiny_data, tmp_path):
    """PEFT's default targets for the family, its head trained in full (--modules-to-save), gradient
    checkpointing and checkpoints; the adapter carries the family's own names, the merged folder
    computes what the adapted model does, and (for each module tree: Llama's, ChatGLM's, Gemma's,
    Phi-3's) a resume from step 2 ends bitwise where the run did."""
    model = family_folder(tmp_path / "model", family)
    blocks, targets, head = TARGETS[family]
    flags = ["--model", model, "--data", tiny_data, "--max-steps", 4, "--batch-size", 4, "--lora-dropout", 0,
             "--modules-to-save", head, "--grad-checkpoint", "--save-every", 2, "--keep", 0, "--eval-exact-match", 2]
    train_here(*flags, "--out", tmp_path / "out", "--merge")
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    expected = {f"base_model.model.{blocks}.{i}.{t}.lora_{ab}.weight" for i in (0, 1) for t in targets for ab in "AB"}
    lora = {k for k in adapter if ".lora_" in k}
    assert {k.replace(".self_attn.", ".").replace(".self_attention.", ".") for k in lora} == expected
    assert f"base_model.model.{head}.weight" in adapter
    config = json.load(open(tmp_path / "out" / "adapter" / "adapter_config.json"))
    assert config["target_modules"] == list(targets)

    adapted = load_adapter(from_pretrained(model), tmp_path / "out" / "adapter").eval()
    merged = from_pretrained(str(tmp_path / "out" / "merged")).eval()
    assert type(merged) is type(adapted)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-4, rtol=1e-4)

    if family not in ("llama", "chatglm", "gemma2", "phi3"):  # resuming is family-agnostic: one run per module tree
        return
    train_here(*flags, "--out", tmp_path / "resumed", "--resume", tmp_path / "out" / "checkpoints" / "step-2")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_keeps_the_family_head_in_full_precision(family, bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = quantize(from_pretrained(family_folder(tmp_path, family)), bits)
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == [model.head_path]  # every other Linear holds quantized weights


@pytest.mark.parametrize("family,quantization", [("llama", "--load-in-4bit"), ("chatglm", "--load-in-8bit"),
                                                 ("gemma2", "--load-in-4bit")])  # its soft-capped loss in bf16
def test_lora_on_a_quantized_base_trains(family, quantization, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = family_folder(tmp_path / "model", family)
    printed = train_here("--model", model, "--data", tiny_data, "--out", tmp_path / "out", "--max-steps", 2,
                         "--batch-size", 4, "--precision", "bf16", "--lora-target", "all-linear", quantization,
                         "--eval-exact-match", 0)
    assert "step 2/2" in printed
    load_adapter(from_pretrained(model), tmp_path / "out" / "adapter")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_an_instruct_fine_tune_stops_at_the_end_of_its_turn(tiny_data, tmp_path):
    """A Qwen-style instruct folder (its own ChatML template, EOS <|im_end|>): after a LoRA fine-tune on
    conversations, greedy generation answers and stops at <|im_end|> (exact match needs both), and the
    merged folder carries the template and stops there too."""
    model = tmp_path / "model"
    make_llama_folder(model, FAMILIES["qwen2"])
    tok = make_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 300, 301
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    rows = [{"conversations": [{"from": "human", "value": f"Say ok to {w}."}, {"from": "gpt", "value": "ok"}]}
            for w in "red green blue cat dog sun moon tree fish bird one two three".split()] * 5
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    printed = train_here("--model", model, "--data", data, "--out", out, "--max-steps", 40, "--batch-size", 8,
                         "--lr", 1e-2, "--warmup-steps", 0, "--lora-target", "all-linear", "--val-fraction", 0.1,
                         "--eval-exact-match", 4, "--merge")
    assert "<|im_start|>assistant\n[[ok<|im_end|>]]" in printed  # the first row, as the loss sees it
    scores = [json.loads(line)["exact_match"] for line in open(out / "metrics.jsonl") if "exact_match" in line]
    assert scores[-1] == 1.0, printed
    generation = json.load(open(out / "merged" / "generation_config.json"))
    assert generation["eos_token_id"] == [0, 301]
    assert json.load(open(out / "merged" / "tokenizer_config.json"))["chat_template"] == CHATML
    chat = subprocess.run([sys.executable, "-m", "nanotune.generate", "--model", str(out / "merged"), "--chat"],
                          input="Say ok to fish.\n", capture_output=True, text=True, cwd=ROOT, env=CPU_ONLY)
    assert chat.returncode == 0 and chat.stdout.splitlines()[0] == "> ok", chat.stdout + chat.stderr


def test_zero3_gathers_a_complete_llama_adapter(tiny_data, tmp_path):
    """DeepSpeed ZeRO-3 partitions every parameter (the tiny ones too: persistence threshold 0); the
    adapter it saves is gathered whole (a group of one process: the partitioning and gathering code is
    the same as with many). A DoRA adapter, with dropout: its weight norm, and its second W x in the
    backward, read partitioned base weights, which DeepSpeed gathers as external parameters."""
    pytest.importorskip("deepspeed")
    model = family_folder(tmp_path / "model", "llama")
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    run_train("--model", model, "--data", tiny_data, "--out", tmp_path / "out", "--max-steps", 2, "--batch-size", 4,
              "--strategy", "deepspeed", "--zero-stage", 3, "--deepspeed-config", config, "--lora-target", "all-linear",
              "--use-dora", "--eval-exact-match", 0)
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 3 and all(t.numel() > 0 for t in adapter.values())  # 7 Linears a block: A, B, m
    load_adapter(from_pretrained(model), tmp_path / "out" / "adapter")


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_on_the_family_defaults_starts_at_the_base_and_merges(family, tmp_path):
    """DoRA on PEFT's default targets of each family (fused query_key_value with its bias, or q_proj and
    v_proj): with B = 0 it computes the base; moved off its init, unload folds it into plain weights
    that compute what the adapted model does."""
    model = family_folder(tmp_path / "model", family)
    base, adapted = from_pretrained(model).eval(), inject_lora(from_pretrained(model), dora=True).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), base(ids), atol=1e-5, rtol=1e-5)
        for name, p in adapted.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        expected = adapted(ids)
        assert not torch.allclose(expected, base(ids), atol=1e-3)
        torch.testing.assert_close(unload(adapted)(ids), expected, atol=1e-5, rtol=1e-5)
