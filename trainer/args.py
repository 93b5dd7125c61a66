"""The command line every training stage shares, and where its files are. It imports no torch (argparse, os and
two small project modules), so a stage answers --help before it loads torch."""
import argparse
import os

from common.cli import HelpFormatter, show_defaults
from dataset.files import DEMO_STAND_INS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_DIR = os.path.join(REPO_ROOT, "trainer")
GENERATION_NAMES = ("minimind-3", "minimind2")  # the keys of model_minimind.GENERATIONS (a test checks they agree)
ROLLOUT_ENGINES = ("torch", "sglang", "vllm")  # trainer/rl/engines.py
# The data augmentation each generation's upstream trained with (dataset/lm_dataset.py, Augmentation): minimind-3's
# leaves the empty think block out of 80% of the SFT / DPO rows that have one and adds a system prompt to 20% of the
# SFT rows without tools; the code that trained the released MiniMind2 models did neither
AUGMENTATION_DEFAULTS = {"minimind-3": dict(drop_empty_think=0.8, add_system_ratio=0.2),
                         "minimind2": dict(drop_empty_think=0.0, add_system_ratio=0.0)}


def common_parser(description, *, save_weight, epochs, batch_size, learning_rate, accumulation_steps,
                  log_interval, save_interval, max_seq_len, data_path, from_weight, group_by_length=0):
    """The options every stage takes; each script passes its own defaults (MiniMind's) and adds extras.
    group_by_length: 1 for the stages that train on token rows (pretraining, SFT, LoRA, DPO, reasoning, KD),
    where it trains 2-3x the real tokens per second of MiniMind's random batches (docs/benchmarks.md)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--save_dir", default="../out", help="weights and metrics (relative to trainer/ by default)")
    p.add_argument("--checkpoint_dir", default="../checkpoints", help="resume files for --from_resume 1")
    p.add_argument("--save_weight", default=save_weight, help="name prefix of the saved weight file")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch_size", type=int, default=batch_size, help="rows per process per micro-batch")
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up before the cosine schedule")
    p.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: the best available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--use_wandb", action="store_true", help="also log to wandb or swanlab (see --tracker)")
    p.add_argument("--tracker", default="swanlab", choices=["swanlab", "wandb"], help="which one --use_wandb uses")
    p.add_argument("--wandb_project", default="MiniMind")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--accumulation_steps", type=int, default=accumulation_steps)
    p.add_argument("--grad_clip", type=float, default=1.0, help="largest gradient norm (0 = no clipping)")
    p.add_argument("--log_interval", type=int, default=log_interval, help="optimizer steps between log lines")
    p.add_argument("--save_interval", type=int, default=save_interval, help="optimizer steps between saves")
    p.add_argument("--generation", default="minimind2", choices=GENERATION_NAMES,
                   help="architecture: MiniMind2, or minimind-3 (per-head q/k norms, Qwen3-MoE experts)")
    # "%(default).0s" prints nothing: it only stops the help formatter from adding "(default: None)"
    p.add_argument("--hidden_size", type=int, default=None,
                   help="(default: 512, MiniMind2-Small; 768 with --generation minimind-3)%(default).0s")
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--max_seq_len", type=int, default=max_seq_len)
    p.add_argument("--data_path", default=data_path)
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--from_weight", default=from_weight,
                   help="weight to start from: a name (out/{name}_{hidden}[_moe].pth), a .pth file, a model folder "
                        "(a released minimind-3 Qwen3 folder included), or 'none' = random init")
    p.add_argument("--tokenizer_dir", default=None,
                   help="tokenizer folder (default: the one a --from_weight folder ships, else model/, this project's)")
    p.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="1 = continue from checkpoints/")
    p.add_argument("--group_by_length", type=int, default=group_by_length, choices=[0, 1],
                   help="1 = batch rows of similar length together (less padding; see ResumableBatchSampler); "
                        "0 = MiniMind's random batches")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = all)")
    p.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="torch.compile the model")
    p.add_argument("--seed", type=int, default=42)
    return p


def add_augmentation_arguments(parser, system_prompts=True):
    """minimind-3's data augmentation (dataset/lm_dataset.py, Augmentation), for the stages that read SFT rows
    (system_prompts=True) or DPO pairs (only the think-block share: upstream gives DPO rows no system prompt). Each
    row's draws follow from --seed and its place in the file, so epochs and resumes see the same rows."""
    parser.add_argument("--drop_empty_think", type=float, default=None,
                        help="share (0-1) of the rows with an empty think block (<think>\\n\\n</think>\\n\\n, which "
                             "minimind-3's template writes before each answer without reasoning) trained without "
                             "it (default: 0.8 with --generation minimind-3, as upstream; 0 with minimind2)"
                             "%(default).0s")
    if system_prompts:
        parser.add_argument("--add_system_ratio", type=float, default=None,
                            help="share (0-1) of the conversations without tools or a system message that get a "
                                 "system prompt from a fixed list (default: 0.2 with --generation minimind-3, as "
                                 "upstream; 0 with minimind2)%(default).0s")


def parse_args(parser, argv=None, minimind3=None):
    """Parse, then fill in what the command line left to the generation or the stage, and turn path options into
    absolute paths: a default written relative to trainer/ (as in MiniMind, e.g. ../out) resolves against trainer/;
    a path the user typed resolves against the cwd. What was filled in, or rebased away from the cwd, is kept in
    args.chosen_for_you, which Run prints at the start.
    minimind3: the stage's defaults under --generation minimind-3 where they differ from MiniMind2's (those of
    upstream's minimind-3 scripts; the README's table lists both). They become the parser's defaults before it
    parses, so a flag on the command line still wins and `--generation minimind-3 --help` shows them."""
    if minimind3 and generation_asked(argv) == "minimind-3":
        unknown = set(minimind3) - {action.dest for action in parser._actions}
        assert not unknown, f"minimind-3 defaults for options this stage does not have: {sorted(unknown)}"
        parser.set_defaults(**minimind3)
    args = show_defaults(parser).parse_args(argv)
    args.chosen_for_you = []
    if minimind3 and args.generation == "minimind-3":
        typed = typed_options(parser, argv)
        left = " ".join(f"--{k} {v}" for k, v in minimind3.items() if k not in typed)
        if left:
            args.chosen_for_you.append(f"{left}: the defaults of --generation minimind-3")
    if getattr(args, "hidden_size", 0) is None:  # each generation's default size: MiniMind2-Small, minimind-3
        args.hidden_size = 768 if args.generation == "minimind-3" else 512
        args.chosen_for_you.append(f"--hidden_size {args.hidden_size}: the default of --generation {args.generation}")
    for name in ("drop_empty_think", "add_system_ratio"):  # the augmentation of each generation's upstream
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, AUGMENTATION_DEFAULTS[args.generation][name])
            if getattr(args, name):  # named when it changes rows (0, MiniMind2's, leaves them as they are)
                args.chosen_for_you.append(f"--{name} {getattr(args, name):g}: the default of --generation "
                                           f"{args.generation}")
        if not 0 <= getattr(args, name, 0) <= 1:
            parser.error(f"--{name} is a share of the rows, from 0 to 1")
    if hasattr(args, "reasoning") and args.from_weight is None:  # the RL stages start from the reasoning model
        args.from_weight = "reason" if args.reasoning else "full_sft"
        args.chosen_for_you.append(f"--from_weight {args.from_weight}: the default with --reasoning {args.reasoning}")
    if hasattr(args, "grad_clip") and args.grad_clip <= 0:
        args.grad_clip = float("inf")  # no clipping: clip_grad_norm_ still returns the norm
    if getattr(args, "rollout_engine", "torch") != "torch" and not args.rollout_url:
        parser.error(f"--rollout_engine {args.rollout_engine} needs --rollout_url, the engine server's address")
    if getattr(args, "sync_interval", 1) < 1:
        parser.error("--sync_interval must be at least 1")
    if getattr(args, "thinking_ratio", None) is not None and not 0 <= args.thinking_ratio <= 1:
        parser.error("--thinking_ratio must be between 0 and 1")
    for name in ("save_dir", "checkpoint_dir", "data_path", "reward_model_path", "tokenizer_dir", "sync_dir"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value and value.lower() != "none":
            base = TRAINER_DIR if value == parser.get_default(name) else os.getcwd()
            setattr(args, name, ",".join(os.path.normpath(os.path.join(base, os.path.expanduser(v)))
                                          for v in value.split(",")))
            if base == TRAINER_DIR and os.path.realpath(os.getcwd()) != os.path.realpath(TRAINER_DIR):
                args.chosen_for_you.append(f"--{name} {value}: the default, relative to trainer/ as in MiniMind: "
                                           f"{getattr(args, name)}")
    args.data_is_default = getattr(args, "data_path", None) == os.path.normpath(
        os.path.join(TRAINER_DIR, parser.get_default("data_path") or ""))
    return args


def generation_asked(argv=None):
    """The --generation on the command line (default minimind2), read before the stage's parser parses, so that
    its defaults can follow the generation. Anything else on the line is left to that parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--generation", default="minimind2")
    return pre.parse_known_args(argv)[0].generation


def typed_options(parser, argv=None):
    """The destinations of the options given on the command line: parsed into a namespace that already holds a
    marker for every option, which argparse keeps wherever the line sets nothing."""
    unset = object()
    given = parser.parse_args(argv, namespace=argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {name for name, value in vars(given).items() if value is not unset}


def data_file(args) -> str:
    """args.data_path, or, when the default full dataset is absent, its bundled demo stand-in."""
    if os.path.exists(args.data_path.split(",")[0]) or not args.data_is_default:
        return args.data_path
    name = os.path.basename(args.data_path)
    demo = os.path.join(REPO_ROOT, "dataset", DEMO_STAND_INS[name])
    if int(os.environ.get("RANK", 0)) == 0:  # once under torchrun
        print(f"{args.data_path} not found. Download the full data with: python scripts/download_data.py {name}\n"
              f"Training on the bundled demo data instead: {os.path.relpath(demo, REPO_ROOT)}", flush=True)
    return demo


def weight_path(save_dir, name, config) -> str:
    """MiniMind's naming: out/{name}_{hidden}[_moe].pth"""
    return os.path.join(save_dir, f"{name}_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth")


def recorded_settings(args):
    """The settings as the trackers and the resume file record them: every one but secrets (API keys)."""
    return {k: v for k, v in vars(args).items() if "api_key" not in k and k != "chosen_for_you"}


def add_engine_arguments(parser):
    """Who samples the rollouts (trainer/rl/engines.py): the RL stages and the agent stage share these. MiniMind's
    spellings of the engine flags (--sglang_base_url, --sglang_model_path, --sglang_shared_path) are second names
    of this project's (--rollout_url, --tokenizer_dir, --sync_dir), so its command lines run unchanged."""
    parser.add_argument("--rollout_engine", default="torch", choices=ROLLOUT_ENGINES,
                        help="torch = in-process; sglang / vllm = a server at --rollout_url (SGLang, vLLM, or "
                             "scripts/serve_openai_api.py, which speaks both)")
    parser.add_argument("--rollout_url", "--sglang_base_url", default=None,
                        help="the engine's address, e.g. http://127.0.0.1:30000 (SGLang), :8000 (vLLM), :8998 (ours)")
    parser.add_argument("--sync_interval", type=int, default=1, help="steps between weight syncs to a server engine")
    parser.add_argument("--sync_dir", "--sglang_shared_path", default=None,
                        help="where synced weight folders are written (default SAVE_DIR/rollout_weights); the "
                             "engine server must be able to read it")
    # MiniMind's tokenizer path for its SGLang engine: a second option writing --tokenizer_dir's dest (SUPPRESS: when
    # absent it leaves --tokenizer_dir's value alone)
    parser.add_argument("--sglang_model_path", dest="tokenizer_dir", default=argparse.SUPPRESS,
                        help="MiniMind's name for --tokenizer_dir")
    parser.add_argument("--rollout_timeout", type=float, default=300,
                        help="seconds to wait for a server engine's answer before stopping with an error")
    parser.add_argument("--rollout_retries", type=int, default=3,
                        help="retries of a server engine request that failed transiently (connection refused or "
                             "dropped, HTTP 429 / 502 / 503 / 504), after 1, 2, 4 ... s")
    # Read from the environment only when the engine is made, so that --help and the logged settings never hold it
    parser.add_argument("--rollout_api_key", default=None,
                        help="sent as 'Authorization: Bearer KEY' to a server engine (default: $MINIMIND_API_KEY, "
                             "the variable this project's server reads)%(default).0s")
    parser.add_argument("--ratio_check", type=float, default=0.05,
                        help="right after a weight sync the sampler is the policy: stop when the mean ratio "
                             "pi / pi_sample departs from 1 by more than this (the engine's log-probs are not the "
                             "sampling distribution's); 0 = off")


def add_rl_arguments(parser, max_gen_len):
    """Options the RL stages share."""
    add_engine_arguments(parser)
    parser.add_argument("--max_gen_len", type=int, default=max_gen_len, help="longest sampled answer")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    parser.add_argument("--thinking_ratio", type=float, default=None,
                        help="share of prompts rendered with thinking open, drawn per prompt (a GRPO prompt's G "
                             "answers alike) from the seeded RNG; the rest closed (default: 0.9 where the chat "
                             "template has a thinking switch, as minimind-3's does; 0 for this project's template, "
                             "which has none)%(default).0s")
    parser.add_argument("--reasoning", type=int, default=1, choices=[0, 1],
                        help="1 = start from the reasoning model and reward the <think>/<answer> format")
    add_reward_model_arguments(parser)


def add_reward_model_arguments(parser, what="a local Hugging Face reward model folder"):
    """The optional reward model (trainer/rl/rewards.py RewardModel): the RL stages and the agent stage."""
    parser.add_argument("--reward_model_path", default=None, help=what)
    parser.add_argument("--reward_model_resident", type=int, default=-1, choices=[-1, 0, 1],
                        help="1 = keep the reward model on the GPU, 0 = on the CPU between scorings (frees its memory "
                             "for the policy), -1 = on the GPU when it takes under a quarter of the free memory")
