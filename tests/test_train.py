"""Training stages end to end (as subprocesses, tiny model, demo data) and the shared plumbing."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT, tiny_model
from forked_python import run_python

from trainer import trainer_utils
from trainer.resume import Checkpoint, check_same_order
from trainer.sampler import ResumableBatchSampler, SampleStream
from trainer.trainer_utils import Run, lr_at

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4", "--max_seq_len", "64",
        "--num_workers", "0", "--log_interval", "1", "--save_interval", "1"]


def run_script(script, *args, cwd=REPO_ROOT, tmp, torchrun=0, check=True, env=None):
    """Run trainer/{script} (from cwd) with the tiny settings, outputs under tmp."""
    path = os.path.join(REPO_ROOT, "trainer", script)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] \
        if torchrun else [sys.executable]
    command = launcher + [os.path.relpath(path, cwd), *TINY, "--save_dir", str(tmp / "out"),
                          "--checkpoint_dir", str(tmp / "ckpt"), *args]
    full_env = dict(os.environ, MINIMIND_NO_PROGRESS="1", HF_DATASETS_CACHE=str(tmp.parent / "hf_cache"))
    if torchrun:
        full_env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    full_env.update(env or {})
    if torchrun:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=full_env)
    else:  # a process of its own, forked with torch and transformers imported (tests/forked_python.py)
        result = run_python(command[1:], cwd=cwd, env=full_env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(tmp, name):
    with open(tmp / "out" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain -> full SFT -> LoRA once, for the tests that need trained weights."""
    tmp = tmp_path_factory.mktemp("chain")
    pre = run_script("train_pretrain.py", "--max_steps", "3", cwd=os.path.join(REPO_ROOT, "trainer"), tmp=tmp)
    sft = run_script("train_full_sft.py", "--max_steps", "3", "--dtype", "float16", tmp=tmp)
    lora = run_script("train_lora.py", "--max_steps", "3", "--dtype", "float32", "--learning_rate", "1e-2",
                      cwd=os.path.join(REPO_ROOT, "trainer"), tmp=tmp)  # a rate at which 3 steps beat batch noise
    return SimpleNamespace(tmp=tmp, pre=pre, sft=sft, lora=lora)


# --------------------------------------------------------------------------------------------
# The three stages
# --------------------------------------------------------------------------------------------

def test_stages_write_the_documented_files(chain):
    out, ckpt = chain.tmp / "out", chain.tmp / "ckpt"
    for name in ("pretrain_64.pth", "full_sft_64.pth", "lora/lora_identity_64.pth"):
        assert (out / name).exists(), name
    for name in ("pretrain_64_resume.pth", "full_sft_64_resume.pth", "lora_identity_64_resume.pth"):
        assert (ckpt / name).exists(), name
    weights = torch.load(out / "full_sft_64.pth", weights_only=True)
    assert len(weights) == 1 + 2 * 9 + 2 and all(v.dtype == torch.float16 for v in weights.values())
    lora = torch.load(out / "lora" / "lora_identity_64.pth", weights_only=True)
    assert lora and all(".lora." in k for k in lora)
    resume = torch.load(ckpt / "pretrain_64_resume.pth", weights_only=True)
    assert resume["step"] == 3 and resume["world_size"] == 1 and resume["consumed"] == 3 * 4 * 8
    assert all(v.dtype == torch.float32 for v in resume["model"].values())
    assert {"optimizer", "scaler", "rng", "epoch"} <= set(resume)


def test_missing_default_data_falls_back_to_the_demo_with_a_message(chain):
    assert "python scripts/download_data.py pretrain_hq.jsonl" in chain.pre.stdout
    assert "dataset/demo/pretrain.jsonl" in chain.pre.stdout
    assert "python scripts/download_data.py sft_mini_512.jsonl" in chain.sft.stdout
    assert "loaded" in chain.sft.stdout and "pretrain_64.pth" in chain.sft.stdout
    assert "LoRA: 4,096 trainable parameters" in chain.lora.stdout  # 2 layers x (q, o) x (8*64 + 64*8)


def test_sft_and_lora_learn(chain):
    sft = metrics(chain.tmp, "full_sft_64_metrics.jsonl")
    assert [m["step"] for m in sft] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in sft)
    lora = metrics(chain.tmp, "lora_identity_64_metrics.jsonl")
    assert lora[-1]["loss"] < lora[0]["loss"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pretrain_dtypes_from_the_root(tmp_path, dtype):
    run_script("train_pretrain.py", "--max_steps", "2", "--dtype", dtype, "--packing", "1", tmp=tmp_path)
    m = metrics(tmp_path, "pretrain_64_metrics.jsonl")
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    assert m[0]["tokens_per_s"] > 0


def test_moe_pretrain(tmp_path):
    run_script("train_pretrain.py", "--max_steps", "2", "--use_moe", "1", "--dtype", "float32", tmp=tmp_path)
    assert (tmp_path / "out" / "pretrain_64_moe.pth").exists()


# --------------------------------------------------------------------------------------------
# Resume and distributed
# --------------------------------------------------------------------------------------------

def losses(tmp, name="pretrain_64_metrics.jsonl"):
    return [(m["step"], m["loss"], m["lr"]) for m in metrics(tmp, name)]


def test_resume_follows_the_same_losses_bit_for_bit(tmp_path):
    common = ["--dtype", "float32", "--accumulation_steps", "2", "--epochs", "2", "--data_path",
              os.path.join(REPO_ROOT, "dataset", "demo", "lora_identity.jsonl")]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # 80 rows / (4 x 2) = 10 steps per epoch: stop in the middle of epoch 1, resume into epoch 2
    run_script("train_full_sft.py", *common, "--from_weight", "none", "--max_steps", "14", tmp=straight)
    run_script("train_full_sft.py", *common, "--from_weight", "none", "--max_steps", "7", tmp=interrupted)
    run_script("train_full_sft.py", *common, "--from_weight", "none", "--max_steps", "14", "--from_resume", "1",
               tmp=interrupted)
    a = losses(straight, "full_sft_64_metrics.jsonl")
    b = losses(interrupted, "full_sft_64_metrics.jsonl")
    assert [s for s, _, _ in a] == list(range(1, 15)) and a == b  # same data order, LR schedule, losses


def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path):
    # MiniMind's random batches: length grouping sorts within each process's batches, so with it on,
    # 2 x b and 1 x 2b group differently (resume on any world size is what grouping keeps)
    common = ["--dtype", "float32", "--max_steps", "3", "--accumulation_steps", "2", "--group_by_length", "0"]
    run_script("train_pretrain.py", *common, "--batch_size", "4", tmp=tmp_path / "one")
    fresh_cache = dict(HF_DATASETS_CACHE=str(tmp_path / "fresh_cache"))
    two_procs = run_script("train_pretrain.py", *common, "--batch_size", "2", tmp=tmp_path / "two", torchrun=2,
                           env=fresh_cache)
    # rank 0 tokenises the file into the cache; rank 1 waits at a barrier and reads it
    assert (two_procs.stdout + two_procs.stderr).count("tokenising pretrain.jsonl (num_proc=1):   0%") == 1
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for (s1, l1, lr1), (s2, l2, lr2) in zip(one, two):
        assert s1 == s2 and lr1 == lr2 and abs(l1 - l2) < 1e-4


def test_resume_a_two_process_run_with_one_process(tmp_path):
    common = ["--dtype", "float32", "--accumulation_steps", "1"]
    run_script("train_pretrain.py", *common, "--batch_size", "2", "--max_steps", "2", tmp=tmp_path, torchrun=2)
    state = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)
    assert state["world_size"] == 2 and state["consumed"] == 2 * 2 * 2
    result = run_script("train_pretrain.py", *common, "--batch_size", "2", "--max_steps", "4", "--from_resume", "1",
                        tmp=tmp_path)
    assert "resuming a 2-process run on 1" in result.stdout
    state = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)
    assert state["world_size"] == 1 and state["step"] == 4 and state["consumed"] == 8 + 2 * 2


def schedule_per_sample(rows, base_lr, run_samples):
    """Each logged step's lr against MiniMind's cosine at the samples trained before that step."""
    before = [0] + [row["samples"] for row in rows[:-1]]
    return [(row["lr"], base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * p / run_samples)))) for row, p in zip(rows, before)]


@pytest.mark.parametrize("first, then, stop_after", [(2, 1, 4), (1, 2, 3)])
def test_resume_on_another_world_size_runs_to_the_end_of_the_epoch(tmp_path, first, then, stop_after):
    """96 documents, batch 4: stopped after a few steps on `first` processes and resumed on `then` to the end
    of the epoch, the run trains every sample once, ends at sample 96 with the final weights and resume file
    saved there, and its learning rate follows the uninterrupted cosine per sample (a step is 4 samples on one
    process and 8 on two, so steps are not the unit). 1 -> 2 resumes at sample 12, which leaves a last round
    of 4 samples that the two processes share."""
    data = tmp_path / "docs96.jsonl"
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl"), encoding="utf-8") as f:
        data.write_text("".join(line for _, line in zip(range(96), f)), encoding="utf-8")
    common = ["--dtype", "float32", "--accumulation_steps", "1", "--learning_rate", "1e-3", "--save_interval", "1000",
              "--data_path", str(data)]
    run_script("train_pretrain.py", *common, "--max_steps", str(stop_after), tmp=tmp_path,
               torchrun=first if first > 1 else 0)
    resumed = run_script("train_pretrain.py", *common, "--from_resume", "1", tmp=tmp_path,
                         torchrun=then if then > 1 else 0)
    assert f"resuming a {first}-process run on {then}" in resumed.stdout
    rows = metrics(tmp_path, "pretrain_64_metrics.jsonl")
    state = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)
    assert state["step"] == len(rows) and state["consumed"] == 96 and state["world_size"] == then
    final = torch.load(tmp_path / "out" / "pretrain_64.pth", weights_only=True)  # saved at the last step
    assert all(torch.equal(final[k], v.half()) for k, v in state["model"].items())
    sizes = [b["samples"] - a["samples"] for a, b in zip([dict(samples=0)] + rows, rows)]
    assert sizes == [4 * first] * stop_after + [4 * then] * ((96 - 4 * first * stop_after) // (4 * then)) + \
        ([4] if then == 2 and first == 1 else [])  # 1 -> 2: 84 samples = 10 rounds of 8 and one of 4
    assert rows[-1]["samples"] == 96 and [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    for logged, expected in schedule_per_sample(rows, 1e-3, 96):
        assert logged == pytest.approx(expected, rel=1e-5)


def test_resume_refuses_settings_that_change_the_sample_order(tmp_path):
    """Flipping --group_by_length (or, with grouping, --batch_size) between a run and its resume would skip
    some rows and repeat others: the resume stops and names the setting and its saved value."""
    common = ["--dtype", "float32", "--save_interval", "1000"]
    run_script("train_pretrain.py", *common, "--group_by_length", "0", "--max_steps", "2", tmp=tmp_path)
    result = run_script("train_pretrain.py", *common, "--max_steps", "4", "--from_resume", "1", tmp=tmp_path,
                        check=False)  # the default is --group_by_length 1
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "was written with --group_by_length 0, and this run has --group_by_length 1" in result.stderr + result.stdout
    run_script("train_pretrain.py", *common, "--group_by_length", "0", "--batch_size", "8", "--max_steps", "4",
               "--from_resume", "1", tmp=tmp_path)  # without grouping any batch size continues the order


@pytest.mark.parametrize("saved, changed, refused", [
    (dict(seed=42), dict(seed=1), "--seed 42"),
    (dict(group_by_length=1, batch_size=4), dict(group_by_length=1, batch_size=8), "--batch_size 4"),
    (dict(group_by_length=0, batch_size=4), dict(group_by_length=0, batch_size=8), None),
    (dict(group_by_length=1, max_seq_len=64), dict(group_by_length=1, max_seq_len=128), "--max_seq_len 64"),
    (dict(group_by_length=0, packing=1, max_seq_len=64), dict(group_by_length=0, packing=1, max_seq_len=128),
     "--max_seq_len 64"),
    (dict(group_by_length=0, max_seq_len=64), dict(group_by_length=0, max_seq_len=128), None),
    (dict(group_by_length=0, packing=0), dict(group_by_length=0, packing=1), "--packing 0"),
    (dict(), dict(group_by_length=1), "--group_by_length 0"),  # a file from before grouping existed
    # the augmentation shares change the row lengths, so they matter where lengths order the rows
    (dict(group_by_length=1, drop_empty_think=0.8), dict(group_by_length=1, drop_empty_think=0.5),
     "--drop_empty_think 0.8"),
    (dict(group_by_length=1), dict(group_by_length=1, add_system_ratio=0.2), "--add_system_ratio 0.0"),  # older file
    (dict(group_by_length=0, add_system_ratio=0.2), dict(group_by_length=0, add_system_ratio=0.0), None),
    (dict(group_by_length=1, batch_size=4, learning_rate=1e-3), dict(group_by_length=1, batch_size=4,
                                                                      learning_rate=5e-4), None),
])
def test_which_settings_a_resume_compares(saved, changed, refused):
    args = dict(seed=42, group_by_length=0, packing=0, batch_size=4, max_seq_len=64, learning_rate=1e-3)
    current = SimpleNamespace(**{**args, **changed})
    if refused is None:
        check_same_order(current, {**args, **saved}, "x_resume.pth")
        return
    with pytest.raises(SystemExit, match=f"written with {refused}"):
        check_same_order(current, saved if not saved else {**args, **saved}, "x_resume.pth")


def test_resume_refuses_data_with_another_number_of_rows(tmp_path):
    run = fake_run(batch_size=2, accumulation_steps=1, epochs=1, checkpoint_dir=str(tmp_path), from_resume=1)
    torch.save(dict(args={}, num_samples=20), run.resume_path)
    model = tiny_model()
    checkpoint = Checkpoint(run, SampleStream(Rows(22), run.args, 0, 1, run.device), model,
                            torch.optim.AdamW(model.parameters()))
    with pytest.raises(SystemExit, match="written for 20 training rows, but this data gives 22"):
        checkpoint.restore()


def test_two_machines_with_the_readme_rendezvous_flags(tmp_path):
    """The README's two-machine line, as two nodes of one process each on localhost (gloo) that share no disk:
    each machine tokenises into its own cache, and only global rank 0 writes weights, resume file and metrics."""
    from conftest import free_port
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        machine = tmp_path / f"machine{node_rank}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", node_rank,
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                   os.path.join(REPO_ROOT, "trainer", "train_pretrain.py"), *TINY, "--dtype", "float32",
                   "--max_steps", "3", "--save_dir", str(machine / "out"), "--checkpoint_dir", str(machine / "ckpt")]
        env = dict(os.environ, MINIMIND_NO_PROGRESS="1", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(machine / "cache"))
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    for machine, output in enumerate(outputs):  # one tokenising pass on each machine
        assert output.count("tokenising pretrain.jsonl (num_proc=1):   0%") == 1, output[-2000:]
        assert any((tmp_path / f"machine{machine}" / "cache").iterdir())
    first, second = tmp_path / "machine0", tmp_path / "machine1"
    assert (first / "out" / "pretrain_64.pth").exists() and (first / "ckpt" / "pretrain_64_resume.pth").exists()
    assert [row["step"] for row in metrics(first, "pretrain_64_metrics.jsonl")] == [1, 2, 3]
    assert torch.load(first / "ckpt" / "pretrain_64_resume.pth", weights_only=True)["world_size"] == 2
    assert not list((second / "out").iterdir()) and not list((second / "ckpt").iterdir())


@pytest.mark.parametrize("local_rank, global_rank_0, first", [("0", True, True), ("0", False, True), ("1", False, False)])
def test_the_first_process_of_each_machine_tokenises_first(monkeypatch, local_rank, global_rank_0, first):
    """LOCAL_RANK 0 runs the block, then meets the machine's other processes at the barrier; they wait first,
    then read its cache. The second machine's first process (global rank 1) does not wait for machine one."""
    events = []
    run = fake_run()
    run.ddp = True
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(trainer_utils, "is_main", lambda: global_rank_0)
    monkeypatch.setattr(trainer_utils.dist, "barrier", lambda *a, **kw: events.append("barrier"))
    with run.main_process_first():
        events.append("tokenise")
    assert events == (["tokenise", "barrier"] if first else ["barrier", "tokenise"])


def test_sample_stream_continues_across_world_sizes():
    """Resume a 2-process epoch with 1 process: every sample exactly once."""
    n, batch = 103, 4
    seen = []
    two = [ResumableBatchSampler(n, batch, rank, 2, seed=7, epoch=3) for rank in range(2)]
    streams = [iter(s) for s in two]
    for _ in range(5):  # five rounds on two processes
        for s in streams:
            seen += next(s)
    one = ResumableBatchSampler(n, batch, 0, 1, seed=7, epoch=3, consumed=len(seen))
    for indices in one:
        seen += indices
    assert sorted(seen) == list(range(n))  # every sample once, the last 3 as a short last round
    order = ResumableBatchSampler(n, batch, 0, 1, seed=7, epoch=3)
    assert [i for b in order for i in b] == seen  # the same order as one process from the start


@pytest.mark.parametrize("n, trained", [(103, 103), (97, 96)])
def test_the_last_round_is_shared_out(n, trained):
    """103 = 12 rounds of 2 x 4 + 7: the 7 go 4 + 3 to the two processes, so the epoch trains on all of them
    (both take part in the round, as DDP needs); of 97 = 96 + 1, the one that cannot reach both waits."""
    samplers = [ResumableBatchSampler(n, 4, rank, 2, seed=7, epoch=0) for rank in range(2)]
    batches = [list(s) for s in samplers]
    assert len(batches[0]) == len(batches[1])  # every process takes part in every round
    flat = [i for k in range(len(batches[0])) for rank in range(2) for i in batches[rank][k]]
    assert len(set(flat)) == len(flat) == trained == ResumableBatchSampler.size(n, 4, 2)[1]
    assert flat == [i for b in ResumableBatchSampler(n, 4, 0, 1, seed=7, epoch=0) for i in b][:trained]
    if n == 103:
        assert [len(b[-1]) for b in batches] == [4, 3]


def test_group_by_length_cuts_padding_and_still_resumes(monkeypatch):
    """--group_by_length: each sample once per epoch, far less padding than random batches, and the
    same continuation-after-resume property on any world size."""
    monkeypatch.setattr(ResumableBatchSampler, "GROUP_BATCHES", 8)
    n, batch = 1003, 8
    lengths = torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(1))

    def padded(sampler):  # tokens a padded batch computes: rows x the longest row
        return sum(len(b) * int(lengths[b].max()) for b in sampler)
    grouped = ResumableBatchSampler(n, batch, 0, 1, seed=7, epoch=0, lengths=lengths)
    flat = [i for b in grouped for i in b]
    assert sorted(flat) == list(range(n))
    plain = ResumableBatchSampler(n, batch, 0, 1, seed=7, epoch=0)
    real = int(lengths[flat].sum())
    assert real / padded(grouped) > 0.85 > 0.7 > real / padded(plain)
    assert flat != sorted(flat, key=lambda i: -int(lengths[i]))  # groups, not one global sort
    two = [iter(ResumableBatchSampler(n, batch, rank, 2, seed=7, epoch=0, lengths=lengths)) for rank in range(2)]
    seen = [i for _ in range(20) for s in two for i in next(s)]
    rest = ResumableBatchSampler(n, batch, 0, 1, seed=7, epoch=0, consumed=len(seen), lengths=lengths)
    assert seen + [i for b in rest for i in b] == flat


# --------------------------------------------------------------------------------------------
# Gradient accumulation and the schedule
# --------------------------------------------------------------------------------------------

def fake_run(**overrides):
    args = dict(device="cpu", dtype="float32", seed=0, hidden_size=64, num_hidden_layers=2, use_moe=0,
                save_dir="/tmp/minimind_test_unused", checkpoint_dir="/tmp/minimind_test_unused", save_weight="x",
                batch_size=2, accumulation_steps=3, epochs=2, num_workers=0, max_steps=0, log_interval=1,
                grad_clip=1.0, learning_rate=1e-3, warmup_steps=0, use_wandb=False, group_by_length=0)
    args.update(overrides)
    return Run(SimpleNamespace(**args))


class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.tensor([1, 10 + i % 50, 20 + i % 30, 2])
        return dict(input_ids=ids, labels=ids.clone())


def test_accumulation_windows_count_exactly():
    args = fake_run(batch_size=2, accumulation_steps=3, epochs=2).args
    stream = SampleStream(Rows(22), args, 0, 1, torch.device("cpu"))
    windows = [(step, stream.epoch, len(window)) for step, window in stream]
    # 22 rows / batch 2 = 11 micro-batches an epoch -> windows of 3, 3, 3, 2 (the rest of the epoch)
    assert windows == [(1, 0, 3), (2, 0, 3), (3, 0, 3), (4, 0, 2), (5, 1, 3), (6, 1, 3), (7, 1, 3), (8, 1, 2)]
    assert stream.total_steps == 8 and stream.final_step


def test_accumulated_step_equals_one_large_batch(tmp_path):
    """train_full_sft.py's step weighs each micro-batch by its share of the step's answer tokens: three micro-batches
    of 2 rows train exactly as one batch of 6 (the same rows: without grouping the order depends on the seed only)."""
    common = ["--dtype", "float32", "--max_steps", "2", "--group_by_length", "0", "--from_weight", "none",
              "--learning_rate", "1e-3"]
    run_script("train_full_sft.py", *common, "--batch_size", "2", "--accumulation_steps", "3", tmp=tmp_path / "small")
    run_script("train_full_sft.py", *common, "--batch_size", "6", "--accumulation_steps", "1", tmp=tmp_path / "large")
    small, large = metrics(tmp_path / "small", "full_sft_64_metrics.jsonl"), metrics(tmp_path / "large",
                                                                                   "full_sft_64_metrics.jsonl")
    for a, b in zip(small, large, strict=True):
        assert a["samples"] == b["samples"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)
    weights = [torch.load(tmp_path / name / "out" / "full_sft_64.pth", weights_only=True)
               for name in ("small", "large")]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=2e-3) for k in weights[0])


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0) == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0) == pytest.approx(0.1)
    assert [lr_at(s, 100, 1.0, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------------

def test_a_kill_during_saving_leaves_the_previous_file_loadable(tmp_path):
    """Kill a process that rewrites a 36 MB checkpoint in a loop, at varying moments mid-save."""
    path = tmp_path / "weights.pth"
    script = (f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
              "import torch\nfrom common.files import atomic_torch_save\n"
              "big = {'w': torch.randn(3000, 3000)}\n"
              "for i in range(10**6):\n"
              f"    big['i'] = torch.tensor(i); atomic_torch_save(big, {str(path)!r})\n"
              "    if i == 0: print('first save done', flush=True)\n")
    for delay in (0.0, 0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("first save done")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)  # never a truncated file
        assert state["w"].shape == (3000, 3000)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """The loss is checked on the device every step and read at log and save steps only: the first bad
    step is still the one named, and no save happens after it."""
    run = fake_run(checkpoint_dir=str(tmp_path), log_interval=3)
    model = tiny_model()
    stream = SimpleNamespace(step=0, epoch=0, samples=0, is_last_step=False)
    for step, loss in ((1, 1.0), (2, float("nan"))):
        stream.step = step
        run.log(stream, dict(loss=torch.tensor(loss)), lr=1e-3)  # not a log step: nothing read yet
    stream.step = 3
    with pytest.raises(SystemExit) as err:
        run.log(stream, dict(loss=torch.tensor(2.0)), lr=1e-3)
    assert "not finite (nan or inf) since step 2" in str(err.value) and run.resume_path in str(err.value)
    with pytest.raises(SystemExit):
        Checkpoint(run, stream, model, torch.optim.AdamW(model.parameters())).save()
    assert not os.path.exists(run.resume_path)
    result = run_script("train_pretrain.py", "--dtype", "float32", "--learning_rate", "1e12", "--max_steps", "30",
                        tmp=tmp_path, check=False)
    assert result.returncode != 0 and "stopping without saving" in result.stderr + result.stdout
    stopped_at = int(next(w for w in (result.stderr + result.stdout).split("since step ")[1:]).split(":")[0])
    state = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)
    assert state["step"] == stopped_at - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def wait_for_metrics(path, rows, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {rows} rows")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_resume_checkpoint_and_the_run_resumes(tmp_path, signum):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM mid-run: the step in progress finishes, a resume file is
    written, a one-line message says how to go on (no traceback), and --from_resume 1 continues from there."""
    command = [sys.executable, os.path.join(REPO_ROOT, "trainer", "train_pretrain.py"), *TINY, "--dtype", "float32",
               "--save_interval", "1000", "--max_steps", "500", "--save_dir", str(tmp_path / "out"),
               "--checkpoint_dir", str(tmp_path / "ckpt")]
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1", HF_DATASETS_CACHE=str(tmp_path.parent / "hf_cache"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics_path = tmp_path / "out" / "pretrain_64_metrics.jsonl"
    wait_for_metrics(metrics_path, 3, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert f"interrupted at step {stopped}; resume with --from_resume 1" in stdout and stopped >= 3
    assert torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)["step"] == stopped
    run_script("train_pretrain.py", "--dtype", "float32", "--max_steps", str(stopped + 2), "--from_resume", "1",
               tmp=tmp_path)
    steps = [row["step"] for row in metrics(tmp_path, "pretrain_64_metrics.jsonl")]
    assert steps == list(range(1, stopped + 3))  # every step once: nothing repeated, nothing lost


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed outright (SIGKILL) after logging steps past its last save: on resume those steps are
    run again, and their first rows are dropped instead of appearing twice."""
    command = [sys.executable, os.path.join(REPO_ROOT, "trainer", "train_pretrain.py"), *TINY, "--dtype", "float32",
               "--save_interval", "3", "--max_steps", "500", "--save_dir", str(tmp_path / "out"),
               "--checkpoint_dir", str(tmp_path / "ckpt")]
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1", HF_DATASETS_CACHE=str(tmp_path.parent / "hf_cache"))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics_path = tmp_path / "out" / "pretrain_64_metrics.jsonl"
    wait_for_metrics(metrics_path, 5, process)
    process.kill()
    process.wait()
    saved = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=True)["step"]
    logged = len(metrics_path.read_text().splitlines())
    assert saved % 3 == 0 and logged >= 5
    result = run_script("train_pretrain.py", "--dtype", "float32", "--max_steps", str(logged + 1), "--from_resume", "1",
                        tmp=tmp_path)
    assert "resumed from" in result.stdout
    assert [row["step"] for row in metrics(tmp_path, "pretrain_64_metrics.jsonl")] == list(range(1, logged + 2))


def test_a_fresh_run_starts_its_metrics_file_anew(tmp_path):
    """Run twice without --from_resume: the metrics file beside the weight holds the second run's rows only (they
    were appended to the first run's, and plot_metrics drew one curve restarting at step 1)."""
    run_script("train_pretrain.py", "--dtype", "float32", "--max_steps", "3", "--log_interval", "1", tmp=tmp_path)
    first = metrics(tmp_path, "pretrain_64_metrics.jsonl")
    result = run_script("train_pretrain.py", "--dtype", "float32", "--max_steps", "2", "--log_interval", "1",
                        tmp=tmp_path)
    assert "of an earlier run replaced" in result.stdout
    second = metrics(tmp_path, "pretrain_64_metrics.jsonl")
    assert [row["step"] for row in first] == [1, 2, 3] and [row["step"] for row in second] == [1, 2]


def test_from_resume_without_a_resume_file_starts_fresh(tmp_path):
    result = run_script("train_pretrain.py", "--dtype", "float32", "--max_steps", "1", "--from_resume", "1", tmp=tmp_path)
    assert "there is no" in result.stdout and "starting from the beginning" in result.stdout


def test_help_shows_the_defaults():
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "trainer", "train_full_sft.py"), "--help"],
                            capture_output=True, text=True)
    assert "(default: 5e-07)" in result.stdout and "(default: 340)" in result.stdout


def test_missing_or_mismatched_from_weight(tmp_path, chain):
    result = run_script("train_full_sft.py", "--max_steps", "1", "--from_weight", "nothing_here", tmp=tmp_path,
                        check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "tokenising" not in message  # checked before any data work
    assert f"{tmp_path / 'out' / 'nothing_here_64.pth'} does not exist" in message and "holds: no .pth files" in message
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "pretrain_128.pth").write_bytes((chain.tmp / "out" / "pretrain_64.pth").read_bytes())
    result = run_script("train_full_sft.py", "--max_steps", "1", "--hidden_size", "128", tmp=tmp_path, check=False)
    message = result.stderr + result.stdout
    assert result.returncode != 0
    assert "shape mismatch for model.embed_tokens.weight: checkpoint [6400, 64] vs model [6400, 128]" in message


# --------------------------------------------------------------------------------------------
# Observability
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tracker, env_name", [("wandb", "WANDB_MODE"), ("swanlab", "SWANLAB_MODE")])
def test_trackers_log_offline(tmp_path, tracker, env_name):
    env = {env_name: "offline", "WANDB_DIR": str(tmp_path), "SWANLAB_LOG_DIR": str(tmp_path / "swanlog")}
    run_script("train_pretrain.py", "--max_steps", "2", "--use_wandb", "--tracker", tracker, "--dtype", "float32",
               tmp=tmp_path, env=env)
    if tracker == "wandb":
        runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    else:
        runs = list((tmp_path / "swanlog").glob("run-*/run-*.swanlab"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_progress_bar_shows_loss_lr_and_speed(tmp_path):
    result = run_script("train_pretrain.py", "--max_steps", "2", "--dtype", "float32", tmp=tmp_path,
                        env={"MINIMIND_NO_PROGRESS": "0"})
    assert "loss=" in result.stderr and "lr=" in result.stderr and "tokens_per_s=" in result.stderr
    assert "2/" in result.stderr  # steps done / total, from which tqdm derives the ETA


def test_settings_filled_in_for_the_user_are_named(tmp_path, monkeypatch):
    """What the command line chose or rebased out of sight is listed, and Run prints it at the start."""
    from trainer import train_full_sft, train_grpo
    monkeypatch.chdir(tmp_path)  # not trainer/: the defaults ../out and ../checkpoints are not relative to here
    notes = "\n".join(train_full_sft.arguments([]).chosen_for_you)
    assert "--hidden_size 512: the default of --generation minimind2" in notes
    assert f"--save_dir ../out: the default, relative to trainer/ as in MiniMind: {os.path.join(REPO_ROOT, 'out')}" \
        in notes
    typed = train_full_sft.arguments(["--hidden_size", "64", "--save_dir", "mine", "--checkpoint_dir", "c",
                                      "--data_path", "d.jsonl"])
    assert typed.chosen_for_you == [] and typed.save_dir == str(tmp_path / "mine")
    notes = "\n".join(train_grpo.arguments(["--reasoning", "0"]).chosen_for_you)
    assert "--from_weight full_sft: the default with --reasoning 0" in notes
    assert "--hidden_size 768: the default of --generation minimind-3" in \
        train_grpo.arguments(["--generation", "minimind-3"]).chosen_for_you
