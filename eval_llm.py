"""Chat with a trained MiniMind from the command line.

    python eval_llm.py --weight full_sft                         # out/full_sft_512.pth, interactive
    python eval_llm.py --weight full_sft --lora_weight lora_identity --prompts "你是谁？"
    python eval_llm.py --load_from path/to/transformers_folder --prompt_file questions.txt
    echo "你好" | python eval_llm.py --weight full_sft --hidden_size 64 --num_hidden_layers 2

Without --prompts / --prompt_file, it reads prompts from standard input when that is not a terminal
(one per line), and asks interactively when it is. Answers stream token by token; --show_speed prints
tokens per second. --historys N keeps the last N messages of the conversation as context.
"""
import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO_ROOT)
from model.model_lora import apply_lora, load_lora  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_state_dict_strict  # noqa: E402


def lora_layout(state):
    """(rank, target Linear names) of a LoRA file, read from its tensor names and shapes."""
    targets = sorted({k.split(".lora.")[0].rsplit(".", 1)[-1] for k in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight"))
    return rank, targets


def load_model(args):
    """(model, tokenizer) from a native .pth (--weight) or a transformers folder (--load_from), + LoRA."""
    if args.load_from != "model":
        if not os.path.isdir(args.load_from):
            raise SystemExit(f"--load_from {args.load_from}: not a folder (expected a transformers model folder)")
        tokenizer = AutoTokenizer.from_pretrained(args.load_from)
        model = AutoModelForCausalLM.from_pretrained(args.load_from, trust_remote_code=True)
        hidden = model.config.hidden_size
    else:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
        config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                use_moe=bool(args.use_moe), inference_rope_scaling=args.inference_rope_scaling)
        model = MiniMindForCausalLM(config)
        path = os.path.join(args.save_dir, f"{args.weight}_{args.hidden_size}{'_moe' if args.use_moe else ''}.pth")
        if not os.path.exists(path):
            present = sorted(f for f in os.listdir(args.save_dir) if f.endswith(".pth")) if os.path.isdir(args.save_dir) else []
            raise SystemExit(f"{path} does not exist; {args.save_dir} holds: {', '.join(present) or 'no .pth files'}")
        load_state_dict_strict(model, torch.load(path, map_location="cpu", weights_only=True), source=path)
        hidden = args.hidden_size
    if args.lora_weight != "None":
        path = args.lora_weight if os.path.exists(args.lora_weight) else \
            os.path.join(args.save_dir, "lora", f"{args.lora_weight}_{hidden}.pth")
        if not os.path.exists(path):
            raise SystemExit(f"LoRA weight {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        rank, targets = lora_layout(state)
        apply_lora(model, rank=rank, alpha=args.lora_alpha, target_modules=targets)
        load_lora(model, state)
    return model.eval().to(args.device), tokenizer


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", default="model", help="'model' = native weights from --save_dir; "
                                                            "otherwise a transformers model folder")
    parser.add_argument("--save_dir", default="out")
    parser.add_argument("--weight", default="full_sft", help="out/{weight}_{hidden}[_moe].pth")
    parser.add_argument("--lora_weight", default="None", help="out/lora/{name}_{hidden}.pth, or a path")
    parser.add_argument("--lora_alpha", type=float, default=None, help="as used in training (default: none)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    parser.add_argument("--inference_rope_scaling", action="store_true", help="YaRN: 16x longer context")
    parser.add_argument("--max_new_tokens", type=int, default=8192)
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--historys", type=int, default=0, help="previous messages kept as context (even number)")
    parser.add_argument("--show_speed", type=int, default=1)
    parser.add_argument("--prompts", nargs="*", default=None, help="prompts to answer, then exit")
    parser.add_argument("--prompt_file", default=None, help="one prompt per line; '-' = standard input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.save_dir == parser.get_default("save_dir"):
        args.save_dir = os.path.join(REPO_ROOT, args.save_dir)

    model, tokenizer = load_model(args)
    streamer = PrintStreamer(tokenizer)
    history = []
    for prompt in prompts_from(args):
        if args.seed is not None:
            torch.manual_seed(args.seed)
        history = history[-args.historys:] if args.historys else []
        messages = history + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt").to(args.device)
        print(f"👶: {prompt}\n🤖: ", end="", flush=True)
        streamer.new_tokens = 0
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                    temperature=args.temperature or None, top_p=args.top_p if args.temperature > 0 else None,
                                    streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        if args.show_speed:
            print(f"[{streamer.new_tokens} tokens, {streamer.new_tokens / seconds:.1f} tokens/s]")
        print(flush=True)
        history = messages + [{"role": "assistant", "content": answer}]


if __name__ == "__main__":
    main()
