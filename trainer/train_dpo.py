"""DPO: learn from preference pairs without a reward model (Rafailov et al., 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

    cd trainer && python train_dpo.py                 # from out/full_sft_512.pth on dataset/dpo.jsonl
    python trainer/train_dpo.py --logp sum --precompute_ref 1

For a prompt x with a chosen answer y_w and a rejected answer y_l, a frozen copy of the starting model
is the reference and
    reward(y)  = beta * (log pi(y|x) - log pi_ref(y|x))
    loss       = -log sigmoid(reward(y_w) - reward(y_l))
log pi(y|x) is taken over the answer tokens only: their mean (MiniMind's length-normalised default,
--logp mean) or their sum (the paper, --logp sum). --precompute_ref 1 computes the reference log-probs
once before training and frees the reference model. Writes out/dpo_{hidden}[_moe].pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_augmentation_arguments, common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind DPO", save_weight="dpo", epochs=1, batch_size=4, learning_rate=4e-8,
                           accumulation_steps=1, log_interval=100, save_interval=100, max_seq_len=1024,
                           data_path="../dataset/dpo.jsonl", from_weight="full_sft", group_by_length=1)
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    parser.add_argument("--logp", default="mean", choices=["mean", "sum"],
                        help="answer log-prob: per-token mean (MiniMind) or sum (the paper)")
    parser.add_argument("--precompute_ref", type=int, default=0, choices=[0, 1],
                        help="1 = reference log-probs once before training, then free the reference model")
    add_augmentation_arguments(parser, system_prompts=False)
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table)
    return parse_args(parser, argv, minimind3=dict(beta=0.15))


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch
import torch.nn.functional as F

from common.device import print0
from dataset.lm_dataset import DPODataset, stack_pairs
from trainer.losses import sequence_logps  # log pi(y|x): the answer tokens' mean (or summed) log-prob
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream, collate
from trainer.trainer_utils import Run, StepSums, lr_at


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair DPO loss and the implicit rewards of both answers."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


@torch.no_grad()
def precompute_reference(run, reference, data, reduction, pad_id, batch_size):
    """Reference log-probs of every pair, [N, 2] (chosen, rejected); each process computes a share."""
    table = torch.zeros(len(data), 2, dtype=run.sum_dtype, device=run.device)
    indices = list(range(run.rank, len(data), run.world_size))
    for start in range(0, len(indices), batch_size):
        batch = collate([data[i] for i in indices[start:start + batch_size]])  # with the pairs' loss_index
        ids, _, labels = (t.to(run.device) for t in stack_pairs(batch, pad_id))
        loss_index = batch["loss_index"].to(run.device)
        with run.autocast():
            logps = sequence_logps(reference(ids, loss_index=loss_index).logits, labels, loss_index, reduction)
        n = len(batch["index"])
        table[batch["index"].to(run.device)] = torch.stack([logps[:n], logps[n:]], dim=1).to(table.dtype)
    return run.all_reduce(table)  # every row was filled by exactly one process


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    pad_id = tokenizer.pad_token_id
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = DPODataset(data_file(args), tokenizer, args.max_seq_len, drop_empty_think=args.drop_empty_think,
                          seed=args.seed, on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    reference = run.frozen_copy(model)  # the starting policy, frozen
    reference_table = None
    if args.precompute_ref:
        reference_table = precompute_reference(run, reference, data, args.logp, pad_id, args.batch_size * 2)
        reference = None
        print0(f"reference log-probs of {len(data)} pairs precomputed; reference model freed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the pairs
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP

    for step, window in run.steps(stream, checkpoint):
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every pair weighs the same in the step: micro-batch b with n_b of the step's N pairs (all processes)
        #   loss = sum_b (n_b / N) * mean DPO loss_b + sum_b aux_b / (M * W)     (aux: the MoE load-balancing loss)
        counts = [len(batch["index"]) for batch in window]
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums = StepSums(run)
        for i, (batch, n) in enumerate(zip(window, counts)):
            batch = run.to_device(batch)
            ids, _, labels = stack_pairs(batch, pad_id)  # chosen rows, then rejected rows: one forward for both
            loss_index = batch["loss_index"]  # the answers' positions in that layout, from the collator
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    out = model(ids, loss_index=loss_index)
                    logps = sequence_logps(out.logits, labels, loss_index, args.logp)  # the head ran there only
                    if reference_table is not None:
                        ref = reference_table[batch["index"]].float()
                        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
                    else:
                        with torch.no_grad():
                            ref_logps = sequence_logps(reference(ids, loss_index=loss_index).logits, labels,
                                                       loss_index, args.logp)
                        ref_chosen, ref_rejected = ref_logps[:n], ref_logps[n:]
                    pair_losses, chosen_reward, rejected_reward = dpo_loss(logps[:n], logps[n:], ref_chosen,
                                                                           ref_rejected, args.beta)
                    dpo = pair_losses.mean()
                share, aux_share = n / total, out.aux_loss / len(window) / run.world_size
                loss = dpo * share + aux_share
                run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
            if args.use_moe:
                sums.add(aux_loss=aux_share)
            sums.add(share, loss=dpo, accuracy=(chosen_reward > rejected_reward).float().mean(),
                     margin=(chosen_reward - rejected_reward).mean(), reward_chosen=chosen_reward.mean(),
                     reward_rejected=rejected_reward.mean())
            sums.add(tokens=batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
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
    run.finish()


if __name__ == "__main__":
    main(args)
