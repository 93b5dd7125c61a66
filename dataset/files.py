"""The data files MiniMind's hubs hold (name -> size, the stage that reads it) and the bundled demo file that
stands in for each when it has not been downloaded. scripts/download_data.py fetches the former; the trainers fall
back to the latter (trainer/args.py data_file)."""

HF_REPO = "jingyaogong/minimind_dataset"
MS_REPO = "gongjy/minimind_dataset"

# name -> (approximate size, training stage that reads it); MiniMind2's files, then minimind-3's
FILES = {
    "pretrain_hq.jsonl": ("1.6 GB", "pretrain"),
    "sft_mini_512.jsonl": ("1.2 GB", "full SFT"),
    "sft_512.jsonl": ("7.5 GB", "full SFT"),
    "sft_1024.jsonl": ("5.6 GB", "full SFT"),
    "sft_2048.jsonl": ("9 GB", "full SFT"),
    "dpo.jsonl": ("53 MB", "DPO (the hub's file is now minimind-3's; MiniMind2's was 909 MB)"),
    "r1_mix_1024.jsonl": ("340 MB", "reasoning distillation"),
    "rlaif-mini.jsonl": ("1 MB", "PPO/GRPO/SPO"),
    "lora_identity.jsonl": ("22.8 KB", "LoRA"),
    "lora_medical.jsonl": ("34 MB", "LoRA"),
    "pretrain_t2t_mini.jsonl": ("1.2 GB", "pretrain, minimind-3 (max_seq_len about 768)"),
    "pretrain_t2t.jsonl": ("10 GB", "pretrain, minimind-3 (max_seq_len about 380)"),
    "sft_t2t_mini.jsonl": ("1.6 GB", "full SFT with tool calls, minimind-3 (max_seq_len about 768)"),
    "sft_t2t.jsonl": ("14 GB", "full SFT with tool calls, minimind-3"),
    "rlaif.jsonl": ("24 MB", "PPO/GRPO/SPO, minimind-3"),
    "agent_rl.jsonl": ("86 MB", "agentic RL (tool use, gt answers), minimind-3"),
    "agent_rl_math.jsonl": ("18 MB", "agentic RL on maths, minimind-3"),
}

# Where the bundled demo stand-ins of the full MiniMind datasets live (relative to dataset/).
DEMO_STAND_INS = {"pretrain_hq.jsonl": "demo/pretrain.jsonl", "sft_mini_512.jsonl": "demo/sft.jsonl",
                  "dpo.jsonl": "demo/dpo.jsonl", "r1_mix_1024.jsonl": "demo/r1.jsonl",
                  "rlaif-mini.jsonl": "demo/rlaif.jsonl", "lora_identity.jsonl": "demo/lora_identity.jsonl",
                  "agent_rl.jsonl": "demo/agent_rl.jsonl",
                  # minimind-3's defaults (--generation minimind-3): the demo files of the same formats
                  "pretrain_t2t_mini.jsonl": "demo/pretrain.jsonl", "sft_t2t_mini.jsonl": "demo/sft.jsonl",
                  "rlaif.jsonl": "demo/rlaif.jsonl", "lora_medical.jsonl": "demo/lora_identity.jsonl"}
