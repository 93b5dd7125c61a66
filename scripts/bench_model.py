"""Model speed benchmark: training step throughput (dense vs MoE) and decode speed (with vs without KV cache).

    python scripts/bench_model.py                        # this machine's best device, default dtype
    python scripts/bench_model.py --device cuda --dtype bfloat16

Prints a markdown table to paste into docs/benchmarks.md. Numbers depend on the machine: run it
where you train. Training uses random token ids (speed does not depend on the text).
"""
import argparse
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default: bfloat16 on CUDA, float16 before sm80; float32 elsewhere)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=340)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--skip_decode", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.bench import benchmark_setup, peak_memory_gib, peak_tflops, reset_peak_memory, training_flops_per_token
from common.device import synchronize
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


MODELS = {
    "dense 512x8 (MiniMind2-Small)": dict(hidden_size=512, num_hidden_layers=8),
    "dense 640x8": dict(hidden_size=640, num_hidden_layers=8),
    "MoE 640x8 (MiniMind2-MoE)": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
}


def active_params_per_token(config: MiniMindConfig) -> int:
    """Parameters a token passes through: the embedding lookup is free, the tied lm_head is not."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    per_expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters()) if config.use_moe else 0
    total = sum(p.numel() for p in model.parameters())
    inactive = config.num_hidden_layers * per_expert * (config.n_routed_experts - config.num_experts_per_tok)
    return total - inactive


def bench_train_step(name, settings, args, device, dtype):
    torch.manual_seed(0)
    config = MiniMindConfig(**settings)
    model = MiniMindForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    reset_peak_memory(device)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            out = model(ids, labels=ids)
            loss = out.loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    tokens = args.batch_size * args.seq_len
    flops = 6 * active_params_per_token(config) * tokens  # forward + backward matmul FLOPs
    # MFU counts attention too (as bench_train.py and gpu_check.py do), against the GPU's peak for the dtype
    peak_flops = peak_tflops(device, dtype)
    mfu = training_flops_per_token(config, args.seq_len) * tokens / seconds / (peak_flops * 1e12) \
        if peak_flops else None
    peak = f"{peak_memory_gib(device):.2f} GiB" if device.type == "cuda" else "-"  # GPU memory only
    del model, optimizer
    return dict(name=name, seconds=seconds, tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12,
                mfu=mfu, active=active_params_per_token(config), peak=peak)


@torch.no_grad()
def bench_decode(args, device, dtype):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**MODELS["dense 512x8 (MiniMind2-Small)"])).to(device).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    prompt = torch.randint(3, 6400, (1, args.prompt_len), device=device)
    rows = []
    for use_cache in (True, False):
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache,
                       pad_token_id=0)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, use_cache=use_cache, pad_token_id=0)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append((use_cache, out.shape[1] - prompt.shape[1], seconds))
    return rows


def main(args):
    device, dtype = benchmark_setup(args.device, args.dtype)  # cuda:N made current; fp16 before sm80

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"## {where}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}\n")
    print(f"Training step (forward + backward + AdamW), batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.steps} steps:\n")
    print("| model | active params/token | s/step | tokens/s | model TFLOP/s | MFU | peak GPU memory |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, settings in MODELS.items():
        r = bench_train_step(name, settings, args, device, dtype)
        results[name] = r
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['active'] / 1e6:.1f}M | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.3f} | {mfu} | {r['peak']} |", flush=True)
    moe, dense = results["MoE 640x8 (MiniMind2-MoE)"], results["dense 640x8"]
    time_ratio = moe["seconds"] / dense["seconds"]
    flop_ratio = moe["active"] / dense["active"]
    print(f"\nMoE 640x8 step / dense 640x8 step: {time_ratio:.2f}x time for {flop_ratio:.2f}x the active "
          f"parameters -> {time_ratio / flop_ratio:.2f}x cost per active-parameter FLOP (1.00 = no routing overhead)")

    if not args.skip_decode:
        print(f"\nGreedy decode, dense 512x8, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens:\n")
        print("| KV cache | new tokens | seconds | tokens/s |")
        print("|---|---|---|---|")
        rows = bench_decode(args, device, dtype)
        for use_cache, n, seconds in rows:
            print(f"| {'yes' if use_cache else 'no'} | {n} | {seconds:.2f} | {n / seconds:.1f} |")
        print(f"\nKV cache speed-up: {rows[1][2] / rows[0][2]:.1f}x")


if __name__ == "__main__":
    main(args)
