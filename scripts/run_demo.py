"""The whole pipeline on the bundled demo data, on a CPU: pretrain -> full SFT -> LoRA identity -> evaluation.

    python scripts/run_demo.py            # about 10 minutes on 2 CPU cores; writes out/demo_report.md
    python scripts/run_demo.py --quick    # a 1-minute smoke run with a tiny model (numbers mean nothing)

Each stage runs the real trainer command line (printed as it goes). Every number in the report is
measured on held-out data that no stage trained on:
  pretrain   loss on dataset/demo/pretrain_eval.jsonl, before (random init) and after
  full SFT   loss on the answers of sft_eval.jsonl, and the exact-match rate on its verifiable questions
             (author of a poem, next line, reading of an idiom, arithmetic), greedy decoding, before and after
  LoRA       held-out "who are you?" phrasings answered with "MiniMind", before and after the adapter
Weights go to out/demo/, the report to out/demo_report.md, loss curves to out/demo_loss_curves.png.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from dataset.lm_dataset import PretrainDataset, SFTDataset, pad_batch  # noqa: E402
from model.model_lora import apply_lora, load_lora  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_state_dict_strict  # noqa: E402
from scripts.plot_metrics import plot  # noqa: E402

DEMO = os.path.join(REPO_ROOT, "dataset", "demo")


def train(script, settings, **options):
    """Run one trainer script from the repository root as a user would; return its wall time and command."""
    command = [sys.executable, os.path.join("trainer", script)] + settings + \
        [item for key, value in options.items() for item in (f"--{key}", str(value))]
    print("\n$ " + " ".join(["python"] + command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start, " ".join(["python"] + command[1:])


def load(config, path, lora_path=None):
    model = MiniMindForCausalLM(config)
    if path:
        load_state_dict_strict(model, torch.load(path, map_location="cpu", weights_only=True), source=path)
    if lora_path:
        state = torch.load(lora_path, map_location="cpu", weights_only=True)
        apply_lora(model, rank=next(v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight")))
        load_lora(model, state)
    return model.eval()


@torch.no_grad()
def held_out_loss(model, dataset, batch_size=16):
    """Mean next-token loss over every label token of the dataset."""
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = pad_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.item() * n
        tokens += n
    return total / tokens


@torch.no_grad()
def answer(model, tokenizer, questions, max_new_tokens=32, batch_size=32):
    """Greedy answers to single-turn questions, batched with left padding."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in questions[start:start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return [a.strip() for a in answers]


def normalise(text):
    return re.sub(r"[\s。.!！,，]+$", "", text.strip())


def question_kind(question, expected):
    if re.fullmatch(r"-?\d+", expected):
        return "arithmetic"
    if "作者" in question:
        return "poem author"
    if "下一句" in question:
        return "next line"
    return "idiom reading"


def exact_match(model, tokenizer, rows):
    questions = [next(m["content"] for m in r["conversations"] if m["role"] == "user") for r in rows]
    got = answer(model, tokenizer, questions)
    per_kind = {}
    for question, row, out in zip(questions, rows, got):
        hit = normalise(out) == normalise(row["answer"])
        per_kind.setdefault(question_kind(question, row["answer"]), []).append(hit)
    overall = sum(sum(v) for v in per_kind.values()) / len(rows)
    return overall, {k: (sum(v), len(v)) for k, v in sorted(per_kind.items())}, list(zip(questions, rows, got))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--pretrain_epochs", type=int, default=3)
    parser.add_argument("--sft_epochs", type=int, default=2)
    parser.add_argument("--lora_epochs", type=int, default=20)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps per stage: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.hidden_size, args.num_hidden_layers = 64, 2
    start_all = time.perf_counter()
    save_dir = os.path.join(args.out_dir, "demo")
    shown = lambda p: os.path.relpath(p, REPO_ROOT) if p.startswith(REPO_ROOT) else p  # noqa: E731
    for old in ("pretrain", "full_sft", "lora_identity"):  # metrics of an earlier demo would mix in
        path = os.path.join(save_dir, f"{old}_{args.hidden_size}_metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    settings = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
                "--save_dir", shown(save_dir), "--checkpoint_dir", shown(os.path.join(save_dir, "checkpoints")),
                "--num_workers", "0",
                "--log_interval", "10", "--save_interval", "1000"]
    quick = ["--max_steps", "3"] if args.quick else []
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    path = lambda name: os.path.join(save_dir, f"{name}_{args.hidden_size}.pth")  # noqa: E731
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    torch.manual_seed(0)

    # Stage 1: pretraining
    pretrain_eval = PretrainDataset(os.path.join(DEMO, "pretrain_eval.jsonl"), tokenizer, max_length=256)
    loss_before = held_out_loss(load(config, None), pretrain_eval)
    seconds_pretrain, cmd_pretrain = train("train_pretrain.py", settings + quick, data_path=shown(os.path.join(DEMO, "pretrain.jsonl")),
                                           epochs=args.pretrain_epochs, batch_size=16, max_seq_len=256, packing=1,
                                           accumulation_steps=1, learning_rate=2e-3, warmup_steps=20)
    pretrained = load(config, path("pretrain"))
    loss_after = held_out_loss(pretrained, pretrain_eval)

    # Stage 2: full SFT
    verifiable = [r for r in read_jsonl(os.path.join(DEMO, "sft_eval.jsonl")) if "answer" in r]
    sft_eval = SFTDataset(os.path.join(DEMO, "sft_eval.jsonl"), tokenizer, max_length=256)
    sft_loss_before = held_out_loss(pretrained, sft_eval)
    em_before, kinds_before, _ = exact_match(pretrained, tokenizer, verifiable)
    seconds_sft, cmd_sft = train("train_full_sft.py", settings + quick, data_path=shown(os.path.join(DEMO, "sft.jsonl")),
                                 epochs=args.sft_epochs, batch_size=16, max_seq_len=256, learning_rate=1e-3,
                                 from_weight="pretrain")
    sft_model = load(config, path("full_sft"))
    sft_loss_after = held_out_loss(sft_model, sft_eval)
    em_after, kinds_after, samples = exact_match(sft_model, tokenizer, verifiable)

    # Stage 3: LoRA identity
    identity = read_jsonl(os.path.join(DEMO, "lora_identity_eval.jsonl"))
    identity_questions = [r["conversations"][0]["content"] for r in identity]
    before_identity = answer(sft_model, tokenizer, identity_questions, max_new_tokens=48)
    seconds_lora, cmd_lora = train("train_lora.py", settings + quick, data_path=shown(os.path.join(DEMO, "lora_identity.jsonl")),
                                   epochs=args.lora_epochs, batch_size=16, max_seq_len=256, learning_rate=2e-3,
                                   from_weight="full_sft")
    lora_model = load(config, path("full_sft"), os.path.join(save_dir, "lora", f"lora_identity_{args.hidden_size}.pth"))
    after_identity = answer(lora_model, tokenizer, identity_questions, max_new_tokens=48)
    named = lambda answers: sum("MiniMind" in a for a in answers)  # noqa: E731

    curves = plot([os.path.join(save_dir, f"{n}_{args.hidden_size}_metrics.jsonl")
                   for n in ("pretrain", "full_sft", "lora_identity")],
                  os.path.join(args.out_dir, "demo_loss_curves.png"), title="MiniMind demo: training loss")
    total_minutes = (time.perf_counter() - start_all) / 60
    kinds = "; ".join(f"{k} {kinds_before[k][0]}→{kinds_after[k][0]}/{n}" for k, (_, n) in kinds_after.items())
    lines = [
        "# MiniMind demo report", "",
        f"Model {args.hidden_size}×{args.num_hidden_layers} ({sum(p.numel() for p in sft_model.parameters()) / 1e6:.2f}M "
        f"parameters), bundled demo data, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{total_minutes:.1f} minutes in all{' (quick smoke run: the numbers mean nothing)' if args.quick else ''}.", "",
        "Every number is measured on held-out files that no stage trained on.", "",
        "| stage | time | metric (held-out) | before | after |", "|---|---|---|---|---|",
        f"| pretrain | {seconds_pretrain / 60:.1f} min | loss on pretrain_eval.jsonl ({len(pretrain_eval)} documents) | "
        f"{loss_before:.3f} | {loss_after:.3f} |",
        f"| full SFT | {seconds_sft / 60:.1f} min | loss on the answers of sft_eval.jsonl ({len(sft_eval)} conversations) | "
        f"{sft_loss_before:.3f} | {sft_loss_after:.3f} |",
        f"| full SFT | | exact match on {len(verifiable)} verifiable questions of sft_eval.jsonl | "
        f"{em_before:.1%} | {em_after:.1%} |",
        f"| LoRA identity | {seconds_lora / 60:.1f} min | {len(identity)} held-out \"who are you?\" phrasings answered with "
        f"\"MiniMind\" | {named(before_identity)}/{len(identity)} | {named(after_identity)}/{len(identity)} |", "",
        f"Exact matches by kind (before SFT → after SFT / questions): {kinds}.", "",
        f"![loss curves]({os.path.relpath(curves, args.out_dir)})", "",
        "## Sample answers after SFT", "", "| question | expected | answer |", "|---|---|---|",
    ]
    lines += [f"| {q} | {r['answer']} | {a.replace(chr(10), ' ')[:80]} |" for q, r, a in samples[:12]]
    lines += ["", "## Identity before and after the LoRA adapter", "", "| question | before | after |", "|---|---|---|"]
    lines += [f"| {q} | {b.replace(chr(10), ' ')[:80]} | {a.replace(chr(10), ' ')[:80]} |"
              for q, b, a in zip(identity_questions, before_identity, after_identity)]
    lines += ["", "## Commands", "", "```", cmd_pretrain, cmd_sft, cmd_lora, "```", ""]
    report = os.path.join(args.out_dir, "demo_report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"\n{report} written ({total_minutes:.1f} min)\n")
    print("\n".join(lines[:15]))


if __name__ == "__main__":
    main()
