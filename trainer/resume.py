"""Stop anywhere, continue exactly: the resumable sample order and the resume file.

A resume file holds the trainable weights in fp32, the optimizer and loss-scaler states, the position in the
sample stream (epoch, samples consumed), every process's random states, the tokenizer's hash and the settings
that fix the sample order; the inference weight beside it is saved in half precision. Both are written
atomically (a temporary file, then one rename), so a kill never leaves half a checkpoint.
"""
import json
import os
import random

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from common.device import is_main, print0
from common.tokenizer import tokenizer_id
from model.model_lora import atomic_torch_save, save_lora
from trainer.args import REPO_ROOT, recorded_settings, weight_path
from trainer.distributed import unwrap


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


def save_checkpoint(run, model, optimizer, extras=None):
    """Weights for inference (half precision; LoRA-only for LoRA runs) and the fp32 resume file.
    extras: {name: module or optimizer} (e.g. a critic and its optimizer) saved into the resume file too."""
    run.check_finite()  # never overwrite a good checkpoint with weights that saw a nan
    raw = unwrap(model)
    # This process's generators only: its own GPU's state (get_rng_state_all would tie the file to the
    # number of visible GPUs), or the MPS one.
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
               mps=torch.mps.get_rng_state() if run.device.type == "mps" else None)
    all_rng = [None] * run.world_size
    if run.ddp:
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    if is_main():
        lora_name = getattr(run.args, "lora_name", None)
        if lora_name:
            path = os.path.join(run.args.save_dir, "lora", f"{lora_name}_{run.config.hidden_size}.pth")
            save_lora(raw, path)
        else:
            path = weight_path(run.args.save_dir, run.weight_name, run.config)
            atomic_torch_save({k: v.detach().half().cpu() for k, v in raw.state_dict().items()}, path)
        state = dict(model=trainable_state(raw), optimizer=optimizer.state_dict(), scaler=run.scaler.state_dict(),
                     step=run.step, epoch=run.epoch, consumed=run.consumed, world_size=run.world_size,
                     num_samples=run.num_samples,
                     tokenizer=tokenizer_id(run.tokenizer),
                     rng=all_rng,
                     extras={k: unwrap(m).state_dict() for k, m in (extras or {}).items()},
                     args={k: v for k, v in recorded_settings(run.args).items()
                           if isinstance(v, (int, float, str, bool))})
        atomic_torch_save(state, run.resume_path)
        if run.progress is not None:
            run.progress.write(f"step {run.step}: saved {os.path.relpath(path, REPO_ROOT)} and "
                               f"{os.path.relpath(run.resume_path, REPO_ROOT)}")
    if run.ddp:
        dist.barrier()


def restore_checkpoint(run, model, optimizer, extras=None):
    """With --from_resume 1: load the resume file into model/optimizer/scaler and the data position."""
    if not run.args.from_resume:
        return
    if not os.path.exists(run.resume_path):
        print0(f"--from_resume 1, but there is no {run.resume_path} yet: starting from the beginning")
        return
    state = torch.load(run.resume_path, map_location="cpu", weights_only=True)
    check_same_order(run, state.get("args", {}))
    saved_tokenizer, tokenizer = state.get("tokenizer"), tokenizer_id(run.tokenizer)
    if saved_tokenizer and tokenizer and saved_tokenizer != tokenizer:
        raise SystemExit(f"{run.resume_path} was trained with another tokenizer than {run.tokenizer_dir} (the "
                         f"resume file's {state.get('args', {}).get('tokenizer_dir') or 'model/'}): the token "
                         "ids would change meaning. Resume with that --tokenizer_dir.")
    run._resumed_num_samples = state.get("num_samples")
    raw = unwrap(model)
    missing, unexpected = raw.load_state_dict(state["model"], strict=False)
    trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
    if unexpected or set(missing) & trainable:
        raise SystemExit(f"{run.resume_path} does not match this model: missing {sorted(set(missing) & trainable)[:5]}, "
                         f"unexpected {unexpected[:5]} (different --hidden_size / --use_moe / LoRA settings?)")
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    elif run.scaler.is_enabled():  # GradScaler.load_state_dict refuses the {} a disabled scaler saves
        print0("the resume file comes from a run without loss scaling (bf16 / fp32): float16 starts with a "
               "fresh loss scale")
    for name, item in (extras or {}).items():
        unwrap(item).load_state_dict(state["extras"][name])
    run.step, run.epoch, run.consumed = state["step"], state["epoch"], state["consumed"]
    if state["world_size"] == run.world_size:
        rng = state["rng"][run.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
        cuda_rng = rng.get("cuda")
        if isinstance(cuda_rng, (list, tuple)):  # files from earlier versions held every GPU's state
            cuda_rng = cuda_rng[run.device.index] if run.device.type == "cuda" and run.device.index < len(cuda_rng) else None
        if cuda_rng is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, run.device)
        if rng.get("mps") is not None and run.device.type == "mps":
            torch.mps.set_rng_state(rng["mps"])
    else:
        print0(f"resuming a {state['world_size']}-process run on {run.world_size}: the sample stream continues "
               "exactly; random states are reseeded")
    print0(f"resumed from {run.resume_path}: step {run.step}, epoch {run.epoch}, {run.consumed} samples "
           "into the epoch")
    if is_main() and os.path.exists(run.metrics_path):  # rows logged after that checkpoint will be redone
        with open(run.metrics_path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= run.step]
        atomic_write_text(run.metrics_path, "".join(rows))


# Settings that fix which rows a resumed position points at, with the value a resume file that predates
# the setting was written under. The seed fixes the shuffle; grouping (and with it the batch size and
# the row lengths, which --max_seq_len cuts) the order; --max_seq_len and --packing which rows exist.
ORDER_SETTINGS = dict(seed=None, group_by_length=0, packing=0, batch_size=None, max_seq_len=None)


def check_same_order(run, saved):
    """Refuse to resume with a setting that would change the sample order: the saved position would then
    skip some rows and repeat others (a changed seed or grouping, or with grouping or packing on a
    changed --batch_size / --max_seq_len). Other settings (learning rate, steps, ...) may change."""
    current = vars(run.args)
    grouped = saved.get("group_by_length", 0) or current.get("group_by_length")
    packed = saved.get("packing", 0) or current.get("packing")
    matters = dict(seed=True, group_by_length=True, packing=True, batch_size=grouped, max_seq_len=grouped or packed)
    for name, before_it_existed in ORDER_SETTINGS.items():
        if name not in current or not matters[name]:
            continue
        was = saved.get(name, before_it_existed)
        if was is not None and was != current[name]:
            raise SystemExit(f"{run.resume_path} was written with --{name} {was}, and this run has --{name} "
                             f"{current[name]}: that changes the sample order, so the saved position would "
                             f"skip some rows and repeat others. Resume with --{name} {was}, or start afresh "
                             "without --from_resume.")


def atomic_write_text(path, text):
    """Replace a text file in one step (a kill never leaves half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def trainable_state(model):
    """fp32 copies of the trainable parameters (all of them in full training, the adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k in names}
