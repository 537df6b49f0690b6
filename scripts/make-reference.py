#!/usr/bin/env python3
"""Produces the llama.cpp reference fixture that shardline's model tests compare against.

For each of a few varied prompts this records, from llama.cpp (through llama-cpp-python) on the SmolLM2 GGUF:
  * the prompt token ids (llama.cpp's tokenizer, special tokens parsed, BOS as the model's metadata says),
  * the greedy continuation (argmax at every step, cross-checked against llama.cpp's own sampler at temperature 0,
    top_k 1, no penalties), with each step's top-1/top-2 logit margin,
  * a teacher-forced evaluation of prompt + continuation: for every position, the top-5 token ids with their raw
    logits (float32 rounded to 4 decimals), the logit of the token that actually follows, and the log-sum-exp of
    the whole row (so log-probabilities can be derived without storing 49152 logits per position),
  * llama.cpp's own noise floor: how far its token-by-token evaluation of the same tokens is from the one-pass one.

Usage:
  scripts/make-reference.py                       # writes node/tests/fixtures/llamacpp_smollm2.json
  scripts/make-reference.py --check FIXTURE       # regenerates and fails unless the data equal FIXTURE's
  scripts/make-reference.py --preset Q4_K_M       # compact fixture of one preset file (scripts/make-presets)
  scripts/make-reference.py --all-presets         # compact fixtures of every preset file that exists

A compact fixture (node/tests/fixtures/llamacpp_presets/<PRESET>.json, about 120 KB) keeps, for every prompt of
PROMPTS and EXTRA_PROMPTS (19 prompts, about 4,200 teacher-forced positions), the prompt tokens, the greedy continuation
and, at every teacher-forced position, only llama.cpp's top-1 token, its logit and its margin over the top-2 logit,
plus (unless --no-self-consistency) llama.cpp's own noise floor. The preset files are read from
$SHARDLINE_CACHE/presets (default ~/.cache/shardline/presets), where scripts/make-presets writes them.

  scripts/make-reference.py --all-presets --preset-out /tmp/p --check-cases node/tests/fixtures/llamacpp_presets
      writes into /tmp/p and fails unless every case of the stored fixtures is regenerated identically

The model is taken from --model, else $SHARDLINE_MODEL, else the cache path that scripts/fetch-model.sh fills.
"""

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "node" / "tests" / "fixtures" / "llamacpp_smollm2.json"
PRESET_OUT = REPO_ROOT / "node" / "tests" / "fixtures" / "llamacpp_presets"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESET_STEM = "SmolLM2-135M-Instruct"
# The llama.cpp quantisation presets, in the order of scripts/make-presets.
PRESETS = [
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS",
]
# The first prompts of the compact fixtures, in this order (the fixtures made before EXTRA_PROMPTS held these four
# only; `--check-cases` compares a regenerated case with a stored one of the same name).
COMPACT_CASES = ["english", "code", "chat", "numbers_multilingual"]

N_THREADS = 2
N_CTX = 2048
N_BATCH = 2048
GREEDY_TOKENS = 32
TOP_K = 5
DECIMALS = 4

LONG_PROSE = """\
Every town has a building that outlives the reason it was built. In ours it is the old grain exchange, a long hall \
of yellow brick with tall arched windows and a clock that has shown twenty past four for as long as anyone can \
remember. Farmers once stood under its iron roof trading sacks of barley and oats, shouting prices across the floor \
while clerks chalked numbers on a board. When the railway closed and the trucks began to drive straight to the mills \
in the city, the traders drifted away one by one, and for almost a decade the hall stood empty except for pigeons.

Then a group of neighbours decided it should not fall down. They had no plan at first, only a key borrowed from the \
council and a rota for sweeping the floor on Saturday mornings. A retired carpenter repaired the doors. Two students \
from the technical college rewired the lights, testing every circuit twice because the original cables were older \
than their grandparents. Someone brought a kettle, someone else brought chairs, and before long the hall held a \
market every second Sunday: vegetables, honey, second-hand books, bicycles with new tyres, and a woman who sharpened \
knives while telling stories about the ships she had worked on as a young engineer.

The market changed the street around it. A bakery opened across the road, then a repair shop for radios and sewing \
machines, then a small library run entirely by volunteers. Children learned to ride bicycles in the empty car park \
on weekday evenings. In winter the hall became a place to keep warm; people brought soup in large pots and shared \
it with whoever came in from the rain. Nobody could say exactly who was in charge, and that seemed to be part of \
why it worked. Decisions were made at a long table after the market closed, usually over tea, sometimes after an \
argument that lasted until the lights had to be switched off.

There were difficult years as well. A storm tore several panels from the roof, and water ran down the inside of \
the north wall for a whole week before the repairs could be paid for. The neighbours held a concert to raise the \
money: a brass band, a choir of retired nurses, and a teenager who played the piano so quietly that the whole hall \
leaned forward to hear him. They raised enough for the roof and, to everyone's surprise, enough to fix the clock. \
On the evening it started again, people gathered under it and cheered when the minute hand finally moved past \
twenty past four.

Today the exchange is busier than it has been in a hundred years, yet it still has the feeling of a place that \
belongs to whoever walks in. Visitors sometimes ask who owns it now. The honest answer is complicated, involving \
a trust, a lease, and a great many signatures, but the answer most people give is simpler. They say it belongs to \
the town, and then they point to the clock, which keeps good time, and to the floor, which is still swept on \
Saturday mornings by whoever happens to arrive first."""

PROMPTS = [
    (
        "english",
        (
            "The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a lantern and a flask of tea. "
            "From the top she could see the fishing boats returning to the harbour, one after"
        ),
    ),
    (
        "code",
        (
            "fn fibonacci(n: u64) -> u64 {\n"
            "    let (mut a, mut b) = (0u64, 1u64);\n"
            "    for _ in 0..n {\n"
            "        let next = a + b;\n"
            "        a = b;\n"
            "        b = next;\n"
            "    }\n"
            "    a\n"
            "}\n\n"
            "/// Returns true when `n` is a prime number.\n"
            "fn is_prime(n: u64) -> bool {\n"
            "    if n < 2 {\n"
            "        return"
        ),
    ),
    (
        "chat",
        (
            "<|im_start|>system\nYou are a concise and friendly gardening assistant.<|im_end|>\n"
            "<|im_start|>user\nHow often should I water a cactus?<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
    ),
    (
        "long",
        LONG_PROSE + "\n\nQuestion: What time did the clock in the grain exchange show for many years?\nAnswer:",
    ),
    (
        "numbers_multilingual",
        (
            "Inventory, 2024-03-17:\n"
            "1. Apples: 142 kg at 2.35 EUR/kg\n"
            "2. Pears: 87 kg at 3.10 EUR/kg\n"
            "3. Plums: 19.5 kg at 4.80 EUR/kg\n"
            "Total weight: 248.5 kg\n\n"
            "Bonjour, je voudrais deux kilos de pommes, s'il vous plaît.\n"
            "Guten Morgen! Wie viel kosten die Birnen?\n"
            "東京の天気は晴れです。\n"
            "Count from 1 to 20: 1, 2, 3,"
        ),
    ),
]


# Prompts only the compact per-preset fixtures use, on top of PROMPTS: more and more varied text (prose of several
# kinds, code in several languages, structured data, multi-turn chat, lists and tables, other languages and scripts),
# so the agreement statistic rests on a few thousand teacher-forced positions rather than a few hundred.
EXTRA_PROMPTS = [
    (
        "recipe_markdown",
        (
            "# Lentil soup for four\n\n"
            "## Ingredients\n\n"
            "- 250 g red lentils, rinsed\n"
            "- 1 large onion, finely chopped\n"
            "- 2 carrots, diced\n"
            "- 3 cloves of garlic\n"
            "- 1 tsp ground cumin and 1/2 tsp smoked paprika\n"
            "- 1.2 litres of vegetable stock\n"
            "- juice of half a lemon\n\n"
            "## Method\n\n"
            "1. Warm two tablespoons of olive oil in a heavy pot and soften the onion for about eight minutes.\n"
            "2. Add the carrots, garlic and spices and stir for another two minutes, until fragrant.\n"
            "3. Pour in the lentils and the stock, bring to a boil, then lower the heat and simmer for 25 minutes.\n"
            "4. Blend half of the soup, stir it back in and season with salt, pepper and the lemon juice.\n\n"
            "Serve with warm bread. The soup keeps for three days in the fridge and"
        ),
    ),
    (
        "python_code",
        (
            "import csv\n"
            "from collections import defaultdict\n"
            "from dataclasses import dataclass\n\n\n"
            "@dataclass\n"
            "class Sale:\n"
            "    region: str\n"
            "    product: str\n"
            "    units: int\n"
            "    price: float\n\n"
            "    @property\n"
            "    def revenue(self) -> float:\n"
            "        return self.units * self.price\n\n\n"
            "def load_sales(path: str) -> list[Sale]:\n"
            '    """Reads a CSV file with the columns region, product, units and price."""\n'
            "    with open(path, newline=\"\") as f:\n"
            "        reader = csv.DictReader(f)\n"
            "        return [Sale(r[\"region\"], r[\"product\"], int(r[\"units\"]), float(r[\"price\"])) for r in reader]\n\n\n"
            "def revenue_by_region(sales: list[Sale]) -> dict[str, float]:\n"
            "    totals: dict[str, float] = defaultdict(float)\n"
            "    for sale in sales:\n"
            "        totals[sale.region] +="
        ),
    ),
    (
        "chat_multi_turn",
        (
            "<|im_start|>system\nYou are a patient maths tutor. Explain each step briefly.<|im_end|>\n"
            "<|im_start|>user\nWhat is 15% of 80?<|im_end|>\n"
            "<|im_start|>assistant\nTo find 15% of 80, write 15% as 0.15 and multiply: 0.15 × 80 = 12. "
            "So 15% of 80 is 12.<|im_end|>\n"
            "<|im_start|>user\nAnd if a jacket costs 80 dollars and is 15% off, what do I pay?<|im_end|>\n"
            "<|im_start|>assistant\nThe discount is the 12 dollars we just found. Subtract it from the price: "
            "80 − 12 = 68. You pay 68 dollars.<|im_end|>\n"
            "<|im_start|>user\nHow would I do that in one step?<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
    ),
    (
        "science_prose",
        (
            "Plate tectonics describes the outer shell of the Earth as a set of rigid plates that move slowly over a "
            "hotter, softer layer of the mantle. The plates travel a few centimetres each year, roughly as fast as "
            "fingernails grow. Where two plates pull apart, as along the middle of the Atlantic Ocean, molten rock "
            "rises to fill the gap and forms new crust. Where they collide, one plate may sink beneath the other, "
            "producing deep ocean trenches, chains of volcanoes and powerful earthquakes. The theory explains why "
            "the coastlines of South America and Africa fit together like pieces of a puzzle, why the same fossils "
            "are found on continents separated by oceans, and why mountain ranges such as the Himalayas are still "
            "rising today. Before the 1960s, most geologists believed that the continents"
        ),
    ),
    (
        "json_config",
        (
            "{\n"
            '  "name": "weather-station",\n'
            '  "version": "2.4.1",\n'
            '  "sensors": [\n'
            '    {"id": "temp-01", "kind": "temperature", "unit": "celsius", "interval_s": 60},\n'
            '    {"id": "hum-01", "kind": "humidity", "unit": "percent", "interval_s": 60},\n'
            '    {"id": "wind-01", "kind": "wind_speed", "unit": "m/s", "interval_s": 10}\n'
            "  ],\n"
            '  "upload": {\n'
            '    "endpoint": "https://example.org/api/v1/readings",\n'
            '    "batch_size": 50,\n'
            '    "retry": {"max_attempts": 5, "backoff_ms": 250}\n'
            "  },\n"
            '  "location": {"latitude": 46.2044, "longitude": 6.1432, "altitude_m": 375},\n'
            '  "enabled":'
        ),
    ),
    (
        "dialogue_story",
        (
            "\"You're late again,\" said Mara, without looking up from the map spread across the kitchen table.\n"
            "\"The bridge was closed,\" Tom replied. He hung his wet coat on the hook by the door. \"I had to go round "
            "by the mill, and the road there is nothing but mud.\"\n"
            "\"Then we'll leave at dawn instead.\" She traced a line with her finger. \"If we follow the river as far "
            "as the old quarry, we can cross the hills before noon.\"\n"
            "\"And if it rains?\"\n"
            "\"Then we get wet.\" For the first time she looked at him, and he saw that she was smiling. \"You didn't "
            "think this would be easy, did you?\"\n"
            "Tom sat down opposite her and studied the map. The route was longer than he had expected, and"
        ),
    ),
    (
        "spanish_italian",
        (
            "La biblioteca del pueblo abre todos los días de nueve a ocho, excepto los domingos. Además de libros, "
            "ofrece talleres de lectura para niños, cursos de informática para mayores y un pequeño club de ajedrez "
            "que se reúne los jueves por la tarde. Este año el ayuntamiento ha aprobado una ampliación: una sala "
            "nueva con ventanales hacia la plaza y veinte puestos de estudio.\n\n"
            "Il mercato del sabato si tiene in piazza dalle sette a mezzogiorno. I contadini della valle portano "
            "formaggi, miele, verdure di stagione e pane cotto nel forno a legna. In autunno arrivano anche le "
            "castagne e i funghi, e la piazza si riempie di gente che"
        ),
    ),
    (
        "sql_shell",
        (
            "-- Monthly active customers and their average order value, last twelve months.\n"
            "SELECT date_trunc('month', o.created_at) AS month,\n"
            "       count(DISTINCT o.customer_id)      AS active_customers,\n"
            "       round(avg(o.total_cents) / 100.0, 2) AS avg_order_eur\n"
            "FROM orders o\n"
            "JOIN customers c ON c.id = o.customer_id\n"
            "WHERE o.status = 'paid'\n"
            "  AND o.created_at >= now() - interval '12 months'\n"
            "  AND c.country IN ('FR', 'DE', 'ES')\n"
            "GROUP BY 1\n"
            "ORDER BY 1;\n\n"
            "# Back up the database and keep the last seven dumps.\n"
            "pg_dump --format=custom --file=\"backup-$(date +%F).dump\" shop\n"
            "ls -1t backup-*.dump | tail -n +8 | xargs -r rm --\n"
            "echo \"backup done at $(date)\" >>"
        ),
    ),
    (
        "email_formal",
        (
            "Subject: Rescheduling of the quarterly review\n\n"
            "Dear Ms. Okafor,\n\n"
            "Thank you for your message of 14 October. Unfortunately, two members of the audit team will be "
            "travelling during the week of the 21st, so we would like to propose moving the quarterly review to "
            "Tuesday, 29 October, at 10:00. The meeting will take place in conference room B on the third floor, "
            "and a video link will be available for colleagues joining from the Lyon office.\n\n"
            "Please find attached the draft agenda and the updated figures for the third quarter. If the new date "
            "does not suit you, let me know and I will"
        ),
    ),
    (
        "russian_chinese",
        (
            "Москва — столица России и крупнейший город страны. Через центр города протекает река Москва, а на её "
            "берегу стоит Кремль. Зимой температура часто опускается ниже нуля, и люди катаются на коньках в парках.\n"
            "北京是中国的首都，有三千多年的历史。故宫、天坛和长城每年吸引数百万游客。春天的北京常常刮风，秋天是最好的季节。\n"
            "서울은 한국의 수도이며 한강이 도시를 가로질러 흐른다.\n"
            "The three passages above describe"
        ),
    ),
    (
        "javascript_html",
        (
            "<!doctype html>\n"
            "<html lang=\"en\">\n"
            "<head><meta charset=\"utf-8\"><title>Counter</title></head>\n"
            "<body>\n"
            "  <button id=\"dec\">-</button>\n"
            "  <span id=\"value\">0</span>\n"
            "  <button id=\"inc\">+</button>\n"
            "  <script>\n"
            "    const value = document.getElementById('value');\n"
            "    let count = Number(localStorage.getItem('count') ?? 0);\n"
            "    const render = () => {\n"
            "      value.textContent = String(count);\n"
            "      localStorage.setItem('count', count);\n"
            "    };\n"
            "    document.getElementById('inc').addEventListener('click', () => { count += 1; render(); });\n"
            "    document.getElementById('dec').addEventListener('click', () => {"
        ),
    ),
    (
        "table_and_list",
        (
            "| Planet  | Distance from the Sun (AU) | Moons | Day length (hours) |\n"
            "|---------|----------------------------|-------|--------------------|\n"
            "| Mercury | 0.39                       | 0     | 4222.6             |\n"
            "| Venus   | 0.72                       | 0     | 2802.0             |\n"
            "| Earth   | 1.00                       | 1     | 24.0               |\n"
            "| Mars    | 1.52                       | 2     | 24.7               |\n"
            "| Jupiter | 5.20                       | 95    | 9.9                |\n\n"
            "Key points:\n"
            "* The inner planets are small and rocky.\n"
            "* The outer planets are gas or ice giants with many moons.\n"
            "* A day on Venus is longer than its year.\n"
            "* Mars has two small moons, Phobos and"
        ),
    ),
    (
        "chat_code_answer",
        (
            "<|im_start|>user\nHow do I reverse a string in Python?<|im_end|>\n"
            "<|im_start|>assistant\nUse slicing with a step of -1:\n\n"
            "```python\ntext = \"hello\"\nreversed_text = text[::-1]\nprint(reversed_text)  # olleh\n```\n\n"
            "Slicing returns a new string, because strings in Python are immutable.<|im_end|>\n"
            "<|im_start|>user\nAnd a list? Can I reverse it in place?<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
    ),
    (
        "poem_and_history",
        (
            "The tide comes in across the sand,\n"
            "and writes its name in foam and light;\n"
            "it takes the castles children planned\n"
            "and leaves the shore all smooth by night.\n\n"
            "In 1869 the Suez Canal opened, linking the Mediterranean Sea with the Red Sea and shortening the voyage "
            "from Europe to India by about 7,000 kilometres. Its construction took ten years and employed tens of "
            "thousands of workers. The canal has no locks, because the two seas lie at almost the same level, and "
            "today around fifty ships pass through it"
        ),
    ),
]


def cache_dir() -> Path:
    """$SHARDLINE_CACHE, else $XDG_CACHE_HOME/shardline, else ~/.cache/shardline (as shardline itself)."""
    if os.environ.get("SHARDLINE_CACHE"):
        return Path(os.environ["SHARDLINE_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shardline"


def default_model_path() -> Path:
    env = os.environ.get("SHARDLINE_MODEL")
    if env:
        return Path(env)
    return cache_dir() / "models" / MODEL_FILE


def preset_path(preset: str) -> Path:
    return cache_dir() / "presets" / f"{PRESET_STEM}.{preset}.gguf"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def logits_row(llm, index: int) -> np.ndarray:
    """Raw float32 logits of one evaluated position (requires logits_all=True)."""
    return np.asarray(llm.scores[index], dtype=np.float32)


def greedy(llm, prompt_tokens: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation: argmax of llama.cpp's logits at every step, one token evaluated at a time.

    Also returns each step's margin (top-1 minus top-2 logit): a step with a margin below the numerical noise of the
    implementations compared is a near-tie, after which exact agreement of the continuation cannot be expected.
    """
    llm.reset()
    llm.eval(prompt_tokens)
    out: list[int] = []
    margins: list[float] = []
    for _ in range(GREEDY_TOKENS):
        row = logits_row(llm, llm.n_tokens - 1)
        top2 = np.partition(row, row.size - 2)[-2:]
        token = int(np.argmax(row))
        out.append(token)
        margins.append(round(float(top2[1] - top2[0]), DECIMALS))
        llm.eval([token])
    return out, margins


def self_consistency(llm, tokens: list[int], batched: np.ndarray) -> dict:
    """How far llama.cpp's token-by-token evaluation is from its one-pass evaluation of the same tokens.

    Both are llama.cpp; the difference comes from the order of floating-point work in attention, amplified by the
    Q8 quantization of activations. It is the noise floor against which another implementation can be judged.
    """
    llm.reset()
    for token in tokens:
        llm.eval([token])
    stepwise = np.asarray(llm.scores[: len(tokens)], dtype=np.float32)
    diff = np.abs(stepwise - batched)
    return {
        "max_abs_logit_diff": round(float(diff.max()), DECIMALS),
        "mean_abs_logit_diff": round(float(diff.mean()), DECIMALS),
        "top1_agreement": round(float((stepwise.argmax(axis=1) == batched.argmax(axis=1)).mean()), DECIMALS),
    }


def sampler_greedy(llm, prompt_tokens: list[int]) -> list[int]:
    """The same continuation from llama.cpp's own sampler chain configured to be greedy (cross-check)."""
    out: list[int] = []
    gen = llm.generate(
        prompt_tokens,
        top_k=1,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        temp=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        reset=True,
    )
    for token in gen:
        out.append(int(token))
        if len(out) == GREEDY_TOKENS:
            break
    return out


def teacher_forced(llm, tokens: list[int]) -> tuple[dict, np.ndarray]:
    """Evaluates all tokens in one pass; summarises every position's logits and returns them all too."""
    llm.reset()
    llm.eval(tokens)
    # A copy: llm.scores is overwritten by the next evaluation.
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
    top_ids, top_logits, target_logits, lse = [], [], [], []
    for pos in range(len(tokens)):
        row = scores[pos]
        # Stable order: larger logit first, smaller id first on ties.
        order = np.lexsort((np.arange(row.size), -row))[:TOP_K]
        top_ids.append([int(i) for i in order])
        top_logits.append([round(float(row[i]), DECIMALS) for i in order])
        if pos + 1 < len(tokens):
            target_logits.append(round(float(row[tokens[pos + 1]]), DECIMALS))
        m = float(row.max())
        lse.append(round(m + float(np.log(np.exp((row - m).astype(np.float64)).sum())), DECIMALS))
    summary = {
        "top_ids": top_ids,
        "top_logits": top_logits,
        "target_logits": target_logits,
        "logsumexp": lse,
    }
    return summary, scores


def open_llama(model: Path, n_threads: int):
    """llama.cpp with every position's logits kept, and whether the file asks for a BOS token."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    return llm, llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"


def generator_info() -> dict:
    """Which command, llama-cpp-python version and machine produced a fixture, and when."""
    import llama_cpp

    return {
        "command": " ".join(["scripts/make-reference.py"] + sys.argv[1:]),
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def common_settings(n_threads: int, add_bos: bool) -> dict:
    return {
        "n_threads": n_threads,
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "add_bos": add_bos,
        "parse_special": True,
        "greedy_tokens": GREEDY_TOKENS,
    }


def build(model: Path, n_threads: int) -> dict:
    llm, add_bos = open_llama(model, n_threads)
    cases = []
    for name, text in PROMPTS:
        prompt_tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        continuation, margins = greedy(llm, prompt_tokens)
        via_sampler = sampler_greedy(llm, prompt_tokens)
        if via_sampler != continuation:
            raise SystemExit(
                f"{name}: llama.cpp's greedy sampler disagrees with argmax: {via_sampler} vs {continuation}"
            )
        all_tokens = prompt_tokens + continuation
        forced, scores = teacher_forced(llm, all_tokens)
        n = len(prompt_tokens)
        forced_pred = [ids[0] for ids in forced["top_ids"][n - 1 : n - 1 + GREEDY_TOKENS]]
        cases.append(
            {
                "name": name,
                "prompt": text,
                "prompt_tokens": prompt_tokens,
                "continuation_tokens": continuation,
                "continuation_text": llm.detokenize(continuation, prev_tokens=prompt_tokens, special=True).decode(
                    "utf-8", errors="replace"
                ),
                "continuation_margins": margins,
                "teacher_forced_greedy_prefix": common_prefix(forced_pred, continuation),
                "llamacpp_self_consistency": self_consistency(llm, all_tokens, scores),
                "positions": forced,
            }
        )
        print(
            f"{name}: {len(prompt_tokens)} prompt tokens, continuation {continuation_preview(cases[-1])}",
            file=sys.stderr,
        )
    llm.close()

    return {
        "format": "shardline-llamacpp-reference/1",
        "generator": generator_info(),
        "model": {"file": MODEL_FILE, "sha256": sha256_file(model), "size": model.stat().st_size},
        "settings": {
            **common_settings(n_threads, add_bos),
            "top_k": TOP_K,
            "logit_decimals": DECIMALS,
            "positions": "row i holds the logits after tokens[0..=i] of prompt_tokens + continuation_tokens; "
            "target_logits[i] is the logit of tokens[i+1]",
        },
        "cases": cases,
    }


def build_compact(model: Path, preset: str, n_threads: int, with_self_consistency: bool = True) -> dict:
    """The compact fixture of one preset file: top-1 id, logit and margin per teacher-forced position."""
    llm, add_bos = open_llama(model, n_threads)
    cases = []
    for name, text in compact_prompts():
        prompt_tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        continuation, _ = greedy(llm, prompt_tokens)
        all_tokens = prompt_tokens + continuation
        llm.reset()
        llm.eval(all_tokens)
        scores = np.array(llm.scores[: len(all_tokens)], dtype=np.float32, copy=True)
        top1, logits, margins = [], [], []
        for row in scores:
            order = np.lexsort((np.arange(row.size), -row))[:2]
            top1.append(int(order[0]))
            logits.append(round(float(row[order[0]]), DECIMALS))
            margins.append(round(float(row[order[0]] - row[order[1]]), DECIMALS))
        case = {
            "name": name,
            "prompt": text,
            "prompt_tokens": prompt_tokens,
            "continuation_tokens": continuation,
        }
        if with_self_consistency:
            sc = self_consistency(llm, all_tokens, scores)
            # The count too, so agreement can be pooled over cases exactly.
            sc["top1_agreeing_positions"] = round(sc["top1_agreement"] * len(all_tokens))
            case["llamacpp_self_consistency"] = sc
        case["positions"] = {"top1_ids": top1, "top1_logits": logits, "top1_margins": margins}
        cases.append(case)
        print(f"{preset} {name}: {len(prompt_tokens)} prompt tokens, {continuation_preview_of(llm, continuation, prompt_tokens)}", file=sys.stderr)
    llm.close()
    return {
        "format": "shardline-llamacpp-reference-compact/2",
        "generator": generator_info(),
        "preset": preset,
        "model": {"file": model.name, "sha256": sha256_file(model), "size": model.stat().st_size},
        "settings": {
            **common_settings(n_threads, add_bos),
            "logit_decimals": DECIMALS,
            "positions": "entry i is about the logits after tokens[0..=i] of prompt_tokens + continuation_tokens: "
            "the arg-max token (smaller id on ties), its logit and its margin over the second largest logit",
        },
        "cases": cases,
    }


def compact_prompts() -> list[tuple[str, str]]:
    """The prompts of a compact fixture: COMPACT_CASES, then `long`, then EXTRA_PROMPTS."""
    by_name = dict(PROMPTS)
    rest = [(n, t) for n, t in PROMPTS if n not in COMPACT_CASES]
    return [(n, by_name[n]) for n in COMPACT_CASES] + rest + EXTRA_PROMPTS


def continuation_preview_of(llm, continuation: list[int], prompt_tokens: list[int]) -> str:
    text = llm.detokenize(continuation, prev_tokens=prompt_tokens, special=True).decode("utf-8", errors="replace")
    return json.dumps(text[:60], ensure_ascii=False)


def check_cases(new: dict, old_path: Path) -> bool:
    """Whether every case of the stored compact fixture `old_path` is regenerated identically (same name; the fields
    both have are compared, so a fixture made before a field was added still checks)."""
    if not old_path.is_file():
        print(f"  no stored fixture at {old_path} to check against", file=sys.stderr)
        return True
    old = json.loads(old_path.read_text(encoding="utf-8"))
    if old["model"] != new["model"]:
        print(f"  {old_path}: other model file ({old['model']['sha256']} vs {new['model']['sha256']})", file=sys.stderr)
        return False
    by_name = {c["name"]: c for c in new["cases"]}
    ok = True
    for case in old["cases"]:
        mine = by_name.get(case["name"])
        # A field left out of this run (llamacpp_self_consistency with --no-self-consistency) is not compared.
        keys = [k for k in case if mine is not None and k in mine]
        same = mine is not None and "positions" in keys and all(mine[k] == case[k] for k in keys)
        left = sorted(set(case) - set(keys))
        print(
            f"  case {case['name']}: {'identical' if same else 'DIFFERS'} to {old_path}"
            + (f" (not compared: {', '.join(left)})" if left else ""),
            file=sys.stderr,
        )
        ok &= same
    return ok


def write_presets(
    presets: list[str], n_threads: int, require: bool, out_dir: Path, check_dir: Path | None, self_cons: bool
) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for preset in presets:
        model = preset_path(preset)
        if not model.is_file():
            if require:
                print(f"{model} is missing; run scripts/make-presets", file=sys.stderr)
                return 2
            print(f"skipped {preset}: {model} is missing (scripts/make-presets makes it)", file=sys.stderr)
            continue
        data = build_compact(model, preset, n_threads, self_cons)
        if check_dir is not None and not check_cases(data, check_dir / f"{preset}.json"):
            failed.append(preset)
        out = out_dir / f"{preset}.json"
        out.write_text(dumps(data) + "\n", encoding="utf-8")
        n = sum(len(c["positions"]["top1_ids"]) for c in data["cases"])
        print(f"wrote {out} ({out.stat().st_size} bytes, {n} positions)", file=sys.stderr)
    if failed:
        print(f"regenerated cases differ from the stored ones for {failed}", file=sys.stderr)
        return 1
    return 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_preview(case: dict) -> str:
    return json.dumps(case["continuation_text"][:60], ensure_ascii=False)


def dumps(value, indent: int = 0) -> str:
    """JSON with objects indented and every list of scalars (or row of a matrix) on one line, to stay compact."""
    pad = " " * indent
    inner = " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{dumps(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: $SHARDLINE_MODEL or cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture to write")
    parser.add_argument(
        "--threads",
        type=int,
        default=N_THREADS,
        help="llama.cpp threads (the data do not depend on it; 1 is much faster on a busy machine)",
    )
    parser.add_argument("--check", type=Path, default=None, help="compare against this fixture instead of writing")
    parser.add_argument("--preset", choices=PRESETS, action="append", help="write the compact fixture of a preset")
    parser.add_argument("--all-presets", action="store_true", help="compact fixtures of every preset file present")
    parser.add_argument("--preset-out", type=Path, default=PRESET_OUT, help="folder of the compact fixtures written")
    parser.add_argument(
        "--check-cases",
        type=Path,
        default=None,
        help="folder of stored compact fixtures: fail unless each of their cases is regenerated identically",
    )
    parser.add_argument(
        "--no-self-consistency",
        action="store_true",
        help="compact fixtures without llama.cpp's token-by-token evaluation (faster)",
    )
    args = parser.parse_args()

    if args.preset or args.all_presets:
        return write_presets(
            args.preset or PRESETS,
            args.threads,
            require=bool(args.preset),
            out_dir=args.preset_out,
            check_dir=args.check_cases,
            self_cons=not args.no_self_consistency,
        )

    model = args.model or default_model_path()
    if not model.is_file():
        print(f"model not found at {model}, run scripts/fetch-model.sh", file=sys.stderr)
        return 2
    data = build(model, args.threads)

    if args.check:
        old = json.loads(args.check.read_text(encoding="utf-8"))
        # The thread count changes how work is split, not the results, so it is left out of the comparison.
        old_settings = {k: v for k, v in old["settings"].items() if k != "n_threads"}
        new_settings = {k: v for k, v in data["settings"].items() if k != "n_threads"}
        same = old["cases"] == data["cases"] and old["model"] == data["model"] and old_settings == new_settings
        if not same:
            for a, b in zip(old["cases"], data["cases"]):
                if a != b:
                    print(f"case {a['name']} differs", file=sys.stderr)
            print(f"{args.check}: regenerated data differ", file=sys.stderr)
            return 1
        print(
            f"{args.check}: regenerated data ({args.threads} threads) are identical to the fixture "
            f"({old['settings']['n_threads']} threads)",
            file=sys.stderr,
        )
        return 0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(data) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
