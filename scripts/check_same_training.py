"""Proof that a redesign of the trainers changed nothing: every stage trains a tiny model in fp32 on the demo data for
a few steps, and this writes what came out - each metrics row (without its time and tokens/s), each saved weight's
SHA-256 and each resume file's contents, hashed tensor by tensor - to one JSON file. Run it on two checkouts and
compare the files:

    python scripts/check_same_training.py --out /tmp/after.json
    (cd /path/to/older/checkout && python scripts/check_same_training.py --out /tmp/before.json)
    python scripts/check_same_training.py --compare /tmp/before.json /tmp/after.json

The runs cover accumulation over micro-batches, MoE balancing, packing, LoRA, DPO with and without precomputed
reference log-probs, the tag-weighted reasoning loss, distillation, GRPO (grpo / cispo, several updates per rollout),
PPO (per-token and sequence-level), SPO, the agent stage (each loss aggregation, dynamic sampling), a stopped run
resumed, and two processes under torchrun. About 4 minutes on a 2-core CPU.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4", "--max_seq_len", "64",
        "--num_workers", "0", "--log_interval", "1", "--save_interval", "2", "--dtype", "float32",
        "--learning_rate", "1e-3"]
RL = ["--max_gen_len", "12", "--batch_size", "2", "--reasoning", "0", "--from_weight", "full_sft"]
AGENT = ["--num_generations", "2", "--max_gen_len", "24", "--batch_size", "2", "--from_weight", "full_sft"]

# (name, script, arguments, processes): run in this order, later stages start from earlier weights
RUNS = [
    ("pretrain", "train_pretrain.py", ["--max_steps", "4", "--accumulation_steps", "2"], 0),
    ("pretrain_moe", "train_pretrain.py", ["--max_steps", "3", "--use_moe", "1", "--accumulation_steps", "2"], 0),
    ("sft", "train_full_sft.py", ["--max_steps", "4", "--accumulation_steps", "2"], 0),
    ("sft_packed", "train_full_sft.py", ["--max_steps", "2", "--packing", "1", "--save_weight", "sft_packed"], 0),
    ("sft_stopped", "train_full_sft.py", ["--max_steps", "2", "--save_weight", "sft_resumed", "--save_interval", "1"],
     0),
    ("sft_resumed", "train_full_sft.py", ["--max_steps", "4", "--save_weight", "sft_resumed", "--from_resume", "1"], 0),
    ("sft_torchrun", "train_full_sft.py", ["--max_steps", "2", "--accumulation_steps", "2", "--save_weight",
                                           "sft_ddp"], 2),
    ("lora", "train_lora.py", ["--max_steps", "3"], 0),
    ("dpo", "train_dpo.py", ["--max_steps", "3", "--accumulation_steps", "2"], 0),
    ("dpo_precomputed", "train_dpo.py", ["--max_steps", "2", "--precompute_ref", "1", "--logp", "sum",
                                         "--save_weight", "dpo_pre"], 0),
    ("reason", "train_distill_reason.py", ["--max_steps", "3", "--accumulation_steps", "2"], 0),
    ("distillation", "train_distillation.py", ["--max_steps", "3", "--student_hidden_size", "64", "--student_num_layers",
                                               "2", "--teacher_hidden_size", "64", "--teacher_num_layers", "2",
                                               "--teacher_weight", "pretrain"], 0),
    ("grpo", "train_grpo.py", RL + ["--max_steps", "2", "--num_generations", "3", "--accumulation_steps", "2"], 0),
    ("grpo_cispo", "train_grpo.py", RL + ["--max_steps", "2", "--num_generations", "2", "--loss_type", "cispo",
                                          "--ppo_epochs", "2", "--save_weight", "grpo_cispo"], 0),
    ("ppo", "train_ppo.py", RL + ["--max_steps", "2", "--update_old_actor_freq", "1", "--critic_learning_rate",
                                  "1e-3"], 0),
    ("ppo_sequence", "train_ppo.py", RL + ["--max_steps", "2", "--gae", "0", "--save_weight", "ppo_seq"], 0),
    ("spo", "train_spo.py", RL + ["--max_steps", "2", "--accumulation_steps", "2"], 0),
    ("agent", "train_agent.py", AGENT + ["--max_steps", "2", "--ppo_epochs", "2"], 0),
    ("agent_token", "train_agent.py", AGENT + ["--max_steps", "1", "--loss_agg", "token", "--loss_type", "grpo",
                                               "--dynamic_sampling", "1", "--save_weight", "agent_token"], 0),
    ("agent_sequence", "train_agent.py", AGENT + ["--max_steps", "1", "--loss_agg", "sequence", "--mask_truncated",
                                                  "1", "--save_weight", "agent_sequence"], 0),
]
VARYING = ("time", "tokens_per_s")  # the only fields of a metrics row that differ between two identical runs
PATHS = ("save_dir", "checkpoint_dir", "data_path", "tokenizer_dir", "sync_dir", "reward_model_path")  # temp folders


def comparable(found):
    """A run's outputs without what names its temporary folder (the path settings a resume file records)."""
    return {key: {**value, "args": {k: v for k, v in value.get("args", {}).items() if k not in PATHS}}
            if isinstance(value, dict) and "args" in value else value for key, value in found.items()}


def digest(value):
    """A canonical hash of a resume file's contents: tensors by dtype, shape and bytes, the rest by value."""
    import torch
    if torch.is_tensor(value):
        return hashlib.sha256(str((value.dtype, tuple(value.shape))).encode()
                              + value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                              ).hexdigest()[:16]
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [digest(v) for v in value]
    return repr(value)


def outputs(root):
    """Every file a run wrote: metrics rows, weight hashes, resume file contents."""
    import torch
    found = {}
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if name.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    found[key] = [{k: v for k, v in json.loads(line).items() if k not in VARYING} for line in f]
            elif name.endswith("_resume.pth"):
                state = torch.load(path, map_location="cpu", weights_only=True)
                state.get("args", {}).pop("data_is_default", None)
                found[key] = digest(state)
            elif name.endswith(".pth"):
                with open(path, "rb") as f:
                    found[key] = hashlib.sha256(f.read()).hexdigest()
    return found


def run_all(only=None):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MINIMIND_NO_PROGRESS="1", HF_DATASETS_CACHE=os.path.join(tmp, "hf_cache"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        for name, script, extra, processes in RUNS:
            if only and name not in only:
                continue
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(processes)] if processes else [sys.executable]
            command = launcher + [os.path.join(REPO_ROOT, "trainer", script), *TINY, "--save_dir",
                                  os.path.join(tmp, "out"), "--checkpoint_dir", os.path.join(tmp, "ckpt"), *extra]
            run_env = dict(env, OMP_NUM_THREADS="1") if processes else env
            result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=run_env)
            if result.returncode:
                raise SystemExit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
            print(f"{name}: done", flush=True)
            results[name] = outputs(tmp)  # everything written so far, so each run's outputs are compared as they were
    return results


def compare(before_path, after_path):
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    differences = 0
    for run in before:
        old, new = comparable(before[run]), comparable(after.get(run, {}))
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if a != b:
                differences += 1
                changed = [k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k)] \
                    if isinstance(a, dict) and isinstance(b, dict) else None
                print(f"{run}: {key} differs" + (f" in {sorted(changed)}" if changed else
                                                  f"\n  before: {json.dumps(a)[:400]}\n  after:  {json.dumps(b)[:400]}"))
    print(f"{len(before)} runs compared, {sum(len(v) for v in before.values())} outputs: {differences} differences")
    return differences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the runs' outputs here (JSON)")
    parser.add_argument("--only", nargs="*", help="run only these (names from RUNS)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two such files")
    args = parser.parse_args(argv)
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    if not args.out:
        parser.error("--out FILE (or --compare BEFORE AFTER)")
    results = run_all(args.only)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
