"""Devices, processes and precision: which device a run or a server uses, which dtype it computes in there, and
printing once per run under torchrun. Shared by the trainers, the chat/serving code and the benchmarks."""
import torch
import torch.distributed as dist


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


def synchronize(device):
    """Wait for the device's queued work (for honest timings); nothing to wait for on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
