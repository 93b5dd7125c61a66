"""Benchmark scripts/serve_openai_api.py: N concurrent streaming clients through the openai client.

    python scripts/bench_serve.py --load_from out/demo/full_sft_192.pth --clients 1 8 --max_tokens 64

    python scripts/bench_serve.py --load_from out/demo/full_sft_192.pth --max_batch 1   # one request at a time

Starts the server on a free localhost port, sends each batch of clients at once (greedy, fixed
max_tokens, so every answer has the same length), and prints per client count: time to first token
(median / worst), whole-request latency (median / worst) and generated tokens per second over all
clients. Concurrent requests share the server's decoding steps (inference/batching.py, up to --max_batch
rows), so the total rate grows with the clients; with --max_batch 1 they take turns.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", required=True, help="a .pth file or a transformers folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

from openai import OpenAI

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_openai_api.py")
QUESTION = [{"role": "user", "content": "请介绍一下你自己，并讲一个简短的故事。"}]


def one_request(client, max_tokens):
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model="minimind", messages=QUESTION, temperature=0, stream=True,
                                            max_tokens=max_tokens)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - start, tokens


def main(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, SERVER, "--load_from", args.load_from, "--port", str(port),
                               "--device", args.device, "--max_batch", str(args.max_batch)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        one_request(client, 4)  # warm-up
        print(f"{args.load_from}, {args.max_tokens} new tokens per request, device {args.device}, "
              f"max_batch {args.max_batch}")
        print(f"{'clients':>7} {'first token med/max (s)':>24} {'latency med/max (s)':>20} {'total tok/s':>12}")
        for n in args.clients:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda _: one_request(client, args.max_tokens), range(n)))
            wall = time.perf_counter() - start
            firsts, latencies, tokens = zip(*results)
            print(f"{n:>7} {statistics.median(firsts):>12.3f} / {max(firsts):<9.3f} "
                  f"{statistics.median(latencies):>9.3f} / {max(latencies):<8.3f} {sum(tokens) / wall:>12.1f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(args)
