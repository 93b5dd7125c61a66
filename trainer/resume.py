"""Stop anywhere, continue exactly: the resume file, and the checkpoint that writes and reads it.

    checkpoint = Checkpoint(run, stream, model, optimizer)    # what the run must keep to continue
    checkpoint.restore()                                      # --from_resume 1: all of it, from the resume file
    ...
    checkpoint.save()                                         # the weight for inference and the resume file

A resume file holds the trainable weights in fp32, the optimizer and loss-scaler states, the sample stream's position
(trainer/sampler.py: step, epoch, samples consumed), every process's random states, the tokenizer's hash and the
settings that fix the sample order; the inference weight beside it is saved in half precision, with the record of
the tokenizer it was trained with (common/tokenizer.py: out/{name}_{hidden}.tokenizer.json), which every load checks.
All are written atomically (common/files.py), so a kill never leaves half a checkpoint. Under torchrun only process 0
writes them; restore() makes every process resume from process 0's file, even on machines that do not share
--checkpoint_dir.
"""
import io
import json
import os
import random
import socket

import torch
import torch.distributed as dist

from common.device import is_main, print0
from common.files import atomic_torch_save, atomic_write_text
from common.tokenizer import tokenizer_fields, tokenizer_id, write_record
from model.model_lora import save_lora
from trainer.args import REPO_ROOT, recorded_settings
from trainer.distributed import unwrap


class Checkpoint:
    """Everything a run keeps to continue exactly: the trainable weights, the optimizer, the loss scaler, the sample
    stream's position and the random states; extras: {name: module, optimizer or object with state_dict()} (PPO's
    critic and its optimizer, SPO's reward tracker). lora_only: the inference weight holds only the adapters."""

    def __init__(self, run, stream, model, optimizer, extras=None, lora_only=False):
        self.run, self.stream, self.model, self.optimizer = run, stream, model, optimizer
        self.extras, self.lora_only = extras or {}, lora_only
        self.path = run.resume_path
        # the weight for inference: out/{name}_{hidden}[_moe].pth, or the adapters alone in out/lora/{name}_{hidden}.pth
        self.weight_file = os.path.join(run.args.save_dir, "lora", f"{run.weight_name}_{run.config.hidden_size}.pth") \
            if lora_only else run.weight_file

    def save(self):
        """The weight for inference (half precision; the adapters only for LoRA) with the record of its tokenizer, and
        the fp32 resume file."""
        run = self.run
        run.check_finite()  # never overwrite a good checkpoint with weights that saw a nan
        raw = unwrap(self.model)
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
            if self.lora_only:
                save_lora(raw, self.weight_file)
            else:
                atomic_torch_save({k: v.detach().half().cpu() for k, v in raw.state_dict().items()},
                                  self.weight_file)
            if run.tokenizer is not None:  # out/{name}_{hidden}.tokenizer.json, checked wherever the weight is loaded
                write_record(self.weight_file, tokenizer_fields(run.tokenizer, run.tokenizer_dir),
                             run.config.generation)
            position = self.stream.state_dict()
            state = dict(model=trainable_state(raw), optimizer=self.optimizer.state_dict(),
                         scaler=run.scaler.state_dict(), step=position["step"], epoch=position["epoch"],
                         consumed=position["consumed"], world_size=run.world_size,
                         num_samples=position["num_samples"],
                         tokenizer=tokenizer_id(run.tokenizer),
                         rng=all_rng,
                         extras={k: unwrap(m).state_dict() for k, m in self.extras.items()},
                         args={k: v for k, v in recorded_settings(run.args).items()
                               if isinstance(v, (int, float, str, bool))})
            atomic_torch_save(state, self.path)
            run.note(f"step {position['step']}: saved {os.path.relpath(self.weight_file, REPO_ROOT)} and "
                     f"{os.path.relpath(self.path, REPO_ROOT)}")
        if run.ddp:
            dist.barrier()

    def restore(self):
        """With --from_resume 1: load the resume file into the model, optimizer, scaler, extras, the stream's
        position and the random states. Refuses a file whose sample order, rows or tokenizer differ from this run's.
        Under torchrun every process resumes from process 0's file, even on machines that do not share
        --checkpoint_dir (read_state)."""
        run = self.run
        state = self.read_state() if run.args.from_resume else None
        if state is None:  # a fresh start: the metrics file beside the weight starts anew, as the weight will
            if is_main() and os.path.exists(run.metrics_path):  # (an earlier run's rows would read as this run's)
                os.remove(run.metrics_path)
                print0(f"a fresh run: {os.path.relpath(run.metrics_path, REPO_ROOT)} of an earlier run replaced")
            return
        self.check_fits(state)
        raw = unwrap(self.model)
        missing, unexpected = raw.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
        if unexpected or set(missing) & trainable:
            raise SystemExit(f"{self.path} does not match this model: missing {sorted(set(missing) & trainable)[:5]}, "
                             f"unexpected {unexpected[:5]} (different --hidden_size / --use_moe / LoRA settings?)")
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            run.scaler.load_state_dict(state["scaler"])
        elif run.scaler.is_enabled():  # GradScaler.load_state_dict refuses the {} a disabled scaler saves
            print0("the resume file comes from a run without loss scaling (bf16 / fp32): float16 starts with a "
                   "fresh loss scale")
        for name, item in self.extras.items():
            unwrap(item).load_state_dict(state["extras"][name])
        self.stream.load_state_dict(state)
        if state["world_size"] == run.world_size:
            restore_rng(state["rng"][run.rank], run.device)
        else:
            print0(f"resuming a {state['world_size']}-process run on {run.world_size}: the sample stream continues "
                   "exactly; random states are reseeded")
        print0(f"resumed from {self.path}: step {state['step']}, epoch {state['epoch']}, {state['consumed']} "
               "samples into the epoch")
        # Process 0 alone writes the metrics file (Run.log), so it alone cuts it back
        if is_main() and os.path.exists(run.metrics_path):  # rows logged after that checkpoint will be redone
            with open(run.metrics_path, encoding="utf-8") as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state["step"]]
            atomic_write_text(run.metrics_path, "".join(rows))

    def read_state(self):
        """The resume file's contents, the same on every process, or None when there is none yet (a fresh start).

        Only process 0 writes the resume file (save()), but each process looks for it in its own --checkpoint_dir,
        and machines that do not share that folder see different things: nothing, or a copy from an earlier run.
        Had each process gone its own way, process 0 would resume at step N while the others start at 0, and the
        run would hang at its first collective. So the processes first agree on who sees the file (a CPU
        collective on the gloo group), then all take the same branch:
          nobody sees it               -> everyone starts from the beginning;
          everyone sees it             -> each reads its own copy, and all copies must be at the same step;
          process 0 and only some more -> process 0 sends its file to every process;
          others, but not process 0    -> a stale file: every process stops with a message."""
        run, path = self.run, self.path
        # (sees the file, host, path) of every process: the hosts and paths make the messages name the machines
        where = over_processes(run, (os.path.exists(path), socket.gethostname(), path))
        with_file = [rank for rank, (seen, _, _) in enumerate(where) if seen]
        without_file = [rank for rank, (seen, _, _) in enumerate(where) if not seen]

        def processes(ranks):
            return ", ".join(f"process {rank} ({where[rank][1]}: {where[rank][2]})" for rank in ranks)

        if not with_file:
            print0(f"--from_resume 1, but there is no {path} yet: starting from the beginning")
            return None
        if 0 in without_file:
            raise SystemExit(f"--from_resume 1: the resume file is missing for {processes([0])}, but there is one "
                             f"for {processes(with_file)}. Only process 0 writes the resume file, so a copy that it "
                             "does not see is stale (an earlier run's). Put the file to resume from into process 0's "
                             "--checkpoint_dir (process 0 then sends it to the others), or delete the stale copies "
                             "to start afresh, or run without --from_resume.")
        if not without_file:
            state = torch.load(path, map_location="cpu", weights_only=True)
            # Each copy is read on its own machine: a stale copy on one of them would resume there at another step
            positions = over_processes(run, (state.get("step"), state.get("epoch"), state.get("consumed")))
            if len(set(positions)) > 1:
                at = "; ".join(f"{processes([rank])} at step {step} (epoch {epoch}, {consumed} samples into it)"
                               for rank, (step, epoch, consumed) in enumerate(positions))
                raise SystemExit(f"--from_resume 1: the processes' resume files differ: {at}. Only process 0 writes "
                                 "the resume file, so the others hold a stale copy: copy process 0's file over them "
                                 "or delete them (process 0 then sends its own), or put --checkpoint_dir on a disk "
                                 "that every machine shares.")
            return state
        # Some processes have no copy (a --checkpoint_dir per machine): process 0 sends its file's bytes to every
        # process, which reads them as it would the file (weights_only), so all resume from the same state.
        print0(f"--from_resume 1: there is no resume file for {processes(without_file)}, so process 0 sends its "
               f"{path} to every process (--checkpoint_dir is not shared). Only process 0 writes the resume file: put "
               "--checkpoint_dir on a disk that every machine shares, so that each process reads it there.")
        content = [None]
        if run.rank == 0:
            with open(path, "rb") as f:
                content = [f.read()]
        dist.broadcast_object_list(content, src=0, group=run.flag_group)
        return torch.load(io.BytesIO(content[0]), map_location="cpu", weights_only=True)

    def check_fits(self, state):
        """Stop if the resume file's sample order, rows or tokenizer differ from this run's. Each process checks its
        own data and tokenizer (machines may hold different copies), and then all stop together: a process that
        stopped alone would leave the others waiting for it at their next collective."""
        run = self.run
        try:
            check_same_order(run.args, state.get("args", {}), self.path)
            saved_tokenizer, tokenizer = state.get("tokenizer"), tokenizer_id(run.tokenizer)
            if saved_tokenizer and tokenizer and saved_tokenizer != tokenizer:
                raise SystemExit(f"{self.path} was trained with another tokenizer than {run.tokenizer_dir} (the "
                                 f"resume file's {state.get('args', {}).get('tokenizer_dir') or 'model/'}): the "
                                 "token ids would change meaning. Resume with that --tokenizer_dir.")
            saved_rows, rows = state.get("num_samples"), len(self.stream.dataset)
            if saved_rows is not None and saved_rows != rows:
                raise SystemExit(f"{self.path} was written for {saved_rows} training rows, but this data gives "
                                 f"{rows}: the saved position would point at other rows. Resume on the same "
                                 "data and settings (--data_path, --max_seq_len, --packing), or start afresh without "
                                 "--from_resume.")
            refusal = None
        except SystemExit as stop:
            refusal = str(stop)
        for rank, refused in enumerate(over_processes(run, refusal)):
            if refused:
                raise SystemExit(f"process {rank}: {refused}" if run.ddp else refused)


def over_processes(run, value):
    """[process 0's value, process 1's, ...] of a small picklable value: one CPU collective on the run's gloo group,
    which never waits on the GPU; [value] with one process."""
    if not run.ddp:
        return [value]
    values = [None] * run.world_size
    dist.all_gather_object(values, value, group=run.flag_group)
    return values


def restore_rng(rng, device):
    """This process's saved random states: torch's, Python's, and its GPU's (or MPS's)."""
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    cuda_rng = rng.get("cuda")
    if isinstance(cuda_rng, (list, tuple)):  # files from earlier versions held every GPU's state
        cuda_rng = cuda_rng[device.index] if device.type == "cuda" and device.index < len(cuda_rng) else None
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, device)
    if rng.get("mps") is not None and device.type == "mps":
        torch.mps.set_rng_state(rng["mps"])


# Settings that fix which rows a resumed position points at, with the value a resume file that predates
# the setting was written under. The seed fixes the shuffle; grouping (and with it the batch size and
# the row lengths, which --max_seq_len cuts and the augmentation shares change) the order; --max_seq_len and
# --packing which rows exist.
ORDER_SETTINGS = dict(seed=None, group_by_length=0, packing=0, batch_size=None, max_seq_len=None,
                      drop_empty_think=0.0, add_system_ratio=0.0)


def check_same_order(args, saved, path):
    """Refuse to resume with a setting that would change the sample order: the saved position would then
    skip some rows and repeat others (a changed seed or grouping, or with grouping or packing on a
    changed --batch_size / --max_seq_len / augmentation share). Other settings (learning rate, steps, ...) may
    change."""
    current = vars(args)
    grouped = saved.get("group_by_length", 0) or current.get("group_by_length")
    packed = saved.get("packing", 0) or current.get("packing")
    matters = dict(seed=True, group_by_length=True, packing=True, batch_size=grouped, max_seq_len=grouped or packed,
                   drop_empty_think=grouped or packed, add_system_ratio=grouped or packed)
    for name, before_it_existed in ORDER_SETTINGS.items():
        if name not in current or not matters[name]:
            continue
        was = saved.get(name, before_it_existed)
        if was is not None and was != current[name]:
            raise SystemExit(f"{path} was written with --{name} {was}, and this run has --{name} "
                             f"{current[name]}: that changes the sample order, so the saved position would "
                             f"skip some rows and repeat others. Resume with --{name} {was}, or start afresh "
                             "without --from_resume.")


def trainable_state(model):
    """fp32 copies of the trainable parameters (all of them in full training, the adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k in names}
