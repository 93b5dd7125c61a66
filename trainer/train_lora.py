"""LoRA fine-tuning: teach a trained model something new (an identity, a domain) with a few adapters.

    cd trainer && python train_lora.py                           # lora_identity on top of out/full_sft_512.pth
    python trainer/train_lora.py --lora_name lora_medical --data_path ../dataset/lora_medical.jsonl

The base weights stay frozen; only the low-rank adapters (model/model_lora.py, W x + B A x) train, on
the same SFT loss as train_full_sft.py. Writes only the adapters: out/lora/{lora_name}_{hidden}.pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import common_parser, data_file, parse_args  # argparse only


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
    return parse_args(parser, argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.device import print0
from dataset.lm_dataset import SFTDataset
from model.model_lora import apply_lora
from trainer.losses import next_token_loss
from trainer.trainer_utils import Run


def main(args):
    run = Run(args, weight_name=args.lora_name)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = SFTDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                          on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    lora_params = apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha,
                             target_modules=args.lora_targets.split(",") if args.lora_targets else None)
    print0(f"LoRA: {lora_params:,} trainable parameters "
           f"({100 * lora_params / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model = run.prepare(model, optimizer)

    def loss_fn(batch):
        # the SFT loss; only the adapters receive gradients
        return next_token_loss(model, batch)

    for step, window in run.steps(data):
        loss = run.accumulate(model, window, loss_fn)  # the frozen base passes gradients through to A and B
        lr = run.optimizer_step(optimizer)             # AdamW on the adapters only
        run.log(loss=loss, lr=lr)
        run.maybe_save(model, optimizer)               # writes out/lora/{lora_name}_{hidden}.pth: adapters only
        if run.should_stop():
            break
    run.finish()


if __name__ == "__main__":
    main(args)
