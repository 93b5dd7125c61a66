"""Score a model's tool calls on held-out requests: is its reply a valid call, of the right tool, with the
right arguments?

    python scripts/eval_toolcall.py --save_dir out/demo --weight full_sft --hidden_size 192
    python scripts/eval_toolcall.py --load_from MiniMind2-Small --data my_requests.jsonl --output calls.json

Each row of --data (default: the demo's tools_eval.jsonl files) is {"conversations": [{"role": "user", ...}, ...],
"tools": [...], "call": {"name", "arguments"}}: the first user turn is asked with the row's tools offered, the
greedy reply is read the way the server reads it (<tool_call> JSON blocks, common/chat.py split_reply), and
its first call is compared with "call". Arguments count as right when the tool gives the same result for them
as for the expected ones (so "12*7" and "12 * 7" are both right), and that result is not an error.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from inference.paths import REPO_ROOT, add_model_arguments, resolve_paths

DEMO_REQUESTS = [os.path.join(REPO_ROOT, "dataset", "demo", "tools_eval.jsonl"),
                 os.path.join(REPO_ROOT, "dataset", "demo", "cedict", "tools_eval.jsonl")]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", default=",".join(DEMO_REQUESTS), help="comma-separated JSONL files of requests")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="at most this many requests (0 = all)")
    parser.add_argument("--output", default=None, help="also write every reply and its scores as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

from common.chat import render, split_reply
from inference.chat_core import greedy_replies, load_chat_model
from inference.tools import run_tool


def read_requests(paths):
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                call = row.get("call")
                if not (isinstance(row.get("conversations"), list) and isinstance(row.get("tools"), list)
                        and isinstance(call, dict) and isinstance(call.get("name"), str)
                        and isinstance(call.get("arguments"), dict)):
                    raise SystemExit(f'{path}, line {number}: expected {{"conversations": [...], "tools": [...], '
                                     f'"call": {{"name": string, "arguments": object}}}}')
                rows.append(row)
    return rows


def score_call(text, expected):
    """{valid, right_tool, right_arguments} of one reply against the expected call."""
    _, _, calls = split_reply(text)
    valid = calls is not None
    right_tool = valid and calls[0]["name"] == expected["name"]
    result = run_tool(expected["name"], calls[0]["arguments"]) if right_tool else None
    right_arguments = right_tool and result == run_tool(expected["name"], expected["arguments"]) \
        and "error" not in json.loads(result)
    return dict(valid=valid, right_tool=right_tool, right_arguments=right_arguments)


def tool_call_scores(model, tokenizer, rows, batch_size=16, max_new_tokens=48):
    """Per row: its kind, the greedy reply to its first user turn (its tools offered) and score_call's answers."""
    prompts = [render(tokenizer, [next(m for m in r["conversations"] if m["role"] == "user")], r["tools"],
                      generation_prompt=True) for r in rows]
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [dict(kind=r.get("kind", r["call"]["name"]), reply=t, **score_call(t, r["call"])) for r, t in zip(rows, replies)]


def main(args):
    paths = [p for p in args.data.split(",") if p]
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"{path} does not exist")
    rows = read_requests(paths)[:args.limit or None]
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)
    scores = tool_call_scores(chat.model, chat.tokenizer, rows, args.batch_size)
    kinds = sorted({s["kind"] for s in scores})
    print(f"{'requests':24s} {'n':>5s} {'valid call':>11s} {'right tool':>11s} {'right arguments':>16s}")
    for kind in kinds + ["all"]:
        group = [s for s in scores if kind in ("all", s["kind"])]
        rates = [100 * sum(s[key] for s in group) / len(group) for key in ("valid", "right_tool", "right_arguments")]
        print(f"{kind:24s} {len(group):5d} {rates[0]:10.1f}% {rates[1]:10.1f}% {rates[2]:15.1f}%")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"model": chat.name, "scores": scores}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(args)
