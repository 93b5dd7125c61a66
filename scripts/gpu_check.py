"""The first command to run on a GPU machine: every training stage for a few steps, checked and timed, then the
checks of what only a GPU shows (packed rows, grouped experts, compile, fp16, resume, host syncs, several GPUs,
the KV cache, long sequences).

    python scripts/gpu_check.py                          # all GPUs found (torchrun over them when more than one)
    python scripts/gpu_check.py --nproc 1 --dtype float16
    python scripts/gpu_check.py --device cpu --hidden_size 64 --num_hidden_layers 2   # the same path on a CPU
    python scripts/gpu_check.py --stages none --checks packing,moe                    # only some checks

Part 1, the stages. Each stage (pretrain, MoE pretrain, SFT, LoRA, DPO, reasoning, KD, PPO, GRPO, SPO) runs its own
trainer/train_*.py on the bundled demo data for --steps optimizer steps, each starting from the weight the
stage before it wrote, all under a temporary folder. Inside the trainers every new kind of attention call
(masked or causal, training or no-grad, full or after the KV cache) runs once under the fast SDPA kernels
only (flash, memory-efficient, cuDNN), so a call that would fall to the slow math kernel stops the stage with
torch's reasons instead of running slowly. The table then shows per stage:

    s/step         median seconds per optimizer step after the first (which pays for start-up)
    tokens/s       real (non-padding) tokens per second over all processes; rollout tokens for RL
    MFU            training FLOPs (6 x active parameters + attention, per trained token) per second over the
                   GPU's dense peak for the dtype; the frozen models' passes and sampling are not counted,
                   so DPO, KD and the RL stages show less than they compute
    peak memory    torch.cuda.max_memory_allocated of rank 0 (the process's peak RSS on a CPU)
    attention      the SDPA kernels the stage's attention calls ran on

Part 2, the checks: a table | check | result | detail |, where a result is

    ok                     the check passed (the detail gives the numbers it compared)
    FAILED                 a wrong result, with the numbers
    needs a CUDA GPU: why  this device cannot show it (on a CPU everything else still runs)
    not run: why           this GPU or these settings cannot show it

    packing       --packing 1 rows of both generations: varlen flash attention vs the block-diagonal mask vs each
                  document alone (logits and gradients)
    moe           minimind2-MoE and minimind-3-MoE: grouped experts vs per-expert, outputs and gradients, and an
                  expert that gets no token
    compile       train_pretrain.py --use_compile 1: recompiles, graph breaks, and its loss against eager
    fp16          float16 with loss scaling: skipped steps and the final scale
    resume        N steps straight vs N/2, stop, --from_resume 1: the same losses and weights
    host_syncs    what makes the host wait for the device inside a training step, per step
    multi_gpu     the same global batch on 1 vs N processes: loss, grad norm, parameters on every rank
    kv_cache      generating with the KV cache vs a full forward of the same tokens (the --dtype, bf16 by default)
    peak_memory   one training step at 2,048 and 4,096 tokens

The checks follow --device, --dtype, --hidden_size, --num_hidden_layers, --batch_size, --max_seq_len and --steps.
Exit status 1 if a stage or a check failed. Copy the tables into docs/benchmarks.md with the GPU's name.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections import Counter, namedtuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root
from common.cli import HelpFormatter, show_defaults

# (stage, script, arguments, the stage whose weight it starts from)
STAGES = [
    ("pretrain", "train_pretrain.py", ["--from_weight", "none"], None),
    ("pretrain_moe", "train_pretrain.py", ["--from_weight", "none", "--use_moe", "1"], None),
    ("full_sft", "train_full_sft.py", ["--from_weight", "pretrain"], "pretrain"),
    ("lora", "train_lora.py", ["--from_weight", "full_sft"], "full_sft"),
    ("dpo", "train_dpo.py", ["--from_weight", "full_sft"], "full_sft"),
    ("reason", "train_distill_reason.py", ["--from_weight", "dpo"], "dpo"),
    ("distillation", "train_distillation.py", ["--from_weight", "full_sft", "--teacher_weight", "full_sft"], "full_sft"),
    ("ppo", "train_ppo.py", ["--from_weight", "full_sft", "--reasoning", "0"], "full_sft"),
    ("grpo", "train_grpo.py", ["--from_weight", "full_sft", "--reasoning", "0", "--num_generations", "4"], "full_sft"),
    ("spo", "train_spo.py", ["--from_weight", "full_sft", "--reasoning", "0"], "full_sft"),
]


CHECK_NAMES = ["packing", "moe", "compile", "fp16", "resume", "host_syncs", "multi_gpu", "kv_cache", "peak_memory"]
# Internal: `gpu_check.py --run-trainer SCRIPT ARGS` runs a trainer inside this file for the checks (run_trainer_inside)
TRAINER_MODE = "--run-trainer"


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default=None,
                        help="cuda / cuda:1 / mps / cpu (default: cuda when torch sees a GPU, else mps, else cpu)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (GPUs) to use; default: every GPU found")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16, help="rows per process (RL stages: 2 prompts)")
    parser.add_argument("--max_seq_len", type=int, default=340)
    parser.add_argument("--max_gen_len", type=int, default=128, help="longest sampled answer in the RL stages")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per stage")
    parser.add_argument("--stages", default=",".join(s[0] for s in STAGES), help="comma-separated subset, or none")
    parser.add_argument("--checks", default="all", help=f"comma-separated subset of {','.join(CHECK_NAMES)}; "
                                                        "all, or none")
    parser.add_argument("--keep", default=None, help="keep the weights, metrics and reports in this folder")
    args = show_defaults(parser).parse_args(argv)
    for value, names, what in ((args.stages, [s[0] for s in STAGES], "stages"), (args.checks, CHECK_NAMES, "checks")):
        unknown = set(value.split(",")) - set(names) - {"all", "none"}
        if unknown:
            parser.error(f"unknown {what} {sorted(unknown)}; choose from {','.join(names)}, all or none")
    return args


def chosen(value, names):
    """The names a comma-separated option picks ('all' and 'none' too), in `names` order."""
    wanted = value.split(",")
    return [name for name in names if name in wanted or "all" in wanted]


if __name__ == "__main__" and sys.argv[1:2] != [TRAINER_MODE]:
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

# -- the checks' trainer runs --------------------------------------------------------------------------------------
# The checks run each trainer as `gpu_check.py --run-trainer SCRIPT ARGS` (under torchrun, in every process), which
# answers here, before the model's imports: a check's run pays for nothing it does not use.

CHECKSUMS_ENV = "MINIMIND_GPU_CHECK_CHECKSUMS"  # where each process's parameter checksum is written
COMPILE_BACKEND_ENV = "MINIMIND_GPU_CHECK_COMPILE_BACKEND"  # the backend torch.compile uses in the run


def parameter_checksum(model):
    """A hash of every parameter and buffer, bit for bit: equal on two processes only if their models are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_trainer_inside(argv):
    """gpu_check.py --run-trainer SCRIPT ARGS: run a trainer script as __main__ in this process (under torchrun, in
    each), changed in two ways that the checks read: at the end every process's parameter checksum goes to
    $MINIMIND_GPU_CHECK_CHECKSUMS (DDP must leave every rank with the same weights), and torch.compile uses
    $MINIMIND_GPU_CHECK_COMPILE_BACKEND when set (the compile check on a CPU)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV)
    if backend:
        compile_model = torch.compile
        torch.compile = lambda model, **kwargs: compile_model(model, **{"backend": backend, **kwargs})
    checksum_path = os.environ.get(CHECKSUMS_ENV)
    if checksum_path:
        import torch.distributed as dist
        from trainer import trainer_utils
        from trainer.distributed import unwrap

        finish = trainer_utils.Run.finish

        def finish_with_checksums(run):
            if run.checkpoint is not None:
                checksums = [parameter_checksum(unwrap(run.checkpoint.model))]
                if run.ddp:
                    gathered = [None] * run.world_size
                    dist.all_gather_object(gathered, checksums[0])
                    checksums = gathered
                if run.rank == 0:
                    with open(checksum_path, "w", encoding="utf-8") as f:
                        json.dump(checksums, f)
            finish(run)

        trainer_utils.Run.finish = finish_with_checksums
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__" and sys.argv[1:2] == [TRAINER_MODE]:
    run_trainer_inside(sys.argv[2:])
    sys.exit(0)


from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from common.bench import GPU_CHECK_ENV, memory_added_by
from common.device import choose_dtype, pick_device, ready_device
from model import kernels, model_minimind
from model.model_minimind import GENERATIONS, MOEFeedForward, MiniMindConfig, MiniMindForCausalLM


# =====================================================================================================================
# Part 1: the stages
# =====================================================================================================================

def stage_command(stage, script, extra, args, out, nproc):
    sizes = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers)]
    if stage == "distillation":  # the teacher is the SFT model of the same size
        sizes += ["--student_hidden_size", str(args.hidden_size), "--student_num_layers", str(args.num_hidden_layers),
                  "--teacher_hidden_size", str(args.hidden_size), "--teacher_num_layers", str(args.num_hidden_layers)]
    rl = stage in ("ppo", "grpo", "spo")
    common = ["--device", args.device, "--dtype", args.dtype, "--max_steps", str(args.steps), "--epochs", "1",
              "--batch_size", str(2 if rl else args.batch_size), "--accumulation_steps", "1",
              "--max_seq_len", str(66 if rl else args.max_seq_len), "--log_interval", "1", "--save_interval", "100000",
              "--num_workers", "1", "--save_dir", os.path.join(out, "out"), "--checkpoint_dir", os.path.join(out, "ckpt")]
    if rl:
        common += ["--max_gen_len", str(args.max_gen_len)]
    if stage == "lora":
        common += ["--lora_name", "lora_check"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + [os.path.join(REPO_ROOT, "trainer", script), *sizes, *common, *extra]


def run_stage(stage, command, out, env):
    report_path = os.path.join(out, f"{stage}.json")
    env = dict(env, **{GPU_CHECK_ENV: report_path})
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0 or not os.path.exists(report_path):
        tail = (result.stdout + result.stderr).strip().splitlines()[-25:]
        return None, "\n".join(tail)
    with open(report_path, encoding="utf-8") as f:
        return json.load(f), None


def table_row(stage, report):
    step_s = statistics.median(report["step_s"]) if report["step_s"] else float("nan")
    tokens_per_s = statistics.median(report["tokens_per_s"]) if report["tokens_per_s"] else float("nan")
    mfu = "-"
    if report["peak_tflops"]:
        per_gpu = tokens_per_s / report["world_size"]
        mfu = f"{report['flops_per_token'] * per_gpu / (report['peak_tflops'] * 1e12):.1%}"
    kernels = "+".join(sorted(set(report["attention"].values()))) or "-"
    return (f"| {stage} | {step_s:.3f} | {tokens_per_s:,.0f} | {mfu} | {report['peak_memory_gib']:.2f} GiB | "
            f"{kernels} |")


def describe(device):
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(index)} (sm{major}{minor})"
    if device.startswith("mps"):  # Apple's GPU, through Metal: not the CPU it shares memory with
        macos = platform.mac_ver()[0]
        return f"Apple MPS ({platform.machine()}{', macOS ' + macos if macos else ''})"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


# =====================================================================================================================
# Part 2: the checks
# =====================================================================================================================

Row = namedtuple("Row", "check result detail")
CHECKS = {}  # name -> function(ctx) returning Rows, in the order they run (CHECK_NAMES)


def check(name):
    def register(function):
        CHECKS[name] = function
        return function
    return register


def needs_cuda(why):
    return f"needs a CUDA GPU: {why}"


@contextlib.contextmanager
def patched(owner, name, value):
    """owner.name = value inside the block: how a check forces or watches one code path (the model looks its kernels
    up by name when it runs)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def counting(function, calls):
    """function, appending to the list `calls` each time it runs: did the model take this path?"""
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return counted


def relative_difference(got, want, floor=1e-30):
    """max |got - want| over max |want| (at least `floor`): one number for "how far apart", whatever the scale."""
    got, want = got.detach().float(), want.detach().float()
    return (got - want).abs().max().item() / max(want.abs().max().item(), floor)


def gradient_difference(got, want):
    """(the largest relative_difference of two {name: gradient} dicts, its name). Each gradient is measured against
    its own largest value, but at least 1% of the largest of all: a gradient that cancels to about zero (minimind-3's
    router under top-1 routing, whose renormalised weight is 1 whatever the scores) holds only rounding noise."""
    floor = 1e-2 * max(g.abs().max().item() for g in want.values())
    return max((relative_difference(got[n], want[n], floor), n) for n in want)


class Trained:
    """A finished train_pretrain.py run of a check: its folder, exit status and output, and what it wrote."""

    def __init__(self, folder, hidden_size, result):
        self.folder, self.hidden_size = folder, hidden_size
        self.returncode, self.stdout, self.stderr = result.returncode, result.stdout, result.stderr

    @property
    def ok(self):
        return self.returncode == 0

    def file(self, kind):
        return os.path.join(self.folder, *{"metrics": ("out", f"pretrain_{self.hidden_size}_metrics.jsonl"),
                                           "resume": ("ckpt", f"pretrain_{self.hidden_size}_resume.pth"),
                                           "checksums": ("checksums.json",)}[kind])

    def metrics(self):
        """The logged rows (step, loss, grad_norm, lr, ...), one per step."""
        with open(self.file("metrics"), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def resume_state(self):
        return torch.load(self.file("resume"), map_location="cpu", weights_only=True)

    def rank_checksums(self):
        with open(self.file("checksums"), encoding="utf-8") as f:
            return json.load(f)

    def failure(self):
        lines = (self.stdout + self.stderr).strip().splitlines()
        return f"the run exited with {self.returncode}: {lines[-1] if lines else 'no output'}"


class Context:
    """What the checks share: the device and dtype asked for, the sizes, where runs go, and the trainer runs made
    so far (a run asked for twice with the same settings runs once)."""

    def __init__(self, args, out, env):
        self.args, self.out, self.env = args, out, env
        self.device = ready_device(args.device)  # "cuda" made current; TF32 for the fp32 matmuls, as in training
        self.dtype = choose_dtype(args.dtype, self.device)
        self.cuda = self.device.type == "cuda"
        gpus = torch.cuda.device_count() if self.cuda else 0
        # processes of the 1-vs-N check: every GPU (or --nproc of them); on a CPU two gloo processes
        self.nproc = (args.nproc if args.nproc and args.nproc > 1 else gpus) if self.cuda else 2
        self.steps = max(2, args.steps)  # the resume check stops half way
        self.runs, self.folders, self.problems = {}, 0, []

    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    def autocast(self):
        """Training's precision: fp32 weights, matmuls in the autocast dtype (trainer_utils.Run.autocast)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def tolerance(self):
        """How far apart two ways of computing the same thing may be, relative to the largest value: fp32 only by
        summation order (TF32 on CUDA, which use_tf32 turns on, keeps a 10-bit mantissa), half precision by its 8
        (bf16) or 11 (fp16) bits."""
        if self.dtype == torch.float32:
            return 5e-3 if self.cuda else 1e-4
        return 5e-2 if self.dtype == torch.bfloat16 else 1e-2

    def config(self, generation, **overrides):
        return MiniMindConfig(generation=generation, hidden_size=self.args.hidden_size,
                              num_hidden_layers=self.args.num_hidden_layers, **overrides)

    def model(self, generation, **overrides):
        torch.manual_seed(0)
        return MiniMindForCausalLM(self.config(generation, **overrides)).to(self.device)

    def folder(self):
        self.folders += 1
        return os.path.join(self.out, "checks", f"run{self.folders}")

    def pretrain(self, *extra, nproc=1, env=None, folder=None, script=None, checksums=False):
        """train_pretrain.py (or `script`) run through run_trainer_inside: --max_steps self.steps of a global batch
        of batch_size x self.nproc rows, logging every step and saving at the last; `extra` arguments override
        these; checksums: each process's parameter checksum into checksums.json. Runs with the same arguments run
        once unless a folder is given (a resumed run continues in one)."""
        key = (extra, nproc, tuple(sorted((env or {}).items())), script, checksums)
        if folder is None and key in self.runs:
            return self.runs[key]
        folder = folder or self.folder()
        args = self.args
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        command = launcher + [
            os.path.abspath(__file__), TRAINER_MODE, script or os.path.join(REPO_ROOT, "trainer", "train_pretrain.py"),
            "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--device", args.device, "--dtype", args.dtype, "--from_weight", "none", "--epochs", "1",
            "--batch_size", str(args.batch_size * self.nproc), "--max_seq_len", str(args.max_seq_len),
            "--accumulation_steps", "1", "--max_steps", str(self.steps),
            "--log_interval", "1", "--save_interval", "100000", "--num_workers", "0",
            "--save_dir", os.path.join(folder, "out"), "--checkpoint_dir", os.path.join(folder, "ckpt"), *extra]
        run_env = dict(self.env, **(env or {}))
        if checksums:
            run_env[CHECKSUMS_ENV] = os.path.join(folder, "checksums.json")
        if nproc > 1 and not self.cuda:
            run_env["OMP_NUM_THREADS"] = "1"  # the processes share the CPU's cores
        result = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=REPO_ROOT)
        trained = Trained(folder, args.hidden_size, result)
        if not trained.ok:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            what = " ".join([os.path.basename(script or "train_pretrain.py"), *extra])
            self.problems.append((what + (f" on {nproc} processes" if nproc > 1 else ""), tail))
        if key not in self.runs:
            self.runs[key] = trained
        return trained


# -- 1. packed rows ---------------------------------------------------------------------------------------------------

DOCUMENTS = [[7, 12, 5], [10, 14]]  # two packed rows of 24 tokens, documents of uneven length


def each_document(ids):
    """(row, start, input_ids [1, n], no position ids) of every document in DOCUMENTS' rows: each one alone."""
    for row, lengths in enumerate(DOCUMENTS):
        for start, n in zip([0, *torch.tensor(lengths).cumsum(0).tolist()], lengths):
            yield row, start, ids[row:row + 1, start:start + n], None


def block_mask_rows(position_ids, *args, **kwargs):
    """kernels.packed_rows forced to the block-diagonal mask (what every device but CUDA sm80+ in fp16/bf16 takes)."""
    return kernels.document_mask(position_ids), None


def forward_backward(model, ctx, pieces, probe):
    """Logits [B, T, V] and parameter gradients of sum(logits * probe), the batch given as (row, start, input_ids,
    position_ids) pieces: the whole packed rows, or each document alone. Gradients add up over the pieces."""
    model.zero_grad(set_to_none=True)
    logits = torch.zeros(probe.shape, device=ctx.device)
    for row, start, ids, positions in pieces:
        with ctx.autocast():
            out = model(ids, position_ids=positions).logits
        end = start + ids.shape[1]
        (out.float() * probe[row:row + len(ids), start:end]).sum().backward()
        logits[row:row + len(ids), start:end] = out.detach().float()
    return logits, {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_passes(name, got, want, ctx, what):
    """A Row comparing two (logits, gradients) results within the dtype's tolerance."""
    (got_logits, got_grads), (want_logits, want_grads) = got, want
    if set(got_grads) != set(want_grads):
        differing = sorted(set(got_grads) ^ set(want_grads))
        return Row(name, "FAILED", f"gradients for different parameters: {differing[:3]}")
    logits = relative_difference(got_logits, want_logits)
    grads, worst = gradient_difference(got_grads, want_grads)
    tolerance = ctx.tolerance()
    result = "ok" if logits <= tolerance and grads <= tolerance else "FAILED"
    return Row(name, result, f"{what}: logits differ by {logits:.1e}, gradients by {grads:.1e} ({worst}) of the "
                             f"largest value; tolerance {tolerance:.0e} ({ctx.dtype_name()})")


@check("packing")
def check_packing(ctx):
    """--packing 1 puts several documents in a row, position ids restarting at 0 at each; the model must keep
    attention inside each document, so that every token gets what it would get alone. kernels.packed_rows sends such
    rows through varlen flash attention (cu_seqlens over the flattened batch) on CUDA sm80+ in fp16/bf16, and through
    a block-diagonal mask (kernels.document_mask) elsewhere. An off-by-one document start, a wrong cu_seqlens or a
    mask that leaks across documents shows only as logits and gradients that differ from the documents run alone -
    and the varlen kernel exists only on a GPU, so only a GPU can compare it."""
    rows = []
    for generation in GENERATIONS:
        model = ctx.model(generation).train()  # dropout 0: training's code path, nothing random
        generator = torch.Generator().manual_seed(0)
        width = sum(DOCUMENTS[0])
        ids = torch.randint(3, model.config.vocab_size, (len(DOCUMENTS), width), generator=generator).to(ctx.device)
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS]).to(ctx.device)
        probe = torch.randn(len(DOCUMENTS), width, model.config.vocab_size, generator=generator).to(ctx.device)
        want = forward_backward(model, ctx, list(each_document(ids)), probe)
        with patched(model_minimind, "packed_rows", block_mask_rows):
            masked = forward_backward(model, ctx, [(0, 0, ids, positions)], probe)
        rows.append(compare_passes(f"packing {generation}: block mask vs alone", masked, want, ctx,
                                   f"{len(DOCUMENTS)} rows of {width} tokens, {sum(map(len, DOCUMENTS))} documents"))
        name = f"packing {generation}: varlen vs block mask"
        if kernels.varlen_usable(ctx.device, ctx.dtype):
            calls = []
            with patched(kernels, "varlen_attn", counting(kernels.varlen_attn, calls)):  # the model's own choice
                varlen = forward_backward(model, ctx, [(0, 0, ids, positions)], probe)
            rows.append(compare_passes(name, varlen, masked, ctx, "varlen flash attention") if calls else
                        Row(name, "FAILED", "kernels.varlen_usable says yes, but the forward did not call varlen_attn"))
        elif ctx.cuda:
            rows.append(Row(name, f"not run: varlen flash attention needs sm80+ and fp16/bf16 (this run: "
                                  f"{describe(str(ctx.device))}, {ctx.dtype_name()})", ""))
        else:
            rows.append(Row(name, needs_cuda("varlen flash attention runs on CUDA sm80+ in fp16/bf16"),
                            f"{ctx.device.type} packs with the block mask (the row above)"))
    return rows


# -- 2. grouped experts -----------------------------------------------------------------------------------------------

def moe_pass(moe, ctx, x, probe):
    """MOEFeedForward's output, input gradient and parameter gradients (zeros where none) for sum(out * probe)."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with ctx.autocast():
        out = moe(x)
    (out.float() * probe).sum().backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
             for name, p in moe.named_parameters()}
    return out.detach().float(), x.grad.detach().float(), grads


@check("moe")
def check_moe(ctx):
    """The MoE layer runs its experts as grouped matmuls (kernels.grouped_experts: the (token, expert) slots sorted by
    expert, one torch grouped_mm per projection over per-expert row ranges) where the device has the kernel, else
    every expert on every token (MOEFeedForward.dense_experts). Both must give the same output and gradients. On a
    GPU grouped_mm is CUTLASS on sm90/sm100 in bf16: a wrong offset or sort order, or an expert that gets no token
    (an empty row range) whose weight gradient the kernel leaves unwritten instead of zero, shows here. The router
    is set so that the last expert gets no token; its gradient must be exactly zero on both paths."""
    rows = []
    for generation in GENERATIONS:
        name = f"MoE {generation}: grouped vs per-expert"
        config = ctx.config(generation, use_moe=True)
        hidden, experts = config.hidden_size, config.n_routed_experts
        torch.manual_seed(0)
        moe = MOEFeedForward(config).to(ctx.device).train()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, hidden, generator=generator).abs().to(ctx.device)  # positive tokens ...
        probe = torch.randn(2, 16, hidden, generator=generator).to(ctx.device)
        with torch.no_grad():
            moe.gate.weight.copy_(torch.randn(experts, hidden, generator=generator))
            moe.gate.weight[-1] = -1.0  # ... so the last expert scores -sum(x): lowest for every token
        with ctx.autocast():
            groupable = model_minimind.can_group_experts(x.reshape(-1, hidden), hidden, config.intermediate_size)
        if not groupable:  # only the per-expert path runs here: nothing to compare
            where = "CUDA sm90/sm100 in bf16, the CPU in fp32/bf16"
            rows.append(Row(name, f"not run: {describe(str(ctx.device))} in {ctx.dtype_name()} has no grouped kernel "
                                  f"({where})" if ctx.device.type in ("cpu", "cuda") else
                            needs_cuda("grouped_mm's CUTLASS kernel runs on sm90/sm100 in bf16"), ""))
            continue
        routed = torch.bincount(moe.gate(x)[0].reshape(-1), minlength=experts)
        calls = []
        with patched(model_minimind, "grouped_experts", counting(model_minimind.grouped_experts, calls)):
            got = moe_pass(moe, ctx, x, probe)
        with patched(model_minimind, "can_group_experts", lambda *args: False):
            want = moe_pass(moe, ctx, x, probe)
        (out, x_grad, grads), (want_out, want_x_grad, want_grads) = got, want
        tolerance = ctx.tolerance()
        empty = [n for n in grads if n.startswith(f"experts.{experts - 1}.")]
        nonzero = [n for n in empty if grads[n].abs().max() != 0 or want_grads[n].abs().max() != 0]
        differences = {"output": relative_difference(out, want_out),
                       "input grad": relative_difference(x_grad, want_x_grad)}
        worst_grad, worst = gradient_difference({n: g for n, g in grads.items() if n not in empty},
                                                {n: g for n, g in want_grads.items() if n not in empty})
        differences["weight grads"] = worst_grad
        detail = (", ".join(f"{k} {v:.1e}" for k, v in differences.items()) + f" (largest: {worst}) of the largest "
                  f"value, tolerance {tolerance:.0e} ({ctx.dtype_name()}); tokens per routed expert "
                  f"{routed.tolist()}, the last one's weight gradients "
                  f"{'not zero: ' + ', '.join(nonzero) if nonzero else 'exactly zero on both paths'}")
        if not calls:
            rows.append(Row(name, "FAILED", "the forward did not take the grouped path (kernels.grouped_experts)"))
        elif routed[-1] != 0:
            rows.append(Row(name, "FAILED", f"the router sent {routed[-1]} tokens to the last expert (set up to get "
                                            "none): the empty-expert case was not exercised; " + detail))
        else:
            passed = max(differences.values()) <= tolerance and not nonzero
            rows.append(Row(name, "ok" if passed else "FAILED", detail))
    return rows


# -- 3. torch.compile -------------------------------------------------------------------------------------------------

def compile_findings(log):
    """(recompiles, their first reason, graph breaks as 'where: why', fell back to eager) from TORCH_LOGS=
    "recompiles,graph_breaks" output."""
    recompiles = re.findall(r"Recompiling function (\S+)", log)
    reasons = re.findall(r"\[__recompiles\]\s+- [\d/]+: (.*)", log)
    places = re.findall(r"Graph break in user code at (\S+)", log)
    why = [w for w in re.findall(r"Developer debug context: (.*)", log) if not w.startswith("frame skipped")]
    breaks = [f"{os.path.relpath(place, REPO_ROOT) if place.startswith(REPO_ROOT) else place}: "
              f"{why[i].strip()[:160] if i < len(why) else '?'}" for i, place in enumerate(places)]
    fell_back = "falling back to eager" in log or "recompile_limit" in log or "cache_size_limit" in log
    return recompiles, reasons[0].strip() if reasons else None, breaks, fell_back


@check("compile")
def check_compile(ctx, script=None):
    """train_pretrain.py --use_compile 1 against the same run in eager mode. torch.compile traces the model with
    dynamo: a graph break (code it cannot trace) splits the graph and loses fusion, a recompile (a guard that
    failed, e.g. a new sequence length) pays the compile time again, and past the recompile limit, or after a break
    it cannot handle, the forward silently runs eagerly. Counted from TORCH_LOGS="recompiles,graph_breaks" on the
    run's stderr. The compiled step-1 loss must equal eager's within the tolerance. On a CPU the aot_eager backend
    stands in for inductor: graph breaks and recompiles are dynamo's, the same under both, and inductor's C++ build
    takes minutes on a small CPU."""
    name = "compile: recompiles, graph breaks"
    backend = None if ctx.device.type != "cpu" else "aot_eager"
    env = {"TORCH_LOGS": "recompiles,graph_breaks"}
    if backend:
        env[COMPILE_BACKEND_ENV] = backend
    eager = ctx.pretrain(script=script)
    compiled = ctx.pretrain("--use_compile", "1", env=env, script=script)
    for run, what in ((compiled, "compiled"), (eager, "eager")):
        if not run.ok:
            return [Row(name, "FAILED", f"{what}: {run.failure()}")]
    recompiles, reason, breaks, fell_back = compile_findings(compiled.stderr)
    loss, eager_loss = compiled.metrics()[0]["loss"], eager.metrics()[0]["loss"]
    difference = abs(loss - eager_loss) / max(abs(eager_loss), 1e-30)
    detail = (f"{len(recompiles)} recompile(s){' (first: ' + reason + ')' if reason else ''}; {len(breaks)} graph "
              f"break(s){' (' + '; '.join(dict.fromkeys(breaks)) + ')' if breaks else ''}"
              f"{'; the forward fell back to eager' if fell_back else ''}; step-1 loss {loss:.6g} vs eager "
              f"{eager_loss:.6g} (tolerance {ctx.tolerance():.0e}); {ctx.steps} steps, backend "
              f"{backend + ' (CPU: the same dynamo graphs as inductor)' if backend else 'inductor'}")
    if difference > ctx.tolerance():
        return [Row(name, "FAILED", detail)]
    # the model is written to compile whole: a graph break or an eager fallback is a regression
    return [Row(name, "FAILED" if breaks or fell_back else "ok", detail)]


# -- 4. fp16 loss scaling ---------------------------------------------------------------------------------------------

def loss_scale_verdict(scaler, losses, steps, init_scale=2.0 ** 16):
    """(result, detail) of a float16 run from its GradScaler state (the resume file's "scaler") and its logged losses.
    The scale starts at init_scale (GradScaler's default, which Run keeps), halves (backoff_factor) at each step whose
    gradients held inf/nan - that step is skipped - and grows only after growth_interval clean steps in a row, so in
    a shorter run the skipped steps are log(scale / init_scale) / log(backoff_factor)."""
    if not scaler:
        return "FAILED", "the resume file holds no loss-scaler state: float16 trained without a GradScaler"
    scale, tracker = float(scaler["scale"]), int(scaler["_growth_tracker"])
    detail = f"final scale {scale:g} (from {init_scale:g}), {tracker} clean step(s) since the last skip"
    finite = all(math.isfinite(loss) for loss in losses)
    if steps >= scaler["growth_interval"]:
        return ("ok" if finite else "FAILED"), detail + f"; skipped steps unknown after {steps} steps (the scale grew)"
    skipped = round(math.log(scale / init_scale) / math.log(scaler["backoff_factor"]))
    detail = f"{skipped} of {steps} steps skipped (inf/nan gradients); " + detail
    if skipped >= steps:
        return "FAILED", detail + ": no step updated the weights"
    if not finite:
        return "FAILED", detail + f"; losses not finite: {losses}"
    return "ok", detail + "; losses finite"


@check("fp16")
def check_fp16(ctx):
    """--dtype float16: fp16 gradients underflow without loss scaling, so Run trains with a GradScaler, which
    multiplies the loss by a scale, skips each step whose gradients overflowed (inf/nan) and halves the scale. A
    GPU shows whether the scale settles or the run keeps skipping steps (a model or a loss that overflows fp16).
    Read from the resume file's scaler state and the logged losses."""
    name = "fp16 loss scaling"
    if not ctx.cuda:
        return [Row(name, needs_cuda("fp16 autocast with a GradScaler (the CPU's fp16 is emulated)"), "")]
    run = ctx.pretrain("--dtype", "float16")
    if not run.ok:
        return [Row(name, "FAILED", run.failure())]
    result, detail = loss_scale_verdict(run.resume_state()["scaler"], [m["loss"] for m in run.metrics()], ctx.steps)
    return [Row(name, result, detail)]


# -- 5. resume --------------------------------------------------------------------------------------------------------

def adam_reach(trained, steps):
    """How far apart `steps` AdamW steps (the trainers' torch defaults, betas 0.9 / 0.999) can move one weight in two
    runs that differ only by rounding: each step moves it at most lr * (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba,
    2015, section 2.1), and a gradient near zero can take either sign in either run."""
    lr = trained.resume_state()["args"].get("learning_rate", 5e-4)
    return 2 * steps * lr * (1 - 0.9) / math.sqrt(1 - 0.999)


@check("resume")
def check_resume(ctx, tamper=None):
    """A run stopped half way and continued with --from_resume 1 must train exactly as if never stopped: the resume
    file holds the weights, the optimizer and loss-scaler states, the sample position and the random states. The
    same losses, learning rates and gradient norms at every step, and the same final weights (the resume files'
    fp32 copies): bit for bit on a CPU; on a GPU, whose attention backward kernels add in varying order, within the
    tolerance for the losses and within what Adam can move a weight in the resumed steps. tamper(folder), for
    tests, changes the stopped run's files before the resume."""
    name = "resume round trip"
    half = ctx.steps // 2
    straight, first = ctx.pretrain(), ctx.pretrain("--max_steps", str(half))
    for run in (straight, first):
        if not run.ok:
            return [Row(name, "FAILED", run.failure())]
    folder = ctx.folder()
    shutil.copytree(first.folder, folder)  # the stopped run's files stay as they were, for the other checks
    if tamper:
        tamper(folder)
    resumed = ctx.pretrain("--from_resume", "1", folder=folder)
    if not resumed.ok:
        return [Row(name, "FAILED", resumed.failure())]
    if "resumed from" not in resumed.stdout:
        return [Row(name, "FAILED", "the second run did not resume (no 'resumed from' in its output)")]
    keys = ("step", "loss", "lr", "grad_norm")
    a = [tuple(m[k] for k in keys) for m in straight.metrics()]
    b = [tuple(m[k] for k in keys) for m in resumed.metrics()]
    weights, resumed_weights = straight.resume_state()["model"], resumed.resume_state()["model"]
    weight_difference = max((weights[k] - resumed_weights[k]).abs().max().item() for k in weights)
    loss_difference = max((abs(x[1] - y[1]) / max(abs(x[1]), 1e-30) for x, y in zip(a, b)), default=math.inf)
    detail = (f"{ctx.steps} steps straight vs {half} + {ctx.steps - half} resumed: losses differ by up to "
              f"{loss_difference:.1e} (relative), weights by {weight_difference:.1e}")
    if [x[0] for x in a] != [y[0] for y in b]:
        return [Row(name, "FAILED", f"logged steps {[x[0] for x in a]} vs {[y[0] for y in b]}")]
    if ctx.device.type == "cpu":
        passed = a == b and weight_difference == 0
        detail += "; bit for bit required on a CPU" + ("" if passed else f": straight {a} vs resumed {b}")
    else:
        reach = adam_reach(straight, ctx.steps - half)
        passed = loss_difference <= ctx.tolerance() and weight_difference <= reach
        detail += f" (tolerance {ctx.tolerance():.0e}; weights {reach:.0e}, what Adam can move in the resumed steps)"
    return [Row(name, "ok" if passed else "FAILED", detail)]


# -- 6. host syncs ----------------------------------------------------------------------------------------------------

TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# frames between an operation's caller and a dispatch mode: torch's dispatch machinery, and this file
DISPATCH_FRAMES = tuple(os.path.join(TORCH_DIR, p) for p in ("_dynamo", "_compile.py", "_ops.py",
                                                             os.path.join("utils", "_python_dispatch.py")))
THIS_FILE = os.path.abspath(__file__)


def calling_file(outside_torch):
    """(file, line) of the code that called the operation being dispatched: the innermost frame beyond the dispatch
    machinery, or (outside_torch) beyond torch altogether (the project line behind an optimizer's read)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        machinery = name == THIS_FILE or name.startswith(DISPATCH_FRAMES)
        if not (machinery or (outside_torch and name.startswith(TORCH_DIR))):
            return name, frame.f_lineno
        frame = frame.f_back
    return "?", 0


class StepSyncs(TorchDispatchMode):
    """Counts, inside the training steps after the first (set .step and .inside), what makes the host wait for the
    device: a device value read into Python (.item(), float(), int(), bool(): aten._local_scalar_dense), a copy from
    the device to the host, and a blocking copy from the host to the device (a Python number made a device tensor:
    the copy waits for the device's queue).

    A CPU has no device to wait for, so there the device is simulated: the parameters, the batch after
    run.to_device, tensors the project's code makes inside a step (with device=...) and whatever is computed from
    them count as on the device, as they would be on a GPU; the loader's CPU batch and the optimizer's step counters
    (CPU tensors unless capturable) stay on the host. A tensor made from Python data there is an upload."""

    def __init__(self, device):
        super().__init__()
        self.simulate = device.type == "cpu"
        self.on_device = WeakIdKeyDictionary()  # the simulated device's tensors
        self.step, self.inside = 0, False
        self.counts = {kind: Counter() for kind in ("device reads", "host reads", "downloads", "uploads")}
        self.where = Counter()  # file:line of the device reads

    def mark(self, tensors):
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self.on_device[tensor] = True

    def on_the_device(self, tensor):
        return tensor in self.on_device if self.simulate else tensor.device.type != "cpu"

    def per_step(self, kind):
        return sum(self.counts[kind].values()) / max(self.step - 1, 1)

    def copy_direction(self, func, args, kwargs):
        """(source device type, target device type, non_blocking) of a copy; None for another operation."""
        if func is torch.ops.aten.copy_.default:
            return args[1].device.type, args[0].device.type, args[2] if len(args) > 2 else kwargs.get("non_blocking")
        if func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device") or args[0].device
            return args[0].device.type, torch.device(target).type, kwargs.get("non_blocking")
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        counting = self.inside and self.step > 1
        made_by_project = (self.simulate and self.inside and not inputs
                           and calling_file(outside_torch=False)[0].startswith(REPO_ROOT + os.sep))
        if counting and func is torch.ops.aten._local_scalar_dense.default:
            device_value = self.on_the_device(args[0])
            self.counts["device reads" if device_value else "host reads"][self.step] += 1
            if device_value:
                path, line = calling_file(outside_torch=True)
                self.where[f"{os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) else path}:{line}"] += 1
        elif counting and made_by_project and func is torch.ops.aten.lift_fresh.default:
            self.counts["uploads"][self.step] += 1  # torch.tensor / as_tensor of Python data, on the device
        elif counting and not self.simulate and (copy := self.copy_direction(func, args, kwargs)):
            source, target, non_blocking = copy
            if source != "cpu" and target == "cpu":
                self.counts["downloads"][self.step] += 1
            elif source == "cpu" and target != "cpu" and not non_blocking:
                self.counts["uploads"][self.step] += 1
        out = func(*args, **kwargs)
        if self.simulate and (made_by_project or any(self.on_the_device(t) for t in inputs)):
            self.mark(tree_leaves(out))
        return out


@check("host_syncs")
def check_host_syncs(ctx, steps=3):
    """A training step should queue its work and never wait for the GPU: every .item() / float() / bool() of a device
    value, or copy to the host, stalls the host until the GPU has caught up, and the GPU then idles while the host
    queues the next kernels. train_full_sft.py runs `steps` steps in this process (2 micro-batches each) under
    StepSyncs, counting from the second step (the first one sets things up); on CUDA torch's sync debug mode
    ("warn") also reports each synchronizing call. Per step there must be none: the trainers read losses and counts
    only at log steps (Run.log)."""
    from trainer import train_full_sft, trainer_utils

    name = "host syncs per step"
    watch, Run = StepSyncs(ctx.device), trainer_utils.Run
    steps_of, log, load_model, to_device = Run.steps, Run.log, Run.load_model, Run.to_device

    def steps_watched(run, stream, checkpoint):
        for step, window in steps_of(run, stream, checkpoint):
            watch.step, watch.inside = step, True
            if ctx.cuda and step > 1:
                torch.cuda.set_sync_debug_mode("warn")
            yield step, window

    def log_watched(run, *args, **kwargs):
        watch.inside = False  # the step ends where it logs: Run.log reads the values, at log steps only
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode(0)
        return log(run, *args, **kwargs)

    def load_model_watched(run, *args, **kwargs):
        model = load_model(run, *args, **kwargs)
        watch.mark([*model.parameters(), *model.buffers()])
        return model

    def to_device_watched(run, batch):
        moved = to_device(run, batch)
        watch.mark(moved.values())
        return moved

    folder = ctx.folder()
    args = train_full_sft.arguments([
        "--hidden_size", str(ctx.args.hidden_size), "--num_hidden_layers", str(ctx.args.num_hidden_layers),
        "--device", ctx.args.device, "--dtype", ctx.args.dtype, "--from_weight", "none", "--batch_size", "2",
        "--accumulation_steps", "2", "--max_seq_len", str(ctx.args.max_seq_len), "--num_workers", "0",
        "--max_steps", str(steps), "--log_interval", "1", "--save_interval", "100000",
        "--save_dir", os.path.join(folder, "out"), "--checkpoint_dir", os.path.join(folder, "ckpt")])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # Run.steps sets its own
    progress = os.environ.get("MINIMIND_NO_PROGRESS")
    os.environ["MINIMIND_NO_PROGRESS"] = "1"
    try:
        with contextlib.ExitStack() as stack:
            for method, replacement in (("steps", steps_watched), ("log", log_watched),
                                        ("load_model", load_model_watched), ("to_device", to_device_watched)):
                stack.enter_context(patched(Run, method, replacement))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            with watch:
                train_full_sft.main(args)
    finally:
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode(0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if progress is None:
            os.environ.pop("MINIMIND_NO_PROGRESS", None)
        else:
            os.environ["MINIMIND_NO_PROGRESS"] = progress
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchronizing" in str(w.message)]
    per_step = {"device value reads": watch.per_step("device reads"),
                "device-to-host copies": watch.per_step("downloads"),
                "blocking host-to-device copies": watch.per_step("uploads")}
    if ctx.cuda:
        per_step["sync-debug warnings"] = len(syncs) / max(watch.step - 1, 1)
    detail = (", ".join(f"{v:g} {k}" for k, v in per_step.items()) + f" per step (steps 2-{watch.step} of "
              f"train_full_sft, 2 micro-batches each); {watch.per_step('host reads'):g} reads of host values per step "
              "(the CPU batch's label counts, the optimizer's step counters)")
    if watch.simulate:
        detail += "; CPU: the device simulated (the parameters, the moved batch and what is computed from them)"
    if watch.where:
        detail += "; device reads at " + ", ".join(f"{place} ({n}x)" for place, n in watch.where.most_common(5))
    if syncs:
        detail += f"; first warning: {syncs[0][:160]}"
    if watch.step < 2:
        return [Row(name, "FAILED", f"the run made {watch.step} step(s): nothing counted after the first")]
    return [Row(name, "FAILED" if any(per_step.values()) else "ok", detail)]


# -- 7. one vs several GPUs -------------------------------------------------------------------------------------------

@check("multi_gpu")
def check_multi_gpu(ctx, one_process_batch=None):
    """The same global batch on 1 process vs N (torchrun, DDP): batch_size x N rows on one, batch_size on each of N.
    DDP averages the gradients over the processes, so step 1's loss and gradient norm must be the same, later steps
    close, and every rank must hold bit-identical parameters at the end (one that drifts trains a different model
    than rank 0 saves). Needs 2+ GPUs; on a CPU it runs as 2 gloo processes. one_process_batch, for tests, changes
    the one process's batch."""
    name = "1 vs N processes"
    if not ctx.cuda and ctx.device.type != "cpu":
        return [Row(name, needs_cuda("2+ CUDA GPUs: DDP over NCCL"), "")]
    if ctx.nproc < 2:
        return [Row(name, f"needs 2+ CUDA GPUs: torch sees {torch.cuda.device_count()} (DDP over NCCL)", "")]
    # MiniMind's random order: length grouping sorts each process's rows, which batches 1 and N processes differently
    random_order = ("--group_by_length", "0")
    one = ctx.pretrain(*random_order, *(("--batch_size", str(one_process_batch)) if one_process_batch else ()))
    many = ctx.pretrain(*random_order, "--batch_size", str(ctx.args.batch_size), nproc=ctx.nproc, checksums=True)
    for run, what in ((one, "1 process"), (many, f"{ctx.nproc} processes")):
        if not run.ok:
            return [Row(name, "FAILED", f"{what}: {run.failure()}")]
    a, b = one.metrics(), many.metrics()
    checksums = many.rank_checksums()
    pairs = {"step-1 loss": (a[0]["loss"], b[0]["loss"]), "step-1 grad norm": (a[0]["grad_norm"], b[0]["grad_norm"]),
             f"step-{a[-1]['step']} loss": (a[-1]["loss"], b[-1]["loss"])}
    differences = {k: abs(x - y) / max(abs(x), 1e-30) for k, (x, y) in pairs.items()}
    weights, many_weights = one.resume_state()["model"], many.resume_state()["model"]
    weight_difference = max((weights[k] - many_weights[k]).abs().max().item() for k in weights)
    reach = adam_reach(many, ctx.steps)
    how = f"{ctx.nproc} GPUs (NCCL)" if ctx.cuda else f"{ctx.nproc} gloo processes on the CPU"
    ranks = (f"identical on all {len(checksums)} ranks" if len(set(checksums)) == 1
             else "DIFFER across ranks: " + ", ".join(checksums))
    detail = (f"{how} x batch {ctx.args.batch_size} vs 1 x {one_process_batch or ctx.args.batch_size * ctx.nproc}, "
              f"{ctx.steps} steps: " + ", ".join(f"{k} {x:.6g} vs {y:.6g}" for k, (x, y) in pairs.items())
              + f" (largest difference {max(differences.values()):.1e}, tolerance {ctx.tolerance():.0e}); parameter "
              f"checksums {ranks}; weights vs 1 process differ by {weight_difference:.1e} (at most {reach:.0e}, what "
              "Adam's steps can move)")
    passed = (a[0]["samples"] == b[0]["samples"] and max(differences.values()) <= ctx.tolerance()
              and len(checksums) == ctx.nproc and len(set(checksums)) == 1 and weight_difference <= reach)
    if a[0]["samples"] != b[0]["samples"]:
        detail = f"not the same global batch: {a[0]['samples']} vs {b[0]['samples']} samples in step 1; " + detail
    return [Row(name, "ok" if passed else "FAILED", detail)]


# -- 8. KV cache ------------------------------------------------------------------------------------------------------

@check("kv_cache")
def check_kv_cache(ctx, new_tokens=8):
    """Generation feeds one token at a time against the cached keys and values; its logits must match a full forward
    over the same tokens. A wrong cache position, RoPE offset or after-cache attention kernel shows as a difference
    here, and in half precision (bf16 by default, as served) a GPU's kernels for one query row differ from the full
    square's, which must stay within rounding. Greedy generate() (the serving path) of new_tokens from a random
    12-token prompt, both generations, in the --dtype (float32 where the device has no native bf16); the greedy
    pick of each step must be the full forward's best token, up to ties within the tolerance."""
    rows = []
    for generation in GENERATIONS:
        model = ctx.model(generation).to(ctx.dtype).eval()  # weights in the serving dtype, as inference holds them
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=generator).to(ctx.device)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            cached = torch.stack(out.logits, dim=1)[0].float()  # [new_tokens, V]: the prefill's, then the cached steps'
            full = model(out.sequences[:, :-1]).logits[0, prompt.shape[1] - 1:].float()
        tolerance = ctx.tolerance()
        difference = relative_difference(cached, full)
        slack = tolerance * full.abs().max()
        agree = int((full.gather(-1, cached.argmax(-1, keepdim=True))[:, 0] >= full.max(-1).values - slack).sum())
        detail = (f"{len(cached)} generated tokens: logits differ by {difference:.1e} of the largest (tolerance "
                  f"{tolerance:.0e}, {ctx.dtype_name()}); greedy picks agree at {agree}/{len(cached)} steps")
        rows.append(Row(f"KV cache {generation}", "ok" if difference <= tolerance and agree == len(cached)
                        else "FAILED", detail))
    return rows


# -- 9. peak memory ---------------------------------------------------------------------------------------------------

@check("peak_memory")
def check_peak_memory(ctx, lengths=(2048, 4096)):
    """One training forward and backward (batch 1, the MiniMind2 model at --hidden_size x --num_hidden_layers, in the
    training dtype) at 2,048 and 4,096 tokens: what long sequences cost on this device. With flash or
    memory-efficient attention activations grow linearly with the length; attention on the math kernel keeps
    [heads, T, T] scores for the backward, so doubling the length would about quadruple them. FAILED if memory grows
    more than 3x from one length to the next twice as long (measured above the weights)."""
    model = ctx.model("minimind2", max_position_embeddings=max(32768, *lengths)).train()
    generator = torch.Generator().manual_seed(0)

    def step(length):
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator).to(ctx.device)
        with ctx.autocast():
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(16)  # the first step pays for kernels and allocator set-up
    rows, measured = [], []
    for length in lengths:
        added, how = memory_added_by(ctx.device, lambda: step(length))
        name = f"peak memory {length} tokens"
        size = f"batch 1, {ctx.args.hidden_size}x{ctx.args.num_hidden_layers}, {ctx.dtype_name()}"
        if added is None:
            rows.append(Row(name, f"not run: {how}", size))
            continue
        detail = f"{added / 2**20:,.0f} MiB ({how}); {size}"
        result = "ok"
        if measured and ctx.device.type != "mps":  # MPS reports the driver's allocation, which never shrinks
            previous_length, previous = measured[-1]
            ratio = added / max(previous, 1)
            limit = 3 * (length / previous_length) / 2  # 3x per doubling: linear is 2x, quadratic 4x
            detail += f"; x{ratio:.2f} from {previous_length} tokens (linear growth: x{length / previous_length:g})"
            if ratio > limit:
                result = "FAILED"
                detail += ": more than linear, something keeps a [T, T] tensor (attention on the math kernel?)"
        measured.append((length, added))
        rows.append(Row(name, result, detail))
    return rows


def run_checks(ctx, wanted):
    """The checks' Rows; a check that crashes gives a FAILED row, its traceback kept in ctx.problems."""
    rows = []
    for name in wanted:
        print(f"checking {name} ...", flush=True)
        try:
            rows += CHECKS[name](ctx)
        except (Exception, SystemExit) as error:
            rows.append(Row(name, "FAILED", f"crashed: {type(error).__name__}: {error}"))
            ctx.problems.append((name, traceback.format_exc()))
    return rows


def checks_table(rows):
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| check | result | detail |", "|---|---|---|"] +
                     [f"| {cell(r.check)} | {cell(r.result)} | {cell(r.detail)} |" for r in rows])


# =====================================================================================================================

def main(args):
    if args.device is None:
        args.device = pick_device()
        if args.device != "cuda":
            print(f"torch {torch.__version__} sees no CUDA GPU: checking the {args.device.upper()} path instead (slow "
                  "at 512x8; --hidden_size 64 --num_hidden_layers 2 is quick). Pass --device to choose.", flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU: check the driver and that torch is a CUDA build "
                         f"(this one is {torch.__version__}); use --device cpu to check the CPU path")
    if args.device == "cuda" and args.nproc is None:
        args.nproc = torch.cuda.device_count()
    nproc = args.nproc or 1
    if nproc > 1 and args.device != "cuda":
        raise SystemExit("--nproc > 1 needs --device cuda (one process per GPU)")
    wanted = chosen(args.stages, [s[0] for s in STAGES])
    checks = chosen(args.checks, CHECK_NAMES)

    out = args.keep or tempfile.mkdtemp(prefix="minimind_gpu_check_")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, MINIMIND_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    print(f"## {describe(args.device)}; torch {torch.__version__}; {args.hidden_size}x{args.num_hidden_layers}, "
          f"{nproc} process(es), {args.dtype} asked, batch {args.batch_size} x {args.max_seq_len}, {args.steps} steps\n",
          flush=True)
    rows, failures, details = [], [], []
    for stage, script, extra, needs in STAGES:
        if stage not in wanted:
            continue
        if needs in {f[0] for f in failures}:
            failures.append((stage, f"needs the weight of the {needs} stage, which failed"))
            rows.append(f"| {stage} | skipped: needs {needs} | | | | |")
            continue
        print(f"running {stage} ...", flush=True)
        report, error = run_stage(stage, stage_command(stage, script, extra, args, out, nproc), out, env)
        if report is None:
            failures.append((stage, error))
            rows.append(f"| {stage} | FAILED | | | | |")
            continue
        rows.append(table_row(stage, report))
        details.append(f"- {stage} ({report['dtype']} on {report['device']}): " + "; ".join(
            f"{kind}: {kernel}" for kind, kernel in sorted(report["attention"].items())))

    check_rows, problems = [], []
    if checks:
        ctx = Context(args, out, env)
        check_rows, problems = run_checks(ctx, checks), ctx.problems

    if wanted:
        print("\n| stage | s/step | real tokens/s | MFU | peak memory | attention |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
        print("\nAttention calls by kind (device dtype mask grad cache: kernel):")
        print("\n".join(details))
    if check_rows:
        print("\n" + checks_table(check_rows), flush=True)
    for stage, error in failures:
        print(f"\n{stage} FAILED:\n{error}")
    for what, tail in problems:
        print(f"\n{what}:\n{tail}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(1 if failures or any(r.result == "FAILED" for r in check_rows) else 0)


if __name__ == "__main__":
    main(args)
