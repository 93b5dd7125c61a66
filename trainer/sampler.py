"""The sample stream of a run: which rows each process trains on, step by step, and where a resumed run continues.

    stream = SampleStream(data, args, run.rank, run.world_size, run.device)
    for step, window in stream:      # window: the micro-batches of one optimizer step (each one collate's dict)
        ...

Progress is counted in samples, which mean the same on any number of processes (a step does not: it takes
batch_size x processes x accumulation_steps samples). The schedule's position, the end of the run and the resume
point are sample counts, so a run resumed on another world size ends where the uninterrupted one ends and follows the
same learning rate per sample. state_dict() / load_state_dict() are what the resume file keeps (trainer/resume.py).
"""
import math

import torch
from torch.utils.data import DataLoader, Sampler

from dataset.lm_dataset import pad_batch, stack_pairs
from model.kernels import document_offsets


def collate(rows):
    """pad_batch's dict; packed rows (with position_ids) also get "documents": where each document starts in the
    flattened batch and the longest one's length, found here on the batch's CPU copy (in the loader's workers), so that
    varlen attention on a GPU needs no host read of position ids already on the device. Rows with labels get
    "loss_index": the flat positions of labels[:, 1:] that carry loss (the model's loss_index), found here too;
    preference pairs get them in stack_pairs' layout (chosen rows, then rejected rows, one width)."""
    batch = pad_batch(rows)
    if "position_ids" in batch:
        batch["documents"] = document_offsets(batch["position_ids"])
    if "labels" in batch:
        batch["loss_index"] = loss_positions(batch["labels"])
    elif "chosen_labels" in batch:
        batch["loss_index"] = loss_positions(stack_pairs(batch, pad_id=0)[2])
    return batch


def loss_positions(labels):
    """The flat positions t of labels[:, 1:] ([B, T - 1]) whose label is not -100."""
    return torch.nonzero(labels[:, 1:].reshape(-1) != -100).squeeze(1)


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


class SampleStream:
    """The windows of micro-batches of a run, one window an optimizer step, resumable at any step boundary.

    Position: step (optimizer steps taken), epoch, consumed (samples all processes took of that epoch). While a
    step runs: step_start / samples are the run's samples before / after it, final_step says it ends the last epoch.
    The micro-batches are still on the CPU (pinned on CUDA); the script moves each to the device before its forward.
    The last window of an epoch may hold fewer than accumulation_steps micro-batches: it is still one optimizer
    step, so no gradient crosses an epoch boundary."""

    def __init__(self, dataset, args, rank, world_size, device):
        self.dataset, self.args, self.rank, self.world_size, self.device = dataset, args, rank, world_size, device
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.step_start, self.samples, self.final_step = 0, 0, False
        # rounds: one micro-batch on every process; an epoch trains epoch_samples of its rows on this world size
        epoch_rounds, self.epoch_samples = ResumableBatchSampler.size(len(dataset), args.batch_size, world_size)
        if epoch_rounds == 0:
            raise SystemExit(f"{len(dataset)} samples cannot give each of {world_size} processes a row: "
                             "use more data or fewer processes")
        self.run_samples = self.epoch_samples * args.epochs
        self.total_steps = None  # plan() sets it when the iteration starts

    def state_dict(self):
        return dict(step=self.step, epoch=self.epoch, consumed=self.consumed, num_samples=len(self.dataset))

    def load_state_dict(self, state):
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]

    @property
    def is_last_step(self):
        """The run's final step: the one that ends the last epoch's sample stream, or --max_steps."""
        return self.final_step or bool(self.args.max_steps and self.step >= self.args.max_steps)

    def schedule_position(self):
        """(t, T) for the learning-rate schedule, in units of one full step of this run but counted in samples
        (t = the samples before this step, T = the run's), so a run resumed on another world size follows the same
        curve per sample; t may be fractional after such a resume."""
        step_samples = self.args.batch_size * self.world_size * self.args.accumulation_steps
        return self.step_start / step_samples, self.run_samples / step_samples

    def plan(self):
        """Where the run's last step will be, from the current position (before --max_steps)."""
        args = self.args
        epoch_rounds, _ = ResumableBatchSampler.size(len(self.dataset), args.batch_size, self.world_size)
        rounds_left, _ = ResumableBatchSampler.size(len(self.dataset) - self.consumed, args.batch_size,
                                                    self.world_size)
        self.total_steps = self.step + math.ceil(rounds_left / args.accumulation_steps) + \
            math.ceil(epoch_rounds / args.accumulation_steps) * (args.epochs - self.epoch - 1)
        return self.total_steps

    def __iter__(self):
        args = self.args
        lengths = self.dataset.lengths() if args.group_by_length else None
        start_epoch, start_consumed = self.epoch, self.consumed
        self.plan()
        for epoch in range(start_epoch, args.epochs):
            self.epoch = epoch
            self.consumed = start_consumed if epoch == start_epoch else 0
            sampler = ResumableBatchSampler(len(self.dataset), args.batch_size, self.rank, self.world_size, args.seed,
                                            epoch, self.consumed, lengths)
            # The loader's own generator: creating its iterator must not draw from the global RNG, whose
            # state a resumed run restores for sampling (RL) and dropout.
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                num_workers=args.num_workers, pin_memory=self.device.type == "cuda",
                                persistent_workers=False, generator=torch.Generator().manual_seed(args.seed + epoch))
            window = []
            for i, batch in enumerate(loader):
                window.append(batch)
                if len(window) == args.accumulation_steps or i == len(sampler) - 1:
                    self.step_start = epoch * self.epoch_samples + self.consumed  # the schedule's position
                    self.consumed += sum(sampler.round_samples(k) for k in range(i + 1 - len(window), i + 1))
                    self.samples = epoch * self.epoch_samples + self.consumed
                    self.final_step = epoch == args.epochs - 1 and i == len(sampler) - 1
                    self.step += 1
                    yield self.step, window  # the script runs the step: forward, backward, update, log, save
                    window = []
