"""What the RL stages share, bottom up: the rollout engines that sample (engines.py: in-process, SGLang, vLLM), the
rewards (rewards.py), the single-turn rollouts of GRPO / PPO / SPO (sampling.py) and the multi-turn tool-use
trajectories of the agent stage (agent.py). Their losses are in trainer/losses.py; each stage's update is in its
train_*.py."""
