"""Chat with a trained MiniMind from the command line.

    python eval_llm.py --weight full_sft                         # out/full_sft_512.pth, interactive
    python eval_llm.py --weight full_sft --lora_weight lora_identity --prompts "你是谁？"
    python eval_llm.py --load_from path/to/transformers_folder --prompt_file questions.txt
    echo "你好" | python eval_llm.py --weight full_sft --hidden_size 64 --num_hidden_layers 2

Without --prompts / --prompt_file, it reads prompts from standard input when that is not a terminal
(one per line), and asks interactively when it is. Answers stream token by token; --show_speed prints
tokens per second. --historys N keeps the last N messages of the conversation as context.

--tools 1 offers the tools of inference/tools.py (calculator, dictionary, calendar): when the answer is a
<tool_call>, the call is run, its result goes back as a tool message and the model answers again (at most
--tool_rounds times per prompt).

--open_thinking 1 lets a reasoning model think first (minimind-3's template then opens the <think> block in the
prompt), 0 asks for an answer without it. A minimind-3 weight needs the tokenizer it was trained with: a released
folder ships it (--load_from minimind-3), a .pth takes --tokenizer_dir minimind-3.
"""
import argparse
import json
import os
import sys
import time

from common.cli import HelpFormatter, show_defaults
from inference.paths import add_model_arguments, resolve_paths


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--max_new_tokens", type=int, default=512,
                        help="answer length limit (MiniMind's 8192 lets a small model loop for minutes)")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--historys", type=int, default=0, help="previous messages kept as context (even number)")
    parser.add_argument("--show_speed", type=int, default=1)
    parser.add_argument("--prompts", nargs="*", default=None, help="prompts to answer, then exit")
    parser.add_argument("--prompt_file", default=None, help="one prompt per line; '-' = standard input")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tools", type=int, default=0, choices=[0, 1],
                        help="1 = offer calculator, dictionary and calendar, and run the calls the model makes")
    parser.add_argument("--tool_rounds", type=int, default=3, help="tool calls run per prompt, at most")
    parser.add_argument("--open_thinking", type=int, default=None, choices=[0, 1],
                        help="1 = let the model reason first (minimind-3's template opens <think>), 0 = an empty "
                             "think block; default: the chat template's own")
    return show_defaults(parser).parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch
from transformers import TextStreamer

from common.chat import opened_think, render
from inference.chat_core import load_chat_model, tool_turn
from inference.tools import TOOLS


def load_model(args):
    """(model, tokenizer) from a native .pth (--weight) or a transformers folder (--load_from), + LoRA."""
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)
    print(f"loaded {os.path.relpath(path)}{' + LoRA ' + os.path.relpath(lora_path) if lora_path else ''} "
          f"on {chat.device} ({str(next(chat.model.parameters()).dtype).removeprefix('torch.')})", flush=True)
    return chat.model, chat.tokenizer


class PrintStreamer(TextStreamer):
    """Prints decoded text as it is generated and counts the new tokens."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.new_tokens = 0

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.new_tokens += value.numel()
        super().put(value)


def prompts_from(args):
    if args.prompts:
        return iter(args.prompts)
    if args.prompt_file:
        stream = sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")
        return (line.strip() for line in stream if line.strip())
    if not sys.stdin.isatty():
        return (line.strip() for line in sys.stdin if line.strip())

    def interactive():
        while True:
            try:
                text = input("👶: ").strip()
            except EOFError:
                return
            if text:
                yield text
    return interactive()


def print_calls(calls, results):
    for call, result in zip(calls, results):
        print(f"🔧 {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {result}", flush=True)


def main(args):
    model, tokenizer = load_model(args)
    streamer = PrintStreamer(tokenizer)
    tools = TOOLS if args.tools else None

    def generate(messages):
        thinking = None if args.open_thinking is None else bool(args.open_thinking)
        text = render(tokenizer, messages, tools, thinking=thinking, generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        # a prompt that opened <think> leaves the reply without it: put it back, so the reply reads whole
        opened = opened_think(tokenizer, inputs["input_ids"][0].tolist())
        print("🤖: " + opened, end="", flush=True)
        streamer.new_tokens = 0
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                    temperature=args.temperature or None, top_p=args.top_p if args.temperature > 0 else None,
                                    streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
        if args.show_speed:
            print(f"[{streamer.new_tokens} tokens, {streamer.new_tokens / seconds:.1f} tokens/s]")
        return opened + tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    history = []
    for prompt in prompts_from(args):
        if args.seed is not None:
            torch.manual_seed(args.seed)
        history = history[-args.historys:] if args.historys else []
        messages = history + [{"role": "user", "content": prompt}]
        print(f"👶: {prompt}", flush=True)
        messages += tool_turn(generate, messages, tools, args.tool_rounds, on_calls=print_calls)
        print(flush=True)
        history = messages


if __name__ == "__main__":
    main(args)
