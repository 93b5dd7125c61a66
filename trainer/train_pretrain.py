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
                        help="1 = pack whole documents into full rows (no padding; documents see each other)")
    return parse_args(parser, argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from dataset.lm_dataset import PretrainDataset
from trainer.losses import next_token_loss
from trainer.trainer_utils import Run


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = PretrainDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                               on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model = run.prepare(model, optimizer)

    def loss_fn(batch):
        # every real token carries loss (labels = input_ids, padding = -100)
        return next_token_loss(model, batch)

    for step, window in run.steps(data):               # the micro-batches of one optimizer step
        loss = run.accumulate(model, window, loss_fn)  # forward + backward each, weighted by its loss tokens
        lr = run.optimizer_step(optimizer)             # the cosine-scheduled lr, gradient clipping, AdamW
        run.log(loss=loss, lr=lr)
        run.maybe_save(model, optimizer)               # every --save_interval steps and at the last one
        if run.should_stop():                          # --max_steps, or Ctrl-C / SIGTERM (a resume file is saved)
            break
    run.finish()


if __name__ == "__main__":
    main(args)
