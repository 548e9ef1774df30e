"""Chat templates: how a conversation becomes token ids, and which of those ids the loss sees.

The most common silent failure in fine-tuning is training on the wrong tokens: the end-of-turn token
never trained (so the model never stops), role headers trained as answers, a hand-written template
that drifts from the model's own. So nanotune renders the model folder's own chat template exactly as
transformers does, and finds the mask from what the template renders, never by matching a pad or EOS
id (they are often the same token). Templates, by name:

  auto      the folder's chat template (chat_template.jinja, else tokenizer_config.json's chat_template);
            a ChatGLM tokenizer ([gMASK]) gets chatglm3 or glm4; a folder without one gets alpaca
  chatml    <|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n  (Qwen)
  llama3    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>  (content trimmed)
  mistral   <s>[INST] ...[/INST] ...</s>, the system text in the last user turn (Mistral's mistral-common)
  alpaca    nanotune's "### Instruction:\\n...\\n\\n### Response:\\n..." for base models, EOS after each answer
  chatglm3  [gMASK] sop <|user|> \\n ... <|assistant|> \\n ... </s>       built from ids, as THUDM's code does
  glm4      [gMASK] <sop> <|user|> \\n ... <|assistant|> \\n ... <|user|>  (their text, tokenized whole, differs)

By default the loss sees every assistant turn's text and the token that closes it (<|im_end|>, <|eot_id|>,
</s>, ChatGLM's next role token) and nothing of system text, user text, role headers, or the newline
after an end-of-turn token. train_on_prompt=True trains on every token; mask_history=True only on the last
assistant turn. A problem with one row is one UserError sentence, prefixed with the caller's `where`.
"""
import json
import os
from datetime import datetime
from itertools import chain, repeat

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanotune import UserError
from nanotune.tokenizer import read_json, token_name

NAMES = ("auto", "alpaca", "chatml", "llama3", "mistral", "chatglm3", "glm4")
ROLES = ("user", "assistant")  # what nanotune.data.turns produces; a system text is passed on its own

# Built-ins written the way model folders write their templates, so they go through the same renderer
# and the same mask-finding as a folder's own. Special tokens are literal: the formats are fixed.
CHATML = r"""
{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

LLAMA3 = r"""{{ '<|begin_of_text|>' }}
{%- for m in messages %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""

# Mistral v0.3's own template puts the system text only into a *final* user turn (loop.last), so a training
# conversation, which ends with an answer, loses it; mistral-common, Mistral's reference tokenizer, puts it
# into the last user turn. With roles alternating, that is the user turn among the last two messages.
MISTRAL = r"""
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content %}{% set messages = messages[1:] %}
{%- endif %}
{{- '<s>' }}
{%- for m in messages %}
{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}
{%- elif m.role == 'user' and system is defined and loop.revindex <= 2 %}
{{- '[INST] ' + system + '\n\n' + m.content + '[/INST]' }}
{%- elif m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}
{%- else %}{{ ' ' + m.content | trim + '</s>' }}
{%- endif %}
{%- endfor %}"""

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
NEEDS = {"chatml": ("<|im_start|>", "<|im_end|>"), "mistral": ("<s>", "</s>"),
         "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


def load_template(name: str, model_dir: str, tokenizer):
    """The template `name` for the model in model_dir, whose tokenizer (nanotune.tokenizer) it encodes with."""
    if name not in NAMES:
        raise UserError(f"unknown chat template {name!r}; use one of {', '.join(NAMES)}")
    if name == "auto" and tokenizer.token_to_id("[gMASK]") is not None:
        # ChatGLM's own text template does not tokenize back to the ids it was trained on: build them.
        name = "chatglm3" if tokenizer.token_to_id("sop") is not None else "glm4"
    if name == "auto":
        source, origin = folder_template(model_dir)
        if source is not None:
            return ChatTemplate(source, tokenizer, special_tokens(model_dir), origin)
        name = "alpaca"
    if name == "alpaca":
        return Alpaca(tokenizer)
    if name in ("chatglm3", "glm4"):
        return ChatGLM(tokenizer, name)
    missing = [t for t in NEEDS[name] if tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(f"template {name!r} needs the tokens {', '.join(missing)}, which the tokenizer in "
                        f"{model_dir} lacks; pick the template the model was trained with (or alpaca)")
    return ChatTemplate(BUILTIN[name], tokenizer, special_tokens(model_dir), f"built-in {name!r}")


def folder_template(model_dir: str):
    """(template source, file) from the folder, as transformers picks it; (None, None) without one."""
    path = os.path.join(model_dir, "chat_template.jinja")  # transformers >= 4.56 saves it here, and it wins
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    path = os.path.join(model_dir, "tokenizer_config.json")
    template = read_json(path).get("chat_template")
    if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{path} has chat templates named {', '.join(map(str, named))} but none named "
                            "'default', which is the one nanotune uses; pick a built-in template instead")
        template = named["default"]
    return (template, path) if template else (None, None)


def special_tokens(model_dir: str) -> dict:
    """The special-token strings transformers passes to a template (bos_token, eos_token, ...)."""
    config = {**read_json(os.path.join(model_dir, "special_tokens_map.json")),
              **read_json(os.path.join(model_dir, "tokenizer_config.json"))}
    names = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    extra = config.get("extra_special_tokens")  # a dict of model-specific names (image_token, ...)
    if isinstance(extra, dict):
        config, names = {**config, **extra}, names + list(extra)
    values = {n: token_name(config.get(n)) for n in names}
    return {n: v for n, v in values.items() if isinstance(v, str)}


class Generation(jinja2.ext.Extension):
    """transformers' {% generation %} tag, which marks assistant text for its own masks: rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        return jinja2.nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True), lineno=lineno)


def compile_jinja(source: str, origin: str):
    """A template compiled in the environment transformers' apply_chat_template uses (chat_template_utils.py)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson  # jinja's own escapes HTML characters
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3's "Today Date"
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template in {origin} is not valid Jinja ({e.message}, line {e.lineno})") from None


class Template:
    """What both kinds share: turning per-token turn numbers into the loss mask."""

    def encode(self, system, turns, train_on_prompt=False, mask_history=False, where="row"):
        """(tokens, trained) of a conversation: system text or None, turns [(role, text), ...]; trained[i] says
        token i is a target the loss sees. `where` (e.g. 'data.jsonl line 7') starts any error message."""
        return self.encode_batch([(system, turns, where)], train_on_prompt, mask_history)[0]

    def encode_batch(self, conversations, train_on_prompt=False, mask_history=False):
        """encode() of many (system, turns, where) at once: the texts of all of them go to the tokenizer in
        one call, which runs on every core (nanotune.store builds its arrays this way). One conversation
        is a batch of one, so both give the same ids and masks."""
        for _, turns, where in conversations:
            check_roles(turns, where)
        out = []
        for tokens, turn in self.tokenize_batch(conversations):  # turn[i]: the answer (0, 1, ...) token i is in
            answers = set(turn) - {None}
            # trained, per answer number (None: not in an answer); then looked up per token, in C (map)
            trained = {k: train_on_prompt or (k is not None and (k == max(answers) or not mask_history))
                       for k in answers | {None}}
            out.append((tokens, list(map(trained.__getitem__, turn))))
        return out

    def tokenize(self, system, turns, where):
        return self.tokenize_batch([(system, turns, where)])[0]

    def prompt(self, system, turns, where="row") -> list:
        """Token ids of the conversation so far, followed by the header the model's answer comes after."""
        check_roles(turns, where)
        return self.generation_prompt(system, turns, where)


def check_roles(turns, where):
    for role, _ in turns:
        if role not in ROLES:
            raise UserError(f"{where}: role {role!r} is not one a chat template knows; use user or assistant")


class ChatTemplate(Template):
    """A Jinja chat template: the folder's own, or a built-in written the same way."""

    def __init__(self, source: str, tokenizer, variables: dict, origin: str):
        if not hasattr(tokenizer, "hf"):  # ChatGLM2/3's SentencePiece tokenizer gives no character offsets
            raise UserError(f"the chat template in {origin} needs a tokenizer.json tokenizer; for ChatGLM3 use "
                            "the chatglm3 template")
        self.tokenizer, self.variables, self.origin, self.source = tokenizer, variables, origin, source
        self.jinja = compile_jinja(source, origin)
        # The special token that closes an assistant turn (<|im_end|>, <|eot_id|>) stops generation too,
        # even where the folder's generation_config.json does not list it (base models).
        tokens, turn = self.tokenize(None, [("user", "Hi"), ("assistant", "Hi")], f"{origin} (a test conversation)")
        answer = [i for i, k in enumerate(turn) if k is not None]
        special = {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
        self.stop_ids = set(tokenizer.stop_ids) | ({tokens[answer[-1]]} & special if answer else set())

    def render(self, messages, add_generation_prompt, where) -> str:
        try:
            return self.jinja.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.variables)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise UserError(f"{where}: the chat template ({self.origin}) cannot render this conversation: "
                            f"{e}") from None

    def answers(self, messages, where):
        """The whole rendered text, and the character span (start, end) of each assistant answer in it.

        Answer k is what rendering messages[:k+1] adds to messages[:k] with the generation prompt: the text
        the model must produce, end-of-turn token included. The text is tokenized once as a whole (so
        the ids equal apply_chat_template's) and the spans mapped to tokens through character offsets."""
        whole = self.render(messages, False, where)
        if messages and messages[0]["role"] == "system" and messages[0]["content"].strip() not in whole:
            raise UserError(f"{where}: the chat template ({self.origin}) leaves out the system text of a "
                            "conversation that ends with an answer (Mistral v0.3's puts it only into a final user "
                            "turn); use the built-in mistral template, or drop the system text")
        spans, cursor = [], 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], True, where)
            upto = self.render(messages[:k + 1], False, where)
            if not upto.startswith(before):
                raise UserError(f"{where}: the chat template ({self.origin}) starts an answer differently from its "
                                "generation prompt, so the answer's tokens cannot be found")
            answer = upto[len(before):].rstrip()  # not the newline after an end-of-turn token
            # The conversation so far is usually the start of the whole; the mistral format moves the system
            # text into the last user turn, shifting what follows it: then look after the previous answer.
            start = len(before) if whole.startswith(upto) else whole.find(answer, cursor)
            if not answer or start < cursor:
                raise UserError(f"{where}: the chat template ({self.origin}) renders the conversation up to an "
                                "answer differently from the whole conversation, so the answer cannot be found")
            spans.append((start, start + len(answer)))
            cursor = start + len(answer)
        return whole, spans

    def tokenize_batch(self, conversations):
        rendered = [self.answers(messages(system, turns), where) for system, turns, where in conversations]
        encodings = self.tokenizer.hf.encode_batch([whole for whole, _ in rendered], add_special_tokens=False)
        # A token belongs to an answer when its characters overlap the span (a zero-width token counts as
        # one character wide): a token that straddles the border is one the model must produce.
        return [(encoding.ids, [next((k for k, (a, b) in enumerate(spans) if s < b and max(e, s + 1) > a), None)
                                for s, e in encoding.offsets]) for encoding, (_, spans) in zip(encodings, rendered)]

    def generation_prompt(self, system, turns, where):
        return self.tokenizer.encode(self.render(messages(system, turns), True, where))


def messages(system, turns) -> list:
    return [{"role": role, "content": text} for role, text in ([("system", system)] if system else []) + list(turns)]


class PieceTemplate(Template):
    """A format built from pieces, each (text or token ids, answer number or None): nothing to find afterwards.
    Each text is tokenized on its own, the texts of a whole batch in one tokenizer call."""

    def tokenize_batch(self, conversations):
        rows = [self.pieces(system, turns, add_generation_prompt=False) for system, turns, _ in conversations]
        encoded = iter(self.tokenizer.encode_batch([p for pieces in rows for p, _ in pieces if isinstance(p, str)]))
        rows = [[(next(encoded) if isinstance(p, str) else p, k) for p, k in pieces] for pieces in rows]
        return [(list(chain.from_iterable(ids for ids, _ in pieces)),
                 list(chain.from_iterable(repeat(k, len(ids)) for ids, k in pieces))) for pieces in rows]

    def generation_prompt(self, system, turns, where):
        pieces = self.pieces(system, turns, add_generation_prompt=True)
        return [i for p, _ in pieces for i in (self.tokenizer.encode(p) if isinstance(p, str) else p)]


def alpaca_prompt(user: str, system: str = None) -> str:
    """The text before an Alpaca answer; generation starts right after it."""
    return (f"{system}\n\n" if system else "") + f"### Instruction:\n{user}\n\n### Response:\n"


class Alpaca(PieceTemplate):
    """nanotune's format for base models: the tokenizer's BOS, then per answer its prompt (user turns since the
    last answer, joined by a blank line; the system text before the first) and the answer followed by EOS.
    Prompt and answer are tokenized apart, so the mask falls exactly on their border."""

    def __init__(self, tokenizer):
        self.tokenizer, self.stop_ids = tokenizer, set(tokenizer.stop_ids)

    def pieces(self, system, turns, add_generation_prompt):
        pieces, asked, k = [(list(self.tokenizer.bos), None)], [], 0
        for role, text in turns:
            if role == "user":
                asked.append(text)
                continue
            pieces.append((alpaca_prompt("\n\n".join(asked), system if k == 0 else None), None))
            pieces += [(text, k), ([self.tokenizer.eos_id], k)]
            asked, k = [], k + 1
        if add_generation_prompt:
            pieces.append((alpaca_prompt("\n\n".join(asked), system if k == 0 else None), None))
        return pieces


class ChatGLM(PieceTemplate):
    """ChatGLM3 / GLM-4, as THUDM's tokenizer builds a message: the role token, then "\\n" and the text each
    encoded on their own (the same string tokenized whole gives other ids). The generation prompt ends with
    <|assistant|>, so the model writes the "\\n" itself. An answer ends where the next role token starts; the
    last is closed by EOS (ChatGLM3's finetune_hf.py) or by <|user|> (GLM-4's finetune.py: "EOS for chat")."""

    def __init__(self, tokenizer, name):
        names = ("[gMASK]", "sop" if name == "chatglm3" else "<sop>",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
        ids = {n: tokenizer.token_to_id(n) for n in names}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise UserError(f"template {name!r} needs the tokens {', '.join(missing)}, which the tokenizer lacks; "
                            "pick the template the model was trained with")
        self.tokenizer, self.name, self.prefix = tokenizer, name, [ids[names[0]], ids[names[1]]]
        self.role = {"system": ids["<|system|>"], "user": ids["<|user|>"], "assistant": ids["<|assistant|>"]}
        self.last_closer = tokenizer.eos_id if name == "chatglm3" else ids["<|user|>"]
        self.stop_ids = set(tokenizer.stop_ids) | {ids["<|user|>"], ids["<|observation|>"]}

    def pieces(self, system, turns, add_generation_prompt):
        pieces, open_answer, k = [(self.prefix, None)], None, 0
        for role, text in ([("system", system)] if system else []) + list(turns):
            pieces.append(([self.role[role]], open_answer))  # a role token closes the answer before it
            open_answer = k if role == "assistant" else None
            pieces += [("\n", open_answer), (text, open_answer)]
            k += role == "assistant"
        if add_generation_prompt:
            pieces.append(([self.role["assistant"]], None))
        elif open_answer is not None:
            pieces.append(([self.last_closer], open_answer))
        return pieces


def export(template, folder: str):
    """Make a model folder nanotune wrote (OUT/model, OUT/merged) tokenize, render and stop as training did,
    in transformers and vLLM too: generation_config.json's eos_token_id lists every id generation stops on
    (the template's end-of-turn token included) and pad_token_id names the pad (if the source did not);
    a built-in Jinja template the folder did not have becomes its tokenizer_config.json's chat_template.
    A source folder without tokenizer_config.json (a bare tokenizer.json) gets one, and a
    special_tokens_map.json, naming the EOS and pad tokens nanotune read and taking tokenizer.json as it
    is (PreTrainedTokenizerFast), as nanotune does. The piece-built formats (alpaca, chatglm3, glm4)
    have no Jinja text to write."""
    tokenizer = template.tokenizer
    generation = read_json(os.path.join(folder, "generation_config.json"))
    generation["eos_token_id"] = sorted(template.stop_ids)
    generation.setdefault("pad_token_id", tokenizer.pad_id)
    write_json(generation, os.path.join(folder, "generation_config.json"))
    config = read_json(os.path.join(folder, "tokenizer_config.json"))
    if not config and hasattr(tokenizer, "hf"):  # ChatGLM's SentencePiece folders bring THUDM's own
        names = {"eos_token": tokenizer.hf.id_to_token(tokenizer.eos_id),
                 "pad_token": tokenizer.hf.id_to_token(tokenizer.pad_id)}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
        if not os.path.exists(os.path.join(folder, "special_tokens_map.json")):
            write_json(names, os.path.join(folder, "special_tokens_map.json"))
    if isinstance(template, ChatTemplate) and template.origin.startswith("built-in"):
        config["chat_template"] = template.source.strip()
    if config:
        write_json(config, os.path.join(folder, "tokenizer_config.json"))


def write_json(value, path):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
