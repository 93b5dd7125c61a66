"""One script a training stage, each writing its own step (train_pretrain.py, train_full_sft.py, train_lora.py,
train_dpo.py, train_distill_reason.py, train_distillation.py, train_ppo.py, train_grpo.py, train_spo.py,
train_agent.py), and what they share, one concern a file: the run's set-up, logging and stopping (trainer_utils.py),
the command line (args.py), the resumable sample stream (sampler.py), the resume file (resume.py), several processes
(distributed.py), the losses (losses.py) and, for the RL stages, rl/."""
