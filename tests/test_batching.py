"""Continuous batching (inference/batching.py): concurrent requests share decoding steps, join at token
boundaries, leave when done, and each gets the answer it would get alone."""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from conftest import PROJECT_TOKENIZER, REPO_ROOT, start_server, talkative_weight

from inference.batching import Batcher
from common.chat import render
from inference.chat_core import load_chat_model, stream_reply

QUESTIONS = ["你好", "请介绍一下你自己。", "What is 2 + 3?", "讲一个很长很长的故事，关于一只小猫和一条河。",
             "Hi", "天空为什么是蓝色的？请详细解释。"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    weight = talkative_weight(tmp_path_factory.mktemp("batching") / "full_sft_64.pth", seed=5)
    return load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)


def prompt(chat, question):
    return chat.tokenizer(render(chat.tokenizer, [{"role": "user", "content": question}], generation_prompt=True),
                          add_special_tokens=False).input_ids


def alone(chat, question, **settings):
    events = list(stream_reply(chat, prompt(chat, question), **settings))
    return "".join(e["delta"] for e in events), events[-1]["finish_reason"], events[-1]["completion_tokens"]


def together(batcher, jobs):
    """Run (question, settings, start delay) jobs on the batcher from one thread each; their results in order."""
    results = [None] * len(jobs)

    def work(i, question, settings, delay):
        time.sleep(delay)
        events = list(batcher.stream(prompt(batcher.chat, question), **settings))
        results[i] = ("".join(e["delta"] for e in events), events[-1]["finish_reason"], events[-1]["completion_tokens"])
    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def recording_batch_sizes(chat):
    """Wrap the model's forward to record each decoding step's batch size. Each step also takes 5 ms more,
    as a real model's would, so that requests started 20 ms apart are still running when the next comes."""
    sizes, forward = [], chat.model.forward

    def record(input_ids, **kwargs):
        if input_ids.shape[1] == 1:
            sizes.append(input_ids.shape[0])
        time.sleep(0.005)
        return forward(input_ids, **kwargs)
    chat.model.forward = record
    return sizes, lambda: setattr(chat.model, "forward", forward)


def test_concurrent_greedy_answers_equal_one_at_a_time(chat):
    # different prompt lengths, different max_tokens (rows leave at different steps), staggered arrivals
    jobs = [(q, dict(max_tokens=12 + 7 * i, temperature=0), 0.02 * i) for i, q in enumerate(QUESTIONS)]
    expected = [alone(chat, q, **settings) for q, settings, _ in jobs]
    assert len({text for text, _, _ in expected}) == len(jobs)  # the answers differ, so a mix-up would show
    sizes, restore = recording_batch_sizes(chat)
    try:
        got = together(Batcher(chat), jobs)
    finally:
        restore()
    assert got == expected
    assert max(sizes) >= 4  # the requests really shared decoding steps
    assert any(b > a > 0 for a, b in zip(sizes, sizes[1:]))  # ...and one joined a running batch


def test_each_request_keeps_its_sampling_seed_and_stop(chat):
    greedy = alone(chat, QUESTIONS[1], max_tokens=30, temperature=0)
    stop = greedy[0][8:11]
    sampled = alone(chat, QUESTIONS[2], max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    jobs = [(QUESTIONS[1], dict(max_tokens=30, temperature=0, stop=[stop]), 0),
            (QUESTIONS[2], dict(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234), 0),
            (QUESTIONS[3], dict(max_tokens=30, temperature=1.0, top_p=0.9, seed=99), 0),
            (QUESTIONS[0], dict(max_tokens=30, temperature=0), 0.05)]
    got = together(Batcher(chat), jobs)
    assert got[0][0] == greedy[0][:greedy[0].find(stop)] and got[0][1] == "stop"  # its own stop string
    assert got[1] == sampled  # its own seed: the same draws as alone, whatever shares the batch
    assert got[3] == alone(chat, QUESTIONS[0], max_tokens=30, temperature=0)


def test_max_batch_caps_the_rows_and_the_rest_wait(chat):
    jobs = [(q, dict(max_tokens=10, temperature=0), 0) for q in QUESTIONS[:4]]
    sizes, restore = recording_batch_sizes(chat)
    try:
        got = together(Batcher(chat, max_batch=2), jobs)
    finally:
        restore()
    assert got == [alone(chat, q, **settings) for q, settings, _ in jobs]
    assert max(sizes) == 2


def test_a_client_that_goes_away_leaves_the_batch(chat):
    batcher = Batcher(chat)
    long_one = batcher.stream(prompt(chat, QUESTIONS[3]), max_tokens=200, temperature=0)
    next(long_one)  # running
    other = together(batcher, [(QUESTIONS[0], dict(max_tokens=10, temperature=0), 0)])
    assert other == [alone(chat, QUESTIONS[0], max_tokens=10, temperature=0)]
    long_one.close()  # what the server does when the client disconnects
    deadline = time.time() + 30
    while batcher.rows and time.time() < deadline:
        time.sleep(0.01)
    assert batcher.rows == [] and batcher.cache is None


@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_a_failing_forward_fails_its_requests_and_the_batcher_goes_on(chat, failing):
    batcher = Batcher(chat)
    forward = chat.model.forward

    def broken(input_ids, **kwargs):
        if (input_ids.shape[1] > 1) == (failing == "prefill"):
            raise RuntimeError("out of memory")
        return forward(input_ids, **kwargs)
    chat.model.forward = broken
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            list(batcher.stream(prompt(chat, QUESTIONS[0]), max_tokens=5, temperature=0))
    finally:
        chat.model.forward = forward
    assert together(batcher, [(QUESTIONS[0], dict(max_tokens=8, temperature=0), 0)]) == \
        [alone(chat, QUESTIONS[0], max_tokens=8, temperature=0)]


def test_max_batch_must_be_positive(chat):
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(chat, max_batch=0)
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "serve_openai_api.py"), "--max_batch", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--max_batch must be at least 1" in result.stderr


def test_the_server_batches_concurrent_clients(tmp_path):
    """The real server process (decoding in its main thread): 4 concurrent streaming clients get the
    answers they get one at a time."""
    weight = talkative_weight(tmp_path / "full_sft_64.pth", seed=5)
    process, url = start_server(tmp_path, "--load_from", str(weight), "--max_seq_len", "256")
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(job):
            question, max_tokens = job
            stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                                    temperature=0, max_tokens=max_tokens, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jobs = [(q, 10 + 6 * i) for i, q in enumerate(QUESTIONS[:4])]
        one_at_a_time = [ask(job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(ask, jobs)) == one_at_a_time
        assert len(set(one_at_a_time)) == len(jobs)
    finally:
        process.terminate()
        process.wait(timeout=30)
