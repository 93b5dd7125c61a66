"""Train MiniMind's byte-level BPE tokenizer (6400 tokens) and write model/tokenizer.json + tokenizer_config.json.

    python scripts/train_tokenizer.py                                      # the bundled demo corpus
    python scripts/train_tokenizer.py --data_path dataset/pretrain_hq.jsonl # the full MiniMind pretraining data

Ids 0/1/2 are <|endoftext|> (padding, unknown), <|im_start|> (bos) and <|im_end|> (eos). The reasoning and
tool tags <think> </think> <answer> </answer> <tool_call> </tool_call> are single tokens (ids 3-8), added
as ordinary (non-special) tokens so that decoding with skip_special_tokens=True keeps them. Calling the
tokenizer adds no special tokens; the ChatML chat template adds them.
"""
import argparse
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>"]
DEMO_CORPUS = ["dataset/demo/pretrain.jsonl", "dataset/demo/sft.jsonl", "dataset/demo/r1.jsonl"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"

# ChatML (Qwen style): a default system prompt when none is given, a <tools> block when tools are passed,
# tool calls as <tool_call> JSON, tool results as <tool_response> in a user turn, and an empty think
# block after the generation prompt when enable_thinking=False.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}"
    "{%- else %}{{- '" + DEFAULT_SYSTEM_PROMPT + "\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for tool_call in (message.tool_calls or []) %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- if loop.first and not message.content %}{{- '<tool_call>\\n' }}{%- else %}{{- '\\n<tool_call>\\n' }}{%- endif %}"
    "{{- '{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def iter_texts(paths):
    """Every text in the JSONL files: the "text" of pretraining rows, each message of conversations."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {line_number}: not valid JSON ({err})") from None
                if "text" in row:
                    yield row["text"]
                for key in ("conversations", "chosen", "rejected"):
                    for message in row.get(key) or []:
                        yield message["content"]


def train(paths, vocab_size=6400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + TAG_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(iter_texts(paths), trainer=trainer)
    # The tags keep ids 3-8 from the trainer; registering them as added tokens makes each one token
    # wherever it appears, while special=False keeps them through skip_special_tokens.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    for i, token in enumerate(SPECIAL_TOKENS + TAG_TOKENS):
        assert tokenizer.token_to_id(token) == i, token
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def chars_per_token(tokenizer: Tokenizer, texts) -> float:
    texts = list(texts)
    return sum(len(t) for t in texts) / max(1, sum(len(tokenizer.encode(t).ids) for t in texts))


def held_out_report(tokenizer: Tokenizer, path=os.path.join(REPO_ROOT, "dataset/demo/pretrain_eval.jsonl")):
    """Characters per token on held-out demo text, Chinese and English documents separately."""
    if not os.path.exists(path):
        return ""
    texts = list(iter_texts([path]))
    chinese = [t for t in texts if sum("\u4e00" <= c <= "\u9fff" for c in t) > len(t) / 3]
    english = [t for t in texts if t.isascii()]
    return (f"held-out characters per token: Chinese {chars_per_token(tokenizer, chinese):.2f} "
            f"({len(chinese)} docs), English {chars_per_token(tokenizer, english):.2f} ({len(english)} docs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+", default=None,
                        help="JSONL files with 'text' or 'conversations' rows (default: the demo corpus)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "model"))
    args = parser.parse_args()
    paths = args.data_path or [os.path.join(REPO_ROOT, p) for p in DEMO_CORPUS]
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"{path} does not exist (full data: python scripts/download_data.py pretrain_hq.jsonl)")
    tokenizer = train(paths, args.vocab_size)
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer.save(os.path.join(args.out_dir, "tokenizer.json"))
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"trained on {', '.join(os.path.relpath(p) for p in paths)}: vocab {tokenizer.get_vocab_size()}, "
          f"written to {args.out_dir}")
    print(held_out_report(tokenizer))


if __name__ == "__main__":
    main()
