"""scripts/eval_benchmark.py on C-Eval / CMMLU style CSV fixtures the test writes itself."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_TOKENIZER, REPO_ROOT
from forked_python import run_python
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from common.chat import render
from inference.chat_core import load_chat_model
from scripts.eval_benchmark import PROMPT, predict, prompt_text, read_questions

SCRIPT = os.path.join(REPO_ROOT, "scripts", "eval_benchmark.py")
MATH = [("1+1=?", "1", "2", "3", "4"), ("2×3=?", "5", "6", "7", "8"), ("10-4=?", "6", "5", "4", "3")]
HISTORY = [("《诗经》是什么？", "诗歌总集", "史书", "小说", "字典"), ("长城在哪个国家？", "日本", "中国", "法国", "巴西")]


def write_ceval(path, rows, answers):  # C-Eval: id,question,A,B,C,D,answer,explanation
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        for i, (row, answer) in enumerate(zip(rows, answers)):
            writer.writerow([i, *row, answer, ""])


def write_cmmlu(path, rows, answers):  # CMMLU: an unnamed index column, Question, A-D, Answer
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        for i, (row, answer) in enumerate(zip(rows, answers)):
            writer.writerow([i, *row, answer])


@pytest.fixture(scope="module")
def weight(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    path = tmp_path_factory.mktemp("bench") / "full_sft_64.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def one_by_one(chat, subject, rows, style="chat"):
    """Reference answers: each prompt alone (no padding), argmax of the logits of A/B/C/D."""
    letters = []
    for question, a, b, c, d in rows:
        text = PROMPT.format(subject=subject, question=question, A=a, B=b, C=c, D=d)
        if style == "chat":
            text = render(chat.tokenizer, [{"role": "user", "content": text}], generation_prompt=True)
        ids = torch.tensor([chat.tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = chat.model(ids).logits[0, -1]
        letters.append("ABCD"[int(logits[[chat.tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]].argmax())])
    return letters


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_batched_predictions_equal_one_prompt_at_a_time(weight, style):
    chat = load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    rows = MATH + HISTORY
    items = [dict(question=q, A=a, B=b, C=c, D=d) for q, a, b, c, d in rows]
    prompts = [prompt_text(chat.tokenizer, "math", item, style) for item in items]
    assert predict(chat, prompts, batch_size=4) == one_by_one(chat, "math", rows, style)


def test_scores_per_subject_and_overall(weight, tmp_path):
    chat = load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    math_answers = one_by_one(chat, "math", MATH)  # the model's own picks: 3/3 right
    history_answers = ["ABCD"[("ABCD".index(x) + 1) % 4] for x in one_by_one(chat, "history", HISTORY)]  # 0/2
    data = tmp_path / "val"
    data.mkdir()
    write_ceval(data / "math_val.csv", MATH, math_answers)
    write_cmmlu(data / "history.csv", HISTORY, [x.lower() for x in history_answers])  # lower case is accepted
    result = run_python([SCRIPT, "--data_dir", str(data), "--load_from", str(weight),
                         "--device", "cpu", "--batch_size", "2", "--output", str(tmp_path / "scores.json")], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.load(open(tmp_path / "scores.json"))
    assert scores["subjects"]["math"]["accuracy"] == 1.0 and scores["subjects"]["history"]["accuracy"] == 0.0
    assert scores["subjects"]["math"]["predictions"] == math_answers
    assert scores["overall"] == {"questions": 5, "accuracy": 3 / 5, "subject_mean": 0.5}
    assert "overall (all questions)" in result.stdout and "0.6000" in result.stdout


def test_bad_files_name_the_file_line_and_expectation(tmp_path):
    bad_answer = tmp_path / "physics_val.csv"
    write_ceval(bad_answer, MATH, ["A", "E", "B"])
    with pytest.raises(SystemExit, match=r"physics_val.csv, line 3: answer must be one of A, B, C, D, got 'E'"):
        read_questions(str(bad_answer))
    no_answers = tmp_path / "physics_test.csv"
    write_ceval(no_answers, MATH, ["", "", ""])
    with pytest.raises(SystemExit, match="test split has no public answers"):
        read_questions(str(no_answers))
    missing = tmp_path / "odd.csv"
    missing.write_text("question,A,B,C,answer\n1+1?,1,2,3,B\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"odd.csv: missing column\(s\) d; expected question, A, B, C, D, answer"):
        read_questions(str(missing))
    result = subprocess.run([sys.executable, SCRIPT, "--data_dir", str(tmp_path / "empty")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no .csv files" in result.stderr
