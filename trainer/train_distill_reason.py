"""Reasoning distillation: learn to think before answering from <think>...</think><answer>...</answer> traces
(written by a stronger reasoning model, as in DeepSeek-R1's distillation).

    cd trainer && python train_distill_reason.py      # from out/dpo_512.pth on dataset/r1_mix_1024.jsonl

The loss is the SFT loss with one change: the positions of the tags <think> </think> <answer> </answer>
inside the answer weigh --tag_weight (10) times more, so a small model learns the layout first:
    loss = sum_t w_t * CE_t / sum_t w_t  over answer tokens t,  w_t = 10 on tag tokens, 1 elsewhere
Positions outside the answers never get weight. With this project's tokenizer each tag is one token;
with a tokenizer that splits tags into sub-words, every sub-word of the tag is weighted.
Conversations whose answers contain no tag are counted (inside packed rows too) and reported at the end.
Writes out/reason_{hidden}[_moe].pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_augmentation_arguments, common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind reasoning distillation", save_weight="reason", epochs=1, batch_size=8,
                           learning_rate=1e-6, accumulation_steps=1, log_interval=100, save_interval=100,
                           max_seq_len=720, data_path="../dataset/r1_mix_1024.jsonl", from_weight="dpo",
                           group_by_length=1)
    parser.add_argument("--tag_weight", type=float, default=10.0, help="loss weight of the tag tokens")
    parser.add_argument("--packing", type=int, default=0, choices=[0, 1],
                        help="1 = pack whole conversations into full rows, attention kept inside each (less padding)")
    add_augmentation_arguments(parser)
    return parse_args(parser, argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch
import torch.nn.functional as F

from common.device import print0
from dataset.lm_dataset import SFTDataset
from model.kernels import document_starts
from trainer.losses import at_loss_positions
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def tag_token_sequences(tokenizer):
    """How each tag is written in token ids: alone and after a newline (as in the trace layout)."""
    sequences = set()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for tag in TAGS:
        sequences.add(tuple(tokenizer(tag, add_special_tokens=False)["input_ids"]))
        after_newline = tokenizer("\n" + tag, add_special_tokens=False)["input_ids"]
        if after_newline[:len(newline)] == newline:
            sequences.add(tuple(after_newline[len(newline):]))
    return sorted(sequences)


def tag_loss_weights(input_ids, labels, tag_sequences, tag_weight):
    """[B, T] weights of the label positions: tag_weight on tag tokens, 1 on other answer tokens, 0 outside."""
    in_answer = labels != -100
    is_tag = torch.zeros_like(in_answer)
    length = input_ids.shape[1]
    for sequence in tag_sequences:
        n = len(sequence)
        if n > length:
            continue
        pattern = torch.tensor(sequence, device=input_ids.device)
        windows = input_ids.unfold(1, n, 1)                      # [B, T-n+1, n]
        starts = (windows == pattern).all(-1)                    # a tag starts here
        for offset in range(n):
            is_tag[:, offset:offset + starts.shape[1]] |= starts
    return in_answer.float() * torch.where(is_tag, tag_weight, 1.0)


def conversations_without_tags(weights, position_ids=None):
    """How many conversations have answer tokens (weight > 0) but no tag (weight > 1): one per row, or each
    conversation of a packed row (position ids restart at 0 where one starts; padding holds no answer)."""
    rows, length = weights.shape
    conversation = torch.zeros_like(weights, dtype=torch.long) if position_ids is None else \
        document_starts(position_ids).cumsum(dim=1) - 1
    slot = (torch.arange(rows, device=weights.device)[:, None] * length + conversation).flatten()
    answer = torch.zeros(rows * length, device=weights.device).index_add_(0, slot, (weights > 0).float().flatten())
    tags = torch.zeros(rows * length, device=weights.device).index_add_(0, slot, (weights > 1).float().flatten())
    return ((answer > 0) & (tags == 0)).sum()


def weighted_next_token_loss(logits, targets, weights):
    """sum w_t * CE_t / sum w_t over the K answer positions: logits [K, V] (the head at the collator's loss_index
    only), their targets [K] and weights [K]."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp(min=1e-9)


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = SFTDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                          drop_empty_think=args.drop_empty_think, add_system_ratio=args.add_system_ratio,
                          seed=args.seed, on_bad_line="skip" if args.skip_bad_lines else "error")
    tag_sequences = tag_token_sequences(tokenizer)
    model = run.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the rows
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP
    untagged = 0  # conversations without a tag, counted on the device and read at the end

    for step, window in run.steps(stream, checkpoint):
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every position weighs its tag weight in the step: micro-batch b, whose weights sum to w_b of the step's W_sum
        # (all processes), enters as (w_b / W_sum) * its weighted mean loss:
        #   loss = sum_b (w_b / W_sum) * loss_b + sum_b aux_b / (M * W)     (aux: the MoE load-balancing loss)
        # (the weights are found on the batches' CPU copies: the host never waits on the GPU for them)
        weights = [tag_loss_weights(batch["input_ids"], batch["labels"], tag_sequences, args.tag_weight)
                   for batch in window]
        # the weights of the K answer positions, in the collator's loss_index order (the head runs there only)
        weights_at = [at_loss_positions(w, batch["loss_index"]) for w, batch in zip(weights, window)]
        counts = [float(w.sum()) for w in weights_at]
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums = StepSums(run)
        for i, (batch, weights, weights_at, n) in enumerate(zip(window, weights, weights_at, counts)):
            batch = run.to_device(batch)
            weights, weights_at = (w.to(run.device, non_blocking=True) for w in (weights, weights_at))
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    untagged = untagged + conversations_without_tags(weights, batch.get("position_ids"))
                    # right-padded rows need no mask; packed rows bring their position ids
                    out = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                                documents=batch.get("documents"), loss_index=batch["loss_index"])
                    targets = at_loss_positions(batch["labels"], batch["loss_index"])  # [K], as out.logits [K, V]
                    tag_weighted = weighted_next_token_loss(out.logits, targets, weights_at)
                share, aux_share = n / total, out.aux_loss / len(window) / run.world_size
                loss = tag_weighted * share + aux_share
                run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
            sums.add(share, loss=tag_weighted)
            sums.add(tokens=batch["attention_mask"].sum())  # real tokens, for tokens/s
            if args.use_moe:
                sums.add(aux_loss=aux_share)
        run.scaler.unscale_(optimizer)  # float16's loss scale out of the gradients before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)

        run.log(stream, sums.over_processes(), lr=lr, grad_norm=grad_norm)
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):
            break
    total = int(run.all_sum(untagged)[0])  # over all processes
    print0(f"{total} conversations seen in training had no <think>/<answer> tag in their answers")
    run.finish()


if __name__ == "__main__":
    main(args)
