"""Score a trained MiniMind on multiple-choice benchmarks in the C-Eval / CMMLU CSV layout.

    python scripts/eval_benchmark.py --data_dir ceval-exam/val --weight full_sft
    python scripts/eval_benchmark.py --data_dir cmmlu/test --load_from MiniMind2-Small --output cmmlu.json

Every *.csv in --data_dir is one subject (its file name without _val / _dev / _test). Columns, in any
order and case: question, A, B, C, D, answer (C-Eval also has id and explanation; CMMLU an unnamed
index), read as UTF-8. No generation: the model reads the prompt below and its next-token
probabilities of "A", "B", "C" and "D" are compared; the most probable letter is its answer
(zero-shot). With --prompt_style chat (default) the prompt is the user turn of the chat template
followed by the assistant's generation prompt; with plain it is the bare text:

    以下是关于{subject}的单项选择题，请直接给出正确答案的选项。

    {question}
    A. {A}
    B. {B}
    C. {C}
    D. {D}
    答案：

Prints accuracy per subject and overall (over all questions, and the mean over subjects).
"""
import argparse
import csv
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from inference.paths import add_model_arguments, resolve_paths


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a folder of C-Eval / CMMLU style CSV files")
    add_model_arguments(parser)
    parser.add_argument("--prompt_style", default="chat", choices=["chat", "plain"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="at most this many questions per subject (0 = all)")
    parser.add_argument("--output", default=None, help="also write the scores (and every prediction) as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.chat import render
from inference.chat_core import load_chat_model
from trainer.rl.sampling import encode_prompts, positions  # the RL stages' left padding


CHOICES = "ABCD"
PROMPT = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n{question}\n" \
         "A. {A}\nB. {B}\nC. {C}\nD. {D}\n答案："


def subject_of(path):
    return re.sub(r"_(val|dev|test)$", "", os.path.splitext(os.path.basename(path))[0])


def read_questions(path):
    """[{question, A, B, C, D, answer, line}] of one CSV; errors name the file, line and what was expected."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        missing = [c for c in ("question", "a", "b", "c", "d", "answer") if c not in columns]
        if missing:
            raise SystemExit(f"{path}: missing column(s) {', '.join(missing)}; expected question, A, B, C, D, answer "
                             f"(found: {', '.join(reader.fieldnames or []) or 'no header'})")
        questions = []
        for row in reader:
            item = {key: (row[columns[key.lower()]] or "").strip() for key in ("question", *CHOICES, "answer")}
            if item["answer"].upper() not in tuple(CHOICES):  # ("" is in the string "ABCD")
                hint = " (C-Eval's test split has no public answers: use val or dev)" if not item["answer"] else ""
                raise SystemExit(f"{path}, line {reader.line_num}: answer must be one of A, B, C, D, "
                                 f"got {item['answer']!r}{hint}")
            questions.append(dict(item, answer=item["answer"].upper(), line=reader.line_num))
    return questions


def prompt_text(tokenizer, subject, item, style):
    text = PROMPT.format(subject=subject.replace("_", " "), **item)
    return render(tokenizer, [{"role": "user", "content": text}], generation_prompt=True) if style == "chat" else text


@torch.no_grad()
def predict(chat, prompts, batch_size=16):
    """The letter with the highest next-token logit after each prompt (left-padded batches)."""
    tokenizer, model = chat.tokenizer, chat.model
    letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in CHOICES]  # single tokens in MiniMind's vocab
    letters = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + batch_size],
                                   model.config.max_position_embeddings, chat.device)
        # positions counted over real tokens: left padding must not shift them
        logits = model(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1).logits[:, -1]
        letters += [CHOICES[i] for i in logits[:, letter_ids].argmax(-1).tolist()]
    return letters


def main(args):
    files = sorted(glob.glob(os.path.join(args.data_dir, "*.csv")))
    if not files:
        raise SystemExit(f"{args.data_dir}: no .csv files (expected one C-Eval / CMMLU CSV per subject)")
    subjects = {subject_of(f): read_questions(f)[:args.limit or None] for f in files}
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)

    results = {}
    for subject, questions in subjects.items():
        prompts = [prompt_text(chat.tokenizer, subject, q, args.prompt_style) for q in questions]
        predicted = predict(chat, prompts, args.batch_size)
        correct = sum(p == q["answer"] for p, q in zip(predicted, questions))
        results[subject] = {"questions": len(questions), "correct": correct,
                            "accuracy": correct / len(questions) if questions else 0.0, "predictions": predicted}
        print(f"{subject:40s} {correct:5d}/{len(questions):<5d} {results[subject]['accuracy']:.4f}", flush=True)
    total = sum(r["questions"] for r in results.values())
    overall = {"questions": total, "accuracy": sum(r["correct"] for r in results.values()) / max(total, 1),
               "subject_mean": sum(r["accuracy"] for r in results.values()) / len(results)}
    print(f"{'overall (all questions)':40s} {overall['accuracy']:.4f}\n{'mean over subjects':40s} "
          f"{overall['subject_mean']:.4f}  [{chat.name}, {args.prompt_style} prompt, chance = 0.25]")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"model": chat.name, "prompt_style": args.prompt_style, "overall": overall,
                       "subjects": results}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(args)
