"""Exported model folders (OUT/model, OUT/merged, nanotune.merge) are complete: shards and their index
as transformers writes them, the dtype asked for (default: the source's), the tokenizer files, and
the stop ids; transformers (when installed) loads them and its generate stops where nanotune's does."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import make_model_dir, make_tokenizer
from nanotune.generate import generate
from nanotune.lora import inject_lora, save_adapter
from nanotune.merge import main as merge_main
from nanotune.models import from_pretrained, save_pretrained
from nanotune.templates import export, load_template
from nanotune.tokenizer import load_tokenizer
from test_chatglm import make_folder as make_glm_folder, thudm_config
from test_families import FAMILIES
from test_llama import make_folder as make_llama_folder


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tensors(folder):
    """{name: (dtype, file)} of every tensor the folder's safetensors files hold."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                found.update({key: (f.get_slice(key).get_dtype(), name) for key in f.keys()})
    return found


def test_merge_writes_shards_an_index_and_the_dtype_asked_for(tmp_path):
    """A bf16 Qwen2-style source (config.json says so) with its tokenizer files: the merged folder is bf16
    by default, fp16 with --save-dtype fp16, split at --max-shard-size, and equals the adapted model."""
    source = tmp_path / "source"
    make_llama_folder(source, {**FAMILIES["qwen2"], "torch_dtype": "bfloat16"})
    make_tokenizer().save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML}))
    model = inject_lora(from_pretrained(str(source)), r=4, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B starts at zero: move it, so that merging changes the weights
                p.add_(0.1 * torch.randn_like(p))
    save_adapter(model, str(tmp_path / "adapter"))
    merge = ["--model", str(source), "--adapter", str(tmp_path / "adapter")]

    merge_main([*merge, "--out", str(tmp_path / "bf16")])  # one file below 5GB, in the source's dtype
    assert {dtype for dtype, _ in tensors(tmp_path / "bf16").values()} == {"BF16"}
    assert not os.path.exists(tmp_path / "bf16" / "model.safetensors.index.json")
    merge_main([*merge, "--out", str(tmp_path / "fp16"), "--save-dtype", "fp16", "--max-shard-size", "15KB"])
    folder = tmp_path / "fp16"
    found = tensors(folder)
    index = json.load(open(folder / "model.safetensors.index.json"))
    n = len({file for _, file in found.values()})
    assert n > 2 and sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                                   for i in range(1, n + 1)]
    assert index["weight_map"] == {key: file for key, (_, file) in found.items()}
    assert {dtype for dtype, _ in found.values()} == {"F16"}
    assert index["metadata"]["total_size"] == sum(2 * p.numel() for p in from_pretrained(str(folder)).parameters())
    assert json.load(open(folder / "config.json"))["torch_dtype"] == "float16"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(folder))
    assert json.load(open(folder / "generation_config.json"))["eos_token_id"] == [0]
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(folder))(ids), model.eval()(ids), atol=0.05, rtol=0.05)
    with pytest.raises(SystemExit, match="--max-shard-size '5 parsecs' is not a size"):
        merge_main([*merge, "--out", str(tmp_path / "bad"), "--max-shard-size", "5 parsecs"])


def test_a_bare_tokenizer_folder_gets_its_tokenizer_config(tmp_path):
    """A source with only tokenizer.json (as assets/tiny-neox): the exported folder names the EOS and pad
    tokens nanotune used, so transformers reads the same ones."""
    source = make_model_dir(tmp_path / "source")
    model = from_pretrained(source)
    save_pretrained(model, str(tmp_path / "out"))
    export(load_template("auto", source, load_tokenizer(source)), str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "tokenizer_config.json"))
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                      "pad_token": "<|endoftext|>"}
    assert json.load(open(tmp_path / "out" / "special_tokens_map.json")) == {"eos_token": "<|endoftext|>",
                                                                             "pad_token": "<|endoftext|>"}
    assert json.load(open(tmp_path / "out" / "generation_config.json")) == {"eos_token_id": [0], "pad_token_id": 0}


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_transformers_loads_the_folder_and_stops_where_nanotune_does(family, tmp_path):
    """The exported folder, sharded, in transformers: AutoTokenizer encodes and renders the chat template as
    nanotune does, AutoModelForCausalLM computes the same logits, and greedy generate stops on the same
    token. The stop token is one nanotune's own greedy answer reaches, made the folder's EOS."""
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    if family == "gpt_neox":
        make_model_dir(source)
    else:
        make_llama_folder(source, FAMILIES["llama"])
    tok = make_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 300, 301
    tok.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    tokenizer = load_tokenizer(str(source))
    template = load_template("auto", str(source), tokenizer)
    prompt = template.prompt(None, [("user", "red cat")])
    model = from_pretrained(str(source)).eval()
    free = generate(model, [prompt], 24)[0]
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] + [0])  # new after a few tokens
    # The folder's EOS by name only (config.json still says 0): transformers learns of it from the
    # generation_config.json that export writes, or not at all.
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML,
                                                              "eos_token": tokenizer.hf.id_to_token(stop)}))
    tokenizer = load_tokenizer(str(source))
    template = load_template("auto", str(source), tokenizer)
    assert template.stop_ids == {stop, 0, 301}
    out = str(tmp_path / "out")
    save_pretrained(from_pretrained(str(source)), out, max_shard_size=60_000)
    export(template, out)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    ours = generate(model, [prompt], 24, eos=template.stop_ids)[0]
    assert ours == free[:free.index(stop)] and 0 not in ours

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    messages = [{"role": "user", "content": "red cat"}]
    hf_prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert hf_prompt["input_ids"] == prompt
    assert hf_tokenizer.encode("red cat sat", add_special_tokens=False) == tokenizer.encode("red cat sat")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
        hf_new = hf_model.generate(ids, max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert hf_new == ours + [stop]  # transformers keeps the stop token; nanotune leaves it out


def test_a_remote_code_folder_keeps_its_code(tmp_path):
    """THUDM's ChatGLM folders name their own Python in auto_map (trust_remote_code): it travels along."""
    source = tmp_path / "source"
    make_glm_folder(source, thudm_config())
    for name in ("modeling_chatglm.py", "quantization.py"):  # the model's code, and a module it imports
        (source / name).write_text("# THUDM's code\n")
    save_pretrained(from_pretrained(str(source)), str(tmp_path / "out"))
    assert {"modeling_chatglm.py", "quantization.py"} <= set(os.listdir(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["auto_map"] == thudm_config()["auto_map"]
