"""Several processes, one run (torchrun): the process group, which process tokenises first, the DDP wrapper,
summing over processes, and leaving together. With one process every function here is a no-op or a pass-through."""
import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.device import cuda_device, pick_device

# How long a collective may wait before the process group gives up on it. NCCL's watchdog default is 10 minutes
# (torch.distributed.init_process_group's timeout): the other processes of a machine wait in main_process_first's
# barrier while its first process tokenises the data, which takes longer than that for a multi-GB file.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def setup_device(requested, ddp: bool) -> torch.device:
    """This process's device, made current, and under torchrun its process group (nccl on CUDA, gloo else)."""
    device = pick_device(requested)
    if ddp and device.startswith("mps"):
        raise SystemExit("torchrun on Apple MPS: a Mac has one GPU and torch has no process-group backend for it "
                         "(nccl is CUDA's, gloo reduces CPU tensors). Run the script with plain python instead.")
    if ddp and device.startswith("cuda"):
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if gpus > 1 and processes > gpus:  # (one visible GPU per process is a launcher's own isolation: allowed)
            raise SystemExit(f"torchrun started {processes} processes on this machine, which has {gpus} GPUs: two "
                             "processes would share one GPU (NCCL refuses that, and memory would run out). Use "
                             f"--nproc_per_node {gpus} or fewer.")
        # torchrun numbers the processes of a machine 0..n-1 (LOCAL_RANK); a launcher that shows each
        # process only its own GPU makes that GPU cuda:0 there, hence the modulo.
        device = cuda_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        # device_id binds this process's NCCL communicator to its GPU at init (eager init), so no
        # collective has to guess the device from the rank, and barrier() uses the bound device.
        dist.init_process_group("nccl", device_id=device, timeout=PROCESS_GROUP_TIMEOUT)
        return device
    if ddp:
        # gloo reduces CPU tensors only: all_reduce below moves them there
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return cuda_device(device) if device.startswith("cuda") else torch.device(device)


@contextmanager
def main_process_first(ddp):
    """The first process of each machine (LOCAL_RANK 0) runs the block first (tokenising a dataset into
    that machine's cache); the machine's other processes wait at a barrier, then run it and read that
    cache instead of tokenising the same file again. Keyed on the local rank, not the global one, so
    machines that do not share a disk each tokenise once, at the same time."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if ddp and not first:
        dist.barrier()
    yield
    if ddp and first:  # every process enters the barrier once: before the block or after it
        dist.barrier()


def wrap(model, device, use_compile, ddp):
    """torch.compile and/or DDP around a model whose trainable parameters are set."""
    if use_compile:
        model = torch.compile(model)
    if ddp:
        # forward_sync_buffers=False (torch 2.13's name for broadcast_buffers): the only buffers are the
        # RoPE tables, equal on every rank and never changed, and DDP would otherwise re-broadcast all
        # named_buffers() (non-persistent ones too) from rank 0 at the start of every training forward.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)
    return model


def broadcast_from_first(model):
    """Process 0's parameters and buffers copied into every process's model, in place (nothing with one process)."""
    if dist.is_initialized():
        for tensor in model.state_dict().values():  # (tied weights come twice: the same values again)
            dist.broadcast(tensor, src=0)


def unwrap(model):
    """The MiniMind module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def all_reduce(tensor):
    """The element-wise sum of a tensor over all processes (itself when there is one process)."""
    if not dist.is_initialized():
        return tensor
    if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        cpu = tensor.cpu()  # gloo reduces CPU tensors only
        dist.all_reduce(cpu)
        return cpu.to(tensor.device)
    dist.all_reduce(tensor)
    return tensor


def leave_together(exit_code):
    """Under DDP, with every file saved: all processes leave at once. The DDP wrapper still holds the gloo
    group, and letting interpreter shutdown destroy it can abort the process ("terminate called without
    an active exception") after a successful run, so skip that shutdown once all is flushed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
