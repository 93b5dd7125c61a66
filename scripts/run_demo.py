"""The whole pipeline on the bundled demo data, on a CPU: pretrain -> full SFT -> LoRA identity -> DPO ->
reasoning distillation -> knowledge distillation -> GRPO, each evaluated on held-out data.

    python scripts/run_demo.py            # about 17 minutes on 2 CPU cores; writes out/demo_report.md
    python scripts/run_demo.py --quick    # a 1-minute smoke run with a tiny model (numbers mean nothing)

Each stage runs the real trainer command line (printed as it goes). Every number in the report is
measured on held-out data that no stage trained on:
  pretrain   loss on dataset/demo/pretrain_eval.jsonl, before (random init) and after
  full SFT   loss on the answers of sft_eval.jsonl, and the exact-match rate on its verifiable questions
             (author of a poem, next line, reading of an idiom, arithmetic), greedy decoding, before and after
  LoRA       held-out "who are you?" phrasings answered with "MiniMind", before and after the adapter
  DPO        on dpo_eval.jsonl: how often the model gives the chosen answer a higher (per-token mean)
             log-probability than the rejected one, and the mean margin, for the SFT model and after DPO
  reasoning  share of held-out r1_eval.jsonl prompts answered in the exact <think>..</think><answer>..</answer>
             layout, before (the DPO model) and after reasoning distillation
  KD         held-out SFT answer loss of a small student (96x2) before and after distillation, and the teacher's
  GRPO       on the verifiable prompts of rlaif_eval.jsonl (greedy answers): mean rule reward and exact-answer rate,
             before (the reasoning model) and after GRPO
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
from dataset.lm_dataset import DPODataset, PretrainDataset, SFTDataset, pad_batch  # noqa: E402
from model.model_lora import apply_lora, load_lora  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_state_dict_strict  # noqa: E402
from scripts.plot_metrics import plot  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "trainer"))
from rewards import answer_reward, rule_rewards  # noqa: E402
from trainer_utils import HelpFormatter, choose_dtype, pick_device, show_defaults  # noqa: E402
from train_dpo import sequence_logps, stack_pairs  # noqa: E402

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


@torch.no_grad()
def preference(model, dataset, batch_size=16):
    """(accuracy, mean margin) of log pi(chosen) - log pi(rejected), per-token means over the answers."""
    margins = []
    for start in range(0, len(dataset), batch_size):
        batch = pad_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask, labels = stack_pairs(batch, 0)
        logps = sequence_logps(model(ids, attention_mask=mask).logits, labels, "mean")
        n = len(batch["index"])
        margins.append(logps[:n] - logps[n:])
    margins = torch.cat(margins)
    return (margins > 0).float().mean().item(), margins.mean().item()


REASONING_LAYOUT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)


def format_compliance(model, tokenizer, questions):
    answers = answer(model, tokenizer, questions, max_new_tokens=96)
    return sum(bool(REASONING_LAYOUT.fullmatch(a.strip())) for a in answers) / len(questions), answers


def rl_scores(model, tokenizer, rows):
    """(mean rule reward, exact-answer rate) of greedy answers to RL prompts with verifiable answers."""
    texts = answer(model, tokenizer, [r["conversations"][0]["content"] for r in rows], max_new_tokens=96)
    extras = [dict(answers=r["answers"]) for r in rows]
    reward = rule_rewards(texts, extras, reasoning=True).mean().item()
    return reward, sum(answer_reward(t, e["answers"]) for t, e in zip(texts, extras)) / len(rows)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--pretrain_epochs", type=int, default=3)
    parser.add_argument("--sft_epochs", type=int, default=2)
    parser.add_argument("--lora_epochs", type=int, default=20)
    parser.add_argument("--student_hidden_size", type=int, default=96)
    parser.add_argument("--student_num_layers", type=int, default=2)
    parser.add_argument("--grpo_steps", type=int, default=60)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps per stage: a smoke test")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="training precision of every stage (bf16 falls back to fp32 on CPUs without native bf16)")
    args = show_defaults(parser).parse_args()
    device = torch.device(pick_device())
    # Decided once here (with its notice, if bf16 is not native), then passed to every stage.
    dtype = str(choose_dtype(args.dtype, device if device.type != "cuda" else torch.device("cuda", 0))).removeprefix("torch.")
    if args.quick:
        args.hidden_size, args.num_hidden_layers, args.student_hidden_size, args.student_num_layers = 64, 2, 32, 1
    start_all = time.perf_counter()
    save_dir = os.path.join(args.out_dir, "demo")
    shown = lambda p: os.path.relpath(p, REPO_ROOT) if p.startswith(REPO_ROOT) else p  # noqa: E731
    for old in ("pretrain", "full_sft", "lora_identity", "dpo", "reason", "full_dist", "grpo"):  # an earlier demo's
        size = args.student_hidden_size if old == "full_dist" else args.hidden_size
        path = os.path.join(save_dir, f"{old}_{size}_metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    settings = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
                "--save_dir", shown(save_dir), "--checkpoint_dir", shown(os.path.join(save_dir, "checkpoints")),
                "--num_workers", "0", "--dtype", dtype,
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

    # Stage 4: DPO, from the SFT model
    dpo_eval = DPODataset(os.path.join(DEMO, "dpo_eval.jsonl"), tokenizer, max_length=256)
    accuracy_before, margin_before = preference(sft_model, dpo_eval)
    seconds_dpo, cmd_dpo = train("train_dpo.py", settings + quick, data_path=shown(os.path.join(DEMO, "dpo.jsonl")),
                                 epochs=1, batch_size=8, max_seq_len=256, learning_rate=1e-4, beta=0.1,
                                 precompute_ref=1, from_weight="full_sft")
    dpo_model = load(config, path("dpo"))
    accuracy_after, margin_after = preference(dpo_model, dpo_eval)

    # Stage 5: reasoning distillation, from the DPO model
    r1_questions = [r["conversations"][0]["content"] for r in read_jsonl(os.path.join(DEMO, "r1_eval.jsonl"))]
    layout_before, _ = format_compliance(dpo_model, tokenizer, r1_questions)
    seconds_reason, cmd_reason = train("train_distill_reason.py", settings + quick, data_path=shown(os.path.join(DEMO, "r1.jsonl")),
                                       epochs=1, batch_size=16, max_seq_len=256, learning_rate=1e-3, from_weight="dpo")
    layout_after, reason_samples = format_compliance(load(config, path("reason")), tokenizer, r1_questions)

    # Stage 6: knowledge distillation, a smaller student from the SFT model as teacher
    student_config = MiniMindConfig(hidden_size=args.student_hidden_size, num_hidden_layers=args.student_num_layers)
    torch.manual_seed(0)
    student_before = held_out_loss(MiniMindForCausalLM(student_config).eval(), sft_eval)
    kd_settings = [x for x in settings if x not in ("--hidden_size", str(args.hidden_size), "--num_hidden_layers",
                                                      str(args.num_hidden_layers))]
    seconds_kd, cmd_kd = train("train_distillation.py", kd_settings + quick, data_path=shown(os.path.join(DEMO, "sft.jsonl")),
                               student_hidden_size=args.student_hidden_size, student_num_layers=args.student_num_layers,
                               teacher_hidden_size=args.hidden_size, teacher_num_layers=args.num_hidden_layers,
                               from_weight="none", teacher_weight="full_sft", epochs=1, batch_size=16, max_seq_len=256,
                               learning_rate=2e-3)
    student_after = held_out_loss(load(student_config, os.path.join(save_dir, f"full_dist_{args.student_hidden_size}.pth")),
                                  sft_eval)

    # Stage 7: GRPO on the verifiable RL prompts, from the reasoning model
    rl_eval = [r for r in read_jsonl(os.path.join(DEMO, "rlaif_eval.jsonl")) if r["answers"]]
    reasoning_model = load(config, path("reason"))
    rl_before = rl_scores(reasoning_model, tokenizer, rl_eval)
    seconds_grpo, cmd_grpo = train("train_grpo.py", settings + (quick or ["--max_steps", str(args.grpo_steps)]),
                                   data_path=shown(os.path.join(DEMO, "rlaif.jsonl")), from_weight="reason",
                                   reasoning=1, num_generations=4, batch_size=4, max_seq_len=128, max_gen_len=64,
                                   learning_rate=2e-5, beta=0.02)
    rl_after = rl_scores(load(config, path("grpo")), tokenizer, rl_eval)

    curves = plot([os.path.join(save_dir, f"{n}_{args.hidden_size}_metrics.jsonl")
                   for n in ("pretrain", "full_sft", "lora_identity", "dpo", "reason", "grpo")] +
                  [os.path.join(save_dir, f"full_dist_{args.student_hidden_size}_metrics.jsonl")],
                  os.path.join(args.out_dir, "demo_loss_curves.png"), title="MiniMind demo: training loss")
    total_minutes = (time.perf_counter() - start_all) / 60
    kinds = "; ".join(f"{k} {kinds_before[k][0]}→{kinds_after[k][0]}/{n}" for k, (_, n) in kinds_after.items())
    lines = [
        "# MiniMind demo report", "",
        f"Model {args.hidden_size}×{args.num_hidden_layers} ({sum(p.numel() for p in sft_model.parameters()) / 1e6:.2f}M "
        f"parameters), bundled demo data, {os.cpu_count()} CPU cores, torch {torch.__version__}, {device.type}, {dtype}; "
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
        f"\"MiniMind\" | {named(before_identity)}/{len(identity)} | {named(after_identity)}/{len(identity)} |",
        f"| DPO | {seconds_dpo / 60:.1f} min | preference accuracy on dpo_eval.jsonl ({len(dpo_eval)} pairs): log-prob of "
        f"chosen > rejected | {accuracy_before:.1%} | {accuracy_after:.1%} |",
        f"| DPO | | mean log-prob margin, chosen - rejected (per token) | {margin_before:.4f} | {margin_after:.4f} |",
        f"| reasoning | {seconds_reason / 60:.1f} min | {len(r1_questions)} r1_eval.jsonl prompts answered in the "
        f"<think>…</think><answer>…</answer> layout | {layout_before:.1%} | {layout_after:.1%} |",
        f"| KD | {seconds_kd / 60:.1f} min | student {args.student_hidden_size}×{args.student_num_layers} loss on the answers "
        f"of sft_eval.jsonl (teacher {args.hidden_size}×{args.num_hidden_layers}: {sft_loss_after:.3f}) | "
        f"{student_before:.3f} | {student_after:.3f} |",
        f"| GRPO | {seconds_grpo / 60:.1f} min | mean rule reward (format + answer, 0-2.5) on {len(rl_eval)} verifiable "
        f"rlaif_eval.jsonl prompts | {rl_before[0]:.3f} | {rl_after[0]:.3f} |",
        f"| GRPO | | exact-answer rate on the same prompts | {rl_before[1]:.1%} | {rl_after[1]:.1%} |", "",
        f"Exact matches by kind (before SFT → after SFT / questions): {kinds}.", "",
        f"![loss curves]({os.path.relpath(curves, args.out_dir)})", "",
        "## Sample answers after SFT", "", "| question | expected | answer |", "|---|---|---|",
    ]
    lines += [f"| {q} | {r['answer']} | {a.replace(chr(10), ' ')[:80]} |" for q, r, a in samples[:12]]
    lines += ["", "## Identity before and after the LoRA adapter", "", "| question | before | after |", "|---|---|---|"]
    lines += [f"| {q} | {b.replace(chr(10), ' ')[:80]} | {a.replace(chr(10), ' ')[:80]} |"
              for q, b, a in zip(identity_questions, before_identity, after_identity)]
    lines += ["", "## Reasoning answers after distillation", "", "| question | answer |", "|---|---|"]
    lines += [f"| {q} | {a.replace(chr(10), ' ')[:100]} |" for q, a in zip(r1_questions[:6], reason_samples[:6])]
    lines += ["", "## Commands", "", "```", cmd_pretrain, cmd_sft, cmd_lora, cmd_dpo, cmd_reason, cmd_kd, cmd_grpo,
                                          "```", ""]
    report = os.path.join(args.out_dir, "demo_report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"\n{report} written ({total_minutes:.1f} min)\n")
    print("\n".join(lines[:22]))


if __name__ == "__main__":
    main()
