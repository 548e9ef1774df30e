"""The model folder's tokenizer and its special tokens, whatever the family.

Text becomes ids through the folder's own tokenizer.json (Hugging Face 'fast' format, read with
the `tokenizers` library). Which ids start and end a text is read from the folder too, never
assumed: Llama 3's tokenizer puts <|begin_of_text|> before every text and its instruct model ends a
turn with <|eot_id|>, Qwen2.5 puts nothing before and ends with <|im_end|>, Pythia ends with
<|endoftext|>. The sources, as transformers reads them:
  bos     what the tokenizer's own post-processor puts before a text (often nothing)
  eos_id  the token that ends a response in training: tokenizer_config.json's eos_token, else
          config.json's eos_token_id
  stop_ids every id that ends generation: eos_id and the eos_token_id of config.json and
          generation_config.json (each an int or a list: Llama 3.2 stops on three)
ChatGLM2/3 ship no tokenizer.json, only a SentencePiece tokenizer.model: ChatGLMTokenizer reads it
with the same interface (the optional sentencepiece package, imported only then).
"""
import json
import os

from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

from nanotune import UserError


class Tokenizer:
    def __init__(self, hf: HFTokenizer, eos_id: int, stop_ids: set, pad_id: int):
        self.hf, self.eos_id, self.stop_ids, self.pad_id = hf, eos_id, stop_ids, pad_id
        # The post-processor's prefix: what encode(add_special_tokens=True) puts before the text.
        plain, full = hf.encode("a", add_special_tokens=False).ids, hf.encode("a", add_special_tokens=True).ids
        self.bos = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list:
        """Token ids of `text` alone: no BOS or EOS added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        """encode() of many texts in one call, which the tokenizers library runs on every core."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, keep_special=False) -> str:
        """Text of `ids`; special tokens (<|eot_id|>, ...) are left out unless keep_special."""
        return self.hf.decode(list(ids), skip_special_tokens=not keep_special)

    def token_to_id(self, token: str):
        return self.hf.token_to_id(token)


def byte_level(file: str) -> bool:
    """Does a tokenizer.json work on bytes (GPT-2 style), rather than SentencePiece-style pieces?"""
    with open(file, encoding="utf-8") as f:
        return '"ByteLevel"' in f.read()


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None


def ids(value) -> list:
    """An eos_token_id field (absent, an int, or a list of ints) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def token_name(value):
    """A special token in tokenizer_config.json: a string, or {"content": string} (a saved AddedToken)."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir: str, vocab_size: int = None) -> Tokenizer:
    """The folder's tokenizer; vocab_size: the model's, which every token id must fit."""
    file = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(file) and os.path.exists(os.path.join(model_dir, "tokenizer.model")) \
            and read_json(os.path.join(model_dir, "config.json")).get("model_type") == "chatglm":
        return load_chatglm_tokenizer(model_dir, vocab_size)
    if not os.path.exists(file):
        raise UserError(f"{file} is missing; nanotune needs the model's tokenizer.json "
                        "(Hugging Face 'fast' tokenizer format) next to config.json")
    try:
        hf = HFTokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for a damaged or foreign file
        raise UserError(f"{file} cannot be read as a Hugging Face tokenizer.json ({e})") from None
    if vocab_size is not None and hf.get_vocab_size() > vocab_size:
        raise UserError(f"{file} has {hf.get_vocab_size()} tokens but the model's config.json says "
                        f"vocab_size {vocab_size}: the tokenizer belongs to another model")
    config = read_json(os.path.join(model_dir, "config.json"))
    generation = read_json(os.path.join(model_dir, "generation_config.json"))
    tokenizer_config = read_json(os.path.join(model_dir, "tokenizer_config.json"))
    if tokenizer_config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast") and not byte_level(file):
        # transformers (5) rebuilds a SentencePiece-style Llama tokenizer rather than take tokenizer.json's
        # pipeline: no normalizer, and a Metaspace pre-tokenizer that (legacy false, its default) puts
        # '▁' before the first piece of a text only, not after every special token as the older
        # Prepend normalizer does (TinyLlama's folder has that one). Read it as transformers reads it.
        legacy, prefix = tokenizer_config.get("legacy", False), tokenizer_config.get("add_prefix_space", True)
        hf.normalizer = None
        hf.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", split=False, prepend_scheme="never" if prefix is False else "always" if legacy else "first")
    eos_name = token_name(tokenizer_config.get("eos_token"))
    eos = [hf.token_to_id(eos_name)] if eos_name and hf.token_to_id(eos_name) is not None else []
    eos += ids(config.get("eos_token_id")) + ids(generation.get("eos_token_id"))
    if not eos:
        raise UserError(f"{model_dir} names no end-of-sequence token (eos_token in tokenizer_config.json or "
                        "eos_token_id in config.json); nanotune needs one to end each response")
    pad_name = token_name(tokenizer_config.get("pad_token"))
    pad = hf.token_to_id(pad_name) if pad_name else None
    # Rows are right-padded and padded positions are never targets, so the pad id changes no result.
    return Tokenizer(hf, eos[0], set(eos), pad if pad is not None else eos[0])


# ChatGLM's special tokens, numbered after the SentencePiece vocabulary in this order (THUDM's
# tokenization_chatglm.py): ChatGLM2 uses the first five, ChatGLM3 all nine (64789..64797). ChatGLM2's
# model simply never sees the last four, so one list serves both.
CHATGLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                          "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLMTokenizer:
    """ChatGLM2/3's SentencePiece tokenizer.model, read as THUDM's code reads it: '[gMASK] sop' before
    every text, SentencePiece's eos (</s>) ends one, and its unk id pads."""

    def __init__(self, sp, stop_ids: set):
        self.sp = sp
        n = sp.get_piece_size()
        self.special = {token: n + i for i, token in enumerate(CHATGLM_SPECIAL_TOKENS)}
        self.special_names = {i: token for token, i in self.special.items()}
        self.bos = [self.special["[gMASK]"], self.special["sop"]]
        self.eos_id, self.pad_id = sp.eos_id(), sp.unk_id()
        self.stop_ids = {self.eos_id} | set(stop_ids)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(CHATGLM_SPECIAL_TOKENS)

    def encode(self, text: str) -> list:
        """Token ids of `text` alone: special-token names in it are plain text, as in THUDM's default."""
        return self.sp.encode(text)

    def encode_batch(self, texts) -> list:
        return self.sp.encode(list(texts))  # SentencePiece takes a list too

    def decode(self, ids, keep_special=False) -> str:
        """Special ids come out as their names if keep_special, else not at all; the runs between them go
        through SentencePiece, which leaves out its own control pieces (</s>) either way. Ids past
        the vocabulary (the embedding is padded to padded_vocab_size, 65024 in ChatGLM3) name no token:
        an untrained model may still generate them, and they decode to nothing, as in a fast tokenizer."""
        text, run = "", []
        for i in map(int, ids):
            if i in self.special_names:
                text, run = text + self.sp.decode(run) + (self.special_names[i] if keep_special else ""), []
            elif i < self.sp.get_piece_size():
                run.append(i)
        return text + self.sp.decode(run)

    def token_to_id(self, token: str):
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)  # SentencePiece answers unk for a piece it does not have
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


def load_chatglm_tokenizer(model_dir: str, vocab_size: int = None) -> ChatGLMTokenizer:
    file = os.path.join(model_dir, "tokenizer.model")
    try:
        import sentencepiece
    except ImportError:
        raise UserError(f"{file} is a SentencePiece tokenizer (ChatGLM2/3), which needs the sentencepiece "
                        "package: pip install nanotune[chatglm]") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=file)
    except RuntimeError as e:
        raise UserError(f"{file} cannot be read as a SentencePiece model ({e}); GLM-4's tokenizer.model is "
                        "tiktoken's, which nanotune does not read: use a folder with tokenizer.json, such as "
                        "THUDM/glm-4-9b-chat-hf") from None
    if sp.eos_id() < 0:
        raise UserError(f"{file} has no end-of-sequence piece, which nanotune needs to end each response")
    config = read_json(os.path.join(model_dir, "config.json"))
    generation = read_json(os.path.join(model_dir, "generation_config.json"))
    tokenizer = ChatGLMTokenizer(sp, ids(config.get("eos_token_id")) + ids(generation.get("eos_token_id")))
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(f"{file} has {tokenizer.vocab_size} tokens with ChatGLM's special tokens, but the model's "
                        f"config.json says vocab_size {vocab_size}: the tokenizer belongs to another model")
    return tokenizer
