"""One script a training stage (train_*.py) and the library they share: the loop's pieces (trainer_utils.py), the
losses (losses.py), RL sampling and rewards (rollout.py, rewards.py), the command line (args.py), resuming
(resume.py) and several processes (distributed.py)."""
