"""What every train_*.py shares around its own step: the run's set-up, its logging, and the signals that stop it.

    run = Run(args)                                        # device, precision, seeds, this run's file names
    tokenizer, model = run.load_tokenizer(), run.load_model()
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)   # trainer/sampler.py
    checkpoint = Checkpoint(run, stream, model, optimizer)                    # trainer/resume.py
    checkpoint.restore()                                   # --from_resume 1
    model = run.wrap(model)                                # torch.compile, DDP
    for step, window in run.steps(stream, checkpoint):     # the script writes the step: forward, loss, backward,
        ...                                                # clip, optimizer step
        run.log(stream, sums.over_processes(), lr=lr)      # StepSums: the step's loss and metrics, summed on the device
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):                        # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()

The rest of trainer/, one concern a file: args.py (the command line), sampler.py (the resumable sample stream),
resume.py (the resume file), distributed.py (torchrun processes), losses.py (the losses the stages share), rl/ (the
RL stages' rollouts, engines and rewards). common/ holds what inference shares too (devices, tokenizers, the chat
format, atomic files).
"""
import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist

from common.bench import GPU_CHECK_ENV, attention_probe, write_gpu_check_report
from common.device import choose_dtype, is_main, print0, sum_dtype, synchronize, use_tf32
from common.tokenizer import PROJECT_TOKENIZER, check_tokenizer_fits, tokenizer_for
from model import kernels
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.qwen3_format import read_weights
from model.weights import config_from_state_dict, load_state_dict_strict
from trainer import distributed
from trainer.args import recorded_settings, weight_path
from trainer.distributed import setup_device, unwrap


def lr_at(step, total_steps, base_lr, warmup_steps=0):
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), from lr down to 0.1 * lr,
    after an optional linear warm-up. t counts optimizer steps over all epochs (SampleStream.schedule_position gives
    it in samples divided by the samples of one step, which may be fractional after a resume on another world size)."""
    if step < warmup_steps:
        return base_lr * min(step + 1, warmup_steps) / warmup_steps
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))


def fused_adamw(device):
    """AdamW(fused=True) on CUDA: one kernel for every parameter, with its step counters on the GPU (torch 2.13's
    default there, foreach, keeps them on the CPU and reads each one back per step); None elsewhere keeps torch's
    default."""
    return True if device.type == "cuda" else None


class StepSums:
    """A step's weighted sums, kept where they are made so that the step never waits for them: sums.add(weight,
    name=value) adds weight * value to each name - device tensors on the device (float64; float32 on MPS, which has
    no float64), Python numbers on the host. over_processes() sums them over all processes: what run.log() writes."""

    def __init__(self, run):
        self.run, self.sums, self.host = run, {}, {}

    def add(self, weight=1.0, **values):
        for name, value in values.items():
            if isinstance(value, torch.Tensor) or isinstance(weight, torch.Tensor):
                value = torch.as_tensor(value, device=self.run.device).detach().to(self.run.sum_dtype)
                self.sums[name] = self.sums.get(name, 0.0) + value * weight
            else:  # Python numbers stay on the host: a device tensor made from one is a blocking copy from it
                self.host[name] = self.host.get(name, 0.0) + value * weight

    def over_processes(self):
        """{name: sum over every process}: device tensors (read on the host only at log steps) and floats."""
        names = sorted(self.sums)
        summed = dict(zip(names, self.run.all_sum(*[self.sums[name] for name in names]))) if names else {}
        host_names = sorted(self.host)  # the same order on every process
        return {**summed, **dict(zip(host_names, self.run.host_sum(*[self.host[name] for name in host_names])))}


class Run:
    """Set-up, logging and stopping of one training run: device, precision, seeds, tokenizer, models, the metrics
    file and tracker, Ctrl-C / SIGTERM. The step itself is in each train_*.py."""

    def __init__(self, args, weight_name=None):
        self.args = args
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.device = setup_device(args.device, self.ddp)
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        # Sums of losses and counts: float64 for exact token weighting, float32 on MPS, which has no float64.
        self.sum_dtype = sum_dtype(self.device)
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)

        if getattr(args, "use_compile", 0) and self.device.type == "mps":
            raise SystemExit("--use_compile 1 on Apple MPS: torch.compile's MPS backend is a prototype in torch 2.13, "
                             "and this project has not run it. Train with --use_compile 0.")
        self.fused_adamw = fused_adamw(self.device)  # what each script passes to torch.optim.AdamW(fused=...)
        self.dtype = choose_dtype(args.dtype, self.device)
        use_tf32(self.device)
        # The loss scaler of float16 (its gradients underflow without one); bf16 and fp32 need none, and disabled
        # (torch.amp.GradScaler) its scale() returns the loss as is, unscale_() and update() do nothing, step() is
        # optimizer.step()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.config = MiniMindConfig(generation=getattr(args, "generation", "minimind2"), hidden_size=args.hidden_size,
                                     num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe))
        self.weight_name = weight_name or args.save_weight
        os.makedirs(args.save_dir, exist_ok=True)
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        # out/{name}_{hidden}[_moe].pth, and beside it the metrics; the resume file in --checkpoint_dir
        self.weight_file = weight_path(args.save_dir, self.weight_name, self.config)
        self.resume_path = os.path.join(args.checkpoint_dir,
                                        os.path.basename(self.weight_file).replace(".pth", "_resume.pth"))
        self.metrics_path = self.weight_file.replace(".pth", "_metrics.jsonl")
        self.tracker, self.progress, self.tokens_since_log = None, None, 0
        self.tokenizer, self.tokenizer_dir = None, None  # load_tokenizer() sets them; weights are checked against them
        self.last_log_time = time.perf_counter()
        # Device-side record of the first step whose loss was not finite (0 = none yet): read on the host
        # only at log and save steps, so training never waits on the GPU just to check the loss.
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self.log_points = []  # (time, step, tokens/s) of each log line, for scripts/gpu_check.py
        self.checkpoint = None  # what a signal saves, once steps() starts
        self.interrupted, self.interrupted_at = None, 0.0  # the signal that asked the run to stop at a step boundary
        self.stopped_by_signal = False  # should_stop() ended the loop for that signal
        # A CPU-side group for the stop flag, so agreeing on it never waits on the GPU stream.
        self.flag_group = dist.new_group(backend="gloo", timeout=distributed.PROCESS_GROUP_TIMEOUT) \
            if self.ddp else None
        for note in getattr(args, "chosen_for_you", []):  # settings the command line filled in or rebased
            print0(note)
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
        model folder), loaded strictly and checked against the run's tokenizer (check_tokenizer_fits)."""
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
            # finite values, and the run's tokenizer: the weight's record, or the probe (a folder's own is its own)
            if self.tokenizer is not None:
                check_tokenizer_fits(model, self.tokenizer, self.tokenizer_dir, path,
                                     chosen=bool(getattr(self.args, "tokenizer_dir", None)))
            print0(f"loaded {path}")
        params = sum(p.numel() for p in model.parameters())
        print0(f"model: {config.generation} {config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
               f"{params / 1e6:.2f}M parameters; device {self.device}, {str(self.dtype).removeprefix('torch.')}, "
               f"{self.world_size} process(es)")
        if os.environ.get(GPU_CHECK_ENV):  # scripts/gpu_check.py: record which attention kernel each call gets
            kernels.ATTENTION_PROBE = attention_probe()
        model = model.to(self.device)
        # Under torchrun every process holds process 0's weights from here on: a random init differs with each
        # process's seed, and DDP's own broadcast (at wrap) reaches only the trained model, not the reference or old
        # actor copied from it before
        distributed.broadcast_from_first(model)
        return model

    def freeze(self, model):
        """A model that is only ever evaluated (reference, old policy, teacher): eval mode, no gradients, and the
        trained model's precision - fp32 weights under the same autocast - so that at step 0 it is the policy to the
        last bit (KL 0, DPO margins 0, PPO ratios 1). Cast whole to bf16, its embeddings, norms, residual stream and
        RoPE tables would round differently; at these sizes the fp32 copy costs little memory."""
        return model.eval().requires_grad_(False)

    def frozen_copy(self, model):
        """A frozen copy of the model as it is now (the reference policy of DPO / RL, PPO's old actor)."""
        return self.freeze(copy.deepcopy(unwrap(model)))

    def main_process_first(self):
        """with run.main_process_first(): tokenise on each machine's first process, then the others read its cache."""
        return distributed.main_process_first(self.ddp)

    def wrap(self, model):
        """torch.compile (--use_compile 1) and, under torchrun, DDP around a model whose trainable parameters are set."""
        return distributed.wrap(model, self.device, self.args.use_compile, self.ddp)

    # -- inside the step --------------------------------------------------------------------------
    def to_device(self, batch):
        """A batch's tensors on the training device (non_blocking: they come from pinned memory on CUDA)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def grad_sync(self, models, last):
        """Under DDP, each backward all-reduces the gradients; inside a window only the last micro-batch's should
        (no_sync() holds the others back). models: the trained model, or several (PPO's actor and critic)."""
        stack = ExitStack()
        if self.ddp and not last:
            for model in models if isinstance(models, (list, tuple)) else [models]:
                stack.enter_context(model.no_sync())
        return stack

    def all_reduce(self, tensor):
        """The element-wise sum of a tensor over all processes (itself when there is one process)."""
        return distributed.all_reduce(tensor)

    def host_sum(self, *numbers):
        """Sum Python numbers over all processes, on the CPU group: counts read off a batch's CPU copy (loss tokens,
        prompts) never touch the GPU. (A device tensor made from a Python number is a blocking copy from the host:
        the CPU would wait for the GPU to finish its queue first.) Returns floats, exact for counts below 2^53."""
        if not self.ddp:
            return [float(n) for n in numbers]
        summed = torch.tensor(numbers, dtype=torch.float64)
        dist.all_reduce(summed, group=self.flag_group)
        return summed.tolist()

    def all_sum(self, *values):
        """Sum numbers or 0-dim tensors over all processes (one collective, no host sync); returns a
        tensor on the device (float64; float32 on MPS, which has no float64)."""
        return self.all_reduce(torch.stack([torch.as_tensor(v, device=self.device).to(self.sum_dtype).reshape(())
                                            for v in values]))

    # -- the loop ----------------------------------------------------------------------------------
    def steps(self, stream, checkpoint):
        """The stream's (step, window) pairs. From here on Ctrl-C or SIGTERM ends the loop at the next step
        boundary (should_stop) and finish() saves `checkpoint` first."""
        self.checkpoint = checkpoint
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.stop_soon)
        self.last_log_time, self.tokens_since_log = time.perf_counter(), 0
        if is_main():
            from tqdm import tqdm
            planned = stream.plan()  # where the last step will be
            total = min(planned, self.args.max_steps) if self.args.max_steps else planned
            self.progress = tqdm(total=total, initial=min(stream.step, total), desc=self.weight_name,
                                 dynamic_ncols=True, disable=os.environ.get("MINIMIND_NO_PROGRESS") == "1")
        yield from stream

    def stop_soon(self, signum, frame):
        if self.interrupted is not None:
            # A second Ctrl-C stops at once, without a checkpoint; one within a second is the same request
            # arriving twice (torchrun forwards the terminal's Ctrl-C to processes that already got it).
            if time.monotonic() - self.interrupted_at > 1.0:
                raise KeyboardInterrupt
            return
        self.interrupted, self.interrupted_at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self.interrupted}: finishing this step and saving a resume checkpoint "
              "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def should_stop(self, stream):
        """At a step boundary: whether the loop ends here, before the data does - --max_steps reached, or Ctrl-C /
        SIGTERM arrived on any process (every process agrees; finish() then saves a resume checkpoint)."""
        if self.args.max_steps and stream.step >= self.args.max_steps:
            return True
        asked = torch.tensor([float(self.interrupted is not None)])
        if self.ddp:
            dist.all_reduce(asked, group=self.flag_group)
        self.stopped_by_signal = bool(asked.item()) and self.checkpoint is not None
        return self.stopped_by_signal

    def check_finite(self):
        """Stop if any step's loss so far was not finite (one host read of a device flag)."""
        bad_step = int(self.first_bad_step)
        if bad_step:
            raise SystemExit(f"loss is not finite (nan or inf) since step {bad_step}: stopping without saving. The "
                             f"last good checkpoint is {self.resume_path} (resume with --from_resume 1, perhaps with "
                             "a lower --learning_rate or --dtype float32).")

    def note(self, text):
        """A line for the user, above the progress bar."""
        (self.progress.write if self.progress is not None else print0)(text)

    def log(self, stream, sums, **metrics):
        """Called once per optimizer step on every process. sums: StepSums.over_processes() of the step, whose
        "tokens" (the step's real tokens, all processes) give the tokens/s and whose "loss" is checked for nan / inf
        on the device; metrics: further values (lr, grad_norm, ...). Every log_interval steps the first process
        writes them to the JSONL metrics file, the tracker and the progress bar. Values may be device tensors: they
        are read on the host only here, at log steps."""
        metrics = {**sums, **metrics}
        tokens = metrics.pop("tokens", 0)
        if "loss" in metrics:
            self.first_bad_step = torch.where((self.first_bad_step == 0) & ~torch.isfinite(torch.as_tensor(
                metrics["loss"], device=self.device)), stream.step, self.first_bad_step)
        self.tokens_since_log = self.tokens_since_log + tokens
        if self.progress is not None:
            self.progress.update(1)
        if stream.step % self.args.log_interval and not stream.is_last_step:
            return
        self.check_finite()  # on every rank, so all of them stop together
        if not is_main():
            return
        synchronize(self.device)  # the time is taken when the device has really finished the steps
        now = time.perf_counter()
        tokens_per_s = float(self.tokens_since_log) / max(now - self.last_log_time, 1e-9)
        self.last_log_time, self.tokens_since_log = now, 0
        record = dict(step=stream.step, epoch=stream.epoch, samples=stream.samples,
                      **{k: float(f"{float(v):.6g}") for k, v in metrics.items()},
                      tokens_per_s=round(tokens_per_s, 1), time=round(time.time(), 1))
        if self.progress is not None:
            self.progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                                       if k in ("loss", "lr", "tokens_per_s") or k in metrics})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.log_points.append((now, stream.step, record["tokens_per_s"]))
        if self.args.use_wandb:
            self._tracker().log(record, step=stream.step)

    def _tracker(self):
        if self.tracker is None:
            name = f"{self.weight_name}_{self.config.hidden_size}"
            if self.args.tracker == "wandb":
                import wandb
                self.tracker = wandb.init(project=self.args.wandb_project, name=name,
                                          config=recorded_settings(self.args))
            else:
                import swanlab
                self.tracker = swanlab.init(project=self.args.wandb_project, name=name,
                                            config=recorded_settings(self.args))
        return self.tracker

    def finish(self):
        """After the loop: a run stopped by a signal saves its resume checkpoint and exits with 130; otherwise
        close the progress bar and tracker, and leave together with the other processes."""
        if self.stopped_by_signal:
            self.checkpoint.save()
            if self.progress is not None:
                self.progress.close()
            print0(f"interrupted at step {self.checkpoint.stream.step}; resume with --from_resume 1")
            distributed.leave_together(130)
            raise SystemExit(130)
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.finish()
        if os.environ.get(GPU_CHECK_ENV) and is_main():
            write_gpu_check_report(self, os.environ[GPU_CHECK_ENV])
        distributed.leave_together(0)
