"""Stage 2, supervised fine-tuning: learn to answer in the chat format.

    cd trainer && python train_full_sft.py            # from out/pretrain_512.pth on dataset/sft_mini_512.jsonl
    torchrun --nproc_per_node 2 trainer/train_full_sft.py

Conversations are rendered with the ChatML template; the loss is the next-token cross-entropy over the
assistant turns only (their content, <|im_end|> and the newline after it): the model learns to answer,
not to imitate the user. All parameters train. Writes out/full_sft_{hidden}[_moe].pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind full SFT", save_weight="full_sft", epochs=2, batch_size=16, learning_rate=5e-7,
                           accumulation_steps=1, log_interval=100, save_interval=100, max_seq_len=340,
                           data_path="../dataset/sft_mini_512.jsonl", from_weight="pretrain", group_by_length=1)
    parser.add_argument("--packing", type=int, default=0, choices=[0, 1],
                        help="1 = pack whole conversations into full rows, attention kept inside each (less padding)")
    return parse_args(parser, argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from dataset.lm_dataset import SFTDataset
from trainer.losses import next_token_loss
from trainer.trainer_utils import Run


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = SFTDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                          on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model = run.prepare(model, optimizer)

    def loss_fn(batch):
        # labels are -100 outside the assistant turns, so only the answers carry loss
        return next_token_loss(model, batch)

    for step, window in run.steps(data):               # one optimizer step's micro-batches of conversations
        loss = run.accumulate(model, window, loss_fn)  # forward + backward, each weighted by its answer tokens
        lr = run.optimizer_step(optimizer)
        run.log(loss=loss, lr=lr)
        run.maybe_save(model, optimizer)
        if run.should_stop():                          # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()


if __name__ == "__main__":
    main(args)
