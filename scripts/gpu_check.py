"""The first command to run on a GPU machine: every training stage for a few steps, checked and timed.

    python scripts/gpu_check.py                          # all GPUs found (torchrun over them when more than one)
    python scripts/gpu_check.py --nproc 1 --dtype float16
    python scripts/gpu_check.py --device cpu --hidden_size 64 --num_hidden_layers 2   # the same path on a CPU

Each stage (pretrain, MoE pretrain, SFT, LoRA, DPO, reasoning, KD, PPO, GRPO, SPO) runs its own
trainer/train_*.py on the bundled demo data for --steps optimizer steps, each starting from the weight the
stage before it wrote, all under a temporary folder. Inside the trainers every new kind of attention call
(masked or causal, training or no-grad, full or after the KV cache) runs once under the fast SDPA kernels
only (flash, memory-efficient, cuDNN), so a call that would fall to the slow math kernel stops the stage with
torch's reasons instead of running slowly. The table then shows per stage:

    s/step         median seconds per optimizer step after the first (which pays for start-up)
    tokens/s       real (non-padding) tokens per second over all processes; rollout tokens for RL
    MFU            training FLOPs (6 x active parameters + attention, per trained token) per second over the
                   GPU's dense peak for the dtype; the frozen models' passes and sampling are not counted,
                   so DPO, KD and the RL stages show less than they compute
    peak memory    torch.cuda.max_memory_allocated of rank 0 (the process's peak RSS on a CPU)
    attention      the SDPA kernels the stage's attention calls ran on

Exit status 1 if a stage failed. Copy the table into docs/benchmarks.md with the GPU's name.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root
from common.cli import HelpFormatter, show_defaults

# (stage, script, arguments, the stage whose weight it starts from)
STAGES = [
    ("pretrain", "train_pretrain.py", ["--from_weight", "none"], None),
    ("pretrain_moe", "train_pretrain.py", ["--from_weight", "none", "--use_moe", "1"], None),
    ("full_sft", "train_full_sft.py", ["--from_weight", "pretrain"], "pretrain"),
    ("lora", "train_lora.py", ["--from_weight", "full_sft"], "full_sft"),
    ("dpo", "train_dpo.py", ["--from_weight", "full_sft"], "full_sft"),
    ("reason", "train_distill_reason.py", ["--from_weight", "dpo"], "dpo"),
    ("distillation", "train_distillation.py", ["--from_weight", "full_sft", "--teacher_weight", "full_sft"], "full_sft"),
    ("ppo", "train_ppo.py", ["--from_weight", "full_sft", "--reasoning", "0"], "full_sft"),
    ("grpo", "train_grpo.py", ["--from_weight", "full_sft", "--reasoning", "0", "--num_generations", "4"], "full_sft"),
    ("spo", "train_spo.py", ["--from_weight", "full_sft", "--reasoning", "0"], "full_sft"),
]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (GPUs) to use; default: every GPU found")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16, help="rows per process (RL stages: 2 prompts)")
    parser.add_argument("--max_seq_len", type=int, default=340)
    parser.add_argument("--max_gen_len", type=int, default=128, help="longest sampled answer in the RL stages")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per stage")
    parser.add_argument("--stages", default=",".join(s[0] for s in STAGES), help="comma-separated subset")
    parser.add_argument("--keep", default=None, help="keep the weights, metrics and reports in this folder")
    return show_defaults(parser).parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.bench import GPU_CHECK_ENV


def stage_command(stage, script, extra, args, out, nproc):
    sizes = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers)]
    if stage == "distillation":  # the teacher is the SFT model of the same size
        sizes += ["--student_hidden_size", str(args.hidden_size), "--student_num_layers", str(args.num_hidden_layers),
                  "--teacher_hidden_size", str(args.hidden_size), "--teacher_num_layers", str(args.num_hidden_layers)]
    rl = stage in ("ppo", "grpo", "spo")
    common = ["--device", args.device, "--dtype", args.dtype, "--max_steps", str(args.steps), "--epochs", "1",
              "--batch_size", str(2 if rl else args.batch_size), "--accumulation_steps", "1",
              "--max_seq_len", str(66 if rl else args.max_seq_len), "--log_interval", "1", "--save_interval", "100000",
              "--num_workers", "1", "--save_dir", os.path.join(out, "out"), "--checkpoint_dir", os.path.join(out, "ckpt")]
    if rl:
        common += ["--max_gen_len", str(args.max_gen_len)]
    if stage == "lora":
        common += ["--lora_name", "lora_check"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + [os.path.join(REPO_ROOT, "trainer", script), *sizes, *common, *extra]


def run_stage(stage, command, out, env):
    report_path = os.path.join(out, f"{stage}.json")
    env = dict(env, **{GPU_CHECK_ENV: report_path})
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0 or not os.path.exists(report_path):
        tail = (result.stdout + result.stderr).strip().splitlines()[-25:]
        return None, "\n".join(tail)
    with open(report_path, encoding="utf-8") as f:
        return json.load(f), None


def table_row(stage, report):
    step_s = statistics.median(report["step_s"]) if report["step_s"] else float("nan")
    tokens_per_s = statistics.median(report["tokens_per_s"]) if report["tokens_per_s"] else float("nan")
    mfu = "-"
    if report["peak_tflops"]:
        per_gpu = tokens_per_s / report["world_size"]
        mfu = f"{report['flops_per_token'] * per_gpu / (report['peak_tflops'] * 1e12):.1%}"
    kernels = "+".join(sorted(set(report["attention"].values()))) or "-"
    return (f"| {stage} | {step_s:.3f} | {tokens_per_s:,.0f} | {mfu} | {report['peak_memory_gib']:.2f} GiB | "
            f"{kernels} |")


def describe(device):
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(index)} (sm{major}{minor})"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print(f"torch {torch.__version__} sees no CUDA GPU: checking the CPU path instead (slow at 512x8; "
                  "--hidden_size 64 --num_hidden_layers 2 is quick). Pass --device to choose.", flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU: check the driver and that torch is a CUDA build "
                         f"(this one is {torch.__version__}); use --device cpu to check the CPU path")
    if args.device == "cuda" and args.nproc is None:
        args.nproc = torch.cuda.device_count()
    nproc = args.nproc or 1
    if nproc > 1 and args.device != "cuda":
        raise SystemExit("--nproc > 1 needs --device cuda (one process per GPU)")
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {[s[0] for s in STAGES]}")

    out = args.keep or tempfile.mkdtemp(prefix="minimind_gpu_check_")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    print(f"## {describe(args.device)}; torch {torch.__version__}; {args.hidden_size}x{args.num_hidden_layers}, "
          f"{nproc} process(es), {args.dtype} asked, batch {args.batch_size} x {args.max_seq_len}, {args.steps} steps\n",
          flush=True)
    rows, failures, details = [], [], []
    for stage, script, extra, needs in STAGES:
        if stage not in wanted:
            continue
        if needs in {f[0] for f in failures}:
            failures.append((stage, f"needs the weight of the {needs} stage, which failed"))
            rows.append(f"| {stage} | skipped: needs {needs} | | | | |")
            continue
        print(f"running {stage} ...", flush=True)
        report, error = run_stage(stage, stage_command(stage, script, extra, args, out, nproc), out, env)
        if report is None:
            failures.append((stage, error))
            rows.append(f"| {stage} | FAILED | | | | |")
            continue
        rows.append(table_row(stage, report))
        details.append(f"- {stage} ({report['dtype']} on {report['device']}): " + "; ".join(
            f"{kind}: {kernel}" for kind, kernel in sorted(report["attention"].items())))

    print("\n| stage | s/step | real tokens/s | MFU | peak memory | attention |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nAttention calls by kind (device dtype mask grad cache: kernel):")
    print("\n".join(details))
    for stage, error in failures:
        print(f"\n{stage} FAILED:\n{error}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(args)
