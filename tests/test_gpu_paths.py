"""GPU and MPS code paths, tested on the CPU by what can be observed here: which SDPA arguments each
forward passes, which device / dtype a choice yields with torch.cuda's answers patched, what a resume file
holds, which host reads a training step makes, and scripts/gpu_check.py end to end with --device cpu."""
import json
import os
import subprocess
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO_ROOT, tiny_model
from forked_python import forked_run

from common import device as devices
from common import bench
from trainer import distributed
from dataset.lm_dataset import pad_batch
from trainer import trainer_utils
from test_train import Rows, fake_run  # noqa: E402
from trainer.resume import Checkpoint  # noqa: E402
from trainer.sampler import SampleStream  # noqa: E402

from model import kernels, model_minimind  # noqa: E402
from model.model_minimind import MiniMindConfig  # noqa: E402


def sdpa_spy(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(dict(q_heads=q.shape[1], k_heads=k.shape[1], mask=attn_mask is not None, **kwargs))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def right_padded_batch():
    """Three SFT-like rows of different lengths, collated the way the trainers collate them."""
    rows = []
    for n in (12, 7, 3):
        ids = torch.arange(5, 5 + n)
        labels = ids.clone()
        labels[: n // 2] = -100  # the prompt carries no loss
        rows.append(dict(input_ids=ids, labels=labels))
    return pad_batch(rows)


# --------------------------------------------------------------------------------------------
# 1. Attention: no mask where causal is exact; K/V heads expanded where a mask is needed
# --------------------------------------------------------------------------------------------

def test_training_forward_passes_no_mask_and_the_loss_is_unchanged(tmp_path, monkeypatch):
    model = tiny_model().train()
    batch = right_padded_batch()
    masked = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    unmasked = model(batch["input_ids"], labels=batch["labels"]).loss  # as train_full_sft.py calls it
    assert abs(unmasked.item() - masked.item()) < 1e-6  # the padding mask changed nothing that carries loss
    calls = sdpa_spy(monkeypatch)
    sft_step_under(Passive(), tmp_path, monkeypatch)  # the script's own step: 2 layers x 2 micro-batches
    assert len(calls) == 4 and all(not c["mask"] and c["is_causal"] and c["enable_gqa"] for c in calls)


def test_masked_attention_on_a_cpu_keeps_grouped_kv_heads(monkeypatch):
    """The CPU's flash kernel takes GQA with a mask: no K/V copy there (CUDA's case is the next test)."""
    model = tiny_model()
    ids = torch.randint(3, 6400, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded RL prompt
    with torch.no_grad():
        reference = [model(ids[i:i + 1, 4 * i:]).logits[0, -1] for i in range(2)]
        calls = sdpa_spy(monkeypatch)
        logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    assert calls and all(c["mask"] and c["k_heads"] == 2 and c["q_heads"] == 4 and c["enable_gqa"] for c in calls)
    for i in range(2):  # each row scores as if it were alone and unpadded
        assert torch.allclose(logits[i, -1], reference[i], atol=1e-5)


@pytest.mark.parametrize("generation", ["minimind2", "minimind-3"])
def test_attention_gets_one_dtype_under_autocast(generation, monkeypatch):
    """Under bf16 autocast q, k and v reach attention in bf16 for both generations - training, packed rows and a
    cached step alike. (minimind-3's q/k RMSNorm has an fp32 weight: its output was fp32 while v was bf16, which the
    varlen and flash kernels refuse, and the KV cache kept fp32 keys.)"""
    seen = []
    real = model_minimind.fast_attention

    def record(q, k, v, *args):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args)

    monkeypatch.setattr(model_minimind, "fast_attention", record)
    model = tiny_model(generation=generation).train()
    ids = torch.randint(3, 6400, (2, 12))
    packed_positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids).loss.backward()
        model(ids, labels=ids, position_ids=packed_positions).loss.backward()
        with torch.no_grad():
            model.eval().generate(ids[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert len(seen) >= 8 and set(seen) == {(torch.bfloat16,) * 3}, seen


def test_cuda_calls_repeat_kv_heads_wherever_flash_cannot_take_them(fake_gpu):
    needs = kernels.sdpa_needs_repeated_kv
    cuda = torch.device("cuda", 0)
    assert not needs(cuda, torch.bfloat16, masked=False) and not needs(cuda, torch.float16, masked=False)
    assert needs(cuda, torch.bfloat16, masked=True)    # flash takes no mask; memory-efficient has no GQA
    assert needs(cuda, torch.float32, masked=False)    # flash is half precision only
    fake_gpu.capability = (7, 5)
    assert needs(cuda, torch.float16, masked=False)    # no flash before sm80 (T4, RTX 20xx)
    assert not needs(torch.device("cpu"), torch.float32, masked=False)  # the CPU flash kernel takes GQA in fp32
    assert not needs(torch.device("cpu"), torch.bfloat16, masked=True)  # ... and with a mask
    assert needs(torch.device("mps"), torch.float16, masked=False)


# --------------------------------------------------------------------------------------------
# 2, 4, 9. Devices and precisions, with torch.cuda's answers patched
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answering like a machine with two GPUs of a chosen compute capability."""
    gpu = SimpleNamespace(capability=(8, 6), name="NVIDIA GeForce RTX 3090", current=None, synced=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=gpu.capability[0], minor=gpu.capability[1], name=gpu.name))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: setattr(gpu, "current", torch.device(device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: gpu.synced.append(device))
    return gpu


def test_the_process_groups_wait_longer_than_tokenising_takes(monkeypatch):
    """While the first process of a machine tokenises a large file (main_process_first), the others wait in a barrier:
    the groups' timeout (NCCL's watchdog default is 10 minutes) must outlast that - the main group's (checked in
    test_each_ddp_process_binds_its_own_gpu) and the gloo group the stop flag is agreed on."""
    assert distributed.PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600
    flag_groups = []
    monkeypatch.setattr(trainer_utils.dist, "new_group", lambda **kw: flag_groups.append(kw))
    monkeypatch.setattr(trainer_utils.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(trainer_utils.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(trainer_utils, "setup_device", lambda requested, ddp: torch.device("cpu"))
    monkeypatch.setenv("RANK", "0")
    fake_run()
    assert flag_groups == [dict(backend="gloo", timeout=distributed.PROCESS_GROUP_TIMEOUT)]


def test_bf16_falls_back_to_fp16_below_compute_capability_8(fake_gpu, capsys):
    cuda = torch.device("cuda", 0)
    fake_gpu.capability, fake_gpu.name = (7, 5), "Tesla T4"
    assert devices.choose_dtype("bfloat16", cuda) == torch.float16
    assert "Tesla T4 (compute capability 7.5) has no native bfloat16" in capsys.readouterr().out
    assert devices.inference_dtype(cuda) == torch.float16
    fake_gpu.capability = (8, 0)
    assert devices.choose_dtype("bfloat16", cuda) == torch.bfloat16
    assert devices.inference_dtype(cuda) == torch.bfloat16
    assert devices.choose_dtype("float32", cuda) == torch.float32


def test_mps_and_cpu_precisions():
    assert devices.sum_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert devices.sum_dtype(torch.device("cpu")) == torch.float64
    assert devices.inference_dtype(torch.device("mps")) == torch.float16
    assert devices.inference_dtype(torch.device("cpu")) == torch.float32


def test_device_pick_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.pick_device() == "mps"
    assert devices.pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device() == "cuda"
    from inference.paths import add_model_arguments
    parser = __import__("argparse").ArgumentParser()
    add_model_arguments(parser)  # eval_llm, the server and the evaluators: no --device means the loader's pick
    assert parser.parse_args([]).device is None


def test_a_single_process_on_cuda_1_makes_it_current(fake_gpu):
    device = distributed.setup_device("cuda:1", ddp=False)
    assert device == torch.device("cuda", 1) and fake_gpu.current == torch.device("cuda", 1)
    assert distributed.setup_device("cuda", ddp=False) == torch.device("cuda", 0)  # an index, never bare
    before = torch.get_float32_matmul_precision()
    try:  # eval, serving and benchmarks: the same device rule, plus TF32 for leftover fp32 matmuls
        fake_gpu.current = None
        assert devices.ready_device("cuda:1") == torch.device("cuda", 1) == fake_gpu.current
        assert torch.get_float32_matmul_precision() == "high"
        fake_gpu.capability = (7, 5)
        assert bench.benchmark_setup("cuda:1") == (torch.device("cuda", 1), torch.float16)
        assert bench.benchmark_setup("cpu") == (torch.device("cpu"), torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)


def test_each_ddp_process_binds_its_own_gpu(fake_gpu, monkeypatch):
    groups = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: groups.append((backend, kw)))
    monkeypatch.setenv("LOCAL_RANK", "3")  # e.g. the 4th process on a machine whose launcher shows 2 GPUs
    device = distributed.setup_device("cuda", ddp=True)
    assert device == torch.device("cuda", 1) and fake_gpu.current == device
    wait = dict(timeout=distributed.PROCESS_GROUP_TIMEOUT)  # why: test_the_process_groups_wait_longer_than_...
    assert groups == [("nccl", dict(device_id=torch.device("cuda", 1), **wait))]
    groups.clear()
    assert distributed.setup_device("cpu", ddp=True) == torch.device("cpu") and groups == [("gloo", wait)]


def test_more_processes_than_gpus_stop_with_a_message(fake_gpu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun --nproc_per_node 3 on a machine with 2 GPUs
    with pytest.raises(SystemExit, match="3 processes on this machine, which has 2 GPUs"):
        distributed.setup_device("cuda", ddp=True)


def test_torchrun_and_compile_on_mps_stop_with_a_message():
    with pytest.raises(SystemExit, match="torchrun on Apple MPS"):
        distributed.setup_device("mps", ddp=True)
    with pytest.raises(SystemExit, match="--use_compile 1 on Apple MPS"):
        fake_run(device="mps", use_compile=1)


def test_adamw_is_fused_on_cuda_and_the_reward_model_stays_where_it_fits(monkeypatch):
    from trainer.rl.rewards import fits_beside_the_policy
    assert trainer_utils.fused_adamw(torch.device("cuda", 0)) is True  # step counters on the GPU: no per-step reads
    assert trainer_utils.fused_adamw(torch.device("cpu")) is None and fake_run().fused_adamw is None
    reward_model = torch.nn.Linear(1000, 1000).half()  # 2 MB of weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 2**20, 80 * 2**30))
    assert fits_beside_the_policy(reward_model, torch.device("cuda", 0))       # 2 MB < a quarter of 16 MB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**20, 80 * 2**30))
    assert not fits_beside_the_policy(reward_model, torch.device("cuda", 0))   # the policy needs the room
    assert fits_beside_the_policy(reward_model, torch.device("cpu"))


def test_tf32_for_the_fp32_matmuls_on_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        devices.use_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before
        devices.use_tf32(torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_benchmarks_wait_for_and_measure_their_own_device(fake_gpu):
    devices.synchronize(torch.device("cuda", 1))
    devices.synchronize(torch.device("cpu"))
    assert fake_gpu.synced == [torch.device("cuda", 1)]
    fake_gpu.name = "NVIDIA H100 80GB HBM3"
    assert bench.peak_tflops(torch.device("cuda", 0), torch.bfloat16) == 989.4
    assert bench.peak_tflops(torch.device("cuda", 0), torch.float32) == 494.7  # TF32
    fake_gpu.name = "NVIDIA H100 PCIe"
    assert bench.peak_tflops(torch.device("cuda", 0), torch.bfloat16) == 756.0
    fake_gpu.name = "NVIDIA A100-SXM4-80GB"
    assert bench.peak_tflops(torch.device("cuda", 0), torch.float16) == 312.0
    fake_gpu.name = "Tesla T4"
    assert bench.peak_tflops(torch.device("cuda", 0), torch.bfloat16) is None  # no native bf16
    assert bench.peak_tflops(torch.device("cpu"), torch.bfloat16) is None


def test_training_flops_count_the_active_parameters():
    dense = MiniMindConfig()
    moe = MiniMindConfig(hidden_size=640, use_moe=True)
    with torch.device("meta"):
        params = sum(p.numel() for p in model_minimind.MiniMindForCausalLM(dense).parameters())
    norms = dense.num_hidden_layers * 2 * dense.hidden_size + dense.hidden_size
    attention = 12 * dense.num_hidden_layers * dense.hidden_size * 340
    assert bench.training_flops_per_token(dense, 340) == 6 * (params - norms) + attention
    # MoE: 2 routed + 1 shared of 5 experts per token, plus the router
    per_expert = 3 * 640 * moe.intermediate_size
    assert bench.training_flops_per_token(moe, 0) - bench.training_flops_per_token(
        MiniMindConfig(hidden_size=640), 0) == 6 * moe.num_hidden_layers * (2 * per_expert + 640 * 4)


# --------------------------------------------------------------------------------------------
# 5. MoE grouped_mm only where torch has the fast kernel
# --------------------------------------------------------------------------------------------

# sm100 (B200) has the kernel too, but its backward gives experts without tokens non-zero gradients (torch #172439)
@pytest.mark.parametrize("capability, grouped", [((9, 0), True), ((10, 0), False), ((8, 0), False),
                                                 ((8, 6), False), ((8, 9), False), ((12, 0), False)])
def test_moe_grouped_mm_only_on_sm90(fake_gpu, capability, grouped):
    fake_gpu.capability = capability
    config = MiniMindConfig(hidden_size=512, use_moe=True)
    tokens = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert kernels.can_group_experts(tokens, config.hidden_size, config.intermediate_size) is grouped
    tokens.dtype = torch.float32  # the CUTLASS kernel is bf16 only
    assert kernels.can_group_experts(tokens, config.hidden_size, config.intermediate_size) is False


@pytest.mark.parametrize("generation", ["minimind2", "minimind-3"])
def test_lora_on_the_experts_trains_where_the_grouped_kernel_runs(generation):
    """The grouped kernel reads each expert's weight directly, past LoRA's forward hook: with adapters on the experts
    the per-expert path runs instead, so every adapter of an expert that got tokens gets a gradient. (The CPU groups
    experts in fp32, as an H100 does in bf16, so this is the GPU's case.)"""
    from model.model_lora import apply_lora
    model = tiny_model(generation=generation, use_moe=True).train()
    layer = model.model.layers[0].mlp
    assert kernels.can_group_experts(torch.zeros(1, 64), 64, model.config.intermediate_size)  # grouped without LoRA
    apply_lora(model, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    ids = torch.randint(3, 6400, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name in ("gate_proj", "up_proj", "down_proj"):
        grads = [getattr(expert, name).lora.B.weight.grad for expert in layer.experts]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


# --------------------------------------------------------------------------------------------
# 3. Resume files: this device's RNG only; a bf16 run resumes in fp16
# --------------------------------------------------------------------------------------------

def test_resume_holds_and_restores_only_this_gpus_rng(tmp_path, monkeypatch):
    run = fake_run(checkpoint_dir=str(tmp_path), save_dir=str(tmp_path))
    run.device = torch.device("cuda", 1)  # as a process on the second GPU would be
    asked, restored = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": asked.append(device) or torch.tensor([7, 1], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state.tolist(), device)))
    model = tiny_model()
    checkpoint = Checkpoint(run, SampleStream(Rows(8), run.args, 0, 1, run.device), model,
                            torch.optim.AdamW(model.parameters()))
    checkpoint.save()
    state = torch.load(run.resume_path, weights_only=True)
    assert asked == [torch.device("cuda", 1)] and state["rng"][0]["cuda"].tolist() == [7, 1]
    run.args.from_resume = 1
    checkpoint.restore()
    assert restored == [([7, 1], torch.device("cuda", 1))]
    # a file from before, with every GPU's state, on a machine that now shows fewer GPUs: no crash
    state["rng"][0]["cuda"] = [torch.tensor([5], dtype=torch.uint8)]
    torch.save(state, run.resume_path)
    restored.clear()
    checkpoint.restore()
    assert restored == []


def test_a_bf16_resume_file_resumes_in_fp16(tmp_path, capsys):
    bf16 = fake_run(checkpoint_dir=str(tmp_path), save_dir=str(tmp_path), dtype="float32")
    model = tiny_model()
    Checkpoint(bf16, SampleStream(Rows(8), bf16.args, 0, 1, bf16.device), model,
               torch.optim.AdamW(model.parameters())).save()
    assert torch.load(bf16.resume_path, weights_only=True)["scaler"] == {}  # what a disabled GradScaler saves
    fp16 = fake_run(checkpoint_dir=str(tmp_path), save_dir=str(tmp_path), dtype="float16", from_resume=1)
    assert fp16.scaler.is_enabled()
    Checkpoint(fp16, SampleStream(Rows(8), fp16.args, 0, 1, fp16.device), model,
               torch.optim.AdamW(model.parameters())).restore()
    assert "fresh loss scale" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 7. No host read inside a training step; no buffer broadcast; frozen models in the autocast dtype
# --------------------------------------------------------------------------------------------

class Passive(TorchDispatchMode):
    """Runs every operation as it is (for sft_step_under when nothing is counted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def step_under(mode, tmp_path, monkeypatch, script="train_full_sft", extra=(), **run_changes):
    """trainer/{script}.py's first step (two micro-batches of tiny settings), run in this process under a
    TorchDispatchMode: `mode.inside` is True between the step's start (the window handed out) and its end (run.log)."""
    import importlib
    module = importlib.import_module(f"trainer.{script}")
    args = module.arguments(["--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "2",
                             "--accumulation_steps", "2", "--max_seq_len", "64", "--num_workers", "0",
                             "--dtype", "float32", "--max_steps", "1", "--save_interval", "1000", "--log_interval", "2",
                             "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
                             *(extra or ["--from_weight", "none"])])
    steps, log = trainer_utils.Run.steps, trainer_utils.Run.log

    def steps_watched(run, stream, checkpoint):
        for run_changes_name, value in run_changes.items():
            setattr(run, run_changes_name, value)
        for item in steps(run, stream, checkpoint):
            mode.inside = True
            yield item

    def log_watched(run, *a, **kw):
        mode.inside = False
        return log(run, *a, **kw)

    monkeypatch.setattr(trainer_utils.Run, "steps", steps_watched)
    monkeypatch.setattr(trainer_utils.Run, "log", log_watched)
    monkeypatch.setenv("MINIMIND_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    with mode:
        module.main(args)


def sft_step_under(mode, tmp_path, monkeypatch, **run_changes):
    """train_full_sft.py's first step under a TorchDispatchMode (see step_under)."""
    step_under(mode, tmp_path, monkeypatch, "train_full_sft", **run_changes)


# What waits for the GPU inside a step: a value read into Python (.item() / int() / bool()), an op whose output size
# depends on the data (nonzero, boolean-mask indexing, masked_select: the host must learn the size), and a tensor made
# from Python values (torch.tensor / as_tensor(number, device=...): a blocking copy from the host; aten.lift_fresh).
DATA_DEPENDENT_SIZE = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
                       "aten.unique_consecutive.default", "aten.unique_dim.default"}


# RL rollouts: sampling reads every new token back (generate stops at eos), so the host waits there anyway
ROLLOUT_FUNCTIONS = {"sample_and_score", "sample_batch"}


class HostSyncs(TorchDispatchMode):
    """Every operation inside a step that would make the host wait on a GPU, by kind: read, size, from_host."""

    def __init__(self):
        super().__init__()
        self.seen, self.inside = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            kind = None
            if func is torch.ops.aten._local_scalar_dense.default:
                kind = "read"
            elif str(func) in DATA_DEPENDENT_SIZE or (func is torch.ops.aten.index.Tensor and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
                kind = "size"
            elif func is torch.ops.aten.lift_fresh.default:
                kind = "from_host"
            if kind:
                self.seen.append((kind, self.where()))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def where():
        """The line of the trainer script that asked for it (file:line; else the innermost project line), 'rollout'
        for an RL rollout, or 'torch.optim' for the optimizer's own bookkeeping: AdamW keeps its step counters on
        the CPU unless fused or capturable, so reading them never waits on a GPU."""
        frames = traceback.extract_stack()
        if any(os.sep + os.path.join("torch", "optim") + os.sep in f.filename for f in frames):
            return "torch.optim"
        if any(f.name in ROLLOUT_FUNCTIONS for f in frames):
            return "rollout"
        ours = [f for f in frames if f.filename.startswith(REPO_ROOT) and os.sep + "tests" + os.sep not in f.filename]
        in_script = [f for f in ours if os.path.basename(f.filename).startswith("train_") and f.name == "main"]
        frame = (in_script or ours or [None])[-1]  # the step's own line, in the script's main()
        return f"{os.path.relpath(frame.filename, REPO_ROOT)}:{frame.lineno}" if frame else "?"


def cpu_copy_lines(script):
    """The lines of a trainer script that read counts off the window's CPU copies (before run.to_device): host work
    on a GPU too."""
    lines = open(os.path.join(REPO_ROOT, "trainer", f"{script}.py"), encoding="utf-8").read().splitlines()
    return {f"trainer/{script}.py:{i}" for i, line in enumerate(lines, 1)
            if line.strip().startswith(("counts = [", "weights = ["))}


def varlen_stand_in(monkeypatch):
    """The CUDA varlen kernel's path on the CPU: packed_rows picks varlen, and a stand-in computes it with the
    block-diagonal mask outside the watched mode (the real kernel takes cu_seqlens on the device and reads nothing)."""
    from torch.utils._python_dispatch import _disable_current_modes
    monkeypatch.setattr(kernels, "varlen_usable", lambda device, dtype: True)

    def stand_in(q, k, v, cu_seqlens, _cu, longest, _longest, window_size, enable_gqa):
        with _disable_current_modes():
            starts = torch.zeros(q.shape[0], dtype=torch.long)
            starts[cu_seqlens[1:-1].long()] = 1
            doc = starts.cumsum(0)
            mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
            out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask,
                                                 enable_gqa=enable_gqa)
            return out.transpose(0, 1)

    monkeypatch.setattr(kernels, "varlen_attn", stand_in)


@pytest.mark.parametrize("script, extra", [
    ("train_full_sft", []), ("train_full_sft", ["--packing", "1"]), ("train_pretrain", []), ("train_dpo", []),
    ("train_distill_reason", ["--packing", "1"]), ("train_distillation", ["teacher"]),
    ("train_grpo", ["--num_generations", "2", "--max_gen_len", "6", "--batch_size", "1"])])
def test_a_training_step_makes_the_host_wait_for_nothing(script, extra, tmp_path, monkeypatch):
    """Between the window handed out and run.log, no operation waits on the GPU: no value read back (.item(), int(),
    bool()), no data-dependent size (nonzero, boolean-mask indexing), no tensor made from Python values on the device
    (a blocking copy). Allowed: AdamW's step counters (CPU tensors unless fused), counts read off the window's CPU
    copy, and an RL rollout's sampling (which reads each token back anyway). Packed rows take the varlen path."""
    varlen_stand_in(monkeypatch)
    if extra == ["teacher"]:
        teacher = tmp_path / "teacher.pth"
        torch.save(model_minimind.MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).state_dict(),
                   teacher)
        extra = ["--student_hidden_size", "64", "--student_num_layers", "2", "--teacher_hidden_size", "64",
                 "--teacher_num_layers", "2", "--teacher_weight", str(teacher)]
    syncs = HostSyncs()
    step_under(syncs, tmp_path, monkeypatch, script, ["--from_weight", "none", *extra])
    waits = [(kind, where) for kind, where in syncs.seen if where not in ("torch.optim", "rollout")
             and where not in cpu_copy_lines(script)]
    assert waits == [], waits
    assert any(where == "torch.optim" for _, where in syncs.seen)  # the watch saw the step


def test_log_probs_take_only_the_answer_positions_and_no_whole_fp32_copy():
    """The RL log-probs: logits only at the positions that predict the answer (logits_to_keep), and log-softmax as
    gather minus a logsumexp over a few rows at a time - never an fp32 copy of the whole [N, T, 6400] logits (a GRPO
    batch of 16 x 1,600 tokens: 655 MB each, before)."""
    from trainer.losses import gathered_logprobs
    from trainer.rl.sampling import completion_logprobs

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out

    logits, targets = torch.randn(16, 40, 6400, dtype=torch.bfloat16), torch.randint(0, 6400, (16, 40))
    with torch.no_grad(), LargestFloat32() as watch:
        logps = gathered_logprobs(logits, targets, temperature=0.8)
    assert watch.largest <= 4 * 40 * 6400  # one chunk of 4 rows at a time, not 16
    full = torch.gather((logits.float() / 0.8).log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps, full, atol=1e-5)

    model, kept = tiny_model(), []
    model.lm_head.register_forward_hook(lambda module, inputs, out: kept.append(out.shape[1]))
    ids = torch.randint(3, 6400, (2, 12))
    rollout = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_length=7, temperature=0.8,
                              completion_mask=torch.ones(2, 5))
    with torch.no_grad():
        logps, _ = completion_logprobs(model, rollout)
        everything = model(ids).logits[:, 6:-1].float() / 0.8
    assert kept[0] == 6  # the 5 answer tokens' predictions and the last position, not all 12
    expected = torch.gather(everything.log_softmax(-1), 2, ids[:, 7:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps, expected, atol=1e-5)


def test_ddp_does_not_rebroadcast_the_rope_tables(tmp_path, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run = fake_run(use_compile=0)
        run.ddp = True
        model = run.wrap(tiny_model().train())
        syncs = []
        monkeypatch.setattr(DistributedDataParallel, "_sync_buffers", lambda self: syncs.append(1))
        for _ in range(2):
            model(torch.randint(3, 100, (2, 8)), labels=torch.randint(3, 100, (2, 8))).loss.backward()
        assert syncs == [] and len(list(model.module.buffers())) == 2  # the RoPE tables stay put
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_frozen_copies_are_the_policy_at_step_0_under_autocast(dtype):
    """The reference / old actor / teacher keep the trained model's fp32 weights and run under the same autocast, so at
    step 0 their log-probs equal the policy's exactly: KL 0, DPO margins 0, PPO ratios 1. (Cast whole to bf16 they
    differed, here by up to 2e-3 nat a token; summed over a long answer that is a ratio far from 1.)"""
    from trainer.losses import gathered_logprobs
    run = fake_run(dtype=dtype)
    run.dtype = getattr(torch, dtype)  # what a GPU gets; the CPU's autocast runs both
    model = tiny_model().train()  # the policy trains in train mode (dropout 0), the copy is in eval mode
    frozen = run.frozen_copy(model)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert {p.dtype for p in frozen.parameters()} == {torch.float32}  # the policy's precision
    ids = torch.randint(3, 6400, (3, 24))
    with run.autocast():
        policy = gathered_logprobs(model(ids).logits[:, :-1], ids[:, 1:])
        with torch.no_grad():
            reference = gathered_logprobs(frozen(ids).logits[:, :-1], ids[:, 1:])
    assert torch.equal(policy.detach(), reference)


def test_a_step_makes_no_float64_tensor_where_the_device_has_none(tmp_path, monkeypatch):
    """MPS has no float64: with the sums in float32 (what Run picks there) no float64 tensor may appear in a step."""

    class Float64Watch(TorchDispatchMode):
        seen, inside = False, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.inside and isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                self.seen = True
            return out

    watch = Float64Watch()
    sft_step_under(watch, tmp_path, monkeypatch, sum_dtype=torch.float32)
    assert not watch.seen


# --------------------------------------------------------------------------------------------
# 8. Tokenised once under torchrun; scripts/gpu_check.py on the CPU
# --------------------------------------------------------------------------------------------

def test_gpu_check_runs_every_stage_on_the_cpu_path(tmp_path, monkeypatch, capsys):
    """Every stage trains a few steps through the same code a GPU owner runs; supervised stages make only
    causal (unmasked) attention calls, the RL stages also masked ones, and all of them run on the CPU's
    flash kernel (on a GPU a call needing the math kernel would stop the stage)."""
    from scripts import gpu_check
    keep = tmp_path / "check"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(subprocess, "run", forked_run)  # each stage's trainer: a process forked from the zygote
    with pytest.raises(SystemExit) as done:
        gpu_check.main(gpu_check.arguments(
            ["--device", "cpu", "--dtype", "float32", "--hidden_size", "64", "--num_hidden_layers", "2",
             "--batch_size", "2", "--max_seq_len", "48", "--max_gen_len", "8", "--steps", "2",
             "--checks", "none", "--keep", str(keep)]))  # (checks: test_gpu_check.py)
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed[-4000:]
    stages = ["pretrain", "pretrain_moe", "full_sft", "lora", "dpo", "reason", "distillation", "ppo", "grpo", "spo"]
    for stage in stages:
        report = json.load(open(keep / f"{stage}.json"))
        kinds = report["attention"]
        assert kinds and set(kinds.values()) == {"FLASH_ATTENTION"}, (stage, kinds)
        masked = [k for k in kinds if " masked " in k]
        if stage in ("ppo", "grpo", "spo"):
            assert any(" train " in k for k in masked), (stage, kinds)  # left-padded rollouts need the mask
        else:
            assert not masked, (stage, kinds)  # right-padded rows: causal alone
        assert report["steps"] == 2 and report["peak_memory_gib"] > 0
        assert any(line.startswith(f"| {stage} | ") and "FLASH_ATTENTION" in line for line in printed.splitlines())
