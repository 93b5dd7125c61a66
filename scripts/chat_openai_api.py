"""Chat in the terminal with any OpenAI-compatible server, by default scripts/serve_openai_api.py.

    python scripts/serve_openai_api.py --weight full_sft &        # in one terminal
    python scripts/chat_openai_api.py                              # interactive
    python scripts/chat_openai_api.py --prompts "你好" "你是谁？" --temperature 0

Answers stream as they are generated; --historys N sends the last N messages as context.
"""
import argparse
import os
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    parser.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY", "none"))
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--historys", type=int, default=0, help="previous messages sent as context (even number)")
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--max_tokens", type=int, default=1024)
    parser.add_argument("--stream", type=int, default=1, choices=[0, 1])
    parser.add_argument("--prompts", nargs="*", default=None, help="prompts to send, then exit")
    args = parser.parse_args()
    from openai import OpenAI  # imported after parsing, so that --help answers at once

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    prompts = iter(args.prompts) if args.prompts is not None else iter(lambda: input("👶: "), None)
    history = []
    for prompt in prompts:
        if not prompt.strip():
            continue
        messages = (history[-args.historys:] if args.historys else []) + [{"role": "user", "content": prompt}]
        if args.prompts is not None:
            print(f"👶: {prompt}")
        print("🤖: ", end="", flush=True)
        settings = dict(model=model, messages=messages, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_tokens)
        # reasoning (the server's reasoning_content) is shown after 💭 and not sent back as context
        if args.stream:
            answer, thinking = "", False
            for chunk in client.chat.completions.create(stream=True, **settings):
                delta = chunk.choices[0].delta if chunk.choices else None
                reasoning = (delta.model_extra or {}).get("reasoning_content") if delta else None
                if reasoning:
                    print(reasoning if thinking else f"💭 {reasoning}", end="", flush=True)
                    thinking = True
                if delta and delta.content:
                    print(("\n🤖: " if thinking else "") + delta.content, end="", flush=True)
                    answer, thinking = answer + delta.content, False
        else:
            message = client.chat.completions.create(**settings).choices[0].message
            reasoning, answer = (message.model_extra or {}).get("reasoning_content"), message.content or ""
            print((f"💭 {reasoning}\n🤖: " if reasoning else "") + answer, end="")
        print("\n")
        history = messages + [{"role": "assistant", "content": answer}]


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, EOFError):
        sys.exit(0)
