"""eval_llm.py (native weights, LoRA, transformers folder; prompts from args, file, stdin),
scripts/plot_metrics.py and the demo pipeline's smoke run."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO_ROOT
from forked_python import forked_run, run_python
from model.model_lora import apply_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts import plot_metrics

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2"]


def tiny_model(seed):
    """The model that `--hidden_size 64 --num_hidden_layers 2` describes (other settings default)."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny 'full_sft' weight, a LoRA adapter for it, and a transformers folder of the same model."""
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model(seed=5)
    (root / "out" / "lora").mkdir(parents=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, root / "out" / "full_sft_64.pth")
    adapted = tiny_model(seed=5)
    apply_lora(adapted, rank=4)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora.B" in n:
                p.normal_(0, 0.5)
    save_lora(adapted, str(root / "out" / "lora" / "lora_identity_64.pth"))
    folder = root / "hf"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model")).save_pretrained(folder)
    return root


def chat(weights, *args, stdin=None):
    result = run_python([os.path.join(REPO_ROOT, "eval_llm.py"), "--save_dir",
                         str(weights / "out"), *TINY, "--temperature", "0", "--max_new_tokens", "12",
                         "--device", "cpu", *args], input=stdin, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def answers(output):
    """The text after each robot prompt, without the speed line."""
    out = []
    for block in output.split("🤖: ")[1:]:
        out.append(block.split("\n[")[0].split("\n👶")[0].strip())
    return out


def greedy(model, prompt, tokens=12):
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_prompts_from_arguments_stream_the_greedy_answer(weights):
    output = chat(weights, "--prompts", "你好", "Who are you?")
    model = tiny_model(seed=5)
    model.load_state_dict({k: v.float() for k, v in torch.load(weights / "out" / "full_sft_64.pth").items()})
    assert answers(output) == [greedy(model, "你好"), greedy(model, "Who are you?")]  # fp16-rounded weights
    assert output.count("tokens/s]") == 2


def test_prompts_from_a_file_and_from_stdin(weights, tmp_path):
    prompt_file = tmp_path / "q.txt"
    prompt_file.write_text("第一个问题\n\n第二个问题\n", encoding="utf-8")
    from_file = chat(weights, "--prompt_file", str(prompt_file))
    from_stdin = chat(weights, stdin="第一个问题\n第二个问题\n")
    assert from_file.count("👶:") == 2 and answers(from_file) == answers(from_stdin)


def test_lora_and_transformers_folder(weights):
    plain = answers(chat(weights, "--prompts", "你是谁？"))
    with_lora = answers(chat(weights, "--prompts", "你是谁？", "--lora_weight", "lora_identity"))
    assert with_lora != plain  # the adapter changes the answer
    from_folder = answers(chat(weights, "--prompts", "你是谁？", "--load_from", str(weights / "hf")))
    model = tiny_model(seed=5)
    assert from_folder == [greedy(model, "你是谁？")]


def test_history_is_kept(weights):
    output = chat(weights, "--prompts", "一", "二", "--historys", "2", "--show_speed", "0")
    assert output.count("👶:") == 2 and "tokens/s" not in output


def test_missing_weight_is_a_clear_error(weights):
    result = run_python([os.path.join(REPO_ROOT, "eval_llm.py"), "--save_dir", str(weights / "out"),
                         "--weight", "nope", *TINY, "--prompts", "x"], timeout=300)
    assert result.returncode != 0 and "nope_64.pth does not exist" in result.stderr and "full_sft_64.pth" in result.stderr


def test_eval_says_which_weight_it_loaded(weights):
    output = chat(weights, "--prompts", "你好", "--lora_weight", "lora_identity")
    assert "full_sft_64.pth + LoRA " in output and "lora_identity_64.pth on cpu (float32)" in output


def test_a_missing_default_weight_points_to_the_demo_weights(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from inference import paths
    demo = tmp_path / "out" / "demo"
    demo.mkdir(parents=True)
    for name in ("pretrain_192.pth", "full_sft_192.pth", "reason_192.pth"):
        (demo / name).write_bytes(b"")
    monkeypatch.setattr(paths, "REPO_ROOT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [os.path.join(os.getcwd(), "eval_llm.py")])
    args = SimpleNamespace(load_from="model", save_dir=str(tmp_path / "out"), weight="full_sft", hidden_size=512,
                           use_moe=0, lora_weight="None")
    with pytest.raises(SystemExit) as err:
        paths.resolve_paths(args)
    assert "to use them: python eval_llm.py --save_dir out/demo --weight full_sft --hidden_size 192" in str(err.value)
    args.weight = "grpo"  # not in the demo: its last chat stage instead
    with pytest.raises(SystemExit) as err:
        paths.resolve_paths(args)
    assert "--weight reason --hidden_size 192" in str(err.value)


def test_plot_metrics(tmp_path):
    path = tmp_path / "pretrain_64_metrics.jsonl"
    rows = [{"step": s, "loss": 9 - s, "lr": 0.1} for s in (1, 2, 3)] + [{"step": 2, "loss": 1.5}]  # resumed at 2
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot_metrics.load_series(str(path)) == {1: 8, 2: 1.5, 3: 6}
    png = plot_metrics.plot([str(path), str(path)], str(tmp_path / "curves.png"))
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 2 * image.shape[0]  # two panels side by side
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\n{oops\n')
    with pytest.raises(SystemExit, match="bad.jsonl line 2"):
        plot_metrics.load_series(str(bad))


def test_smoothed_curve_shows_the_trend_of_noisy_losses():
    """Length-grouped batches: losses alternate far around a falling trend; the smoothed curve follows the
    trend without lag (a straight line stays on itself), starts at the first point and keeps a constant constant."""
    trend = [5 - 3 * t / 400 for t in range(400)]
    noisy = [v + (1.5 if t % 2 else -1.5) for t, v in enumerate(trend)]
    smoothed = plot_metrics.smooth(noisy)
    assert smoothed[0] == noisy[0]
    assert max(abs(s - v) for s, v in zip(smoothed[20:-20], trend[20:-20])) < 0.1  # the raw points are 1.5 away
    assert plot_metrics.smooth(trend) == pytest.approx(trend)
    assert plot_metrics.smooth([2.0] * 30) == pytest.approx([2.0] * 30)
    assert plot_metrics.smooth([1.0, 3.0], window=1) == [1.0, 3.0]


def test_paired_bootstrap_interval():
    from scripts.run_demo import paired_interval, stage_result
    low, high = paired_interval([0] * 50, [1] * 40 + [0] * 10)  # 40 of 50 items newly right
    assert 0.6 < low < 0.8 < high <= 0.92
    low, high = paired_interval([0, 1] * 25, [1, 0] * 25)  # as many fixed as broken: no change
    assert low < 0 < high
    result = stage_result("kd", "loss", [2.0, 3.0, 4.0], [1.0, 2.5, 3.0], False, weights=[1, 2, 3])
    assert result["before"] == 20 / 6 and result["after"] == 15 / 6 and result["improved"]  # token-weighted means


def test_the_report_says_what_the_agent_stage_shows():
    from scripts.run_demo import agent_reading
    row = lambda low, high: dict(ci95=[low, high])  # noqa: E731
    only_reward = agent_reading(row(0.004, 0.084), row(0.0, 0.015), row(-0.082, 0.0))
    assert only_reward.startswith("Agent stage: the reward rose, task success did not move significantly")
    assert "not in tool use" in only_reward
    learned = agent_reading(row(0.1, 0.3), row(0.02, 0.1), row(-0.2, -0.01))
    assert "task success rose" in learned and "valid tool calls fell" in learned and "not in tool use" not in learned


def test_demo_pipeline_smoke_run(tmp_path, monkeypatch):
    # run_demo.py in this process; the trainer commands it runs are processes forked from the tests' zygote
    from scripts import run_demo
    monkeypatch.setenv("MINIMIND_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", forked_run)
    run_demo.main(run_demo.arguments(["--quick", "--out_dir", str(tmp_path)]))
    report = (tmp_path / "demo_report.md").read_text(encoding="utf-8")
    for row in ("| pretrain |", "| sft |", "| tools |", "| agent |", "| lora |", "| dpo |", "| reasoning |", "| kd |", "| grpo |"):
        assert row in report
    assert "loss on pretrain_eval.jsonl (48 documents, per token)" in report  # --quick scores a few items
    assert "\nAgent stage: the reward " in report
    # shares are shown as percentages, whatever the metric's wording (the right-arguments row was 0.000 before)
    arguments_row = next(line for line in report.splitlines() if "with the right arguments" in line)
    assert re.search(r"\| \d+\.\d% \| \d+\.\d% \| [+-]\d+\.\d pt \[", arguments_row), arguments_row
    loss_row = next(line for line in report.splitlines() if line.startswith("| pretrain |"))
    assert "%" not in loss_row and " pt " not in loss_row
    card = json.loads((tmp_path / "demo_report.json").read_text(encoding="utf-8"))
    primary = [r for r in card["stages"] if r["primary"]]
    assert [r["stage"] for r in primary] == ["pretrain", "sft", "tools", "agent", "lora", "dpo", "reasoning", "kd",
                                             "grpo"]
    for r in card["stages"]:
        low, high = r["ci95"]
        assert low <= r["after"] - r["before"] + 1e-9 and r["after"] - r["before"] <= high + 1e-9
        assert {"metric", "before", "after", "higher_is_better", "seconds"} <= set(r)
    assert card["device"] == "cpu" and card["dtype"] in ("float32", "bfloat16") and card["minutes"] > 0
    assert primary[0]["improved"] and primary[0]["ci95"][1] < 0  # even 3 steps lower the held-out loss
    assert (tmp_path / "demo_loss_curves.png").stat().st_size > 10_000
    for name in ("pretrain_64.pth", "full_sft_64.pth", "agent_64.pth", "lora/lora_identity_64.pth"):
        assert (tmp_path / "demo" / name).exists()
    shutil.rmtree(tmp_path / "demo")
