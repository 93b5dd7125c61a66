"""Where the demo's time goes: every stage's wall time split into start-up, data, forward, backward, optimizer, sampling,
saving and the rest, from stack samples of the demo and of every trainer it starts.

    python scripts/profile_demo.py                         # runs scripts/run_demo.py under py-spy (pip install py-spy)
    python scripts/profile_demo.py -- --grpo_steps 16      # arguments after -- go to run_demo.py
    python scripts/profile_demo.py --samples out/demo_profile.txt   # classify samples recorded before
    python scripts/profile_demo.py --peak_only             # the CPU's fp32 matmul peak, nothing else

py-spy samples the Python stack of each process --rate times a second (it only reads the processes' memory, so the
demo runs at its own speed); a sample taken while a thread runs a torch kernel counts for the Python line that called
it, so "backward" is loss.backward() with all its kernels. A sample with an import anywhere in its stack is start-up;
otherwise it goes to the first category below (in this order) whose pattern matches any frame of its stack, so a
forward inside sampling counts as sampling and a forward recomputed inside backward as backward:

  start-up    importing modules, parsing arguments, building the model, reading the tokenizer (before the first batch)
  data        the DataLoader, collation, tokenising into the cache
  forward     a module's forward outside sampling and evaluation: the training forward, reference / teacher passes
  loss        the loss functions (trainer/losses.py)
  backward    loss.backward()
  optimizer   clipping, the optimizer's step, zero_grad
  sampling    generating rollouts (RL) or answers (the demo's evaluations)
  saving      torch.save, checkpoints, metrics files
  evaluation  run_demo.py's own held-out measurements besides generation (losses, margins)
  other       everything else: the Python between the kernels, logging, the scheduler

The matmul peak is the best of a few 2048^3 fp32 matmuls on all cores (torch.mm), in GFLOP/s, measured when this script
runs. The table's "6N GFLOP/s" is 6 x parameters x the median tokens/s the stage's trainer logged (its whole loop: data,
forward, backward, optimizer and the Python between; attention's own FLOPs left out: the dense-model convention, an
equivalent rate where a stage skips work, as LoRA does for the frozen weights' gradients), and "of peak" that over the
matmul peak.
"""
import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _names(*names):
    """A pattern for frames of these functions: py-spy writes a frame "function (file:line)", methods as Class.function."""
    return rf"(^|\.)({'|'.join(names)}) \("


CATEGORIES = [  # (category, pattern of a frame); the first category matching any frame of a sample wins
    ("saving", re.compile(r"\((.*/)?(serialization|resume)\.py|" + _names("save", "atomic_save"))),
    ("sampling", re.compile(_names("generate", "sample", "sample_and_score", "sample_batch", "run_trajectories",
                                   "greedy_replies", "answer", "rl_scores", "agent_scores", "exact_match",
                                   "format_compliance", "tool_call_scores"))),
    ("backward", re.compile(r"(^|\.)backward \(.*torch/(_tensor|autograd/__init__)\.py")),
    ("optimizer", re.compile(r"torch/optim/|" + _names("clip_grad_norm_", "zero_grad"))),
    ("loss", re.compile(r"\((.*/)?trainer/losses\.py|" + _names("cross_entropy", "distillation_loss",
                                                                  "weighted_next_token_loss"))),
    ("data", re.compile(r"torch/utils/data/|datasets/|\((.*/)?dataset/lm_dataset\.py|\((.*/)?trainer/sampler\.py")),
    ("evaluation", re.compile(_names("held_out_losses", "preference_margins"))),
    ("forward", re.compile(r"Module\._call_impl|" + _names("forward"))),
]
START_UP = re.compile(_names("arguments", "parse_args", "from_pretrained", "load_model", "load_tokenizer", "Run.__init__",
                             "Checkpoint.restore"))
KD = "KD (2 runs)"
STAGES = dict(train_pretrain="pretrain", train_full_sft="full SFT", train_agent="agentic RL", train_lora="LoRA",
              train_dpo="DPO", train_distill_reason="reasoning", train_distillation=KD, train_grpo="GRPO")
COLUMNS = ["start-up", "data", "forward", "loss", "backward", "optimizer", "sampling", "saving", "evaluation", "other"]


def matmul_peak(size=2048, repeats=5):
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def stage_of(process):
    for script, stage in STAGES.items():
        if f"{script}.py" in process:
            return stage
    return "demo's own evaluations" if "run_demo.py" in process else None


def classify(frames):
    """frames: outermost first. Imports anywhere and the set-up calls made by main are start-up; else the first
    category whose pattern matches a frame; else other."""
    if any(f.startswith("_find_and_load") for f in frames):
        return "start-up"
    for name, pattern in CATEGORIES:
        if any(pattern.search(f) for f in frames):
            return name
    return "start-up" if any(START_UP.search(f) for f in frames[1:3]) else "other"


def read_samples(path):
    """{stage: Counter(category -> samples)} from py-spy's raw output (one 'process N:"cmd";frame;... count' a line)."""
    table = collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            # with --subprocesses a child's stack starts with its parents' "process N:"cmd"" frames, then its own
            last = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
            stage = stage_of(frames[last] + ";".join(frames[last + 1:last + 2]))  # the command, or its first frame
            if stage is None or not count.isdigit():
                continue
            if frames[last + 1:last + 2] and frames[last + 1].startswith("Thread._bootstrap"):
                continue  # helper threads (tqdm's monitor, loader threads): the main thread's time is the wall time
            table[stage][classify(frames[last + 1:])] += int(count)
    return table


def tokens_per_second(out_dir):
    """Each stage's training speed: the median of the tokens/s its trainer logged (first window left out; KD: the
    run with the teacher)."""
    speeds = {}
    for name, stage in (("pretrain", "pretrain"), ("full_sft", "full SFT"), ("agent", "agentic RL"),
                        ("lora_identity", "LoRA"), ("dpo", "DPO"), ("reason", "reasoning"), ("grpo", "GRPO"),
                        ("full_dist", KD)):
        folder = os.path.join(out_dir, "demo")
        found = sorted(f for f in os.listdir(folder) if re.fullmatch(rf"{name}_\d+_metrics\.jsonl", f)) \
            if os.path.isdir(folder) else []
        for file in found[:1]:
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                values = [json.loads(line)["tokens_per_s"] for line in f if line.strip()][1:]
            if values:
                speeds[stage] = statistics.median(values)
    return speeds


def report(table, rate, peak=None, parameters=None, speeds=None):
    extra_head = " | trainer tokens/s | 6N GFLOP/s | of peak |" if peak else " |"
    lines = ["| stage | wall s | " + " | ".join(COLUMNS) + extra_head,
             "|---|---:|" + "---:|" * len(COLUMNS) + ("---:|---:|---:|" if peak else "")]
    total = collections.Counter()
    for stage, counts in table.items():
        samples = sum(counts.values())
        total.update(counts)
        cells = [f"{100 * counts[c] / samples:.0f}%" if counts[c] else "" for c in COLUMNS]
        extra = " |"
        if peak:
            speed = (speeds or {}).get(stage)
            flops = 6 * parameters * speed / 1e9 if speed and parameters and stage != KD else None
            extra = f" | {speed:,.0f} | {flops:.1f} | {flops / peak:.1%} |" if flops else \
                f" | {speed:,.0f} | | |" if speed else " | | | |"  # KD: a student and a teacher, not 6N
        lines.append(f"| {stage} | {samples / rate:.0f} | " + " | ".join(cells) + extra)
    samples = sum(total.values())
    lines.append(f"| **all** | {samples / rate:.0f} | " + " | ".join(
        f"{100 * total[c] / samples:.0f}%" if total[c] else "" for c in COLUMNS) + (" | | | |" if peak else " |"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=None, help="classify this py-spy raw file instead of running the demo")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "out", "demo_profile.txt"))
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"), help="the demo's --out_dir")
    parser.add_argument("--rate", type=int, default=20, help="samples a second")
    parser.add_argument("--peak_only", action="store_true")
    parser.add_argument("demo_args", nargs="*", help="after --: arguments for run_demo.py")
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 torch.mm, {os.cpu_count()} cores): {peak:.1f} GFLOP/s", flush=True)
    if args.peak_only:
        return
    if args.samples is None:
        if shutil.which("py-spy") is None:
            sys.exit("py-spy is not installed: pip install py-spy")
        args.samples = args.output
        os.makedirs(os.path.dirname(args.samples), exist_ok=True)
        start = time.perf_counter()
        subprocess.run(["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", str(args.rate), "-o",
                        args.samples, "--", sys.executable, os.path.join(REPO_ROOT, "scripts", "run_demo.py"),
                        "--out_dir", args.out_dir, *args.demo_args], check=True)
        print(f"demo under py-spy: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    table = read_samples(args.samples)
    parameters = None
    report_file = os.path.join(args.out_dir, "demo_report.json")
    if os.path.exists(report_file):
        with open(report_file, encoding="utf-8") as f:
            parameters = json.load(f)["parameters"]
    print(report(table, args.rate, peak, parameters, tokens_per_second(args.out_dir)))


if __name__ == "__main__":
    main()
