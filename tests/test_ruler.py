"""RULER-style tasks: lengths, answers, clusters, echo, determinism, held-out checks (docs/methods/ruler.md)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from conftest import minilm_dir
from transformers import AutoTokenizer

from headmap import stats
from headmap.errors import OptionError, TaskError
from headmap.evaluation import load_task, ruler

LENGTHS = [384, 512]  # MiniLM's tokenizer says 512 is its model's limit


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def sets(tok):
    return {task: ruler.generate(task, tok, 6, LENGTHS, seed=1, per_haystack=3) for task in ruler.TASKS}


def _count(tok, text, special=True):
    return len(tok(text, add_special_tokens=special)["input_ids"])


# The filler grows by one word (prose tasks), one rare word repeated f_rare times (common words: "123. word"
# is at most 4 tokens here, f_rare <= 3) or one word of the last document, which is dropped while it would
# hold fewer than QA_MIN_WORDS words (qa, at most 2 tokens a word here): the fitted context is within one
# such step of the budget.
SLACK = {"common_words": 12, "qa": 2 * ruler.QA_MIN_WORDS + 8}
WORD_SLACK = 8


def test_every_task_fits_its_length(tok, sets):
    for task, items in sets.items():
        assert len(items) == 6
        assert [i.target_length for i in items] == [384, 384, 384, 512, 512, 512] or task == "common_words"
        for item in items:
            assert item.task == task
            assert _count(tok, item.context) == item.length
            reserve = max(_count(tok, o, special=False) for o in item.options)
            assert item.length + reserve <= item.target_length
            assert item.target_length - (item.length + reserve) <= SLACK.get(task, WORD_SLACK), (task, item.length)


def test_answers_are_in_the_context_and_the_right_option(sets):
    for task, items in sets.items():
        for item in items:
            assert 2 <= len(item.options) <= ruler.N_OPTIONS
            assert len(set(item.options)) == len(item.options)
            right = item.options[item.answer]
            for answer in item.answers:
                assert answer in right
                if task != "qa":
                    assert answer in item.context.split("\n\nQuestion:")[0]
            if task == "qa":
                # the keyword occurs in the gold document and in no other
                word = re.search(r'word "([A-Za-z]+)"', item.question).group(1)
                docs = re.findall(r"Document (\d+): (.*)", item.context)
                holders = [n for n, text in docs if word.lower() in {w.lower() for w in re.findall(r"[A-Za-z]+", text)}]
                assert holders == [item.answers[0].split()[-1]]


def test_needle_tasks_shapes(sets):
    for item in sets["niah_multikey"]:
        keys = [n.split("=")[0] for n in item.needles]
        assert len(set(keys)) == ruler.NEEDLES_MULTI
        assert item.needle == item.needles[0]
        assert all(k not in item.question for k in keys[1:])
        # the distractor keys' numbers are the wrong options
        assert {o.strip() for o in item.options} - {item.answers[0]} <= {n.split("=")[1] for n in item.needles[1:]}
    for item in sets["niah_multivalue"]:
        assert len({n.split("=")[0] for n in item.needles}) == 1
        assert len(item.answers) == ruler.NEEDLES_MULTI
        # answers in the order they appear
        positions = [item.context.index(v) for v in item.answers]
        assert positions == sorted(positions)
    for item in sets["niah_multiquery"]:
        assert len(item.answers) == ruler.NEEDLES_MULTI
        for n in item.needles:
            assert n.split("=")[0] in item.question


def test_variable_tracking_chain(sets):
    for item in sets["variable_tracking"]:
        names = item.answers
        assert len(names) == ruler.VT_HOPS + 1
        value = re.search(r"value (\d+)", item.question).group(1)
        first = item.context.index(f"VAR {names[0]} = {value}.")
        hops = [item.context.index(f"VAR {names[j + 1]} = VAR {names[j]}.") for j in range(ruler.VT_HOPS)]
        assert [first] + hops == sorted([first] + hops)


def test_common_words_frequencies(sets):
    for item in sets["common_words"]:
        listed = re.findall(r"\d+\. ([a-z]+)", item.context)
        counts = Counter(listed)
        f_common, f_rare = ruler._cwe_frequencies(item.target_length)
        assert all(counts[w] == f_common for w in item.answers)
        assert {c for w, c in counts.items() if w not in item.answers} <= {f_rare}
        assert len(item.answers) == ruler.CWE_COMMON


def test_clusters_and_shared_haystacks(sets):
    for task, items in sets.items():
        by_haystack: dict[str, list[str]] = {}
        for item in items:
            assert item.cluster == item.haystack
            by_haystack.setdefault(item.haystack, []).append(item.id)
        for item in items:
            assert sorted(item.shares_haystack + [item.id]) == sorted(by_haystack[item.haystack])
        if task == "common_words":
            assert len(by_haystack) == len(items)  # every word list is its own
        else:
            assert sorted(len(v) for v in by_haystack.values()) == [3, 3]
            # siblings read the same prose with their own needles
            a, b = (i for i in items if i.haystack == items[0].haystack and i.id in by_haystack[items[0].haystack][:2])
            assert a.needle != b.needle
            assert set(a.paragraphs) & set(b.paragraphs)


def test_the_default_question_does_not_echo_the_needle(tok):
    plain = ruler.generate("niah_single", tok, 3, [512], seed=4)
    echo = ruler.generate("niah_single", tok, 3, [512], seed=4, echo=True)
    for p, e in zip(plain, echo, strict=True):
        key = p.needle.split("=")[0]
        needle = f"One of the magic numbers of {key} is"
        assert needle in p.context
        tail = p.context.split("\n\nQuestion:")[1]
        assert "magic numbers of" not in tail and tail.endswith("Answer:")
        assert e.context.endswith(needle)
        assert (p.needle, p.echo, e.echo) == (e.needle, False, True)  # same needles: only the wording differs
    with pytest.raises(OptionError, match="echo"):
        ruler.generate("common_words", tok, 1, [512], echo=True)


def test_same_seed_same_items_other_seed_disjoint_needles(tok):
    for task in ("niah_multikey", "variable_tracking", "qa"):
        a = ruler.generate(task, tok, 8, [512], seed=7)
        b = ruler.generate(task, tok, 8, [512], seed=7)
        c = ruler.generate(task, tok, 8, [512], seed=8)
        assert [i.to_dict() for i in a] == [i.to_dict() for i in b]
        o = ruler.overlap(a, c)
        assert not o.needles and not o.items
        assert ruler.overlap(a, b).needles  # the same set overlaps itself


def test_exclude_and_text_range_make_held_out_sets(tok):
    scan = ruler.generate("niah_single", tok, 8, [512], seed=0, text_range=(0.0, 0.5))
    test = ruler.generate("niah_single", tok, 8, [512], seed=0, text_range=(0.5, 1.0), exclude=scan)
    o = ruler.overlap(scan, test)
    assert o.disjoint and o.text_disjoint
    assert o.describe().startswith("disjoint")
    same = ruler.overlap(scan, scan[:3])
    assert not same.disjoint
    assert "3 shared items" in same.describe()
    # exclude alone keeps needles and haystacks apart even on the same text and seed
    again = ruler.generate("niah_single", tok, 8, [512], seed=0, text_range=(0.0, 0.5), exclude=scan)
    assert ruler.overlap(scan, again).disjoint


def test_jsonl_round_trip_is_a_task_file(tok, sets, tmp_path):
    items = sets["niah_multivalue"] + sets["qa"]
    path = ruler.write_jsonl(items, tmp_path / "ruler.jsonl")
    task = load_task(path)
    assert [t.id for t in task.items] == [i.id for i in items]
    for t, i in zip(task.items, items, strict=True):
        assert (t.context, t.options, t.answer) == (i.context, i.options, i.answer)
    back = ruler.read_jsonl(path)
    assert back == [i.to_dict() for i in items]
    assert {"id", "task", "context", "question", "answers", "length", "cluster", "haystack", "needle"} <= set(back[0])
    assert stats.cluster_ids(back) == [i.haystack for i in items]
    assert ruler.overlap(back, items).needles
    assert json.loads((tmp_path / "ruler.jsonl").read_text().splitlines()[0])["id"] == items[0].id


def test_default_item_count_is_the_power_analysis():
    assert ruler.DEFAULT_ITEMS == stats.paired_sample_size().items


def test_bad_inputs(tok):
    with pytest.raises(OptionError, match="above the model's limit of 512"):
        ruler.generate("niah_single", tok, 1, [1024])
    with pytest.raises(OptionError, match="above the model's limit of 256"):
        ruler.generate("niah_single", tok, 1, [512], max_length=256)
    with pytest.raises(OptionError, match="unknown RULER-style task"):
        ruler.generate("niah", tok, 1, [512])
    with pytest.raises(OptionError, match="use lengths of at least"):
        ruler.generate("qa", tok, 1, [128])
    with pytest.raises(OptionError, match=">= 1"):
        ruler.generate("niah_single", tok, 0, [512])
    with pytest.raises(OptionError, match="text_range"):
        ruler.generate("niah_single", tok, 1, [512], text_range=(0.6, 0.2))
    with pytest.raises(TaskError, match="'haystack'"):
        ruler.overlap([{"id": "a", "needle": "x"}], [{"id": "b", "needle": "y", "haystack": "h"}])
    with pytest.raises(OptionError, match="non-empty"):
        ruler.overlap([], [{"id": "b"}])


def test_haystacks_are_reused_only_when_the_text_runs_out(tok):
    # a few paragraphs hold fewer sentence starts than the items ask for: haystacks come back, and the
    # items that share one share its cluster
    items = ruler.generate("niah_single", tok, 40, [384], seed=3, per_haystack=1, text_range=(0.0, 0.02))
    sizes = Counter(i.haystack for i in items)
    assert max(sizes.values()) > 1
    for item in items:
        assert len(item.shares_haystack) == sizes[item.haystack] - 1
    assert len({i.needle for i in items}) == 40  # needles are never reused
    wide = ruler.generate("niah_single", tok, 40, [384], seed=3, per_haystack=1)
    assert len({i.haystack for i in wide}) == 40
