#!/usr/bin/env python3
"""Writes the tokenizer reference fixtures of shardline-node from llama.cpp (through llama-cpp-python).

Two fixtures come out, both under node/tests/fixtures/:

* tokenizer_smollm2.json: token ids that llama.cpp produces for about forty varied strings with the SmolLM2 GGUF
  (byte-level BPE, pre-tokenizer "smollm"), its detokenized text, its end-of-generation token set, and chat prompts
  rendered from the model's own Jinja template by Python's jinja2 with the settings Hugging Face transformers uses
  (trim_blocks, lstrip_blocks), together with llama.cpp's built-in ChatML rendering where that one applies and the
  llama.cpp token ids of each rendered prompt.
* tokenizer_bpe_pre.json: the same strings with SmolLM2's tokens and merges under other `tokenizer.ggml.pre`
  names (llama-bpe, gpt-2, qwen2, falcon, default), each written into a vocab-only GGUF without
  `add_bos_token`, so that llama.cpp's split expressions and per-name defaults are checked too.
* tokenizer_templates.json: the chat templates of other Llama-family models (Llama 2, Llama 3, Mistral, Zephyr /
  TinyLlama, and one with Jinja features those lack) rendered by jinja2 over a few conversations, including the
  ones a template refuses with raise_exception.
* tokenizer_spm.json: a small SentencePiece-style vocabulary (pieces with scores, byte-fallback tokens <0xXX>,
  control tokens) that this script builds, writes into a vocab-only GGUF with the `gguf` package, loads into
  llama.cpp and tokenizes a set of strings with. The fixture holds the vocabulary itself and the expected ids, so the
  Rust tests need neither llama.cpp nor the GGUF.

Usage: scripts/make-tokenizer-fixtures.py [--model PATH] [--out DIR] [--only FIXTURE...]
The model defaults to $SHARDLINE_MODEL, then the shardline cache path that scripts/fetch-model.sh fills.
Needs: llama-cpp-python, gguf, jinja2.
"""

import argparse
import ctypes
import json
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import jinja2
import jinja2.sandbox
try:
    import llama_cpp
except ImportError:  # only tokenizer_templates.json can be made without it
    llama_cpp = None

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Strings for the byte-level BPE model: English, code, whitespace runs, newlines, digits, punctuation, accents,
# CJK, emoji, special tokens written in the text, and odd Unicode (non-breaking and ideographic spaces, combining
# marks, zero-width joiners).
SMOLLM2_STRINGS = [
    "",
    " ",
    "Hello",
    "Hello world! 123",
    "The quick brown fox jumps over the lazy dog.",
    "  multiple   spaces",
    "trailing spaces   ",
    "\tTabs\tand\ttabs\t",
    "line one\nline two\n\nline four\n",
    "\r\nWindows\r\nnewlines\r\n",
    "\n\n\n",
    "3.14159 and 2,718,281 and 1e-9 and 0x1F",
    "1234567890",
    "Numbers: 1st 2nd 3rd 42nd 100th",
    "I'm sure you'll see they've done what we'd said, isn't it?",
    "DON'T SHOUT, it's 'quoted' and \"double quoted\"",
    "Punctuation!!! ??? ... ;;; :: -- __ ** ## @@ $$ %% ^^ && (( )) [[ ]] {{ }}",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() {\n\tlet x: Vec<u32> = vec![1, 2, 3];\n\tprintln!(\"{x:?}\");\n}",
    "<div class=\"a\">&nbsp;</div> // comment /* block */",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "Café déjà vu, naïve façade, Ångström, smørrebrød, Straße",
    "Ελληνικά και Русский язык и العربية",
    "日本語のテキストと中文文本，还有한국어。",
    "Emoji: 🎉🚀👍🏽 and family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "non\u00a0breaking\u00a0space and ideographic\u3000space",
    "e\u0301 combining acute, zero\u200bwidth, bidi \u202emark",
    "  leading spaces",
    "mixed   \t\n  whitespace \n\t ",
    "<|im_start|>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>text<|endoftext|>more",
    "<|im_start|><|im_end|><|im_start|>",
    "not special: <|im_start or im_end|> <im_start>",
    "<repo_name>shardline<file_sep>src/main.rs",
    "a" * 64,
    "ab" * 40 + " " + "xyz" * 20,
    "Ünïcödé ÜBER alles ÀÉÎÕÜ",
    "$100.00 + €50,00 = ¥? £!",
]

def chat(*turns: tuple[str, str], add_generation_prompt: bool = True) -> dict:
    """One chat-template case: (role, content) turns and whether the assistant's header is appended."""
    return {
        "messages": [{"role": role, "content": content} for role, content in turns],
        "add_generation_prompt": add_generation_prompt,
    }


SMOLLM2_CHATS = [
    chat(("user", "Hi there!")),
    chat(("user", "Hi there!"), add_generation_prompt=False),
    chat(("system", "You are a terse assistant."), ("user", "What is the capital of France?")),
    chat(
        ("system", "Answer in French."),
        ("user", "Hello"),
        ("assistant", "Bonjour !"),
        ("user", "Count to 3:\n1, 2, 3?"),
    ),
    chat(("user", "Write code"), ("assistant", "```python\nprint('hi')\n```"), ("user", "Thanks 🎉")),
]


def default_model_path():
    env = os.environ.get("SHARDLINE_MODEL")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shardline" / "models" / MODEL_FILE


def load_vocab(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def tokenize(llm, text, add_special):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


def detokenize(llm, ids):
    # special=True renders control tokens as their text, which is what shardline's decode does.
    return llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


def eog_ids(llm):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def render_jinja(template, messages, add_generation_prompt, bos_token, eos_token):
    """Renders a chat template the way Hugging Face transformers' apply_chat_template does."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def llama_cpp_chatml(messages, add_generation_prompt):
    """llama.cpp's built-in ChatML formatter (llama_chat_apply_template with the name "chatml")."""
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        role = m["role"].encode()
        content = m["content"].encode()
        keep += [role, content]
        arr[i].role = role
        arr[i].content = content
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(b"chatml", arr, len(messages), add_generation_prompt, buf, size)
    if n < 0 or n > size:
        raise RuntimeError(f"llama_chat_apply_template failed: {n}")
    return buf.raw[:n].decode("utf-8")


def smollm2_fixture(model_path):
    llm = load_vocab(model_path)
    reader = gguf.GGUFReader(str(model_path))
    template = reader.fields["tokenizer.chat_template"].contents()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos, eos = llm.token_bos(), llm.token_eos()
    bos_text = llm.detokenize([bos], special=True).decode()
    eos_text = llm.detokenize([eos], special=True).decode()

    cases = []
    for text in SMOLLM2_STRINGS:
        for add_special in (False, True):
            ids = tokenize(llm, text, add_special)
            cases.append({"text": text, "add_special": add_special, "ids": ids, "detokenized": detokenize(llm, ids)})

    chats = []
    for chat in SMOLLM2_CHATS:
        rendered = render_jinja(template, chat["messages"], chat["add_generation_prompt"], bos_text, eos_text)
        # llama.cpp's ChatML formatter has no default system prompt, so it only agrees when the chat has one.
        has_system = chat["messages"][0]["role"] == "system"
        builtin = llama_cpp_chatml(chat["messages"], chat["add_generation_prompt"]) if has_system else None
        chats.append(
            {
                "messages": chat["messages"],
                "add_generation_prompt": chat["add_generation_prompt"],
                "jinja2": rendered,
                "llama_cpp_chatml": builtin,
                "ids": tokenize(llm, rendered, False),
            }
        )

    return {
        "source": f"llama-cpp-python {llama_cpp.__version__} on {model_path.name}",
        "model_file": model_path.name,
        "vocab_size": llm.n_vocab(),
        "bos": bos,
        "eos": eos,
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog": eog_ids(llm),
        "eot": llama_cpp.llama_vocab_eot(vocab),
        "chat_template": template,
        "cases": cases,
        "chats": chats,
    }


PRE_TOKENIZERS = ["llama-bpe", "gpt-2", "qwen2", "falcon", "default"]
# Appended to SmolLM2's vocabulary for the pre-tokenizer fixture: multi-digit tokens (SmolLM2 has none, so digit
# grouping would otherwise not show) and a whole word no merge reaches (shows llama-bpe's ignore_merges).
PRE_EXTRA_TOKENS = ["12", "123", "45", "456", "78", "\u0120unreachableword"]
PRE_EXTRA_MERGES = ["1 2", "12 3", "4 5", "45 6", "7 8"]
PRE_EXTRA_STRINGS = ["an unreachableword here", "12345 456 7890 1", "x123456789y", "3456 7812 a3456"]


def write_vocab_gguf(path, model, tokens, types, scores=None, merges=None, pre=None, **ids_and_flags):
    """A GGUF with an architecture, the hyperparameters llama.cpp reads even for a vocab-only load (they describe no
    real model), and the vocabulary."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in ids_and_flags.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_pre_fixture(model_path):
    reader = gguf.GGUFReader(str(model_path))
    field = lambda key: reader.fields[key]
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode("utf-8") for i in field("tokenizer.ggml.tokens").data]
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    merges = [bytes(field("tokenizer.ggml.merges").parts[i]).decode("utf-8") for i in field("tokenizer.ggml.merges").data]
    tokens += PRE_EXTRA_TOKENS
    types += [int(gguf.TokenType.NORMAL)] * len(PRE_EXTRA_TOKENS)
    merges += PRE_EXTRA_MERGES
    out = {
        "source": f"llama-cpp-python {llama_cpp.__version__} on {model_path.name}'s vocabulary plus extra tokens",
        "extra_tokens": PRE_EXTRA_TOKENS,
        "extra_merges": PRE_EXTRA_MERGES,
        "pre": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_TOKENIZERS:
            path = Path(tmp) / f"{pre}.gguf"
            write_vocab_gguf(path, "gpt2", tokens, types, merges=merges, pre=pre, bos_token_id=1, eos_token_id=2)
            llm = load_vocab(path)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            cases = []
            for text in SMOLLM2_STRINGS + PRE_EXTRA_STRINGS:
                for add_special in (False, True):
                    cases.append({"text": text, "add_special": add_special, "ids": tokenize(llm, text, add_special)})
            out["pre"][pre] = {"add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)), "cases": cases}
    return out


# Text the small SentencePiece vocabulary is grown from.
SPM_CORPUS = """
The history of all hitherto existing society is the history of class struggles. It was the best of times, it was the
worst of times, it was the age of wisdom, it was the age of foolishness. In the beginning the universe was created.
This has made a lot of people very angry and been widely regarded as a bad move. Call me Ishmael. Some years ago,
never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore,
I thought I would sail about a little and see the watery part of the world. A tokenizer splits text into pieces, and
the model reads the pieces one at a time. Hello world, hello there, hello again.
"""

SPM_STRINGS = [
    "",
    " ",
    "Hello world",
    "hello there, hello again.",
    "The history of the world",
    "It was the best of times, it was the worst of times.",
    "  two leading spaces",
    "trailing space ",
    "multiple   inner    spaces",
    "line one\nline two\n",
    "tab\tseparated\tvalues",
    "Unseen words: zebra quiz jukebox",
    "Digits 0123456789 and 3.14",
    "Café déjà vu",
    "日本語",
    "emoji 🎉 here",
    "<s>",
    "<s>Hello</s>",
    "text</s> more text",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "<unk> stays special",
    "ALL CAPS TEXT",
    "a",
    "▁already escaped▁",
]


def build_spm_vocab():
    """A few hundred pieces with log-frequency scores, grown from SPM_CORPUS like a tiny SentencePiece model.

    Layout follows Llama 2: <unk>, <s>, </s>, then the 256 byte-fallback tokens, then the pieces by falling score,
    then two ChatML control tokens. Scores are rounded to one decimal so that equal scores occur and the tests
    also cover llama.cpp's tie-breaking (leftmost pair first).
    """
    words = ["\u2581" + w for w in SPM_CORPUS.split()]
    counts = Counter()
    for w in words:
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + 8) + 1):
                counts[w[i:j]] += 1
    chars = sorted({c for w in words for c in w})
    best = [p for p, c in counts.most_common() if c >= 2][:320]

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    for p in best:
        tokens.append(p)
        types.append(gguf.TokenType.NORMAL)
        scores.append(round(math.log(counts[p]), 1))
    for c in chars:
        if c not in tokens:
            tokens.append(c)
            types.append(gguf.TokenType.NORMAL)
            scores.append(-10.0)
    for special in ["<|im_start|>", "<|im_end|>"]:
        tokens.append(special)
        types.append(gguf.TokenType.CONTROL)
        scores.append(0.0)
    return tokens, [int(t) for t in types], scores


def spm_fixture():
    tokens, types, scores = build_spm_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spm-vocab.gguf"
        write_vocab_gguf(
            path, "llama", tokens, types, scores=scores, bos_token_id=1, eos_token_id=2, unk_token_id=0,
            add_bos_token=True, add_eos_token=False, add_space_prefix=True,
        )
        llm = load_vocab(path)
        cases = []
        for text in SPM_STRINGS:
            for add_special in (False, True):
                ids = tokenize(llm, text, add_special)
                cases.append({"text": text, "add_special": add_special, "ids": ids, "detokenized": detokenize(llm, ids)})
        eog = eog_ids(llm)
        source = f"llama-cpp-python {llama_cpp.__version__} on a vocab-only GGUF written by gguf {gguf.__version__}" \
            if hasattr(gguf, "__version__") else f"llama-cpp-python {llama_cpp.__version__} on a vocab-only GGUF"
    return {
        "source": source,
        "vocab": {
            "model": "llama",
            "tokens": tokens,
            "token_types": types,
            "scores": scores,
            "bos": 1,
            "eos": 2,
            "unk": 0,
            "add_bos": True,
            "add_eos": False,
            "add_space_prefix": True,
        },
        "eog": eog,
        "cases": cases,
    }


# Chat templates as the models' tokenizer_config.json files ship them (Llama 2 chat, Llama 3 instruct, Mistral
# instruct v0.1, Zephyr / TinyLlama chat), and one that uses namespace(), whitespace control, filters and slicing.
TEMPLATES = {
    "llama2": (
        "<s>",
        "</s>",
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    ),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    "mistral": (
        "<s>",
        "</s>",
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    ),
    "zephyr": (
        "<s>",
        "</s>",
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    ),
    "features": (
        "<s>",
        "</s>",
        "{%- set ns = namespace(system='', turns=0) -%}\n"
        "{%- for m in messages -%}\n"
        "  {%- if m.role == 'system' -%}{%- set ns.system = m.content | trim -%}\n"
        "  {%- else -%}{%- set ns.turns = ns.turns + 1 -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{{- bos_token }}{% if ns.system %}[{{ ns.system | upper }}]{% endif %}\n"
        "{% for m in messages if m.role != 'system' %}\n"
        "    {{ loop.index }}/{{ ns.turns }} {{ m.role | title }}: {{ m.content.replace('\\n', ' ') | trim }}"
        "{{ ' (first)' if loop.first else '' }}{{ '|' ~ m.content[:3] ~ '|' }}\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}Assistant:{% endif %}",
    ),
}

# Qwen2.5-Instruct's template (ChatML with a default system prompt and tool calls) and Qwen3's (thinking blocks:
# reasoning kept only after the last user query, found by walking the messages backwards), as their
# tokenizer_config.json files ship them.
TEMPLATES["qwen2.5"] = (
    "",
    "<|im_end|>",
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
""",
)
TEMPLATES["qwen3"] = (
    "",
    "<|im_end|>",
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}""",
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " What is 2+2? "}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout cats."},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Roles out of order"}],
    [{"role": "user", "content": "Ünïcödé 🎉 and <b>markup</b> & 'quotes'"}],
    # A reasoning model's history: thinking blocks in earlier and in the last assistant turn, and tool results.
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "<think>\nsix times seven\n</think>\n\n42"},
        {"role": "user", "content": "Check the weather."},
        {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"wind\": 3}"},
        {"role": "assistant", "content": "<think>\nmild\n</think>\nIt is 21 degrees."},
    ],
]


def templates_fixture():
    cases = []
    for name, (bos, eos, template) in TEMPLATES.items():
        for messages in CONVERSATIONS:
            for add_generation_prompt in (True, False):
                case = {"template": name, "messages": messages, "add_generation_prompt": add_generation_prompt}
                try:
                    case["rendered"] = render_jinja(template, messages, add_generation_prompt, bos, eos)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
    templates = {name: {"bos_token": bos, "eos_token": eos, "source": t} for name, (bos, eos, t) in TEMPLATES.items()}
    return {"source": f"jinja2 {jinja2.__version__} (trim_blocks, lstrip_blocks)", "templates": templates, "cases": cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--out", type=Path, default=ROOT / "node" / "tests" / "fixtures")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["tokenizer_smollm2.json", "tokenizer_bpe_pre.json", "tokenizer_templates.json", "tokenizer_spm.json"],
        help="write only these fixtures (tokenizer_templates.json needs only jinja2)",
    )
    args = parser.parse_args()
    needs_llama_cpp = not args.only or set(args.only) != {"tokenizer_templates.json"}
    if needs_llama_cpp and llama_cpp is None:
        sys.exit("llama-cpp-python is not installed (see docs/REFERENCE.md)")
    if needs_llama_cpp and not args.model.is_file():
        sys.exit(f"model not found at {args.model}; run scripts/fetch-model.sh or set SHARDLINE_MODEL")
    args.out.mkdir(parents=True, exist_ok=True)

    makers = {
        "tokenizer_smollm2.json": lambda: smollm2_fixture(args.model),
        "tokenizer_bpe_pre.json": lambda: bpe_pre_fixture(args.model),
        "tokenizer_templates.json": templates_fixture,
        "tokenizer_spm.json": spm_fixture,
    }
    for name, make in makers.items():
        if args.only and name not in args.only:
            continue
        fixture = make()
        path = args.out / name
        path.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
