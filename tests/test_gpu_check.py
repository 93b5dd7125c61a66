"""scripts/gpu_check.py's checks (its second table) on the CPU: every check reports a result here - ok, or the reason
it needs a CUDA GPU - and each one reports FAILED when the piece it guards is broken on purpose."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from forked_python import forked_run

from model import kernels, model_minimind
from scripts import gpu_check

TINY = ["--device", "cpu", "--dtype", "float32", "--hidden_size", "64", "--num_hidden_layers", "2",
        "--batch_size", "2", "--max_seq_len", "48", "--steps", "2"]

# every row the checks print, in order; the ones a CPU cannot show say why
ROWS = ["packing minimind2: block mask vs alone", "packing minimind2: varlen vs block mask",
        "packing minimind-3: block mask vs alone", "packing minimind-3: varlen vs block mask",
        "MoE minimind2: grouped vs per-expert", "MoE minimind-3: grouped vs per-expert",
        "compile: recompiles, graph breaks", "fp16 loss scaling", "resume round trip", "host syncs per step",
        "1 vs N processes", "KV cache minimind2", "KV cache minimind-3",
        "peak memory 2048 tokens", "peak memory 4096 tokens"]
NEEDS_CUDA = {"packing minimind2: varlen vs block mask", "packing minimind-3: varlen vs block mask", "fp16 loss scaling"}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """One Context for the module: a trainer run asked for again (same arguments) is not run twice. Its trainer
    processes are forked from the tests' zygote (tests/forked_python.py), torchrun's are started as usual."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp / "hf_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", forked_run)
        yield gpu_check.Context(gpu_check.arguments(TINY), str(tmp), env)


@pytest.fixture(scope="module")
def rows(ctx):
    return gpu_check.run_checks(ctx, gpu_check.CHECK_NAMES)


def only(rows, name):
    [row] = [row for row in rows if row.check == name]
    return row


# --------------------------------------------------------------------------------------------
# Every check reports on the CPU
# --------------------------------------------------------------------------------------------

def test_every_check_reports_on_the_cpu(rows, ctx):
    assert [row.check for row in rows] == ROWS
    assert not ctx.problems, ctx.problems  # no run failed, no check crashed
    for row in rows:
        if row.check in NEEDS_CUDA:
            assert row.result.startswith("needs a CUDA GPU: "), row
        elif row.check.startswith("compile"):  # the whole forward compiles (no graph break, no eager fallback)
            assert row.result == "ok" and "0 graph break(s)" in row.detail, row
        else:
            assert row.result == "ok", row
    assert "bit for bit" in only(rows, "resume round trip").detail
    assert "identical on all 2 ranks" in only(rows, "1 vs N processes").detail
    assert "exactly zero on both paths" in only(rows, "MoE minimind2: grouped vs per-expert").detail
    assert "0 device value reads" in only(rows, "host syncs per step").detail
    assert " MiB " in only(rows, "peak memory 4096 tokens").detail


def test_the_command_prints_the_checks_table(tmp_path):
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "gpu_check.py"), *TINY,
                             "--stages", "none", "--checks", "fp16,kv_cache"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "| check | result | detail |" in lines and not any(line.startswith("| stage |") for line in lines)
    assert any(line.startswith("| fp16 loss scaling | needs a CUDA GPU: ") for line in lines)
    assert any(line.startswith("| KV cache minimind-3 | ok | ") for line in lines)


def test_a_failed_check_fails_the_command(ctx, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.CHECKS, "kv_cache", lambda ctx: [gpu_check.Row("KV cache", "FAILED", "1.0 vs 2.0")])
    args = gpu_check.arguments([*TINY, "--stages", "none", "--checks", "kv_cache", "--keep", ctx.out])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(args)
    assert stop.value.code == 1 and "| KV cache | FAILED | 1.0 vs 2.0 |" in capsys.readouterr().out


def test_options_and_device_names():
    with pytest.raises(SystemExit):
        gpu_check.arguments(["--checks", "packing,bogus"])
    assert gpu_check.chosen("none", gpu_check.CHECK_NAMES) == []
    assert gpu_check.chosen("kv_cache,packing", gpu_check.CHECK_NAMES) == ["packing", "kv_cache"]
    assert gpu_check.describe("mps").startswith("Apple MPS")  # Apple's GPU, not "a CPU"
    assert gpu_check.describe("cpu").endswith("threads")


# --------------------------------------------------------------------------------------------
# Each check fails when what it guards is broken
# --------------------------------------------------------------------------------------------

def test_packing_fails_when_the_mask_lets_documents_see_each_other(ctx, monkeypatch):
    def leaky_mask(position_ids):  # causal over the whole row: a document attends to the one before it
        batch, seq_len = position_ids.shape
        return torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch, 1, seq_len, seq_len)

    monkeypatch.setattr(kernels, "document_mask", leaky_mask)
    rows = gpu_check.check_packing(ctx)
    assert only(rows, "packing minimind2: block mask vs alone").result == "FAILED"
    assert only(rows, "packing minimind-3: block mask vs alone").result == "FAILED"


def test_moe_fails_when_the_grouped_path_drops_an_expert(ctx, monkeypatch):
    grouped = model_minimind.grouped_experts
    monkeypatch.setattr(model_minimind, "grouped_experts", lambda experts, act_fn, tokens, topk_idx, topk_weight:
                        grouped(experts, act_fn, tokens, topk_idx, topk_weight * (topk_idx != 0)))
    rows = gpu_check.check_moe(ctx)
    assert [row.result for row in rows] == ["FAILED", "FAILED"] and "output" in rows[0].detail


def test_moe_fails_when_an_expert_without_tokens_gets_a_gradient(ctx, monkeypatch):
    """A grouped kernel that leaves an empty expert's gradient unwritten: here a trace of its weight in the output."""
    grouped = model_minimind.grouped_experts

    def touching_the_last_expert(experts, act_fn, tokens, topk_idx, topk_weight):
        return grouped(experts, act_fn, tokens, topk_idx, topk_weight) + 1e-30 * experts[-1].down_proj.weight.sum()

    monkeypatch.setattr(model_minimind, "grouped_experts", touching_the_last_expert)
    row = gpu_check.check_moe(ctx)[0]
    assert row.result == "FAILED" and "the last one's weight gradients not zero" in row.detail


FAKE_TRAINER = '''
import argparse, json, os, torch
parser = argparse.ArgumentParser()
parser.add_argument("--save_dir")
parser.add_argument("--hidden_size")
parser.add_argument("--use_compile", type=int, default=0)
args, _ = parser.parse_known_args()

def loss_of(x):
    y = (x * x).sum()
    torch._dynamo.graph_break()
    if torch.compiler.is_compiling():  # a model that computes something else once compiled
        y = y + 1
    return y

loss = float((torch.compile(loss_of) if args.use_compile else loss_of)(torch.ones(4)))
os.makedirs(args.save_dir, exist_ok=True)
with open(os.path.join(args.save_dir, f"pretrain_{args.hidden_size}_metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": loss}) + "\\n")
'''


def test_compile_fails_when_the_compiled_loss_differs_and_counts_the_graph_break(ctx, tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    [row] = gpu_check.check_compile(ctx, script=str(script))
    assert row.result == "FAILED" and "step-1 loss 5 vs eager 4" in row.detail
    assert "1 graph break(s)" in row.detail, row.detail


def scaler_state(steps, overflow):
    """A real GradScaler's state after `steps` steps whose gradients all overflowed (inf), or none did."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(steps):
        scaler.scale((weight * (math.inf if overflow else 1.0)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return scaler.state_dict()


def test_fp16_fails_when_every_step_is_skipped():
    result, detail = gpu_check.loss_scale_verdict(scaler_state(3, overflow=True), [9.0, 9.0, 9.0], steps=3)
    assert result == "FAILED" and "3 of 3 steps skipped" in detail and "final scale 8192" in detail
    result, detail = gpu_check.loss_scale_verdict(scaler_state(3, overflow=False), [9.0, 8.9, 8.8], steps=3)
    assert result == "ok" and "0 of 3 steps skipped" in detail
    assert gpu_check.loss_scale_verdict({}, [9.0], steps=1)[0] == "FAILED"  # fp16 without a scaler
    assert gpu_check.loss_scale_verdict(scaler_state(1, False), [math.nan], steps=1)[0] == "FAILED"


def test_resume_fails_when_the_resume_file_does_not_hold_the_weights(ctx):
    def tamper(folder):
        path = os.path.join(folder, "ckpt", "pretrain_64_resume.pth")
        state = torch.load(path, weights_only=True)
        name = sorted(state["model"])[0]
        state["model"][name] = state["model"][name] + 1e-3
        torch.save(state, path)

    [row] = gpu_check.check_resume(ctx, tamper=tamper)
    assert row.result == "FAILED" and "bit for bit required" in row.detail


def test_host_syncs_fail_on_a_read_of_a_device_value(ctx, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_

    def clip_and_read(*args, **kwargs):
        norm = clip(*args, **kwargs)
        float(norm)  # on a GPU: the host waits for the whole backward
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_read)
    [row] = gpu_check.check_host_syncs(ctx)
    assert row.result == "FAILED" and row.detail.startswith("1 device value reads")
    assert "tests/test_gpu_check.py" in row.detail  # where the read is


def test_multi_gpu_fails_when_the_global_batches_differ(ctx):
    [row] = gpu_check.check_multi_gpu(ctx, one_process_batch=ctx.args.batch_size)  # half the 2 processes' batch
    assert row.result == "FAILED" and row.detail.startswith("not the same global batch")


def test_kv_cache_fails_when_cached_steps_lose_their_positions(ctx, monkeypatch):
    rotate = model_minimind.apply_rotary
    monkeypatch.setattr(model_minimind, "apply_rotary",  # a one-token step (after the cache) left unrotated
                        lambda q, k, cos, sin: (q, k) if q.shape[2] == 1 else rotate(q, k, cos, sin))
    rows = gpu_check.check_kv_cache(ctx)
    assert [row.result for row in rows] == ["FAILED", "FAILED"]


def test_peak_memory_fails_when_attention_keeps_the_scores(ctx, monkeypatch):
    def math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, documents=None):
        """Attention written out, as SDPA's math kernel runs it: [B, H, T, T] scores kept for the backward."""
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return scores.masked_fill(~causal, -math.inf).softmax(-1) @ v

    monkeypatch.setattr(model_minimind, "fast_attention", math_attention)
    rows = gpu_check.check_peak_memory(ctx)
    assert rows[0].result == "ok" and rows[1].result == "FAILED" and "more than linear" in rows[1].detail
