"""Load and save models in their Hugging Face folder layout, whatever the family.

    from nanotune.models import from_pretrained, save_pretrained
    model = from_pretrained("pythia-410m")        # config.json's model_type picks the family
    logits = model(input_ids)                     # (B, T) -> (B, T, V)

Each family file maps a config.json model_type to a model class whose parameter names are the
checkpoint's own, so loading is a key-by-key copy with checks, and saving writes what transformers reads.
"""
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanotune import UserError
from nanotune.models import chatglm, gpt_neox, llama

MODEL_TYPES = {**gpt_neox.MODEL_TYPES, **llama.MODEL_TYPES, **chatglm.MODEL_TYPES}
# Files of a model folder that describe its tokenizer: copied into every model folder we write.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def read_config(path: str):
    """The model class and its parsed config for the folder at `path`."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model folder {path!r} does not exist; pass --model a folder with config.json "
                        "and *.safetensors (a Hugging Face checkpoint, or nanotune's default assets/tiny-neox)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{file} is missing; a model folder needs config.json and *.safetensors") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} cannot be read as JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{file} must hold a JSON object (a transformers config), not {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{file}: model_type is {model_type!r}, which nanotune does not support; it loads "
                        f"{', '.join(sorted(MODEL_TYPES))}")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) \
            else "?"
        raise UserError(f"{file}: the checkpoint is already quantized ({method}); nanotune quantizes from "
                        "full-precision weights itself (--load-in-8bit / --load-in-4bit), so point --model at "
                        "the original model")
    cls = MODEL_TYPES[model_type]
    return cls, cls.config_class.from_hf(hf, file)


def safetensors_files(path: str) -> list:
    """The weight files of a folder: model.safetensors, or the shards an index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise UserError(f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); nanotune never unpickles "
                        "weights, since that can run arbitrary code. Convert them once where you trust the file: "
                        "transformers' model.save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"{path} has no model.safetensors (or model.safetensors.index.json with shards)")


def from_pretrained(path, num_layers=-1, device="cpu"):
    """Load a Hugging Face model folder in fp32, whatever the checkpoint stores. num_layers=N keeps
    only the first N blocks (-1: all). device="meta" builds the model without reading a single weight
    (FSDP ranks that receive theirs from rank 0)."""
    cls, config = read_config(path)
    if num_layers != -1:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise UserError(f"--num-layers {num_layers} is out of range: {path} has "
                            f"{config.num_hidden_layers} layers (use 1..{config.num_hidden_layers}, or -1 for all)")
        config.num_hidden_layers = num_layers
    with torch.device("meta"):  # no memory for weights we are about to overwrite
        model = cls(config)
    model.name_or_path = path
    if str(device) == "meta":
        return model.float()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.head_path + ".weight" if config.tie_word_embeddings else None
    expected.pop(tied, None)
    block_prefix = model.blocks_path + "."
    state = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key.endswith(cls.ignored_keys) or key == tied:  # recomputed here / the embedding's matrix
                        continue
                    if key.startswith(block_prefix) and int(key[len(block_prefix):].split(".")[0]) >= num_layers > 0:
                        continue  # a block that --num-layers leaves out
                    if key not in expected:
                        raise UserError(f"{file}: unexpected tensor {key!r}; is this a {cls.__name__} checkpoint?")
                    state[key] = f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise UserError(f"{file} cannot be read as safetensors ({e}); the file is damaged or incomplete, "
                            "so copy or download it again") from None
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{path}: tensor {key!r} is missing from the checkpoint")
        if state[key].shape != shape:
            raise UserError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, but config.json "
                            f"implies {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above
    model.tie_weights()
    return model.float()


def save_pretrained(model, path: str, state_dict: dict = None):
    """Write config.json, model.safetensors and the source folder's tokenizer files.
    state_dict: the model's full state when it is sharded (FSDP gathers it for us)."""
    os.makedirs(path, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop(model.head_path + ".weight")  # safetensors refuses shared storage; transformers re-ties on load
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    source = getattr(model, "name_or_path", "")
    for name in TOKENIZER_FILES:
        file = os.path.join(source, name)
        if os.path.exists(file) and os.path.abspath(file) != os.path.abspath(os.path.join(path, name)):
            shutil.copyfile(file, os.path.join(path, name))
