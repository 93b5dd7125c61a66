"""Stage 1, pretraining: learn to continue text by predicting each next token.

    cd trainer && python train_pretrain.py            # MiniMind2-Small on dataset/pretrain_hq.jsonl
    python trainer/train_pretrain.py --hidden_size 128 --num_hidden_layers 4 --packing 1
    torchrun --nproc_per_node 2 trainer/train_pretrain.py

loss = mean over real tokens of -log p(x_t | x_<t)  (+ the MoE load-balancing loss when --use_moe 1)
Writes out/pretrain_{hidden}[_moe].pth and checkpoints/pretrain_{hidden}[_moe]_resume.pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                           learning_rate=5e-4, accumulation_steps=8, log_interval=100, save_interval=100,
                           max_seq_len=340, data_path="../dataset/pretrain_hq.jsonl", from_weight="none",
                           group_by_length=1)
    parser.add_argument("--packing", type=int, default=0, choices=[0, 1],
                        help="1 = concatenate the documents and cut the stream into full rows (no padding; a "
                             "document may run into the next row, and documents in a row see each other)")
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table)
    return parse_args(parser, argv, minimind3=dict(epochs=2, data_path="../dataset/pretrain_t2t_mini.jsonl"))


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from dataset.lm_dataset import PretrainDataset
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = PretrainDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                               on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the rows
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP

    for step, window in run.steps(stream, checkpoint):  # window: the micro-batches of one optimizer step
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every token weighs the same in the step: micro-batch b, with n_b of the step's N loss tokens (all
        # processes), enters as (n_b / N) * its mean loss, which with M micro-batches on W processes gives
        #   loss = sum_b (n_b / N) * loss_b + sum_b aux_b / (M * W)     (aux: the MoE load-balancing loss)
        counts = [len(batch["loss_index"]) for batch in window]  # loss tokens (after the shift), found by the collator
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums = StepSums(run)
        for i, (batch, n) in enumerate(zip(window, counts)):
            batch = run.to_device(batch)
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    # every real token carries loss (labels = input_ids, padding -100). No attention mask: rows
                    # are right-padded, so under causal attention padding changes nothing that carries loss
                    out = model(batch["input_ids"], labels=batch["labels"], loss_index=batch["loss_index"],
                                position_ids=batch.get("position_ids"), documents=batch.get("documents"))
                share, aux_share = n / total, out.aux_loss / len(window) / run.world_size
                loss = out.loss * share + aux_share
                run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
            sums.add(share, loss=out.loss)
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
            checkpoint.save()                           # out/pretrain_{hidden}.pth and the resume file
        if run.should_stop(stream):                     # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()


if __name__ == "__main__":
    main(args)
