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
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

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
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_state_dict_strict  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Arguments and paths
# ----------------------------------------------------------------------------------------------

def common_parser(description, *, save_weight, epochs, batch_size, learning_rate, accumulation_steps,
                  log_interval, save_interval, max_seq_len, data_path, from_weight):
    """The options every stage takes; each script passes its own defaults (MiniMind's) and adds extras."""
    p = argparse.ArgumentParser(description=description)
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
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--max_seq_len", type=int, default=max_seq_len)
    p.add_argument("--data_path", default=data_path)
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--from_weight", default=from_weight, help="weight to start from ('none' = random init)")
    p.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="1 = continue from checkpoints/")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = all)")
    p.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="torch.compile the model")
    p.add_argument("--seed", type=int, default=42)
    return p


def parse_args(parser, argv=None):
    """Parse, then turn path options into absolute paths: a default written relative to trainer/ (as in
    MiniMind, e.g. ../out) resolves against trainer/; a path the user typed resolves against the cwd."""
    args = parser.parse_args(argv)
    for name in ("save_dir", "checkpoint_dir", "data_path", "reward_model_path"):
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
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def lr_at(step, total_steps, base_lr, warmup_steps=0):
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), from lr down to 0.1 * lr,
    after an optional linear warm-up. t counts optimizer steps over all epochs."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))


class ResumableBatchSampler(Sampler):
    """This rank's micro-batches of one epoch, starting after `consumed` samples.

    The epoch's order is a permutation fixed by (seed, epoch). Positions are global: micro-batch k of
    rank r is order[consumed + (k * world + r) * B : ... + B], so after k rounds every rank together has
    consumed k * world * B samples. Resuming from that count gives the same stream on any world size.
    A last round with fewer than world * B samples is left for the next epoch's shuffle.
    """

    def __init__(self, num_samples, batch_size, rank, world_size, seed, epoch, consumed=0):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        self.order = torch.randperm(num_samples, generator=generator)[consumed:].tolist()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self):
        return len(self.order) // (self.batch_size * self.world_size)

    def __iter__(self):
        for k in range(len(self)):
            start = (k * self.world_size + self.rank) * self.batch_size
            yield self.order[start:start + self.batch_size]


# ----------------------------------------------------------------------------------------------
# The run: everything a stage needs around its own loss
# ----------------------------------------------------------------------------------------------

class Run:
    """Set-up, data stream, optimizer steps, logging and checkpoints of one training run."""

    def __init__(self, args, weight_name=None):
        self.args = args
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        device = pick_device(args.device)
        if self.ddp:
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if device.startswith("cuda"):
                device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(device)
        else:
            self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)

        self.dtype = self._choose_dtype(args.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                     use_moe=bool(args.use_moe))
        self.weight_name = weight_name or args.save_weight
        os.makedirs(args.save_dir, exist_ok=True)
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        self.resume_path = os.path.join(args.checkpoint_dir, os.path.basename(
            weight_path(args.save_dir, self.weight_name, self.config)).replace(".pth", "_resume.pth"))
        self.metrics_path = weight_path(args.save_dir, self.weight_name, self.config).replace(".pth", "_metrics.jsonl")
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.tracker, self.progress, self.step_tokens, self.step_metrics = None, None, 0, {}
        self._last_time, self._tokens_since_log = time.perf_counter(), 0

    def _choose_dtype(self, name):
        dtype = getattr(torch, name)
        if dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            print0("This CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 would be slower than fp32 here, "
                   "so training in float32. Pass --dtype float32 to silence this.")
            return torch.float32
        if dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            print0("This GPU has no bfloat16: using float16 with loss scaling.")
            return torch.float16
        return dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- model -----------------------------------------------------------------------------
    def load_model(self, from_weight=None, config=None):
        """A MiniMind model, initialised randomly or from out/{from_weight}_{hidden}[_moe].pth (strictly)."""
        config = config or self.config
        from_weight = self.args.from_weight if from_weight is None else from_weight
        model = MiniMindForCausalLM(config)
        if from_weight and from_weight.lower() != "none":
            path = weight_path(self.args.save_dir, from_weight, config)
            if not os.path.exists(path):
                present = sorted(f for f in os.listdir(self.args.save_dir) if f.endswith(".pth")) \
                    if os.path.isdir(self.args.save_dir) else []
                raise SystemExit(f"--from_weight {from_weight}: {path} does not exist. {self.args.save_dir} holds: "
                                 f"{', '.join(present) or 'no .pth files'}. Train that stage first, or check "
                                 "--save_dir / --hidden_size / --use_moe.")
            load_state_dict_strict(model, torch.load(path, map_location="cpu", weights_only=True), source=path)
            print0(f"loaded {path}")
        params = sum(p.numel() for p in model.parameters())
        print0(f"model: {config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
               f"{params / 1e6:.2f}M parameters; device {self.device}, {str(self.dtype).removeprefix('torch.')}, "
               f"{self.world_size} process(es)")
        return model.to(self.device)

    def prepare(self, model, optimizer, extras=None):
        """Resume state if asked (--from_resume 1), then wrap for torch.compile / DDP."""
        self.restore(model, optimizer, extras)
        return self.wrap(model)

    def wrap(self, model):
        """torch.compile and/or DDP around a model whose trainable parameters are set."""
        if self.args.use_compile:
            model = torch.compile(model)
        if self.ddp:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    # -- data --------------------------------------------------------------------------------
    def steps_per_epoch(self, dataset):
        micro_batches = len(dataset) // (self.args.batch_size * self.world_size)
        return math.ceil(micro_batches / self.args.accumulation_steps)

    def steps(self, dataset):
        """Yield (step, micro-batches of one optimizer step), resuming where a checkpoint left off.

        The last window of an epoch may hold fewer than accumulation_steps micro-batches: it is still
        one optimizer step, so no gradient crosses an epoch boundary.
        """
        args = self.args
        self.total_steps = self.steps_per_epoch(dataset) * args.epochs
        if self.total_steps == 0:
            raise SystemExit(f"{len(dataset)} samples cannot fill one batch of {args.batch_size} x {self.world_size} "
                             "processes: lower --batch_size")
        start_epoch, start_consumed = self.epoch, self.consumed
        self._last_time, self._tokens_since_log = time.perf_counter(), 0
        self.progress = self._progress_bar()
        for epoch in range(start_epoch, args.epochs):
            self.epoch = epoch
            self.consumed = start_consumed if epoch == start_epoch else 0
            sampler = ResumableBatchSampler(len(dataset), args.batch_size, self.rank, self.world_size, args.seed,
                                            epoch, self.consumed)
            # The loader's own generator: creating its iterator must not draw from the global RNG, whose
            # state a resumed run restores for sampling (RL) and dropout.
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_batch, num_workers=args.num_workers,
                                pin_memory=self.device.type == "cuda", persistent_workers=False,
                                generator=torch.Generator().manual_seed(args.seed + epoch))
            window = []
            for i, batch in enumerate(loader):
                window.append({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                               for k, v in batch.items()})
                if len(window) == args.accumulation_steps or i == len(sampler) - 1:
                    self.consumed += len(window) * args.batch_size * self.world_size
                    self.step += 1
                    yield self.step, window
                    window = []
                    if args.max_steps and self.step >= args.max_steps:
                        return

    def all_sum(self, *values):
        """Sum numbers over all processes (one collective); returns a float64 tensor on the device."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.ddp:
            dist.all_reduce(t)
        return t

    def accumulate(self, model, window, loss_fn, count=None):
        """Forward and backward every micro-batch of one optimizer step; return the step's mean loss.

        loss_fn(batch) -> (mean loss over the batch's items, extra loss such as MoE balance, or 0[, metrics]).
        Items (loss-carrying label tokens, or what `count(batch)` counts) weigh the same across
        micro-batches and processes: batch b's mean loss enters as (n_b / N) * loss_b, N being the
        step's items on all processes, so accumulation and DDP give exactly the large-batch loss.
        Optional metrics (a dict of batch means) are averaged the same way into self.step_metrics.
        """
        count = count or (lambda batch: count_label_tokens(batch["labels"]))
        counts = [count(batch) for batch in window]
        total = max(float(self.all_sum(sum(counts))[0]), 1.0)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        step_metrics = {}
        for i, (batch, n) in enumerate(zip(window, counts)):
            # Inside the window, DDP's gradient all-reduce waits for the last micro-batch.
            with model.no_sync() if self.ddp and i < len(window) - 1 else nullcontext():
                with self.autocast():
                    loss, extra, *metrics = loss_fn(batch)
                share = n / total
                # DDP averages gradients over processes; our terms are shares of the global sum.
                self.scaler.scale((loss * share + extra / len(window) / self.world_size) * self.world_size).backward()
            step_loss += loss.detach().double() * share
            for name, value in (metrics[0] if metrics else {}).items():
                step_metrics[name] = step_metrics.get(name, 0.0) + torch.as_tensor(value).detach().double() * share
        real_tokens = sum(int(v.sum()) for b in window for k, v in b.items() if k.endswith("attention_mask"))
        names = sorted(step_metrics)
        sums = self.all_sum(step_loss, real_tokens, *[step_metrics[name] for name in names])
        self.step_tokens = int(sums[1])
        self.step_metrics = {name: float(value) for name, value in zip(names, sums[2:])}
        return float(sums[0])

    # -- update ------------------------------------------------------------------------------
    def optimizer_step(self, optimizer, learning_rate=None, more=()):
        """Set the scheduled lr, unscale, clip, step, zero the gradients; returns the lr used.
        more: further (optimizer, base lr) pairs stepped alongside (e.g. PPO's critic) on the same schedule."""
        lrs = []
        for opt, base_lr in [(optimizer, learning_rate or self.args.learning_rate), *more]:
            lr = lr_at(self.step - 1, self.total_steps, base_lr, self.args.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                  self.args.grad_clip if self.args.grad_clip > 0 else float("inf"))
            if opt is optimizer:
                self.step_metrics["grad_norm"] = float(norm)  # before clipping
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

    def log(self, **metrics):
        """Called once per optimizer step on every rank, after accumulate(). Every log_interval steps rank 0
        writes the metrics, those loss_fn returned and the real tokens/s to the JSONL, the tracker and the
        progress bar."""
        metrics = {**self.step_metrics, **metrics}
        self._tokens_since_log += self.step_tokens
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise SystemExit(f"loss is {metrics['loss']} at step {self.step}: stopping without saving. The last good "
                             f"checkpoint is {self.resume_path} (resume with --from_resume 1, perhaps with a lower "
                             "--learning_rate or --dtype float32).")
        if not is_main():
            return
        self.progress.update(1)
        if self.step % self.args.log_interval and not self.is_last_step():
            return
        now = time.perf_counter()
        tokens_per_s = self._tokens_since_log / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens_since_log = now, 0
        record = dict(step=self.step, epoch=self.epoch, **{k: float(f"{v:.6g}") for k, v in metrics.items()},
                      tokens_per_s=round(tokens_per_s, 1), time=round(time.time(), 1))
        self.progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                                   if k in ("loss", "lr", "tokens_per_s") or k in metrics})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
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
        raw = unwrap(model)
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
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
                         rng=all_rng,
                         extras={k: unwrap(m).state_dict() for k, m in (extras or {}).items()},
                         args={k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool))})
            atomic_torch_save(state, self.resume_path)
            if self.progress is not None:
                self.progress.write(f"step {self.step}: saved {os.path.relpath(path, REPO_ROOT)} and "
                                    f"{os.path.relpath(self.resume_path, REPO_ROOT)}")
        if self.ddp:
            dist.barrier()

    def train(self, model, optimizer, dataset, loss_fn, count=None):
        """The loop every supervised stage shares: for each optimizer step, forward and backward its
        micro-batches (loss_fn), step at the scheduled lr, log, save at intervals and at the end."""
        for step, window in self.steps(dataset):
            loss = self.accumulate(model, window, loss_fn, count)
            lr = self.optimizer_step(optimizer)
            self.log(loss=loss, lr=lr)
            self.maybe_save(model, optimizer)

    def is_last_step(self):
        """The run's final step: the end of the last epoch, or --max_steps."""
        return self.step == getattr(self, "total_steps", 0) or bool(self.args.max_steps and self.step >= self.args.max_steps)

    def maybe_save(self, model, optimizer, extras=None):
        if self.step % self.args.save_interval == 0 or self.is_last_step():
            self.save(model, optimizer, extras)

    def restore(self, model, optimizer, extras=None):
        """With --from_resume 1: load the resume file into model/optimizer/scaler and the data position."""
        if not self.args.from_resume:
            return
        if not os.path.exists(self.resume_path):
            raise SystemExit(f"--from_resume 1 but {self.resume_path} does not exist: nothing to resume")
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        raw = unwrap(model)
        missing, unexpected = raw.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
        if unexpected or set(missing) & trainable:
            raise SystemExit(f"{self.resume_path} does not match this model: missing {sorted(set(missing) & trainable)[:5]}, "
                             f"unexpected {unexpected[:5]} (different --hidden_size / --use_moe / LoRA settings?)")
        optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for name, item in (extras or {}).items():
            unwrap(item).load_state_dict(state["extras"][name])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        if state["world_size"] == self.world_size:
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            print0(f"resuming a {state['world_size']}-process run on {self.world_size}: the sample stream continues "
                   "exactly; random states are reseeded")
        print0(f"resumed from {self.resume_path}: step {self.step}, epoch {self.epoch}, {self.consumed} samples "
               "into the epoch")

    def finish(self):
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.finish()
        if self.ddp:
            # Every file is saved; leave together. The DDP wrapper still holds the gloo group, and
            # letting interpreter shutdown destroy it can abort the process ("terminate called without
            # an active exception") after a successful run, so skip that shutdown once all is flushed.
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def unwrap(model):
    """The MiniMind module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def trainable_state(model):
    """fp32 copies of the trainable parameters (all of them in full training, the adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k in names}


def load_tokenizer(path=os.path.join(REPO_ROOT, "model")):
    from transformers import AutoTokenizer
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise SystemExit(f"no tokenizer at {path}: expected tokenizer.json and tokenizer_config.json "
                         "(python scripts/train_tokenizer.py writes them)")
    return AutoTokenizer.from_pretrained(path)


def next_token_loss(model, batch):
    """Mean next-token cross-entropy over the tokens whose label is not -100, and the MoE balance loss."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, out.aux_loss


def token_logprobs(logits, labels):
    """log p(labels[:, t+1] | ...t) for every position t, and the mask of positions that count.

    Returns ([B, T-1] log-probs, with 0 where labels are -100; [B, T-1] float mask). The log-softmax
    runs in fp32 so long answers do not lose precision.
    """
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def count_label_tokens(labels):
    """Positions that carry loss after the shift: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != -100).sum())
