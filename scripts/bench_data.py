"""Data pipeline at scale: peak memory and time to tokenise a 1 GB pretraining JSONL, then a cached restart.

    python scripts/bench_data.py                 # generates /tmp/minimind_bench/pretrain_1gb.jsonl once
    python scripts/bench_data.py --size_gb 0.2 --num_proc 4

The file is made of demo pretraining documents recombined at random (fixed seed). Each run happens
in a fresh process; the peak resident memory of that process and all its worker processes together
is sampled every 0.1 s (as PSS, which counts pages shared by forked workers once). The first run tokenises (in parallel) and writes the Arrow cache; the second
finds the cache and must reach its first batch within seconds.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root


def generate(path, size_gb, seed=0):
    """Write a JSONL of about size_gb GB: each line is 2-6 random demo documents joined."""
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    target = int(size_gb * 1e9)
    written = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w", encoding="utf-8") as f:
        while written < target:
            line = json.dumps({"text": "\n".join(rng.choices(docs, k=rng.randint(2, 6)))}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    os.replace(path + ".part", path)


def child(args):
    """Runs in a fresh process: build the dataset, then time the first batches of a DataLoader."""
    start = time.perf_counter()
    import datasets
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer
    from dataset.lm_dataset import PretrainDataset, pad_batch
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    data = PretrainDataset(args.path, tokenizer, max_length=340, packing=args.packing,
                           num_proc=args.num_proc, cache_dir=args.cache_dir)
    ready = time.perf_counter()
    loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=pad_batch, num_workers=0)
    tokens = 0
    for i, batch in enumerate(loader):
        tokens += int(batch["attention_mask"].sum())
        if i == 9:
            break
    first_batches = time.perf_counter()
    print(json.dumps(dict(rows=len(data), dataset_s=ready - start, ten_batches_s=first_batches - ready,
                          tokens_in_ten_batches=tokens)))


def run_measured(args, extra):
    """Run `child` in a new process and sample the memory of its whole process tree."""
    command = [sys.executable, __file__, "--child", "--path", args.path, "--cache_dir", args.cache_dir,
               "--num_proc", str(args.num_proc)] + extra
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak, parent = 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                tree = [parent] + parent.children(recursive=True)
                # PSS splits pages shared between the forked workers, so the sum is the real total
                peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed with exit code {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]), wall_s=wall, peak_gb=peak / 1e9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/tmp/minimind_bench/pretrain_1gb.jsonl")
    parser.add_argument("--size_gb", type=float, default=1.0)
    parser.add_argument("--cache_dir", default="/tmp/minimind_bench/cache")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    if not os.path.exists(args.path):
        start = time.perf_counter()
        generate(args.path, args.size_gb)
        print(f"generated {args.path} in {time.perf_counter() - start:.0f} s")
    print(f"file: {os.path.getsize(args.path) / 1e9:.2f} GB; CPU cores: {os.cpu_count()}; num_proc: {args.num_proc}; "
          f"packing: {args.packing}")
    subprocess.run(["rm", "-rf", args.cache_dir], check=True)
    extra = ["--packing"] if args.packing else []
    print("| run | rows | dataset ready (s) | 10 batches (s) | wall (s) | peak memory, all processes (PSS, GB) |")
    print("|---|---|---|---|---|---|")
    for name in ("first (tokenise + cache)", "second (from cache)"):
        r = run_measured(args, extra)
        print(f"| {name} | {r['rows']:,} | {r['dataset_s']:.1f} | {r['ten_batches_s']:.2f} | {r['wall_s']:.1f} | "
              f"{r['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
