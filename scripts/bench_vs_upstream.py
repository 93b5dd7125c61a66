"""The whole pretraining process against the original MiniMind2's: the same job, wall clock, fresh processes.

    python scripts/bench_vs_upstream.py --upstream /path/to/minimind     # a checkout of MiniMind2's trainer
    python scripts/bench_vs_upstream.py --upstream /path/to/minimind --runs 3 --hidden_size 512 --num_hidden_layers 8

Both trainers pretrain a fresh model (512x8 by default) for one epoch, batch 8 with their default accumulation (8),
max_seq_len 340, in fp32 on the CPU, with no loader workers, on two sets of 160 documents from
dataset/demo/pretrain.jsonl: the first 160 (mixed lengths, as real data is: MiniMind2 pads every row to 340 tokens,
this project to the longest row of the batch) and 160 that fill all 340 tokens (both then run the same matrix
shapes: what is left is the step itself and the start-up). Prints the median wall time of each. The other checkout
writes its checkpoint to its own ../checkpoints (MiniMind2's trainer always does); everything else goes to a
temporary folder.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS, MAX_SEQ_LEN = 160, 340


def document_sets(folder):
    """{name: path} of the two 160-document files (lengths as MiniMind2's dataset counts them: bos + text + eos)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    full = [line for line in lines
            if len(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]) + 2 >= MAX_SEQ_LEN]
    sets = {"first 160 documents (mixed lengths)": lines[:DOCUMENTS],
            f"160 documents of >= {MAX_SEQ_LEN} tokens": full[:DOCUMENTS]}
    paths = {}
    for i, (name, chosen) in enumerate(sets.items()):
        paths[name] = os.path.join(folder, f"documents_{i}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(chosen)
    return paths


def timed(command, cwd, env):
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="a checkout of the original MiniMind (MiniMind2's trainer)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    args = parser.parse_args()
    size = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers)]
    job = ["--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--max_seq_len", str(MAX_SEQ_LEN),
           "--save_interval", "100000", "--log_interval", "100000"]
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, MINIMIND_NO_PROGRESS="1", HF_DATASETS_CACHE=os.path.join(out, "hf_cache"))
        for name, data in document_sets(out).items():
            # MiniMind2 trains in fp32 on a CPU whatever --dtype says (its autocast is CUDA only)
            upstream = [sys.executable, "train_pretrain.py", *size, *job, "--data_path", data,
                        "--save_dir", os.path.join(out, "upstream")]
            ours = [sys.executable, os.path.join(REPO_ROOT, "trainer", "train_pretrain.py"), *size, *job,
                    "--data_path", data, "--dtype", "float32", "--save_dir", os.path.join(out, "ours"),
                    "--checkpoint_dir", os.path.join(out, "ours_checkpoints")]
            times = {"MiniMind2": [], "this project": []}
            for _ in range(args.runs):  # interleaved, so that a slow spell of the machine hits both
                times["MiniMind2"].append(timed(upstream, os.path.join(args.upstream, "trainer"), env))
                times["this project"].append(timed(ours, out, env))
            medians = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name}, {args.hidden_size}x{args.num_hidden_layers}, batch 8, fp32:", flush=True)
            for who, seconds in medians.items():
                print(f"  {who:14s} {seconds:7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in times[who])})", flush=True)
            print(f"  MiniMind2 / this project: {medians['MiniMind2'] / medians['this project']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
