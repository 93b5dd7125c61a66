"""Start-up time: how long a command takes before it does any work.

    python scripts/bench_startup.py                       # this checkout
    python scripts/bench_startup.py --repo /path/to/other/checkout --runs 5

Times (median of --runs, wall clock, a fresh process each) of `--help` for a trainer, eval_llm.py and the server,
and of a whole tiny training run (64x2, one optimizer step on the bundled demo data: the imports, tokenizer,
dataset and model set-up dominate it). Outputs go to a temporary folder.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(repo, out):
    tiny = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_steps", "1", "--batch_size", "4",
            "--max_seq_len", "64", "--dtype", "float32", "--num_workers", "0", "--save_dir", out,
            "--checkpoint_dir", out, "--from_weight", "none"]
    return {
        "train_pretrain.py --help": [os.path.join(repo, "trainer", "train_pretrain.py"), "--help"],
        "eval_llm.py --help": [os.path.join(repo, "eval_llm.py"), "--help"],
        "serve_openai_api.py --help": [os.path.join(repo, "scripts", "serve_openai_api.py"), "--help"],
        "train_pretrain.py, 1 step of 64x2": [os.path.join(repo, "trainer", "train_pretrain.py"), *tiny],
        "train_full_sft.py, 1 step of 64x2": [os.path.join(repo, "trainer", "train_full_sft.py"), *tiny],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=REPO_ROOT, help="the checkout to time (default: this one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory() as out:
        env["HF_DATASETS_CACHE"] = os.path.join(out, "hf_cache")
        for name, command in commands(os.path.abspath(args.repo), out).items():
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                subprocess.run([sys.executable, *command], cwd=out, env=env, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                times.append(time.perf_counter() - start)
            print(f"{name:40s} median {statistics.median(times):6.2f} s  (runs: "
                  f"{', '.join(f'{t:.2f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
