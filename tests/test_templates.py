"""Chat templates and turn masks: built-ins against ids written out from each model's documented format,
the folder's own template against transformers' apply_chat_template, and one-sentence errors.

Tiny tests use a byte-level tokenizer built here (one token per byte, the format's special tokens added);
tests on real tokenizer folders skip without /work/shared, those against transformers without it."""
import datetime
import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from nanotune import UserError
from nanotune.templates import Alpaca, alpaca_prompt, compile_jinja, load_template, messages
from nanotune.tokenizer import load_tokenizer

TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers")
QWEN, LLAMA, MISTRAL, TINYLLAMA = ("qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "mistral-7b-instruct-v0.3",
                                   "tinyllama-1.1b-chat-v1.0")
CHATGLM_TOKENS = ["[gMASK]", "sop", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SYSTEM, DIALOGUE = "Be brief.", [("user", "hi"), ("assistant", "red"), ("user", "more"), ("assistant", "blue")]
CHATLIKE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_folder(path, specials=(), eos="<|endoftext|>", template=None, jinja=None):
    """A model folder with a byte-level tokenizer (one token per byte, `specials` added): tokenizer.json,
    tokenizer_config.json (eos_token, chat_template if given) and chat_template.jinja if given."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([eos, *specials])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos, **({"chat_template": template} if template is not None else {})}, f)
    if jinja is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja)
    return str(path)


def assemble(*pieces):
    """(ids, trained) pieces -> the whole (tokens, trained) pair."""
    return [i for ids, _ in pieces for i in ids], [keep for ids, keep in pieces for _ in ids]


def real(name):
    path = os.path.join(TOKENIZERS, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} is not here (shared tokenizer folders)")
    return path


def one_sentence(error, where=None):
    message = str(error.value)
    assert "\n" not in message and (where is None or message.startswith(where + ": ")), message
    return message


# ---- names, alpaca, and the auto fallback

def test_unknown_name_is_one_sentence_listing_the_names(tmp_path):
    folder = tiny_folder(tmp_path)
    with pytest.raises(UserError) as e:
        load_template("vicuna", folder, load_tokenizer(folder))
    message = one_sentence(e)
    assert "'vicuna'" in message and all(n in message for n in
                                         ["auto", "alpaca", "chatml", "llama3", "mistral", "chatglm3", "glm4"])


def test_alpaca_is_nanotunes_format(tmp_path):
    folder = tiny_folder(tmp_path)
    tok = load_tokenizer(folder)
    x, eos = tok.encode, tok.eos_id
    first = "Be brief.\n\n### Instruction:\nhi\n\n### Response:\n"
    assert alpaca_prompt("hi", "Be brief.") == first
    template = load_template("alpaca", folder, tok)
    # The system text only before the first instruction; prompt and answer tokenized apart; EOS after each.
    want = assemble((x(first), False), (x("red") + [eos], True),
                    (x("### Instruction:\nmore\n\n### Response:\n"), False), (x("blue") + [eos], True))
    assert template.encode(SYSTEM, DIALOGUE) == want
    assert template.prompt(SYSTEM, DIALOGUE[:1]) == x(first)
    # Two user turns in a row become one instruction, joined by a blank line.
    tokens, _ = template.encode(None, [("user", "a"), ("user", "b"), ("assistant", "c")])
    assert tokens == x("### Instruction:\na\n\nb\n\n### Response:\n") + x("c") + [eos]
    assert template.stop_ids == tok.stop_ids


def test_auto_without_a_template_is_alpaca(tmp_path):
    folder = tiny_folder(tmp_path)
    tok = load_tokenizer(folder)
    template = load_template("auto", folder, tok)
    assert isinstance(template, Alpaca)
    assert template.encode(SYSTEM, DIALOGUE) == load_template("alpaca", folder, tok).encode(SYSTEM, DIALOGUE)


# ---- built-in text templates on the tiny tokenizer: ids and masks

def test_chatml_trains_answers_and_im_end_only(tmp_path):
    folder = tiny_folder(tmp_path, ["<|im_start|>", "<|im_end|>"])
    tok = load_tokenizer(folder)
    x, (S, E) = tok.encode, (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"))
    template = load_template("chatml", folder, tok)
    head = [S, *x("system\nBe brief."), E, *x("\n"), S, *x("user\nhi"), E, *x("\n"), S, *x("assistant\n")]
    between = [*x("\n"), S, *x("user\nmore"), E, *x("\n"), S, *x("assistant\n")]
    pieces = [(head, False), (x("red") + [E], True), (between, False), (x("blue") + [E], True), (x("\n"), False)]
    tokens, trained = assemble(*pieces)
    assert template.encode(SYSTEM, DIALOGUE) == (tokens, trained)
    # mask_history: only the last answer; train_on_prompt: every token.
    pieces[1] = (pieces[1][0], False)
    assert template.encode(SYSTEM, DIALOGUE, mask_history=True) == assemble(*pieces)
    assert template.encode(SYSTEM, DIALOGUE, train_on_prompt=True) == (tokens, [True] * len(tokens))
    assert template.prompt(SYSTEM, DIALOGUE[:3]) == head + x("red") + [E] + between
    # No default system text; <|im_end|> stops generation though this tokenizer's EOS is <|endoftext|>.
    assert template.encode(None, DIALOGUE[:2])[0] == [S, *x("user\nhi"), E, *x("\n"), S, *x("assistant\nred"), E,
                                                        *x("\n")]
    assert template.stop_ids == {tok.eos_id, E}


def test_llama3_builtin(tmp_path):
    folder = tiny_folder(tmp_path, LLAMA3_TOKENS)
    tok = load_tokenizer(folder)
    x, (B, H, EH, EOT) = tok.encode, [tok.token_to_id(t) for t in LLAMA3_TOKENS]
    template = load_template("llama3", folder, tok)
    tokens, trained = template.encode(SYSTEM, [("user", " hi\n"), ("assistant", " red\n")])
    want = assemble(([B, H, *x("system"), EH, *x("\n\nBe brief."), EOT, H, *x("user"), EH, *x("\n\nhi"), EOT,
                      H, *x("assistant"), EH, *x("\n\n")], False), (x("red") + [EOT], True))  # content trimmed
    assert (tokens, trained) == want
    assert template.prompt(None, [("user", "hi")]) == [B, H, *x("user"), EH, *x("\n\nhi"), EOT,
                                                       H, *x("assistant"), EH, *x("\n\n")]
    assert EOT in template.stop_ids


def test_mistral_builtin_puts_the_system_text_into_the_last_user_turn(tmp_path):
    folder = tiny_folder(tmp_path, ["<s>", "</s>"], eos="</s>")
    tok = load_tokenizer(folder)
    x, BOS, EOS = tok.encode, tok.token_to_id("<s>"), tok.eos_id
    template = load_template("mistral", folder, tok)
    # The answers before the system text shift: found after the previous answer, not at the prefix's length.
    want = assemble(([BOS, *x("[INST] hi[/INST]")], False), (x(" red") + [EOS], True),
                    (x("[INST] Be brief.\n\nmore[/INST]"), False), (x(" blue") + [EOS], True))
    assert template.encode(SYSTEM, DIALOGUE) == want
    assert template.prompt(SYSTEM, DIALOGUE[:1]) == [BOS, *x("[INST] Be brief.\n\nhi[/INST]")]
    with pytest.raises(UserError) as e:
        template.encode(None, [("user", "a"), ("user", "b"), ("assistant", "c")], where="d.jsonl line 3")
    assert "alternate" in one_sentence(e, "d.jsonl line 3")


# ---- ChatGLM, built from ids

@pytest.mark.parametrize("name", ["chatglm3", "glm4"])
def test_chatglm_is_built_from_ids_and_trains_the_closing_role_token(tmp_path, name):
    folder = tiny_folder(tmp_path, CHATGLM_TOKENS, eos="</s>")
    tok = load_tokenizer(folder)
    x = tok.encode
    names = ["[gMASK]", "sop" if name == "chatglm3" else "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
             "<|observation|>"]
    gmask, sop, system, user, assistant, observation = [tok.token_to_id(t) for t in names]
    last = tok.eos_id if name == "chatglm3" else user  # GLM-4's finetune.py closes a chat with <|user|>
    template = load_template(name, folder, tok)
    # role token, then "\n" and the text each encoded on their own; an answer ends with the next role token.
    pieces = [([gmask, sop, system, *x("\n"), *x("Be brief."), user, *x("\n"), *x("hi"), assistant], False),
              ([*x("\n"), *x("red"), user], True), ([*x("\n"), *x("more"), assistant], False),
              ([*x("\n"), *x("blue"), last], True)]
    assert template.encode(SYSTEM, DIALOGUE) == assemble(*pieces)
    pieces[1] = (pieces[1][0], False)
    assert template.encode(SYSTEM, DIALOGUE, mask_history=True) == assemble(*pieces)
    assert template.prompt(None, DIALOGUE[:1]) == [gmask, sop, user, *x("\n"), *x("hi"), assistant]
    assert {user, observation, tok.eos_id} <= template.stop_ids


def test_chatglm_without_its_role_tokens_is_one_sentence(tmp_path):
    folder = tiny_folder(tmp_path)
    with pytest.raises(UserError) as e:
        load_template("glm4", folder, load_tokenizer(folder))
    assert "<|user|>" in one_sentence(e)


def test_builtin_needs_its_special_tokens(tmp_path):
    folder = tiny_folder(tmp_path)
    with pytest.raises(UserError) as e:
        load_template("chatml", folder, load_tokenizer(folder))
    assert "<|im_start|>" in one_sentence(e)


# ---- the folder's own template: where it comes from, and rows it cannot render

def test_chat_template_list_uses_the_one_named_default(tmp_path):
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATLIKE}]
    folder = tiny_folder(tmp_path / "a", template=listed)
    tok = load_tokenizer(folder)
    tokens, _ = load_template("auto", folder, tok).encode(None, DIALOGUE[:2])
    assert tok.decode(tokens) == "user: hi\nassistant: red\n"
    folder = tiny_folder(tmp_path / "b", template=listed[:1])
    with pytest.raises(UserError) as e:
        load_template("auto", folder, load_tokenizer(folder))
    assert "default" in one_sentence(e)


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    folder = tiny_folder(tmp_path, template="IGNORED", jinja=CHATLIKE)
    tok = load_tokenizer(folder)
    tokens, trained = load_template("auto", folder, tok).encode(None, DIALOGUE[:2])
    assert tok.decode(tokens) == "user: hi\nassistant: red\n"
    assert tok.decode([t for t, keep in zip(tokens, trained) if keep]) == "red"  # not the newline after it


def test_template_that_raises_is_one_sentence(tmp_path):
    folder = tiny_folder(tmp_path, template="{% if messages[0].role == 'system' %}"
                                             "{{ raise_exception('System role not supported') }}{% endif %}"
                                             + CHATLIKE)
    template = load_template("auto", folder, load_tokenizer(folder))
    with pytest.raises(UserError) as e:
        template.encode(SYSTEM, DIALOGUE, where="data.jsonl line 7")
    assert "System role not supported" in one_sentence(e, "data.jsonl line 7")


def test_unknown_role_is_one_sentence(tmp_path):
    folder = tiny_folder(tmp_path, template=CHATLIKE)
    template = load_template("auto", folder, load_tokenizer(folder))
    with pytest.raises(UserError) as e:
        template.encode(None, [("user", "hi"), ("tool", "42"), ("assistant", "red")], where="data.json row 2")
    assert "'tool'" in one_sentence(e, "data.json row 2")


def test_template_that_renders_history_differently_is_one_sentence(tmp_path):
    # The last answer gets a "!" that the same answer lacks once the conversation goes on.
    folder = tiny_folder(tmp_path, template="{% for m in messages %}{{ m.role }}: {{ m.content }}"
                                             "{% if loop.last and m.role == 'assistant' %}!{% endif %}\n{% endfor %}"
                                             "{% if add_generation_prompt %}assistant: {% endif %}")
    template = load_template("auto", folder, load_tokenizer(folder))
    assert template.encode(None, DIALOGUE[:2])[1].count(True) == len("red!")
    with pytest.raises(UserError) as e:
        template.encode(None, DIALOGUE, where="x.jsonl line 1")
    assert "cannot be found" in one_sentence(e, "x.jsonl line 1")


def test_invalid_jinja_is_one_sentence(tmp_path):
    folder = tiny_folder(tmp_path, template="{% for m in messages %}{{ m.content }}")
    with pytest.raises(UserError) as e:
        load_template("auto", folder, load_tokenizer(folder))
    assert "tokenizer_config.json" in one_sentence(e)


# ---- the renderer itself, against transformers' (needs transformers, not the shared folders)

TRICKY = [  # tojson's options and non-ASCII text, loop controls, {% generation %}, namespace, whitespace control
    "{% for m in messages %}{{ m | tojson(indent=2) }}\n{% endfor %}{{ messages | tojson(separators=(',', ':')) }}",
    "{%- for m in messages %}\n  {% if loop.index > 3 %}{% break %}{% endif %}\n  {%- if m.role == 'user' %}"
    "{% continue %}{% endif %}\n    {{ m.content }}|\n{% endfor %}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
    "{{ bos_token }}{{ strftime_now('%Y-%m-%d') }}{% set ns = namespace(n=0) %}\n{% for m in messages %}"
    "{% set ns.n = ns.n + 1 %}  {{ ns.n }}{% endfor %}\n  {% if add_generation_prompt %}go{% endif %}",
]


@pytest.mark.parametrize("source", TRICKY)
def test_rendering_equals_transformers(source):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    chat = messages(SYSTEM, [("user", "héllo ☃ <b>"), *DIALOGUE[1:]])
    for generation in (False, True):
        theirs, _ = chat_template_utils.render_jinja_template(
            conversations=[chat], chat_template=source, add_generation_prompt=generation,
            bos_token="<s>", eos_token="</s>")
        ours = compile_jinja(source, "test").render(messages=chat, add_generation_prompt=generation,
                                                    bos_token="<s>", eos_token="</s>")
        assert ours == theirs[0]


# ---- real tokenizer folders, ids written out from each model's documented format (shared folders only)

ASK, ANSWER = [("user", "Hello there")], [("assistant", "Hi! How can I help?")]


def test_qwen_own_template_adds_its_default_system_text():
    folder = real(QWEN)
    tok = load_tokenizer(folder)
    template = load_template("auto", folder, tok)
    im_start, im_end, nl = 151644, 151645, 198
    qwen = tok.encode("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    default = [im_start, 8948, nl, *qwen, im_end, nl]  # "<|im_start|>system\n...<|im_end|>\n"
    brief = [im_start, 8948, nl, 3430, 9814, 13, im_end, nl]  # "<|im_start|>system\nBe brief.<|im_end|>\n"
    user = [im_start, 872, nl, 9707, 1052, im_end, nl]  # "<|im_start|>user\nHello there<|im_end|>\n"
    head = [im_start, 77091, nl]  # "<|im_start|>assistant\n"
    answer = [13048, 0, 2585, 646, 358, 1492, 30, im_end]  # "Hi! How can I help?<|im_end|>"
    assert template.encode(None, ASK + ANSWER) == assemble((default + user + head, False), (answer, True),
                                                           ([nl], False))  # not the newline after <|im_end|>
    assert template.prompt(None, ASK) == default + user + head
    want = assemble((brief + user + head, False), (answer, True), ([nl], False))
    assert template.encode(SYSTEM, ASK + ANSWER) == want
    assert load_template("chatml", folder, tok).encode(SYSTEM, ASK + ANSWER) == want
    assert im_end in template.stop_ids


def test_llama32_own_template_adds_the_knowledge_and_today_date_header():
    folder = real(LLAMA)
    tok = load_tokenizer(folder)
    begin, start, end, eot, nl2 = 128000, 128006, 128007, 128009, 271
    today = tok.encode("Today Date: " + datetime.datetime.now().strftime("%d %b %Y") + "\n\n")
    cutting = [38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198]  # "Cutting Knowledge Date: December 2023\n"
    user = [start, 882, end, nl2, 9906, 1070, eot]  # "<|start_header_id|>user<|end_header_id|>\n\nHello there..."
    head = [start, 78191, end, nl2]  # "<|start_header_id|>assistant<|end_header_id|>\n\n"
    answer = [13347, 0, 2650, 649, 358, 1520, 30, eot]
    tokens, trained = load_template("auto", folder, tok).encode(SYSTEM, ASK + ANSWER)
    system = [begin, start, 9125, end, nl2, *cutting, *today, 3513, 10015, 13, eot]
    assert (tokens, trained) == assemble((system + user + head, False), (answer, True))
    # The built-in llama3 has no date header, and no system block without a system text.
    want = assemble(([begin] + user + head, False), (answer, True))
    assert load_template("llama3", folder, tok).encode(None, ASK + ANSWER) == want


def test_mistral_own_template_and_the_builtin():
    folder = real(MISTRAL)
    tok = load_tokenizer(folder)
    own, builtin = load_template("auto", folder, tok), load_template("mistral", folder, tok)
    ask = [1, 3, 23325, 1504, 4]  # "<s>[INST] Hello there[/INST]"
    answer = [16127, 29576, 2370, 1309, 1083, 2084, 29572, 2]  # " Hi! How can I help?</s>"
    want = assemble((ask, False), (answer, True))
    assert own.encode(None, ASK + ANSWER) == want == builtin.encode(None, ASK + ANSWER)
    # Mistral v0.3's own template drops the system text from a conversation that ends with an answer.
    with pytest.raises(UserError) as e:
        own.encode(SYSTEM, ASK + ANSWER, where="d.jsonl line 1")
    assert "built-in mistral" in one_sentence(e, "d.jsonl line 1")
    ask = [1, 3, *tok.encode("Be brief.\n\nHello there"), 4]
    assert own.prompt(SYSTEM, ASK) == builtin.prompt(SYSTEM, ASK) == ask
    assert builtin.encode(SYSTEM, ASK + ANSWER) == assemble((ask, False), (answer, True))
    assert own.stop_ids == builtin.stop_ids == {2}


def test_tinyllama_template_from_chat_template_jinja():
    folder = real(TINYLLAMA)
    tok = load_tokenizer(folder)
    template = load_template("auto", folder, tok)
    chat = messages(SYSTEM, ASK + ANSWER)
    assert template.render(chat, False, "x") == ("<|system|>\nBe brief.</s>\n<|user|>\nHello there</s>\n"
                                                 "<|assistant|>\nHi! How can I help?</s>\n")
    assert template.render(chat[:-1], True, "x").endswith("</s>\n<|assistant|>\n")
    tokens, trained = template.encode(SYSTEM, ASK + ANSWER)
    assert tok.hf.decode([t for t, keep in zip(tokens, trained) if keep], skip_special_tokens=False) \
        == "Hi! How can I help?</s>"


# ---- exactness: nanotune's ids equal transformers' apply_chat_template (shared folders and transformers)

CONVERSATIONS = {"one turn": (None, ASK + ANSWER),
                 "two turns": (None, [("user", "Hello"), ("assistant", "Hi"), ("user", " What is 2+2?\n"),
                                      ("assistant", "  4\n")]),
                 "system, one turn": (SYSTEM, ASK + ANSWER),
                 "system, two turns": (SYSTEM, [("user", "Hello"), ("assistant", "Hi"), ("user", "Why?"),
                                                ("assistant", "Because.")])}


def input_ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", [QWEN, LLAMA, MISTRAL, TINYLLAMA])
def test_ids_equal_transformers(name, conversation):
    transformers = pytest.importorskip("transformers")
    folder = real(name)
    hf, tok = transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    template = load_template("auto", folder, tok)
    system, turns = CONVERSATIONS[conversation]
    chat = messages(system, turns)
    text = hf.apply_chat_template(chat, tokenize=False)
    assert template.render(chat, False, "x") == text  # same day: Llama 3.2's template writes today's date
    assert template.render(chat[:-1], True, "x") == hf.apply_chat_template(chat[:-1], tokenize=False,
                                                                           add_generation_prompt=True)
    # TinyLlama's tokenizer.json has Llama 2's Prepend normalizer, which transformers 5 replaces (tokenizer.py)
    assert tok.encode(text) == input_ids(hf(text, add_special_tokens=False))
    prompt = input_ids(hf.apply_chat_template(chat[:-1], add_generation_prompt=True))
    assert template.prompt(system, turns[:-1]) == prompt
    if name == MISTRAL and system:  # its template drops the system text here; nanotune refuses the row
        with pytest.raises(UserError):
            template.encode(system, turns)
        return
    tokens, trained = template.encode(system, turns)
    assert tokens == input_ids(hf.apply_chat_template(chat))
    n, m = len(prompt), sum(trained[len(prompt):])  # the last answer follows the generation prompt ...
    assert tokens[:n] == prompt and trained[n:] == [True] * m + [False] * (len(tokens) - n - m)
    assert tokens[n + m - 1] in template.stop_ids  # ... and ends with the end-of-turn token


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_builtins_equal_the_models_own(conversation):
    """chatml with a system text is Qwen2.5's template; mistral without one is Mistral v0.3's."""
    transformers = pytest.importorskip("transformers")
    system, turns = CONVERSATIONS[conversation]
    name, builtin = (QWEN, "chatml") if system else (MISTRAL, "mistral")
    folder = real(name)
    hf, tok = transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    tokens, _ = load_template(builtin, folder, tok).encode(system, turns)
    assert tokens == input_ids(hf.apply_chat_template(messages(system, turns)))
