"""GRPO step cost: seconds and peak memory of one step at MiniMind2-Small size, 8 answers of 256 tokens.

    python scripts/bench_rl.py                                   # this machine (CPU: float32 by default)
    python scripts/bench_rl.py --device cuda --dtype bfloat16

One step = sampling 8 answers to one prompt with the KV cache (forced to exactly --new_tokens tokens),
rule rewards, reference log-probs, policy log-probs, the GRPO loss, backward and an AdamW step, i.e. what
trainer/train_grpo.py does per prompt. The phases are timed separately; peak memory is the process's
resident set on CPU (ru_maxrss) and the peak allocated by tensors on a GPU (common/bench.py peak_memory_gib).
"""
import argparse
import copy
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.bench import benchmark_setup, peak_memory_gib, reset_peak_memory
from common.device import synchronize
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.losses import clipped_objective, group_advantages, k3_kl, masked_mean
from trainer.rl.rewards import rule_rewards
from trainer.rl.sampling import completion_logprobs, sample
from trainer.rl.engines import TorchEngine


def main(args):
    device, dtype = benchmark_setup(args.device, args.dtype)  # cuda:N made current; fp16 before sm80
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers))
    model = model.to(device).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "计算：37 + 48 = ？"}], tokenize=False,
                                           add_generation_prompt=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    engine = TorchEngine(model, tokenizer, min_new_tokens=args.new_tokens,  # full-length answers: a fixed workload
                         logprobs=False)  # as train_grpo.py samples in-process
    reset_peak_memory(device)

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        return result, time.perf_counter() - start

    phases = []
    for _ in range(args.steps):
        with autocast:
            rollout, t_sample = timed(lambda: sample(engine, tokenizer, [prompt], 66, args.new_tokens,
                                                     args.num_generations, device))
            rewards = rule_rewards(rollout.texts, [{"answers": ["85"]}] * len(rollout.texts), True).to(device)
            advantages = group_advantages(rewards, args.num_generations)
            with torch.no_grad():
                (ref_logps, _), t_ref = timed(lambda: completion_logprobs(reference, rollout))
            (logps, _), t_policy = timed(lambda: completion_logprobs(model, rollout))
            mask = rollout.completion_mask
            loss = masked_mean(clipped_objective(logps, logps.detach(), advantages, 0.2) + 0.02 * k3_kl(logps, ref_logps),
                               mask)
        _, t_update = timed(lambda: (loss.backward(), optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        phases.append((t_sample, t_ref, t_policy, t_update))
    t_sample, t_ref, t_policy, t_update = phases[-1]  # the last step (after warm-up)
    total = t_sample + t_ref + t_policy + t_update
    # peak_memory_gib: peak of tensors on a GPU, the process's peak resident set on a CPU, and on MPS
    # only the driver's current allocation
    unit = {"cuda": "GPU", "mps": "MPS driver"}.get(device.type, "RSS")
    peak = f"{peak_memory_gib(device):.2f} GiB {unit}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"## {where}; torch {torch.__version__}; {args.hidden_size}x{args.num_hidden_layers}, "
          f"{args.num_generations} x {rollout.completion_mask.sum(1).max().item()} new tokens, "
          f"{str(dtype).removeprefix('torch.')}\n")
    print("| sample (KV cache) | reference log-probs | policy log-probs | backward + AdamW | s/step | peak memory |")
    print("|---|---|---|---|---|---|")
    print(f"| {t_sample:.2f} s | {t_ref:.2f} s | {t_policy:.2f} s | {t_update:.2f} s | {total:.2f} | {peak} |")


if __name__ == "__main__":
    main(args)
