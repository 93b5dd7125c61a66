"""White-box knowledge distillation: a small student learns from a larger teacher's full output distribution
(Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

    cd trainer && python train_distillation.py        # student 512x8 <- teacher 768x16, both from full_sft
    python train_distillation.py --generation minimind-3  # student 768x8 <- teacher 768x8 MoE (full_sft_768_moe)

On the answer tokens of SFT data, with softmax temperature T:
    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
The T^2 keeps the gradient scale of the soft term independent of T. The teacher is frozen and runs
under the same autocast. Writes out/full_dist_{student_hidden}[_moe].pth.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_augmentation_arguments, common_parser, data_file, parse_args, weight_path  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind knowledge distillation", save_weight="full_dist", epochs=6, batch_size=32,
                           learning_rate=5e-6, accumulation_steps=1, log_interval=100, save_interval=100,
                           max_seq_len=340, data_path="../dataset/sft_mini_512.jsonl", from_weight="full_sft",
                           group_by_length=1)
    parser.add_argument("--student_hidden_size", type=int, default=512)
    parser.add_argument("--student_num_layers", type=int, default=8)
    parser.add_argument("--teacher_hidden_size", type=int, default=768)
    parser.add_argument("--teacher_num_layers", type=int, default=16)
    parser.add_argument("--teacher_use_moe", type=int, default=None, choices=[0, 1],
                        help="1 = the teacher is a MoE model (default: 1 with --generation minimind-3, else as the "
                             "student, --use_moe)%(default).0s")
    parser.add_argument("--teacher_weight", "--from_teacher_weight", default="full_sft",
                        help="out/{teacher_weight}_{teacher_hidden}[_moe].pth")
    # upstream minimind-3's names of the student's options (--use_moe, --from_weight)
    parser.add_argument("--student_use_moe", dest="use_moe", type=int, choices=[0, 1], default=argparse.SUPPRESS,
                        help="the same as --use_moe")
    parser.add_argument("--from_student_weight", dest="from_weight", default=argparse.SUPPRESS,
                        help="the same as --from_weight")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE")
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--packing", type=int, default=0, choices=[0, 1],
                        help="1 = pack whole conversations into full rows, attention kept inside each (less padding)")
    add_augmentation_arguments(parser)
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table): a
    # dense 768x8 student learns from the 768x8 MoE teacher (minimind-3-moe)
    args = parse_args(parser, argv, minimind3=dict(data_path="../dataset/sft_t2t_mini.jsonl", student_hidden_size=768,
                                                   teacher_num_layers=8, teacher_use_moe=1))
    if args.teacher_use_moe is None:
        args.teacher_use_moe = args.use_moe
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset
from model.model_minimind import MiniMindConfig
from trainer.losses import at_loss_positions
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


def distillation_loss(student_logits, teacher_logits, targets, alpha, temperature):
    """(total, CE, KL), each the mean over the K answer positions; KL(teacher || student) at temperature T, per
    token. The logits are [K, V], both models' heads run at the collator's loss_index only (the positions whose next
    token is a label), and targets [K] are the labels there."""
    student, teacher = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student, targets)
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean")  # the sum over the vocabulary, the mean over positions
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl, ce, kl


def main(args):
    args.hidden_size, args.num_hidden_layers = args.student_hidden_size, args.student_num_layers  # the model we train

    run = Run(args)
    teacher_config = MiniMindConfig(generation=args.generation, hidden_size=args.teacher_hidden_size,
                                    num_hidden_layers=args.teacher_num_layers, use_moe=bool(args.teacher_use_moe))
    run.check_from_weight(args.teacher_weight, teacher_config)  # before tokenising
    tokenizer = run.load_tokenizer()
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = SFTDataset(data_file(args), tokenizer, args.max_seq_len, packing=bool(args.packing),
                          drop_empty_think=args.drop_empty_think, add_system_ratio=args.add_system_ratio,
                          seed=args.seed, on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    teacher_path = weight_path(args.save_dir, args.teacher_weight, teacher_config)
    if os.path.exists(teacher_path):  # peek at the teacher's vocabulary without reading the whole file
        vocab = torch.load(teacher_path, map_location="cpu", weights_only=True, mmap=True)["model.embed_tokens.weight"].shape[0]
        if vocab != model.config.vocab_size:
            raise SystemExit(f"{teacher_path} has a vocabulary of {vocab} tokens, the student {model.config.vocab_size}: "
                             "distillation compares distributions token by token, so both must use the same tokenizer")
    teacher = run.freeze(run.load_model(from_weight=args.teacher_weight, config=teacher_config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the rows
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP

    for step, window in run.steps(stream, checkpoint):
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every answer token weighs the same in the step (n_b of the step's N, all processes):
        #   loss = sum_b (n_b / N) * loss_b + sum_b aux_b / (M * W)     (aux: the student's MoE balancing loss)
        counts = [len(batch["loss_index"]) for batch in window]  # loss tokens (after the shift), found by the collator
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums = StepSums(run)
        for i, (batch, n) in enumerate(zip(window, counts)):
            batch = run.to_device(batch)
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    # right-padded rows need no mask; packed rows bring their position ids. Both heads run at the
                    # answer positions only (the collator's loss_index): [K, V] logits, the K labels as targets
                    inputs = dict(position_ids=batch.get("position_ids"), documents=batch.get("documents"),
                                  loss_index=batch["loss_index"])
                    out = model(batch["input_ids"], **inputs)
                    with torch.no_grad():  # the teacher only answers
                        teacher_logits = teacher(batch["input_ids"], **inputs).logits
                    targets = at_loss_positions(batch["labels"], batch["loss_index"])
                    kd, ce, kl = distillation_loss(out.logits, teacher_logits, targets, args.alpha, args.temperature)
                share, aux_share = n / total, out.aux_loss / len(window) / run.world_size
                loss = kd * share + aux_share
                run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
            sums.add(share, loss=kd, ce=ce, kl=kl)
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
    run.finish()


if __name__ == "__main__":
    main(args)
