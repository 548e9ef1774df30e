"""Load and save models in their Hugging Face folder layout, whatever the family.

    from nanotune.models import from_pretrained, save_pretrained
    model = from_pretrained("pythia-410m")        # config.json's model_type picks the family
    logits = model(input_ids)                     # (B, T) -> (B, T, V)

Each family file maps a config.json model_type to a model class whose parameter names are the
checkpoint's own, so loading is a key-by-key copy with checks, and saving writes what transformers reads.
"""
import ctypes
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanotune import UserError
from nanotune.models import chatglm, gemma, gpt_neox, llama, phi3

MODEL_TYPES = {**gpt_neox.MODEL_TYPES, **llama.MODEL_TYPES, **chatglm.MODEL_TYPES, **phi3.MODEL_TYPES,
               **gemma.MODEL_TYPES}
# Files of a model folder that describe its tokenizer: copied into every model folder we write.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json")
MAX_SHARD_SIZE = "5GB"  # transformers' default for save_pretrained
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --save-dtype
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None  # glibc's


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
        raise UserError(f"{file}: {unsupported(hf)}")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) \
            else "?"
        raise UserError(f"{file}: the checkpoint is already quantized ({method}); nanotune quantizes from "
                        "full-precision weights itself (--load-in-8bit / --load-in-4bit), so point --model at "
                        "the original model")
    cls = MODEL_TYPES[model_type]
    return cls, cls.config_class.from_hf(hf, file)


def unsupported(hf: dict) -> str:
    """Why a config.json's model_type does not load, naming the types that do."""
    model_type, types = hf.get("model_type"), ", ".join(sorted(MODEL_TYPES))
    if any(key in hf for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        return (f"model_type {model_type!r} is a mixture-of-experts model, which nanotune does not implement; "
                f"it loads the dense types {types}")
    if "vision_config" in hf or "text_config" in hf:
        text = "gemma3_text (gemma-3-270m, gemma-3-1b)" if model_type == "gemma3" else "one of them"
        return (f"model_type {model_type!r} is a multimodal model (a vision tower beside its language model), "
                f"which nanotune does not load; it loads the text-only types {types}, so point --model at a "
                f"folder of {text}")
    return f"model_type is {model_type!r}, which nanotune does not support; it loads {types}"


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


def from_pretrained(path, num_layers=-1, device="cpu", dtype=torch.float32):
    """Load a Hugging Face model folder, each tensor cast to `dtype` as it is read (None: kept in the
    checkpoint's own dtype). num_layers=N keeps only the first N blocks (-1: all). device="meta" builds
    the model, in those dtypes, and checks the checkpoint's names and shapes without reading a weight:
    load_weights (or quantize, or FSDP and ZeRO-3 shard by shard) reads each one later, where it is
    kept and in the dtype its placeholder has by then (cast_frozen may change it)."""
    cls, config = read_config(path)
    if num_layers != -1:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise UserError(f"--num-layers {num_layers} is out of range: {path} has "
                            f"{config.num_hidden_layers} layers (use 1..{config.num_hidden_layers}, or -1 for all)")
        config.num_hidden_layers = num_layers
    with torch.device("meta"):  # no memory for weights we are about to read
        model = cls(config)
    model.name_or_path = path
    model.weights = Weights(path, model)
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype or model.weights.dtypes[model.weights.key(name)])  # on meta: no memory
    return model if str(device) == "meta" else load_weights(model, device)


class Weights:
    """Where each of a model's tensors lies in its folder's safetensors files, checked against the model
    (names and shapes, from the files' headers), and reads of one tensor, or of a range of its rows.

    A file is opened (memory-mapped) for one read and closed after it: the tensor is copied out, cast
    on the way, and the mapping goes. Kept open, every page read would stay mapped, and counted in the
    process's memory, until the end: a bf16 model of N bytes would peak at N for the mapping plus what
    it keeps (BENCHMARKS.md, loading)."""

    def __init__(self, path, model):
        cls, config = type(model), model.config
        expected = {k: v.shape for k, v in model.state_dict().items()}
        self.tied = model.head_path + ".weight" if config.tie_word_embeddings else None
        self.embed = model.embed_path + ".weight"
        expected.pop(self.tied, None)
        block_prefix = model.blocks_path + "."
        self.files, self.dtypes = {}, {}
        for file in safetensors_files(path):
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if key.endswith(cls.ignored_keys) or key == self.tied:  # recomputed here / the embedding's
                            continue
                        if key.startswith(block_prefix) and \
                                int(key[len(block_prefix):].split(".")[0]) >= config.num_hidden_layers:
                            continue  # a block that --num-layers leaves out
                        if key not in expected:
                            raise UserError(f"{file}: unexpected tensor {key!r}; is this a {cls.__name__} checkpoint?")
                        tensor = f.get_slice(key)
                        if tuple(tensor.get_shape()) != tuple(expected[key]):
                            raise UserError(f"{path}: tensor {key!r} has shape {tuple(tensor.get_shape())}, but "
                                            f"config.json implies {tuple(expected[key])}")
                        self.files[key] = file
                        self.dtypes[key] = SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.float32)  # F64 too
            except (OSError, SafetensorError) as e:
                raise UserError(f"{file} cannot be read as safetensors ({e}); the file is damaged or incomplete, "
                                "so copy or download it again") from None
        for key in expected:
            if key not in self.files:
                raise UserError(f"{path}: tensor {key!r} is missing from the checkpoint")

    def key(self, name: str) -> str:
        """The checkpoint's name for a parameter, also once LoRA wraps its Linear (PEFT's `base_layer`)."""
        key = name.replace(".base_layer.", ".")
        return self.embed if key == self.tied else key

    def read(self, name: str, dtype=None, device="cpu", rows=None) -> torch.Tensor:
        """Parameter `name` (rows: only rows[0]:rows[1] of its dim 0), in `dtype` (None: the file's), a
        copy in `device`'s memory that owns its storage."""
        key = self.key(name)
        release_freed_memory()
        with safe_open(self.files[key], framework="pt") as f:
            t = f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]
            return t.to(device, dtype or t.dtype, copy=True)


def release_freed_memory():
    """Give the pages of freed heap blocks back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Loading frees a large temporary (an fp32 Linear being quantized, a module ZeRO-3 has partitioned) after
    each small block it keeps (the codes, the partition); glibc's malloc serves such sizes from its heap once
    one has been freed, and the blocks kept between the holes stop it from shrinking: without this, a 4-bit
    or ZeRO-3 load peaked 2.7x / 1.2x higher on a CPU (BENCHMARKS.md, loading)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


@torch.no_grad()
def load_weights(model, device="cpu"):
    """Read every parameter still on the meta device from the checkpoint (model.weights), one at a time,
    in its placeholder's dtype, into `device`. The placeholder becomes the tensor read (swap_tensors), so
    ties (the head that is the embedding), an optimizer or a wrapper that holds it all see the real one."""
    for name, p in model.named_parameters():  # a tied tensor is one parameter, read once
        if p.is_meta:
            torch.utils.swap_tensors(p, nn.Parameter(model.weights.read(name, p.dtype, device),
                                                     requires_grad=p.requires_grad))
    return model


def save_pretrained(model, path: str, state_dict: dict = None, dtype: torch.dtype = None, max_shard_size: int = None):
    """Write config.json, the weights and the source folder's tokenizer files (and the remote code its
    auto_map names, for THUDM's ChatGLM). state_dict: the model's full state when it is sharded (FSDP
    gathers it for us). dtype: of the floating-point tensors written (None: the source folder's, as
    transformers' save keeps the dtype a model was loaded in). Above max_shard_size bytes (None: 5GB)
    the weights are split as transformers splits them: model-00001-of-0000N.safetensors, ..., and
    model.safetensors.index.json naming each tensor's file."""
    os.makedirs(path, exist_ok=True)
    source = getattr(model, "name_or_path", "")
    dtype = dtype or source_dtype(source) or torch.float32
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop(model.head_path + ".weight")  # safetensors refuses shared storage; transformers re-ties on load
    shards = split(state, max_shard_size or parse_size(MAX_SHARD_SIZE))
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")  # transformers 5 calls it dtype, and reads this too
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    for name in TOKENIZER_FILES + remote_code(source) if source else ():
        file = os.path.join(source, name)
        if os.path.exists(file) and os.path.abspath(file) != os.path.abspath(os.path.join(path, name)):
            shutil.copyfile(file, os.path.join(path, name))


def split(state: dict, max_bytes: int) -> list:
    """The tensors in shards of at most max_bytes, in order, as transformers cuts them: a new shard starts
    when the next tensor would overflow this one, and a tensor larger than max_bytes is a shard alone."""
    shards, size = [{}], 0
    for key, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    return shards


def parse_size(text) -> int:
    """Bytes from a size as transformers spells it: '5GB' (10^9), '500MB', '2GiB' (2^30), or a plain number."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    number = str(text).strip().upper().rstrip("KMGTIB")
    unit = str(text).strip().upper()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"--max-shard-size {text!r} is not a size; write it as transformers does, e.g. 5GB, "
                        "500MB or 2GiB") from None
    if value < 1:
        raise UserError(f"--max-shard-size {text!r} must be at least one byte")
    return int(value)


def source_dtype(path: str):
    """The dtype a model folder stores its weights in: config.json's dtype (torch_dtype before transformers
    5), else its first floating-point tensor's; None when neither says (or there is no folder)."""
    if not path:
        return None
    hf = optional_json(os.path.join(path, "config.json"))
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    try:
        for file in safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if dtype in SAFETENSORS_DTYPES:
                        return SAFETENSORS_DTYPES[dtype]
    except (UserError, OSError, SafetensorError):
        return None
    return None


def optional_json(path: str) -> dict:
    """The object in a JSON file that may be absent (or not one): {} then, as the file only adds metadata."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remote_code(source: str) -> tuple:
    """The folder's Python files, when its config.json or tokenizer_config.json has an auto_map: the code
    transformers runs for trust_remote_code (THUDM's modeling_chatglm.py, tokenization_chatglm.py and
    the modules they import), which a folder we write must carry too."""
    if not any(optional_json(os.path.join(source, name)).get("auto_map")
               for name in ("config.json", "tokenizer_config.json")):
        return ()
    return tuple(sorted(name for name in os.listdir(source) if name.endswith(".py")))
