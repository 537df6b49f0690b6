#!/usr/bin/env python3
"""Checks a running shardline coordinator's HTTP API with the official `openai` Python package, unchanged.

Start a swarm first (a coordinator with `--http` and nodes covering every layer), then:

  scripts/test-openai.py --base-url http://127.0.0.1:8080/v1 --model SmolLM2-135M-Instruct.Q4_1

Checks, greedy so that every answer is reproducible:
  * models.list() lists the model;
  * chat.completions and completions, not streamed: text, finish reason and usage are present and consistent;
  * the same requests streamed: the chunks add up to exactly the non-streamed text, the stream ends cleanly, and
    with stream_options.include_usage the last chunk carries the same usage;
  * log-probabilities (chat and completions), streamed and not: the chunks' entries add up to the non-streamed ones;
  * errors reach the client as the package's typed exceptions: NotFoundError (unknown model), BadRequestError
    (max_tokens over the context).
Exits non-zero on the first failed check; prints one line per check.
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="API root including /v1, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True, help="model name as GET /v1/models lists it")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    n = args.max_tokens

    ids = [m.id for m in client.models.list().data]
    check(args.model in ids, f"models.list() lists {args.model} ({ids})")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=args.model, messages=messages, max_tokens=n, temperature=0, seed=1)
    choice = chat.choices[0]
    check(chat.object == "chat.completion", "chat: object is chat.completion")
    check(choice.message.role == "assistant", "chat: assistant message")
    check(choice.finish_reason in ("stop", "length"), f"chat: finish_reason {choice.finish_reason}")
    usage = chat.usage
    check(usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= n, f"chat: usage {usage}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "chat: total_tokens adds up")
    print(f"     chat text: {choice.message.content!r}")

    stream = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=n,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, stream_usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            stream_usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(pieces) == choice.message.content, "chat stream: chunks add up to the non-streamed text")
    check(finish == choice.finish_reason, f"chat stream: finish_reason {finish}")
    check(stream_usage is not None and stream_usage.completion_tokens == usage.completion_tokens,
          f"chat stream: usage in the last chunk ({stream_usage})")

    prompt = "The capital of France is"
    comp = client.completions.create(model=args.model, prompt=prompt, max_tokens=n, temperature=0, seed=1)
    check(comp.object == "text_completion", "completions: object is text_completion")
    check(comp.usage.completion_tokens > 0, f"completions: usage {comp.usage}")
    text = comp.choices[0].text
    print(f"     completion text: {text!r}")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=args.model, prompt=prompt, max_tokens=n, temperature=0, seed=1, stream=True
        )
        if c.choices
    )
    check(streamed == text, "completions stream: chunks add up to the non-streamed text")

    chat_lp = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=n, temperature=0, seed=1, logprobs=True, top_logprobs=2
    )
    want = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
            for t in chat_lp.choices[0].logprobs.content]
    got = []
    for chunk in client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=n, temperature=0, seed=1, logprobs=True, top_logprobs=2,
        stream=True,
    ):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                got += [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in c.logprobs.content]
    check(len(want) > 0 and got == want, f"chat stream: logprobs of {len(got)} tokens equal the non-streamed ones")

    comp_lp = client.completions.create(model=args.model, prompt=prompt, max_tokens=n, temperature=0, seed=1, logprobs=2)
    want = (comp_lp.choices[0].logprobs.tokens, comp_lp.choices[0].logprobs.token_logprobs,
            comp_lp.choices[0].logprobs.text_offset)
    got = ([], [], [])
    for chunk in client.completions.create(
        model=args.model, prompt=prompt, max_tokens=n, temperature=0, seed=1, logprobs=2, stream=True
    ):
        for c in chunk.choices:
            if c.logprobs:
                got[0].extend(c.logprobs.tokens)
                got[1].extend(c.logprobs.token_logprobs)
                got[2].extend(c.logprobs.text_offset)
    check(len(want[0]) > 0 and got == want, f"completions stream: logprobs of {len(got[0])} tokens equal the non-streamed ones")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        check(False, "unknown model raises NotFoundError")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model raises NotFoundError (404)")
    try:
        client.completions.create(model=args.model, prompt=prompt, max_tokens=10_000_000)
        check(False, "max_tokens over the context raises BadRequestError")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "max_tokens over the context raises BadRequestError (400)")
    print("all checks passed")


if __name__ == "__main__":
    main()
