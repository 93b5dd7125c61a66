"""Plumbing shared by every training stage, so that each train_*.py shows only its own algorithm.

- arguments common to all stages, paths that resolve against the repository (not the working directory)
- device choice (cuda -> mps -> cpu), DDP (nccl on CUDA, gloo on CPU), per-rank seeds, autocast + GradScaler
- a sample order that is a pure function of (seed, epoch), consumed in global positions, so a run resumes
  exactly, also on a different number of processes
- the learning-rate schedule lr_t = lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), optional linear warm-up
- optimizer steps (unscale, clip, step), progress bar, metrics JSONL under out/, wandb or swanlab
- atomic checkpoints: half-precision weights for inference and an fp32 resume file
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_DIR = os.path.join(REPO_ROOT, "trainer")
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from dataset.lm_dataset import DEMO_STAND_INS, pad_batch  # noqa: E402
from model.model_lora import atomic_torch_save, save_lora  # noqa: E402
from model.model_minimind import (GENERATIONS, MiniMindConfig, MiniMindForCausalLM,  # noqa: E402
                                  config_from_state_dict, load_state_dict_strict)
from model.qwen3_format import read_weights  # noqa: E402
from trainer.losses import count_label_tokens  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Arguments and paths
# ----------------------------------------------------------------------------------------------

def common_parser(description, *, save_weight, epochs, batch_size, learning_rate, accumulation_steps,
                  log_interval, save_interval, max_seq_len, data_path, from_weight, group_by_length=0):
    """The options every stage takes; each script passes its own defaults (MiniMind's) and adds extras.
    group_by_length: 1 for the stages that train on token rows (pretraining, SFT, LoRA, DPO, reasoning, KD),
    where it trains 2-3x the real tokens per second of MiniMind's random batches (docs/benchmarks.md)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--save_dir", default="../out", help="weights and metrics (relative to trainer/ by default)")
    p.add_argument("--checkpoint_dir", default="../checkpoints", help="resume files for --from_resume 1")
    p.add_argument("--save_weight", default=save_weight, help="name prefix of the saved weight file")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch_size", type=int, default=batch_size, help="rows per process per micro-batch")
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up before the cosine schedule")
    p.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: the best available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--use_wandb", action="store_true", help="also log to wandb or swanlab (see --tracker)")
    p.add_argument("--tracker", default="swanlab", choices=["swanlab", "wandb"], help="which one --use_wandb uses")
    p.add_argument("--wandb_project", default="MiniMind")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--accumulation_steps", type=int, default=accumulation_steps)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--log_interval", type=int, default=log_interval, help="optimizer steps between log lines")
    p.add_argument("--save_interval", type=int, default=save_interval, help="optimizer steps between saves")
    p.add_argument("--generation", default="minimind2", choices=sorted(GENERATIONS),
                   help="architecture: MiniMind2, or minimind-3 (per-head q/k norms, Qwen3-MoE experts)")
    # "%(default).0s" prints nothing: it only stops the help formatter from adding "(default: None)"
    p.add_argument("--hidden_size", type=int, default=None,
                   help="(default: 512, MiniMind2-Small; 768 with --generation minimind-3)%(default).0s")
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--max_seq_len", type=int, default=max_seq_len)
    p.add_argument("--data_path", default=data_path)
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--from_weight", default=from_weight,
                   help="weight to start from: a name (out/{name}_{hidden}[_moe].pth), a .pth file, a model folder "
                        "(a released minimind-3 Qwen3 folder included), or 'none' = random init")
    p.add_argument("--tokenizer_dir", default=None,
                   help="tokenizer folder (default: the one a --from_weight folder ships, else model/, this project's)")
    p.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="1 = continue from checkpoints/")
    p.add_argument("--group_by_length", type=int, default=group_by_length, choices=[0, 1],
                   help="1 = batch rows of similar length together (less padding; see ResumableBatchSampler); "
                        "0 = MiniMind's random batches")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = all)")
    p.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="torch.compile the model")
    p.add_argument("--seed", type=int, default=42)
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps a docstring's layout and ends every option's help with its default."""


def show_defaults(parser):
    """Give options without a help text one, so that HelpFormatter (which skips those) lists their default."""
    for action in parser._actions:
        if action.help is None:
            action.help = "(default: %(default)s)"
    return parser


def parse_args(parser, argv=None):
    """Parse, then turn path options into absolute paths: a default written relative to trainer/ (as in
    MiniMind, e.g. ../out) resolves against trainer/; a path the user typed resolves against the cwd."""
    args = show_defaults(parser).parse_args(argv)
    if getattr(args, "hidden_size", 0) is None:  # each generation's default size: MiniMind2-Small, minimind-3
        args.hidden_size = 768 if args.generation == "minimind-3" else 512
    for name in ("save_dir", "checkpoint_dir", "data_path", "reward_model_path", "tokenizer_dir"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value and value.lower() != "none":
            base = TRAINER_DIR if value == parser.get_default(name) else os.getcwd()
            setattr(args, name, ",".join(os.path.normpath(os.path.join(base, os.path.expanduser(v)))
                                          for v in value.split(",")))
    args.data_is_default = getattr(args, "data_path", None) == os.path.normpath(
        os.path.join(TRAINER_DIR, parser.get_default("data_path") or ""))
    return args


def data_file(args) -> str:
    """args.data_path, or, when the default full dataset is absent, its bundled demo stand-in."""
    if os.path.exists(args.data_path.split(",")[0]) or not args.data_is_default:
        return args.data_path
    name = os.path.basename(args.data_path)
    demo = os.path.join(REPO_ROOT, "dataset", DEMO_STAND_INS[name])
    print0(f"{args.data_path} not found. Download the full data with: python scripts/download_data.py {name}\n"
           f"Training on the bundled demo data instead: {os.path.relpath(demo, REPO_ROOT)}")
    return demo


def weight_path(save_dir, name, config) -> str:
    """MiniMind's naming: out/{name}_{hidden}[_moe].pth"""
    return os.path.join(save_dir, f"{name}_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth")


# ----------------------------------------------------------------------------------------------
# Devices, processes, precision
# ----------------------------------------------------------------------------------------------

def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(requested=None) -> str:
    """The device to use: the one asked for, else cuda -> mps -> cpu (training, eval, server, web chat)."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_device(name: str) -> torch.device:
    """torch.device for "cuda" / "cuda:N", made the current device: allocations without a device, the
    default CUDA generator and NCCL all follow the current device, which stays cuda:0 unless set."""
    device = torch.device(name)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def setup_device(requested, ddp: bool) -> torch.device:
    """This process's device, made current, and under torchrun its process group (nccl on CUDA, gloo else)."""
    device = pick_device(requested)
    if ddp and device.startswith("cuda"):
        # torchrun numbers the processes of a machine 0..n-1 (LOCAL_RANK); a launcher that shows each
        # process only its own GPU makes that GPU cuda:0 there, hence the modulo.
        device = cuda_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        # device_id binds this process's NCCL communicator to its GPU at init (eager init), so no
        # collective has to guess the device from the rank, and barrier() uses the bound device.
        dist.init_process_group("nccl", device_id=device)
        return device
    if ddp:
        dist.init_process_group("gloo")  # gloo reduces CPU tensors only: Run.all_reduce moves them there
    return cuda_device(device) if device.startswith("cuda") else torch.device(device)


def sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """The training precision asked for, unless this device only emulates it (then a message says so)."""
    dtype = getattr(torch, name)
    if dtype != torch.bfloat16:
        return dtype
    if device.type == "cpu" and not cpu_has_native_bf16():
        print0("This CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 would be slower than fp32 here, "
               "so training in float32. Pass --dtype float32 to silence this.")
        return torch.float32
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        # torch.cuda.is_bf16_supported() defaults to including_emulation=True and says yes on T4 / V100 /
        # RTX 20xx, where bf16 is emulated without tensor cores; compute capability 8.0 (Ampere) is native.
        print0(f"{torch.cuda.get_device_name(device)} (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no native bfloat16: "
               "training in float16 with loss scaling instead. Pass --dtype float16 to silence this.")
        return torch.float16
    if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        print0("bfloat16 on MPS needs macOS 14 or newer: training in float16 with loss scaling instead.")
        return torch.float16
    return dtype


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights for serving and evaluation: bf16 on GPUs that run it natively (sm80+), else fp16 on
    GPUs and MPS, fp32 on CPUs (where half-precision matmuls are slow or emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def use_tf32(device: torch.device):
    """On CUDA, let the fp32 matmuls that remain (fp32 runs, ops autocast keeps in fp32) use TF32 tensor
    cores: set_float32_matmul_precision("high") allows TF32 (10-bit mantissa) for float32 matmuls."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


def ready_device(name) -> torch.device:
    """A device for evaluation, serving or benchmarks: "cuda" / "cuda:N" made the current device, and TF32
    allowed for the fp32 matmuls there (training gets the same from Run)."""
    device = torch.device(name)
    if device.type == "cuda":
        device = cuda_device(str(device))
    use_tf32(device)
    return device


def benchmark_setup(device_name, dtype_name=None):
    """(device, dtype) of a benchmark script: bf16 on CUDA (float16 before sm80, with choose_dtype's message),
    float32 elsewhere, unless a dtype is asked for."""
    device = ready_device(device_name)
    dtype_name = dtype_name or ("bfloat16" if device.type == "cuda" else "float32")
    return device, choose_dtype(dtype_name, device) if device.type == "cuda" else getattr(torch, dtype_name)


def synchronize(device):
    """Wait for the device's queued work (for honest timings); nothing to wait for on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """Peak memory allocated by tensors on this device since the last reset (GiB); the process's peak
    resident set on a CPU (what psutil/ru_maxrss can say); the driver's current allocation on MPS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


# Dense (no sparsity) tensor-core peaks in TFLOP/s by GPU name and dtype, fp32 meaning TF32 (what
# float32 matmuls use after use_tf32). GeForce cards: the rate with fp32 accumulation (what torch uses).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "L40S": {"bfloat16": 362.1, "float16": 362.1, "float32": 183.0},
    "L40": {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5},
    "A10": {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0},
    "4090": {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6},
    "3090": {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6},
    "V100": {"float16": 125.0, "float32": 15.7},
    "T4": {"float16": 65.0, "float32": 8.1},
}


def peak_tflops(device, dtype):
    """The GPU's peak for this dtype (PEAK_TFLOPS), or None where unknown (CPUs, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), {})
    return peaks.get(str(dtype).removeprefix("torch."))


def training_flops_per_token(config, seq_len):
    """Forward + backward FLOPs per trained token: 6 per parameter a token passes through (Kaplan et al.,
    2020; active parameters for MoE, the embedding lookup excluded but the tied lm_head counted) plus
    the attention scores and mixing, 12 * layers * hidden * seq_len (PaLM appendix B)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.head_dim * config.num_attention_heads, config.head_dim * config.num_key_value_heads
    attention = 2 * hidden * q + 2 * hidden * kv
    experts = (config.num_experts_per_tok + config.n_shared_experts) if config.use_moe else 1
    mlp = 3 * hidden * inter * experts + (hidden * config.n_routed_experts if config.use_moe else 0)
    active = layers * (attention + mlp) + hidden * config.vocab_size
    return 6 * active + 12 * layers * q * seq_len


def lr_at(step, total_steps, base_lr, warmup_steps=0):
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), from lr down to 0.1 * lr,
    after an optional linear warm-up. t counts optimizer steps over all epochs (Run passes it in samples
    divided by the samples of one step, which may be fractional after a resume on another world size)."""
    if step < warmup_steps:
        return base_lr * min(step + 1, warmup_steps) / warmup_steps
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))


class ResumableBatchSampler(Sampler):
    """This rank's micro-batches of one epoch, starting after `consumed` samples.

    The epoch's order is a permutation fixed by (seed, epoch). Positions are global: in round k every rank
    takes its micro-batch of B from order[consumed + k * world * B : ... + world * B], so after k rounds the
    ranks together have consumed k * world * B samples. Resuming from that count gives the same stream on
    any world size. The r < world * B samples left at the end make one short last round, shared out as
    evenly as they go (every rank needs a row; only r < world samples wait for the next epoch's shuffle).

    With `lengths` (--group_by_length 1) the permutation is then cut into groups of GROUP_BATCHES * B
    samples; each group is sorted by length and cut into micro-batches of B, whose order inside the group
    is shuffled. A batch then holds rows of similar length, so little of it is padding (the idea of
    Hugging Face's LengthGroupedSampler); the order still depends only on (seed, epoch, B), so resuming works.
    """
    GROUP_BATCHES = 64

    def __init__(self, num_samples, batch_size, rank, world_size, seed, epoch, consumed=0, lengths=None):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_samples, generator=generator)
        if lengths is not None:
            order = self.group_by_length(order, lengths, batch_size, generator)
        self.order = order[consumed:].tolist()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.full_rounds, self.last_round = self.plan(len(self.order), batch_size, world_size)

    @staticmethod
    def plan(samples, batch_size, world_size):
        """(full rounds, samples of the short last round or 0) that a stream of this many samples makes."""
        full, rest = divmod(samples, batch_size * world_size)
        return full, rest if rest >= world_size else 0

    @classmethod
    def group_by_length(cls, order, lengths, batch_size, generator):
        grouped = []
        for group in order.split(cls.GROUP_BATCHES * batch_size):
            group = group[torch.argsort(lengths[group], descending=True, stable=True)]
            batches = list(group.split(batch_size))
            full = batches if len(batches[-1]) == batch_size else batches[:-1]  # a short tail batch stays last,
            grouped += [full[i] for i in torch.randperm(len(full), generator=generator)] + batches[len(full):]
        return torch.cat(grouped)  # so every batch starts at a multiple of batch_size

    def __len__(self):
        return self.full_rounds + bool(self.last_round)

    def round_samples(self, k):
        """Samples all ranks together take in round k."""
        return self.batch_size * self.world_size if k < self.full_rounds else self.last_round

    @classmethod
    def size(cls, samples, batch_size, world_size):
        """(rounds, samples they take) of a stream of this many samples."""
        full, last = cls.plan(samples, batch_size, world_size)
        return full + bool(last), full * batch_size * world_size + last

    def __iter__(self):
        for k in range(self.full_rounds):
            start = (k * self.world_size + self.rank) * self.batch_size
            yield self.order[start:start + self.batch_size]
        if self.last_round:  # rank r gets share_r = last // world (+1 for the first last % world ranks)
            start = self.full_rounds * self.batch_size * self.world_size
            share, extra = divmod(self.last_round, self.world_size)
            start += self.rank * share + min(self.rank, extra)
            yield self.order[start:start + share + (self.rank < extra)]


# ----------------------------------------------------------------------------------------------
# The run: everything a stage needs around its own loss
# ----------------------------------------------------------------------------------------------

class Run:
    """Set-up, data stream, optimizer steps, logging and checkpoints of one training run."""

    def __init__(self, args, weight_name=None):
        self.args = args
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.device = setup_device(args.device, self.ddp)
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        # Sums of losses and counts: float64 for exact token weighting, float32 on MPS, which has no float64.
        self.sum_dtype = sum_dtype(self.device)
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)

        self.dtype = choose_dtype(args.dtype, self.device)
        use_tf32(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.config = MiniMindConfig(generation=getattr(args, "generation", "minimind2"), hidden_size=args.hidden_size,
                                     num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe))
        self.weight_name = weight_name or args.save_weight
        os.makedirs(args.save_dir, exist_ok=True)
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        self.resume_path = os.path.join(args.checkpoint_dir, os.path.basename(
            weight_path(args.save_dir, self.weight_name, self.config)).replace(".pth", "_resume.pth"))
        self.metrics_path = weight_path(args.save_dir, self.weight_name, self.config).replace(".pth", "_metrics.jsonl")
        # step: optimizer steps taken; epoch, consumed: samples (all processes together) into that epoch;
        # step_start / samples: the run's samples before / after the current step; final_step: it ends the run.
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.step_start, self.samples, self.run_samples, self.final_step = 0, 0, 0, False
        # rows of the training data (saved in the resume file) and the count a resume file was written for
        self.num_samples, self._resumed_num_samples = None, None
        self.tracker, self.progress, self.step_tokens, self.step_metrics = None, None, 0, {}
        self.tokenizer, self.tokenizer_dir = None, None  # load_tokenizer() sets them; weights are checked against them
        self._last_time, self._tokens_since_log = time.perf_counter(), 0
        # Device-side record of the first step whose loss was not finite (0 = none yet): read on the host
        # only at log and save steps, so training never waits on the GPU just to check the loss.
        self._first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self._log_points = []  # (time, step, tokens/s) of each log line, for scripts/gpu_check.py
        self._saving = None  # (model, optimizer, extras) once prepare() has them: what an interrupt saves
        self._interrupted = None  # the signal that asked the run to stop at the next step boundary
        self._stopped_by_signal = False  # should_stop() ended the loop for that signal
        # A CPU-side group for the stop flag, so agreeing on it never waits on the GPU stream.
        self._flag_group = dist.new_group(backend="gloo") if self.ddp else None
        self.check_from_weight()

    def check_from_weight(self, from_weight=None, config=None):
        """The path of --from_weight: out/{from_weight}_{hidden}[_moe].pth for a name, or the .pth file / model
        folder it names (None for 'none'), failing clearly if it is not there; Run calls it at once, before any
        tokenising."""
        from_weight = getattr(self.args, "from_weight", None) if from_weight is None else from_weight
        if not from_weight or from_weight.lower() == "none":
            return None
        if os.path.isdir(from_weight) or (from_weight.endswith(".pth") and os.path.isfile(from_weight)):
            return os.path.abspath(from_weight)
        path = weight_path(self.args.save_dir, from_weight, config or self.config)
        if not os.path.exists(path):
            present = sorted(f for f in os.listdir(self.args.save_dir) if f.endswith(".pth")) \
                if os.path.isdir(self.args.save_dir) else []
            raise SystemExit(f"--from_weight {from_weight}: {path} does not exist. {self.args.save_dir} holds: "
                             f"{', '.join(present) or 'no .pth files'}. Train that stage first, or check "
                             "--save_dir / --hidden_size / --use_moe.")
        return path

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- model -----------------------------------------------------------------------------
    def load_tokenizer(self):
        """--tokenizer_dir; else the tokenizer a --from_weight model folder ships (a released minimind-3 folder
        does); else model/, this project's. Weights loaded later are checked against it (check_tokenizer_fits)."""
        self.tokenizer, self.tokenizer_dir = tokenizer_for(self.check_from_weight(),
                                                           getattr(self.args, "tokenizer_dir", None))
        if self.tokenizer_dir != PROJECT_TOKENIZER:
            print0(f"tokenizer: {self.tokenizer_dir}")
        return self.tokenizer

    def load_model(self, from_weight=None, config=None):
        """A MiniMind model, initialised randomly or from --from_weight (a name under --save_dir, a .pth file or a
        model folder), loaded strictly and checked against the run's tokenizer."""
        config = config or self.config
        model = MiniMindForCausalLM(config)
        path = self.check_from_weight(from_weight, config)
        if path:
            state = read_weights(path)
            generation = config_from_state_dict(state).generation  # read off the keys, never the file name
            if generation != config.generation:
                raise SystemExit(f"{path} holds a {generation} model, and this run builds a {config.generation} one: "
                                 f"pass --generation {generation}")
            load_state_dict_strict(model, state, source=path)
            # a folder's own tokenizer is the one it was trained with; any other is checked
            if self.tokenizer is not None and self.tokenizer_dir != path:
                check_tokenizer_fits(model, self.tokenizer, self.tokenizer_dir, path,
                                     chosen=bool(getattr(self.args, "tokenizer_dir", None)))
            print0(f"loaded {path}")
        params = sum(p.numel() for p in model.parameters())
        print0(f"model: {config.generation} {config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
               f"{params / 1e6:.2f}M parameters; device {self.device}, {str(self.dtype).removeprefix('torch.')}, "
               f"{self.world_size} process(es)")
        if os.environ.get(GPU_CHECK_ENV):
            install_attention_probe()
        return model.to(self.device)

    def freeze(self, model):
        """A model that is only ever evaluated (reference, old policy, teacher): eval mode, no gradients,
        held in the autocast dtype, since under autocast its matmuls run in that dtype anyway and fp32
        weights would only double its memory and be cast again on every forward."""
        model = model.eval().requires_grad_(False)
        return model.to(self.dtype) if self.dtype != torch.float32 else model

    def frozen_copy(self, model):
        """A frozen copy of the model as it is now (the reference policy of DPO / RL, PPO's old actor)."""
        return self.freeze(copy.deepcopy(unwrap(model)))

    @contextmanager
    def main_process_first(self):
        """The first process of each machine (LOCAL_RANK 0) runs the block first (tokenising a dataset into
        that machine's cache); the machine's other processes wait at a barrier, then run it and read that
        cache instead of tokenising the same file again. Keyed on the local rank, not the global one, so
        machines that do not share a disk each tokenise once, at the same time."""
        first = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if self.ddp and not first:
            dist.barrier()
        yield
        if self.ddp and first:  # every process enters the barrier once: before the block or after it
            dist.barrier()

    def prepare(self, model, optimizer, extras=None):
        """Resume state if asked (--from_resume 1), then wrap for torch.compile / DDP. From here on Ctrl-C or
        SIGTERM stops the run at the next step boundary with a resume checkpoint (see steps())."""
        self.restore(model, optimizer, extras)
        model = self.wrap(model)
        self._saving = (model, optimizer, extras)
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop_soon)
        return model

    def _stop_soon(self, signum, frame):
        if self._interrupted is not None:
            # A second Ctrl-C stops at once, without a checkpoint; one within a second is the same request
            # arriving twice (torchrun forwards the terminal's Ctrl-C to processes that already got it).
            if time.monotonic() - self._interrupted_at > 1.0:
                raise KeyboardInterrupt
            return
        self._interrupted, self._interrupted_at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self._interrupted}: finishing step {self.step} and saving a resume checkpoint "
              "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def should_stop(self):
        """At a step boundary: whether the loop ends here, before the data does - --max_steps reached, or Ctrl-C /
        SIGTERM arrived on any process (every process agrees; finish() then saves a resume checkpoint)."""
        if self.args.max_steps and self.step >= self.args.max_steps:
            return True
        asked = torch.tensor([float(self._interrupted is not None)])
        if self.ddp:
            dist.all_reduce(asked, group=self._flag_group)
        self._stopped_by_signal = bool(asked.item()) and self._saving is not None
        return self._stopped_by_signal

    def wrap(self, model):
        """torch.compile and/or DDP around a model whose trainable parameters are set."""
        if self.args.use_compile:
            model = torch.compile(model)
        if self.ddp:
            # forward_sync_buffers=False (torch 2.13's name for broadcast_buffers): the only buffers are the
            # RoPE tables, equal on every rank and never changed, and DDP would otherwise re-broadcast all
            # named_buffers() (non-persistent ones too) from rank 0 at the start of every training forward.
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                            forward_sync_buffers=False)
        return model

    # -- data --------------------------------------------------------------------------------
    def steps(self, dataset):
        """Yield (step, micro-batches of one optimizer step), resuming where a checkpoint left off.

        The micro-batches are still on the CPU (pinned on CUDA): accumulate() counts their tokens there
        and moves each to the device just before its forward. The last window of an epoch may hold fewer
        than accumulation_steps micro-batches: it is still one optimizer step, so no gradient crosses an
        epoch boundary.

        Progress is counted in samples, which mean the same on any number of processes (a step does not:
        it takes batch_size x processes x accumulation_steps samples): the schedule's position, the end of
        the run and the resume point are sample counts, so a run resumed on another world size ends where
        the uninterrupted one ends and follows the same learning rate per sample.
        """
        args = self.args
        self.check_same_data(dataset)
        self.num_samples = len(dataset)
        # rounds: one micro-batch on every process; an epoch trains epoch_samples of its rows on this world size
        epoch_rounds, self.epoch_samples = ResumableBatchSampler.size(len(dataset), args.batch_size, self.world_size)
        if epoch_rounds == 0:
            raise SystemExit(f"{len(dataset)} samples cannot give each of {self.world_size} processes a row: "
                             "use more data or fewer processes")
        self.run_samples = self.epoch_samples * args.epochs
        start_epoch, start_consumed = self.epoch, self.consumed
        rounds_left, _ = ResumableBatchSampler.size(len(dataset) - start_consumed, args.batch_size, self.world_size)
        steps_left = math.ceil(rounds_left / args.accumulation_steps) + \
            math.ceil(epoch_rounds / args.accumulation_steps) * (args.epochs - start_epoch - 1)
        self.total_steps = self.step + steps_left  # where this run's last step will be
        lengths = dataset.lengths() if args.group_by_length else None
        self._last_time, self._tokens_since_log = time.perf_counter(), 0
        self.progress = self._progress_bar()
        for epoch in range(start_epoch, args.epochs):
            self.epoch = epoch
            self.consumed = start_consumed if epoch == start_epoch else 0
            sampler = ResumableBatchSampler(len(dataset), args.batch_size, self.rank, self.world_size, args.seed,
                                            epoch, self.consumed, lengths)
            # The loader's own generator: creating its iterator must not draw from the global RNG, whose
            # state a resumed run restores for sampling (RL) and dropout.
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_batch, num_workers=args.num_workers,
                                pin_memory=self.device.type == "cuda", persistent_workers=False,
                                generator=torch.Generator().manual_seed(args.seed + epoch))
            window = []
            for i, batch in enumerate(loader):
                window.append(batch)
                if len(window) == args.accumulation_steps or i == len(sampler) - 1:
                    self.step_start = epoch * self.epoch_samples + self.consumed  # the schedule's position
                    self.consumed += sum(sampler.round_samples(k) for k in range(i + 1 - len(window), i + 1))
                    self.samples = epoch * self.epoch_samples + self.consumed
                    self.final_step = epoch == args.epochs - 1 and i == len(sampler) - 1
                    self.step += 1
                    yield self.step, window  # the caller runs the step: forward, backward, update, log, save
                    window = []

    def check_same_data(self, dataset):
        """A resumed run continues the saved sample order only over the same rows (see restore)."""
        saved = self._resumed_num_samples
        if saved is not None and saved != len(dataset):
            raise SystemExit(f"{self.resume_path} was written for {saved} training rows, but this data gives "
                             f"{len(dataset)}: the saved position would point at other rows. Resume on the same "
                             "data and settings (--data_path, --max_seq_len, --packing), or start afresh without "
                             "--from_resume.")

    def all_reduce(self, tensor):
        """The element-wise sum of a tensor over all processes (itself when there is one process)."""
        if not self.ddp:
            return tensor
        if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
            cpu = tensor.cpu()  # gloo reduces CPU tensors only
            dist.all_reduce(cpu)
            return cpu.to(tensor.device)
        dist.all_reduce(tensor)
        return tensor

    def all_sum(self, *values):
        """Sum numbers or 0-dim tensors over all processes (one collective, no host sync); returns a
        tensor on the device (float64; float32 on MPS, which has no float64)."""
        return self.all_reduce(torch.stack([torch.as_tensor(v, device=self.device).to(self.sum_dtype).reshape(())
                                            for v in values]))

    def to_device(self, batch):
        """A batch's tensors on the training device (non_blocking: they come from pinned memory on CUDA)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def accumulate(self, model, window, loss_fn, count=None):
        """Forward and backward every micro-batch of one optimizer step; return the step's mean loss.

        loss_fn(batch) -> (mean loss over the batch's items, extra loss such as MoE balance, or 0[, metrics]).
        Items (loss-carrying label tokens, or what `count(batch)` counts) weigh the same across
        micro-batches and processes: batch b's mean loss enters as (n_b / N) * loss_b, N being the
        step's items on all processes, so accumulation and DDP give exactly the large-batch loss.
        Optional metrics (a dict of batch means) are averaged the same way into self.step_metrics.
        model: the trained model, or a list of them (PPO's actor and critic) that all wait for the last
        micro-batch before DDP reduces their gradients.
        The loss, metrics and token count stay on the device; log() reads them at log steps only.
        """
        models = model if isinstance(model, (list, tuple)) else [model]
        count = count or (lambda batch: count_label_tokens(batch["labels"]))
        counts = [count(batch) for batch in window]  # on the CPU batches, before the transfer
        real_tokens = sum(int(v.sum()) for b in window for k, v in b.items() if k.endswith("attention_mask"))
        total = self.all_sum(sum(counts))[0].clamp(min=1)
        step_loss = torch.zeros((), dtype=self.sum_dtype, device=self.device)
        step_metrics = {"aux_loss": 0.0} if self.config.use_moe else {}  # logged: the router's balance term
        for i, (cpu_batch, n) in enumerate(zip(window, counts)):
            batch = self.to_device(cpu_batch)
            with ExitStack() as no_sync:
                if self.ddp and i < len(window) - 1:  # inside the window DDP's all-reduce waits for the last
                    for m in models:
                        no_sync.enter_context(m.no_sync())
                with self.autocast():
                    loss, extra, *metrics = loss_fn(batch)
                # The step's loss over its M micro-batches on W processes, N items in all:
                #   L = sum_b (n_b / N) * loss_b + sum_b extra_b / (M * W)
                # Each micro-batch backpropagates its own part; DDP averages gradients over the W processes,
                # so the part is multiplied by W first.
                token_share = n / total                                # n_b / N
                extra_share = extra / len(window) / self.world_size   # extra_b / (M * W)
                part_of_step = loss * token_share.to(loss.dtype) + extra_share
                self.scaler.scale(part_of_step * self.world_size).backward()
            step_loss += loss.detach().to(self.sum_dtype) * token_share
            if self.config.use_moe:
                step_metrics["aux_loss"] += torch.as_tensor(extra_share, device=self.device).detach().to(self.sum_dtype)
            for name, value in (metrics[0] if metrics else {}).items():
                value = torch.as_tensor(value, device=self.device).detach().to(self.sum_dtype)
                step_metrics[name] = step_metrics.get(name, 0.0) + value * token_share
            # masks a loss_fn added (RL rollouts) were made on the device: summed there, read later
            real_tokens = real_tokens + sum((v.sum() for k, v in batch.items()
                                             if k.endswith("attention_mask") and k not in cpu_batch), 0)
        names = sorted(step_metrics)
        sums = self.all_sum(step_loss, real_tokens, *[step_metrics[name] for name in names])
        self._first_bad_step = torch.where((self._first_bad_step == 0) & ~torch.isfinite(sums[0]),
                                           self.step, self._first_bad_step)
        self.step_tokens = sums[1]
        self.step_metrics = dict(zip(names, sums[2:]))
        return sums[0]

    # -- update ------------------------------------------------------------------------------
    def optimizer_step(self, optimizer, learning_rate=None, more=()):
        """Set the scheduled lr, unscale, clip, step, zero the gradients; returns the lr used.
        more: further (optimizer, base lr) pairs stepped alongside (e.g. PPO's critic) on the same schedule."""
        lrs = []
        # The schedule runs over samples (see steps()), here in units of one full step of this run, so a run
        # resumed on another world size follows the same curve per sample: t = step_start / run_samples.
        step_samples = self.args.batch_size * self.world_size * self.args.accumulation_steps
        for opt, base_lr in [(optimizer, learning_rate or self.args.learning_rate), *more]:
            lr = lr_at(self.step_start / step_samples, self.run_samples / step_samples, base_lr, self.args.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                  self.args.grad_clip if self.args.grad_clip > 0 else float("inf"))
            if opt is optimizer:
                self.step_metrics["grad_norm"] = norm  # before clipping; read at log steps
            self.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
            lrs.append(lr)
        self.scaler.update()  # once per step, after every optimizer
        return lrs[0]

    # -- logging -----------------------------------------------------------------------------
    def _progress_bar(self):
        if not is_main():
            return None
        from tqdm import tqdm
        total = min(self.total_steps, self.args.max_steps) if self.args.max_steps else self.total_steps
        return tqdm(total=total, initial=min(self.step, total), desc=self.weight_name, dynamic_ncols=True,
                    disable=os.environ.get("MINIMIND_NO_PROGRESS") == "1")

    def check_finite(self):
        """Stop if any step's loss so far was not finite (one host read of a device flag)."""
        bad_step = int(self._first_bad_step)
        if bad_step:
            raise SystemExit(f"loss is not finite (nan or inf) since step {bad_step}: stopping without saving. The "
                             f"last good checkpoint is {self.resume_path} (resume with --from_resume 1, perhaps with "
                             "a lower --learning_rate or --dtype float32).")

    def log(self, **metrics):
        """Called once per optimizer step on every rank, after accumulate(). Every log_interval steps rank 0
        writes the metrics, those loss_fn returned and the real tokens/s to the JSONL, the tracker and the
        progress bar. Values may be device tensors: they are read on the host only here, at log steps."""
        metrics = {**self.step_metrics, **metrics}
        self._tokens_since_log = self._tokens_since_log + self.step_tokens
        if self.progress is not None:
            self.progress.update(1)
        if self.step % self.args.log_interval and not self.is_last_step():
            return
        self.check_finite()  # on every rank, so all of them stop together
        if not is_main():
            return
        synchronize(self.device)  # the time is taken when the device has really finished the steps
        now = time.perf_counter()
        tokens_per_s = float(self._tokens_since_log) / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens_since_log = now, 0
        record = dict(step=self.step, epoch=self.epoch, samples=self.samples,
                      **{k: float(f"{float(v):.6g}") for k, v in metrics.items()},
                      tokens_per_s=round(tokens_per_s, 1), time=round(time.time(), 1))
        if self.progress is not None:
            self.progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                                       if k in ("loss", "lr", "tokens_per_s") or k in metrics})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._log_points.append((now, self.step, record["tokens_per_s"]))
        if self.args.use_wandb:
            self._tracker().log(record, step=self.step)

    def _tracker(self):
        if self.tracker is None:
            name = f"{self.weight_name}_{self.config.hidden_size}"
            if self.args.tracker == "wandb":
                import wandb
                self.tracker = wandb.init(project=self.args.wandb_project, name=name, config=vars(self.args))
            else:
                import swanlab
                self.tracker = swanlab.init(project=self.args.wandb_project, name=name,
                                            config=vars(self.args))
        return self.tracker

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model, optimizer, extras=None):
        """Weights for inference (half precision; LoRA-only for LoRA runs) and the fp32 resume file.
        extras: {name: module or optimizer} (e.g. a critic and its optimizer) saved into the resume file too."""
        self.check_finite()  # never overwrite a good checkpoint with weights that saw a nan
        raw = unwrap(model)
        # This process's generators only: its own GPU's state (get_rng_state_all would tie the file to the
        # number of visible GPUs), or the MPS one.
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                   mps=torch.mps.get_rng_state() if self.device.type == "mps" else None)
        all_rng = [None] * self.world_size
        if self.ddp:
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if is_main():
            lora_name = getattr(self.args, "lora_name", None)
            if lora_name:
                path = os.path.join(self.args.save_dir, "lora", f"{lora_name}_{self.config.hidden_size}.pth")
                save_lora(raw, path)
            else:
                path = weight_path(self.args.save_dir, self.weight_name, self.config)
                atomic_torch_save({k: v.detach().half().cpu() for k, v in raw.state_dict().items()}, path)
            state = dict(model=trainable_state(raw), optimizer=optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         step=self.step, epoch=self.epoch, consumed=self.consumed, world_size=self.world_size,
                         num_samples=self.num_samples,
                         tokenizer=tokenizer_id(self.tokenizer),
                         rng=all_rng,
                         extras={k: unwrap(m).state_dict() for k, m in (extras or {}).items()},
                         args={k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool))})
            atomic_torch_save(state, self.resume_path)
            if self.progress is not None:
                self.progress.write(f"step {self.step}: saved {os.path.relpath(path, REPO_ROOT)} and "
                                    f"{os.path.relpath(self.resume_path, REPO_ROOT)}")
        if self.ddp:
            dist.barrier()

    def is_last_step(self):
        """The run's final step: the one that ends the last epoch's sample stream, or --max_steps."""
        return self.final_step or bool(self.args.max_steps and self.step >= self.args.max_steps)

    def maybe_save(self, model, optimizer, extras=None):
        if self.step % self.args.save_interval == 0 or self.is_last_step():
            self.save(model, optimizer, extras)

    def restore(self, model, optimizer, extras=None):
        """With --from_resume 1: load the resume file into model/optimizer/scaler and the data position."""
        if not self.args.from_resume:
            return
        if not os.path.exists(self.resume_path):
            print0(f"--from_resume 1, but there is no {self.resume_path} yet: starting from the beginning")
            return
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        self.check_same_order(state.get("args", {}))
        saved_tokenizer, tokenizer = state.get("tokenizer"), tokenizer_id(self.tokenizer)
        if saved_tokenizer and tokenizer and saved_tokenizer != tokenizer:
            raise SystemExit(f"{self.resume_path} was trained with another tokenizer than {self.tokenizer_dir} (the "
                             f"resume file's {state.get('args', {}).get('tokenizer_dir') or 'model/'}): the token "
                             "ids would change meaning. Resume with that --tokenizer_dir.")
        self._resumed_num_samples = state.get("num_samples")
        raw = unwrap(model)
        missing, unexpected = raw.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
        if unexpected or set(missing) & trainable:
            raise SystemExit(f"{self.resume_path} does not match this model: missing {sorted(set(missing) & trainable)[:5]}, "
                             f"unexpected {unexpected[:5]} (different --hidden_size / --use_moe / LoRA settings?)")
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():  # GradScaler.load_state_dict refuses the {} a disabled scaler saves
            print0("the resume file comes from a run without loss scaling (bf16 / fp32): float16 starts with a "
                   "fresh loss scale")
        for name, item in (extras or {}).items():
            unwrap(item).load_state_dict(state["extras"][name])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        if state["world_size"] == self.world_size:
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
            cuda_rng = rng.get("cuda")
            if isinstance(cuda_rng, (list, tuple)):  # files from earlier versions held every GPU's state
                cuda_rng = cuda_rng[self.device.index] if self.device.type == "cuda" and self.device.index < len(cuda_rng) else None
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
            if rng.get("mps") is not None and self.device.type == "mps":
                torch.mps.set_rng_state(rng["mps"])
        else:
            print0(f"resuming a {state['world_size']}-process run on {self.world_size}: the sample stream continues "
                   "exactly; random states are reseeded")
        print0(f"resumed from {self.resume_path}: step {self.step}, epoch {self.epoch}, {self.consumed} samples "
               "into the epoch")
        if is_main() and os.path.exists(self.metrics_path):  # rows logged after that checkpoint will be redone
            with open(self.metrics_path, encoding="utf-8") as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(rows))

    # Settings that fix which rows a resumed position points at, with the value a resume file that predates
    # the setting was written under. The seed fixes the shuffle; grouping (and with it the batch size and
    # the row lengths, which --max_seq_len cuts) the order; --max_seq_len and --packing which rows exist.
    ORDER_SETTINGS = dict(seed=None, group_by_length=0, packing=0, batch_size=None, max_seq_len=None)

    def check_same_order(self, saved):
        """Refuse to resume with a setting that would change the sample order: the saved position would then
        skip some rows and repeat others (a changed seed or grouping, or with grouping or packing on a
        changed --batch_size / --max_seq_len). Other settings (learning rate, steps, ...) may change."""
        current = vars(self.args)
        grouped = saved.get("group_by_length", 0) or current.get("group_by_length")
        packed = saved.get("packing", 0) or current.get("packing")
        matters = dict(seed=True, group_by_length=True, packing=True, batch_size=grouped, max_seq_len=grouped or packed)
        for name, before_it_existed in self.ORDER_SETTINGS.items():
            if name not in current or not matters[name]:
                continue
            was = saved.get(name, before_it_existed)
            if was is not None and was != current[name]:
                raise SystemExit(f"{self.resume_path} was written with --{name} {was}, and this run has --{name} "
                                 f"{current[name]}: that changes the sample order, so the saved position would "
                                 f"skip some rows and repeat others. Resume with --{name} {was}, or start afresh "
                                 "without --from_resume.")

    def _write_gpu_check_report(self, path):
        """What scripts/gpu_check.py tabulates: seconds per step after the first, real tokens/s, peak memory,
        training FLOPs per token and the attention kernels this stage's forwards ran on."""
        times = [(t, step) for t, step, _ in self._log_points]
        later = list(zip(times, times[1:]))  # the first step pays for start-up (kernels, allocator, compile)
        step_s = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in later]
        report = dict(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), world_size=self.world_size,
                      steps=self.step, step_s=step_s, tokens_per_s=[tps for _, _, tps in self._log_points[1:]],
                      peak_memory_gib=peak_memory_gib(self.device),
                      flops_per_token=training_flops_per_token(self.config, self.args.max_seq_len),
                      peak_tflops=peak_tflops(self.device, self.dtype), attention=ATTENTION_KERNELS_SEEN)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f)

    def finish(self):
        """After the loop: a run stopped by a signal saves its resume checkpoint and exits with 130; otherwise
        close the progress bar and tracker, and leave together with the other processes."""
        if self._stopped_by_signal:
            self.save(*self._saving)
            if self.progress is not None:
                self.progress.close()
            print0(f"interrupted at step {self.step}; resume with --from_resume 1")
            self._leave_together(130)
            raise SystemExit(130)
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.finish()
        if os.environ.get(GPU_CHECK_ENV) and is_main():
            self._write_gpu_check_report(os.environ[GPU_CHECK_ENV])
        self._leave_together(0)

    def _leave_together(self, exit_code):
        """Under DDP, with every file saved: all processes leave at once. The DDP wrapper still holds the gloo
        group, and letting interpreter shutdown destroy it can abort the process ("terminate called without
        an active exception") after a successful run, so skip that shutdown once all is flushed."""
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)


# ----------------------------------------------------------------------------------------------
# scripts/gpu_check.py: every stage reports its speed, memory and attention kernels
# ----------------------------------------------------------------------------------------------

GPU_CHECK_ENV = "MINIMIND_GPU_CHECK"  # set by scripts/gpu_check.py to the JSON file a stage reports into
ATTENTION_KERNELS_SEEN = {}  # kind of attention call -> the SDPA backend that ran it


def install_attention_probe():
    """Make every new kind of attention call (device, dtype, masked or causal, train or no-grad) run once
    under the fast SDPA kernels only (flash, memory-efficient, cuDNN; flash on a CPU), recording which one
    took it. On a GPU a call that only the math kernel accepts raises, with torch's reasons: the math kernel
    upcasts to fp32 and keeps a [B, H, T, T] tensor for the backward, slow and memory-hungry."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import kernels
    fast = {"cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
            "cpu": [SDPBackend.FLASH_ATTENTION]}

    def probe(q, k, v, **kwargs):
        kind = (f"{q.device.type} {str(q.dtype).removeprefix('torch.')} "
                f"{'masked' if kwargs.get('attn_mask') is not None else 'causal' if kwargs.get('is_causal') else 'open'} "
                f"{'train' if torch.is_grad_enabled() and q.requires_grad else 'no-grad'} "
                f"{'full' if q.shape[2] == k.shape[2] else 'after-cache'}")
        if kind in ATTENTION_KERNELS_SEEN:
            return
        reasons = []
        for backend in fast.get(q.device.type, []):
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v, **kwargs)
                    ATTENTION_KERNELS_SEEN[kind] = backend.name
                    return
                except RuntimeError as error:
                    reasons += [str(w.message) for w in caught] or [str(error)]
        if q.device.type == "cuda":
            raise RuntimeError(f"attention call [{kind}, q {list(q.shape)}, k {list(k.shape)}] falls to the slow math "
                               "kernel:\n  " + "\n  ".join(reasons))
        ATTENTION_KERNELS_SEEN[kind] = "MATH" if q.device.type in fast else f"{q.device.type} default (not checked)"

    kernels.ATTENTION_PROBE = probe


def atomic_write_text(path, text):
    """Replace a text file in one step (a kill never leaves half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def unwrap(model):
    """The MiniMind module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def trainable_state(model):
    """fp32 copies of the trainable parameters (all of them in full training, the adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k in names}


PROJECT_TOKENIZER = os.path.join(REPO_ROOT, "model")


def load_tokenizer(path=PROJECT_TOKENIZER):
    from transformers import AutoTokenizer
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise SystemExit(f"no tokenizer at {path}: expected tokenizer.json and tokenizer_config.json "
                         "(python scripts/train_tokenizer.py writes them; a released model folder ships its own)")
    return AutoTokenizer.from_pretrained(path)


def tokenizer_id(tokenizer):
    """A short hash of the token -> id mapping (None without a tokenizer), which a resume file keeps."""
    if tokenizer is None:
        return None
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def has_tokenizer(folder):
    return os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "tokenizer.json"))


def tokenizer_for(weight, tokenizer_dir=None):
    """(tokenizer, its folder) for a weight (a .pth file, a model folder, or None): tokenizer_dir; else the one a
    model folder ships, the one it was trained with; else model/. A tokenizer_dir that differs from the one the
    folder ships is refused, saying how."""
    own = weight is not None and has_tokenizer(weight)
    path = tokenizer_dir or (weight if own else PROJECT_TOKENIZER)
    tokenizer = load_tokenizer(path)
    if tokenizer_dir and own:
        difference = tokenizer_difference(load_tokenizer(weight), tokenizer)
        if difference:
            raise SystemExit(f"{weight} ships its own tokenizer, and --tokenizer_dir {tokenizer_dir} is another one: "
                             f"{difference}. Leave out --tokenizer_dir to use the folder's.")
    return tokenizer, path


def tokenizer_difference(a, b):
    """How two tokenizers differ, in words: None when every token has the same id in both."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a == vocab_b:
        return None
    moved = sum(vocab_b.get(token) != i for token, i in vocab_a.items())
    tags = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")
    tags = ", ".join(f"{t} {vocab_a.get(t)} vs {vocab_b.get(t)}" for t in tags if vocab_a.get(t) != vocab_b.get(t))
    return (f"{moved} of its {len(vocab_a)} tokens have another id or none in the other ({len(vocab_b)} tokens)"
            + (f"; special tokens: {tags}" if tags else ""))


# Plain Chinese and English, the languages every MiniMind is trained on: a weight read with the tokenizer it was
# trained with predicts it better than uniform guessing; read with another, it confidently predicts the wrong ids.
PROBE_TEXT = ("人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。今天天气很好，我们一起去公园散步吧。"
              "The sun rises in the east and sets in the west. Reading books is a good way to learn new things.")


@torch.no_grad()
def probe_loss(model, tokenizer):
    """Mean next-token cross-entropy of the model on PROBE_TEXT as the tokenizer encodes it (bos first, as in
    pretraining)."""
    ids = tokenizer((tokenizer.bos_token or "") + PROBE_TEXT, add_special_tokens=False).input_ids
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([ids], device=device)).logits.float()
    finally:
        model.train(was_training)
    return torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:], device=device)).item()


def check_tokenizer_fits(model, tokenizer, tokenizer_dir, weight, chosen=False):
    """Say so when a weight is paired with a tokenizer it was not trained with (the ids would mean other text and
    every answer would be garbage): a tokenizer larger than the weight's vocabulary stops the load; so does one whose
    encoding of PROBE_TEXT the weight predicts worse than uniform guessing by a nat, unless the tokenizer was chosen
    (--tokenizer_dir), which turns that into a warning: a weight that reads no text at all (random, or barely
    trained and confident) looks the same, and the one who names the tokenizer knows which it is."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens and {weight} only "
                         f"{vocab_size} embedding rows: they do not belong together")
    loss, uniform = probe_loss(model, tokenizer), math.log(vocab_size)
    if loss <= uniform + 1.0:
        return
    message = (f"{weight} does not read the token ids of the tokenizer in {tokenizer_dir}: on a plain sentence its "
               f"loss is {loss:.1f} nats a token, worse than guessing uniformly ({uniform:.1f}). A weight needs the "
               "tokenizer it was trained with: a released minimind-3 weight the one in its model folder "
               "(--tokenizer_dir path/to/minimind-3), a weight trained here the one its run used (model/ unless "
               "--tokenizer_dir said otherwise).")
    if not chosen:
        raise SystemExit(message + " To load it with this tokenizer all the same, name it: --tokenizer_dir "
                         f"{tokenizer_dir}")
    print(f"warning: {message}", file=sys.stderr, flush=True)
