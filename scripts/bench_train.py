"""Training throughput in real (non-pad) tokens/s: random, length-grouped and packed batches, eager vs torch.compile.

    python scripts/bench_train.py                                   # pretraining, 512x8, batch 8 x 340
    python scripts/bench_train.py --device cuda --dtype bfloat16     # on a GPU it also prints MFU
    python scripts/bench_train.py --data sft                         # SFT: random vs length-grouped vs packed
    python scripts/bench_train.py --data demo_sft --hidden_size 192 --num_hidden_layers 4 --batch_size 16 \
        --max_seq_len 832 --rows grouped --skip_compile              # the demo's SFT (conversations + tool rows)

Rows come from the bundled demo pretraining data (one document per row, cut at 340 tokens) or, with
--data sft, the demo SFT conversations, batched as the trainers do: a shuffled epoch padded to the longest
row of each batch ("random", MiniMind's), --group_by_length 1 ("grouped": rows of similar length share a
batch), or --packing 1 ("packed": pretraining rows filled with whole documents, which see each other as
in nanoGPT; SFT rows filled with whole conversations, attention kept inside each one).
--data demo_sft is the demo's SFT mix (sft.jsonl and the tool conversations, whose tool schemas make long prompts).
"head" is where the 6400-wide lm_head and the loss run: at every position ("all", as before the collator's loss_index)
or at the positions whose label counts ("loss", what the trainers do now).
Only real tokens count. Each setting runs warm-up steps, then the mean over the timed steps.
MFU = training FLOPs of the real tokens (6 x active parameters + attention) per second over the GPU's
dense peak for the dtype (common/bench.py PEAK_TFLOPS; "-" on CPUs and unlisted GPUs).
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
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=340)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_compile", action="store_true")
    parser.add_argument("--data", default="pretrain", choices=["pretrain", "sft", "demo_sft"])
    parser.add_argument("--rows", default="random,grouped,packed", help="which batchings to time (comma-separated)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.bench import benchmark_setup, peak_tflops, training_flops_per_token
from common.device import synchronize
from dataset.lm_dataset import PretrainDataset, SFTDataset
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.sampler import ResumableBatchSampler, collate


def bench(dataset, args, device, dtype, compile_model, lengths=None, head="loss"):
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    model = MiniMindForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_model else model
    # the trainers' batches: a shuffled epoch, grouped by length or not
    order = iter(ResumableBatchSampler(len(dataset), args.batch_size, 0, 1, seed=0, epoch=0, lengths=lengths))
    batches = [collate([dataset[i] for i in next(order)]) for _ in range(args.warmup + args.steps)]
    times, real, padded = [], 0, 0
    for i, batch in enumerate(batches):
        n_real = int(batch["attention_mask"].sum())  # counted on the CPU copy: no host sync in the timed step
        batch = {k: v.to(device) for k, v in batch.items()}
        synchronize(device)
        start = time.perf_counter()
        # No attention mask, as in the trainers: rows are right-padded, so causal attention alone keeps
        # real tokens off the padding, and SDPA can take the flash kernel. Packed SFT rows bring position ids.
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step_model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                              loss_index=batch["loss_index"] if head == "loss" else None).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            real += n_real
            padded += batch["input_ids"].numel()
    seconds = sum(times)
    flops = training_flops_per_token(config, args.max_seq_len) * real
    peak = peak_tflops(device, dtype)
    return dict(tokens_per_s=real / seconds, pad_share=1 - real / padded, step_s=seconds / len(times),
                mfu=flops / seconds / (peak * 1e12) if peak else None)


def main(args):
    device, dtype = benchmark_setup(args.device, args.dtype)  # cuda:N made current; fp16 before sm80
    from transformers import AutoTokenizer
    import datasets
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    if args.data in ("sft", "demo_sft"):
        path = os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl")
        if args.data == "demo_sft":  # as scripts/run_demo.py lists them: the tool files three times
            path = ",".join([path] + [os.path.join(REPO_ROOT, "dataset", "demo", f)
                                      for f in ("tools.jsonl", "cedict/tools.jsonl")] * 3)
        sft = SFTDataset(path, tokenizer, args.max_seq_len)
        data = {"random": (sft, None), "grouped": (sft, sft.lengths()),
                "packed": (lambda: SFTDataset(path, tokenizer, args.max_seq_len, packing=True), None)}
    else:
        path = os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl")
        documents = PretrainDataset(path, tokenizer, args.max_seq_len)
        data = {"random": (documents, None), "grouped": (documents, documents.lengths()),
                "packed": (lambda: PretrainDataset(path, tokenizer, args.max_seq_len, packing=True), None)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"## {where}; torch {torch.__version__}; {args.hidden_size}x{args.num_hidden_layers}, batch "
          f"{args.batch_size} x {args.max_seq_len}, {str(dtype).removeprefix('torch.')}\n")
    print("| rows | mode | head | pad share | s/step | real tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for rows, (dataset, lengths) in data.items():
        if rows not in args.rows.split(","):
            continue
        dataset = dataset() if callable(dataset) else dataset  # packed rows: built only when timed
        for compile_model in ((False,) if args.skip_compile else (False, True)):
            for head in ("all", "loss"):
                r = bench(dataset, args, device, dtype, compile_model, lengths, head)
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
                print(f"| {rows} | {'compile' if compile_model else 'eager'} | {head} | {r['pad_share']:.1%} | "
                      f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main(args)
