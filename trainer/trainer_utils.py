"""The training loop's pieces, which every train_*.py calls in its own loop:

    for step, window in run.steps(data):               # one optimizer step's micro-batches, resumable
        loss = run.accumulate(model, window, loss_fn)  # forward + backward, weighted by tokens
        lr = run.optimizer_step(optimizer)             # scheduled lr, unscale, clip, step
        run.log(loss=loss, lr=lr)
        run.maybe_save(model, optimizer)
        if run.should_stop():                          # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()

Run also sets a run up (device, precision, seeds, tokenizer, model) and holds its state. What is not the loop lives
beside it, one concern a file: trainer/args.py (the command line), trainer/resume.py (the resumable sample order and
the resume file), trainer/distributed.py (torchrun processes), trainer/losses.py (the losses), trainer/rollout.py and
trainer/rewards.py (RL sampling and scoring); common/ holds what inference shares (devices, tokenizers).
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
from torch.utils.data import DataLoader

from common.bench import GPU_CHECK_ENV, attention_probe, write_gpu_check_report
from common.device import choose_dtype, is_main, print0, sum_dtype, synchronize, use_tf32
from common.tokenizer import PROJECT_TOKENIZER, check_tokenizer_fits, tokenizer_for
from dataset.lm_dataset import pad_batch
from model import kernels
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.qwen3_format import read_weights
from model.weights import config_from_state_dict, load_state_dict_strict
from trainer import distributed, resume
from trainer.args import recorded_settings, weight_path
from trainer.distributed import setup_device, unwrap
from trainer.losses import count_label_tokens
from trainer.resume import ResumableBatchSampler


def lr_at(step, total_steps, base_lr, warmup_steps=0):
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), from lr down to 0.1 * lr,
    after an optional linear warm-up. t counts optimizer steps over all epochs (Run passes it in samples
    divided by the samples of one step, which may be fractional after a resume on another world size)."""
    if step < warmup_steps:
        return base_lr * min(step + 1, warmup_steps) / warmup_steps
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))


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
        self.log_points = []  # (time, step, tokens/s) of each log line, for scripts/gpu_check.py
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
        if os.environ.get(GPU_CHECK_ENV):  # scripts/gpu_check.py: record which attention kernel each call gets
            kernels.ATTENTION_PROBE = attention_probe()
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

    def main_process_first(self):
        """with run.main_process_first(): tokenise on each machine's first process, then the others read its cache."""
        return distributed.main_process_first(self.ddp)

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
        """torch.compile (--use_compile 1) and, under torchrun, DDP around a model whose trainable parameters are set."""
        return distributed.wrap(model, self.device, self.args.use_compile, self.ddp)

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
        return distributed.all_reduce(tensor)

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
        self.log_points.append((now, self.step, record["tokens_per_s"]))
        if self.args.use_wandb:
            self._tracker().log(record, step=self.step)

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

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model, optimizer, extras=None):
        """Weights for inference (half precision; LoRA-only for LoRA runs) and the fp32 resume file (trainer/resume.py).
        extras: {name: module or optimizer} (e.g. a critic and its optimizer) saved into the resume file too."""
        resume.save_checkpoint(self, model, optimizer, extras)

    def is_last_step(self):
        """The run's final step: the one that ends the last epoch's sample stream, or --max_steps."""
        return self.final_step or bool(self.args.max_steps and self.step >= self.args.max_steps)

    def maybe_save(self, model, optimizer, extras=None):
        if self.step % self.args.save_interval == 0 or self.is_last_step():
            self.save(model, optimizer, extras)

    def restore(self, model, optimizer, extras=None):
        """With --from_resume 1: load the resume file into model/optimizer/scaler and the data position."""
        resume.restore_checkpoint(self, model, optimizer, extras)

    def check_same_order(self, saved):
        """Refuse to resume with a setting that would change the sample order (trainer/resume.py)."""
        resume.check_same_order(self, saved)

    def finish(self):
        """After the loop: a run stopped by a signal saves its resume checkpoint and exits with 130; otherwise
        close the progress bar and tracker, and leave together with the other processes."""
        if self._stopped_by_signal:
            self.save(*self._saving)
            if self.progress is not None:
                self.progress.close()
            print0(f"interrupted at step {self.step}; resume with --from_resume 1")
            distributed.leave_together(130)
            raise SystemExit(130)
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.finish()
        if os.environ.get(GPU_CHECK_ENV) and is_main():
            write_gpu_check_report(self, os.environ[GPU_CHECK_ENV])
        distributed.leave_together(0)
