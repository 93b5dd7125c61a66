"""Measurement: what scripts/bench_*.py and scripts/gpu_check.py report (peak memory, the GPU's peak TFLOP/s,
training FLOPs per token) and the attention-kernel probe a training run installs when gpu_check.py runs it.
Nothing here changes what is computed; it only measures."""
import json

import torch

from common.device import choose_dtype, pick_device, ready_device


def benchmark_setup(device_name, dtype_name=None):
    """(device, dtype) of a benchmark script: bf16 on CUDA (float16 before sm80, with choose_dtype's message),
    float32 elsewhere, unless a dtype is asked for."""
    device = ready_device(device_name or pick_device())
    dtype_name = dtype_name or ("bfloat16" if device.type == "cuda" else "float32")
    return device, choose_dtype(dtype_name, device) if device.type == "cuda" else getattr(torch, dtype_name)


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


GPU_CHECK_ENV = "MINIMIND_GPU_CHECK"  # set by scripts/gpu_check.py to the JSON file a stage reports into
ATTENTION_KERNELS_SEEN = {}  # kind of attention call -> the SDPA backend that ran it


def attention_probe():
    """A hook for model/kernels.ATTENTION_PROBE (the trainer sets it) that makes every new kind of attention call
    (device, dtype, masked or causal, train or no-grad) run once under the fast SDPA kernels only (flash, memory-efficient, cuDNN; flash on a CPU), recording which one
    took it. On a GPU a call that only the math kernel accepts raises, with torch's reasons: the math kernel
    upcasts to fp32 and keeps a [B, H, T, T] tensor for the backward, slow and memory-hungry."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

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

    return probe


def write_gpu_check_report(run, path):
    """What scripts/gpu_check.py tabulates for a training run: seconds per step after the first, real tokens/s,
    peak memory, training FLOPs per token and the attention kernels this stage's forwards ran on."""
    times = [(t, step) for t, step, _ in run.log_points]
    later = list(zip(times, times[1:]))  # the first step pays for start-up (kernels, allocator, compile)
    step_s = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in later]
    report = dict(device=str(run.device), dtype=str(run.dtype).removeprefix("torch."), world_size=run.world_size,
                  steps=run.log_points[-1][1] if run.log_points else 0, step_s=step_s,
                  tokens_per_s=[tps for _, _, tps in run.log_points[1:]],
                  peak_memory_gib=peak_memory_gib(run.device),
                  flops_per_token=training_flops_per_token(run.config, run.args.max_seq_len),
                  peak_tflops=peak_tflops(run.device, run.dtype), attention=ATTENTION_KERNELS_SEEN)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f)


def _cpu_resident_bytes(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def memory_added_by(device, fn):
    """Run fn() and return (bytes, what was measured): the most memory fn added above what was in use before it.

    CUDA: torch.cuda.max_memory_allocated over the call, less the tensors allocated before it (the weights).
    MPS: the driver's allocation after the call less before it (MPS keeps no resettable peak; its allocator caches,
    so this is close to a high-water mark but is not one). CPU (Linux): the process's peak resident set (VmHWM,
    reset by writing 5 to /proc/self/clear_refs) less its resident set before the call. (None, why) where none of
    these can be read."""
    from common.device import synchronize
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated above the weights"
    if device.type == "mps":
        before = torch.mps.driver_allocated_memory()
        fn()
        torch.mps.synchronize()
        return torch.mps.driver_allocated_memory() - before, "MPS driver allocation added (not a peak)"
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux)
        before = _cpu_resident_bytes("VmRSS")
    except OSError as error:
        fn()
        return None, f"CPU: peak RSS not measurable here ({error})"
    fn()
    return _cpu_resident_bytes("VmHWM") - before, "CPU: peak resident set (VmHWM) above the RSS before"
