"""LoRA fine-tuning: teach a trained model something new (an identity, a domain) with a few adapters.

    cd trainer && python train_lora.py                           # lora_identity on top of out/full_sft_512.pth
    python trainer/train_lora.py --lora_name lora_medical --data_path ../dataset/lora_medical.jsonl

The base weights stay frozen; only the low-rank adapters (model/model_lora.py, W x + B A x) train, on
the same SFT loss as train_full_sft.py. Writes only the adapters: out/lora/{lora_name}_{hidden}.pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_augmentation_arguments, common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind LoRA fine-tuning", save_weight="lora", epochs=50, batch_size=32,
                           learning_rate=1e-4, accumulation_steps=1, log_interval=10, save_interval=100,
                           max_seq_len=340, data_path="../dataset/lora_identity.jsonl", from_weight="full_sft",
                           group_by_length=1)
    parser.add_argument("--lora_name", default="lora_identity", help="adapter name: out/lora/{lora_name}_{hidden}.pth")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="scale B A x by alpha / rank (default: no scaling)")
    parser.add_argument("--lora_targets", default=None,
                        help="comma-separated Linear names, e.g. q_proj,v_proj (default: every square Linear, i.e. "
                             "q_proj and o_proj)")
    parser.add_argument("--packing", type=int, default=0, choices=[0, 1],
                        help="1 = pack whole conversations into full rows, attention kept inside each (less padding)")
    add_augmentation_arguments(parser)
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table)
    return parse_args(parser, argv, minimind3=dict(epochs=10, data_path="../dataset/lora_medical.jsonl",
                                                   lora_name="lora_medical"))


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.device import print0
from dataset.lm_dataset import SFTDataset
from model.model_lora import apply_lora
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


def main(args):
    run = Run(args, weight_name=args.lora_name)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = SFTDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                          drop_empty_think=args.drop_empty_think, add_system_ratio=args.add_system_ratio,
                          seed=args.seed, on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    lora_count = apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha,
                            target_modules=args.lora_targets.split(",") if args.lora_targets else None)
    print0(f"LoRA: {lora_count:,} trainable parameters "
           f"({100 * lora_count / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
    lora_params = [p for p in model.parameters() if p.requires_grad]  # the adapters; the base stays frozen
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the rows
    checkpoint = Checkpoint(run, stream, model, optimizer, lora_only=True)  # saves the adapters alone
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP

    for step, window in run.steps(stream, checkpoint):  # window: the micro-batches of one optimizer step
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every answer token weighs the same in the step: micro-batch b, with n_b of the step's N loss tokens (all
        # processes), enters as (n_b / N) * its mean loss, which with M micro-batches on W processes gives
        #   loss = sum_b (n_b / N) * loss_b + sum_b aux_b / (M * W)     (aux: the MoE load-balancing loss)
        counts = [len(batch["loss_index"]) for batch in window]  # loss tokens (after the shift), found by the collator
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums = StepSums(run)
        for i, (batch, n) in enumerate(zip(window, counts)):
            batch = run.to_device(batch)
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    # the SFT loss (the head at the answer positions only: loss_index); the frozen base passes
                    # gradients through to the adapters A and B
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
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)

        run.log(stream, sums.over_processes(), lr=lr, grad_norm=grad_norm)
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()                           # out/lora/{lora_name}_{hidden}.pth: adapters only
        if run.should_stop(stream):                     # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()


if __name__ == "__main__":
    main(args)
