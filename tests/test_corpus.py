"""Built-in corpora (needle, items), corpus specs with options, JSONL files with spans, strict mode."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest
from conftest import minilm_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import headmap.corpus as corpus_mod
from headmap.corpus import BUILTIN_CORPORA, load_corpus, parse_spec, shipped_text
from headmap.errors import CorpusError
from headmap.probes.base import Probe


class NoOffsets:
    """A tokenizer that cannot return offset mappings (like a slow one): the prefix fallback runs."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offsets_mapping is not available")
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)


def trained_bpe(kind: str, numbers_end_with_period: bool = False) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on the shipped prose: byte-level (GPT-2 style) or Metaspace
    (sentencepiece style), with a BOS token. With ``numbers_end_with_period`` it learns merges like "3."."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    rng = random.Random(0)
    dot = "." if numbers_end_with_period else ""
    numbers = [f"The number is {rng.randrange(1000, 999999)}{dot}" for _ in range(2000)] + ["Document [1]:"] * 50
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(shipped_text() + numbers, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = ["llama", "minilm", "bytelevel", "metaspace", "no-offsets"]


@pytest.fixture(scope="module")
def toks(tiny_llama_dir):
    llama = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return {
        "llama": llama,
        "minilm": AutoTokenizer.from_pretrained(minilm_dir()),
        "bytelevel": trained_bpe("bytelevel"),
        "metaspace": trained_bpe("metaspace"),
        "no-offsets": NoOffsets(llama),
    }


@pytest.fixture
def llama(toks):
    return toks["llama"]


def squash(text: str) -> str:
    """Lower case without white space: decoded WordPiece text spaces punctuation differently."""
    return re.sub(r"\s+", "", text).lower()


# -- specs -----------------------------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("needle:depths=0,0.5,1:lengths=256,512") == (
        "needle",
        {"depths": [0.0, 0.5, 1.0], "lengths": [256, 512]},
    )
    assert parse_spec("items: k = 3 :item_tokens=20") == ("items", {"k": 3, "item_tokens": 20})
    assert parse_spec("text") == ("text", {})
    assert parse_spec("repeats") == ("repeats", {})
    assert parse_spec("data/needle:depths=1.txt") is None  # a path: colons are part of its name
    assert parse_spec("my:file.jsonl") is None
    assert set(BUILTIN_CORPORA) >= {"text", "repeats", "needle", "items"}


@pytest.mark.parametrize(
    "spec, words",
    [
        ("needle:size=3", ["unknown option 'size'", "lengths", "depths"]),
        ("needle:depths=0,1.5", ["depths", "1.5", "between 0 and 1", "lengths"]),
        ("needle:depths=0,half", ["depths", "'half'", "not a number"]),
        ("needle:depths=0,,1", ["depths", "empty item"]),
        ("needle:lengths=abc", ["lengths", "'abc'", "not a whole number", "depths"]),
        ("needle:lengths=0", ["lengths", "at least 1"]),
        ("needle:", ["empty option"]),
        ("items:k=0", ["k", "at least 1", "item_tokens"]),
        ("items:k=2.5", ["k", "'2.5'", "whole number"]),
        ("items:k", ["'k'", "no value"]),
        ("items:k=2:k=3", ["'k'", "twice"]),
        ("items:depth=1", ["unknown option 'depth'", "k (", "item_tokens ("]),
        ("text:limit=3", ["'text' takes no options"]),
        ("repeats:n=3", ["'repeats' takes no options"]),
    ],
)
def test_bad_options(llama, spec, words):
    with pytest.raises(CorpusError) as err:
        load_corpus(spec, llama, 128)
    for word in words:
        assert word in str(err.value)


def test_options_are_recorded(llama):
    c = load_corpus("needle:depths=0.5:lengths=96,128", llama, 128)
    assert c.description["options"] == {"lengths": [96, 128], "depths": [0.5]}
    assert c.description["name"] == "needle" and c.description["seed"] == 0
    c = load_corpus("needle", llama, 128)
    assert c.description["options"] == {"lengths": [128], "depths": [0.0, 0.25, 0.5, 0.75, 1.0]}
    c = load_corpus("items:k=3", llama, 256, limit=1)
    assert c.description["options"] == {"k": 3, "item_tokens": 48}


def test_text_and_repeats_unchanged(llama):
    text = load_corpus("text", llama, 64, limit=2)
    # cut to 64 tokens by the tokenizer, so an encoder's closing [SEP] stays (it is the 64th token)
    first = llama(" ".join(shipped_text()[:3]), truncation=True, max_length=64)["input_ids"]
    assert text.samples[0].ids == first and text.samples[0].info["paragraphs"][0] == 0
    assert len(first) == 64 and first[-1] == llama.sep_token_id
    rep = load_corpus("repeats", llama, 33, limit=2, seed=3)
    n = rep.samples[0].info["repeat_length"]
    off = rep.samples[0].info["offset"]
    ids = rep.samples[0].ids
    assert ids[off : off + n] == ids[off + n : off + 2 * n]


# -- needle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_needle_spans_and_answers(toks, kind):
    tok = toks[kind]
    c = load_corpus("needle:lengths=96,160", tok, 160)
    assert len(c) == 10  # one input per (length, depth) pair
    pairs = [(s.info["context_length"], s.info["depth"]) for s in c.samples]
    assert pairs == [(L, d) for L in (96, 160) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for s in c.samples:
        info = s.info
        start, end = info["needle_span"]
        assert 0 < start < end <= len(s.ids)
        assert info["answer_ids"] == s.ids[start:end]
        assert info["exact_copy"] is True
        assert tok.decode(s.ids[start:end]).strip() == info["answer"]
        assert info["answer"].isdigit() and 4 <= len(info["answer"]) <= 6
        assert info["answer"] in info["needle"] and info["needle"].startswith("The secret number of")
        assert info["question"].startswith("What is the secret number of")
        a, b = info["needle_sentence_span"]
        assert a <= start and end <= b
        assert squash(tok.decode(s.ids[a:b])) == squash(info["needle"])
        # the prompt ends with the question and "Answer:" (not the needle's own words, issue 10); the answer follows
        prompt = squash(tok.decode(s.ids, skip_special_tokens=True))
        place = info["question"].removeprefix("What is the secret number of ").removesuffix("?")
        assert place in info["needle"] and prompt.endswith(squash(f"{info['question']} Answer:"))
        assert squash(tok.decode(s.ids + info["answer_ids"], skip_special_tokens=True)).endswith(
            "answer:" + info["answer"]
        )
        # the needle is in the context only once, the question after it
        assert prompt.count(squash(info["needle"])) == 1


@pytest.mark.parametrize("kind", ["llama", "bytelevel", "no-offsets"])
def test_needle_lengths_respected(toks, kind):
    c = load_corpus("needle:lengths=80,200,256:depths=0,0.6", toks[kind], 256)
    for s in c.samples:
        L = s.info["context_length"]
        assert L - 2 <= len(s.ids) <= L
    assert sorted({s.info["context_length"] for s in c.samples}) == [80, 200, 256]
    assert c.description["truncated"] == 0


def test_needle_default_length_is_max_length(llama):
    c = load_corpus("needle", llama, 120)
    assert len(c) == 5 and {s.info["context_length"] for s in c.samples} == {120}
    assert all(len(s.ids) <= 120 for s in c.samples)


@pytest.mark.parametrize("kind", ["llama", "metaspace"])
def test_needle_depths_in_order(toks, kind):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    c = load_corpus("needle:lengths=256", toks[kind], 256)
    starts = [s.info["needle_span"][0] for s in c.samples]
    assert [s.info["depth"] for s in c.samples] == depths
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for s in c.samples:
        assert abs(s.info["actual_depth"] - s.info["depth"]) < 0.15
    # one needle per length and round: only its place changes with the depth
    assert len({s.info["needle"] for s in c.samples}) == 1
    first, last = c.samples[0], c.samples[-1]
    lead = toks[kind]("hello")["input_ids"].index(toks[kind]("hello", add_special_tokens=False)["input_ids"][0])
    assert lead == 1
    assert first.info["needle_sentence_span"][0] == lead  # depth 0: right after BOS / CLS
    q = squash(toks[kind].decode(last.ids[last.info["needle_sentence_span"][1] :], skip_special_tokens=True))
    assert q.startswith("question:")  # depth 1: right before the question


def test_needle_limit_repeats_with_new_needles(llama):
    c = load_corpus("needle:lengths=100:depths=0,1", llama, 100, limit=5)
    assert len(c) == 5
    assert [s.info["depth"] for s in c.samples] == [0.0, 1.0, 0.0, 1.0, 0.0]
    needles = [s.info["needle"] for s in c.samples]
    assert needles[0] == needles[1] and needles[2] == needles[3]
    assert len({needles[0], needles[2], needles[4]}) == 3


def test_needle_is_seeded(llama):
    a = load_corpus("needle:lengths=128", llama, 128, seed=1)
    b = load_corpus("needle:lengths=128", llama, 128, seed=1)
    other = load_corpus("needle:lengths=128", llama, 128, seed=2)
    assert [s.ids for s in a.samples] == [s.ids for s in b.samples]
    assert [s.info for s in a.samples] == [s.info for s in b.samples]
    assert a.samples[0].info["needle"] != other.samples[0].info["needle"]
    assert [s.ids for s in a.samples] != [s.ids for s in other.samples]


def test_needle_rewords_when_the_number_merges_with_the_period():
    tok = trained_bpe("metaspace", numbers_end_with_period=True)
    assert tok.convert_ids_to_tokens(tok("is 48213.", add_special_tokens=False)["input_ids"])[-1].endswith(".")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = load_corpus("needle:lengths=128:depths=0,0.5,1", tok, 128)
    for s in c.samples:
        start, end = s.info["needle_span"]
        assert s.info["exact_copy"] is True and s.info["answer_ids"] == s.ids[start:end]
        assert tok.decode(s.ids[start:end]).strip() == s.info["answer"]
        assert s.info["needle"].endswith(corpus_mod.NEEDLE_ENDINGS[1])


def test_needle_warns_when_no_needle_copies_exactly(monkeypatch):
    tok = trained_bpe("metaspace", numbers_end_with_period=True)
    monkeypatch.setattr(corpus_mod.needle, "NEEDLE_ENDINGS", (".", "."))
    with pytest.warns(UserWarning, match="splits the secret number differently"):
        c = load_corpus("needle:lengths=128:depths=0.5", tok, 128)
    s = c.samples[0]
    start, end = s.info["needle_span"]
    assert s.info["exact_copy"] is False
    assert s.info["answer_ids"] == s.ids[start:end]  # the needle's own tokens
    assert s.info["answer"] in tok.decode(s.ids[start:end])


def test_needle_length_above_max_length(llama):
    with pytest.raises(CorpusError, match=r"context length 512 is above --max-length 256"):
        load_corpus("needle:lengths=128,512", llama, 256)


def test_needle_context_too_short(llama):
    with pytest.raises(
        CorpusError, match=r"need (\d+) tokens \(.*\) but the context length is 30; use --max-length >= \1"
    ):
        load_corpus("needle", llama, 30)
    with pytest.raises(CorpusError) as err:
        load_corpus("needle:lengths=30", llama, 256)
    need = int(re.search(r"need (\d+) tokens", str(err.value)).group(1))
    assert f"needle lengths >= {need}" in str(err.value)
    ok = load_corpus(f"needle:lengths={need}", llama, 256)  # the length the message asks for is enough
    assert all(len(s.ids) <= need for s in ok.samples)


# -- items -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_items_spans(toks, kind):
    tok = toks[kind]
    c = load_corpus("items", tok, 1024)
    assert len(c) == 8  # default number of inputs
    prose = squash(" ".join(shipped_text()))
    for s in c.samples:
        spans = s.info["items"]
        assert s.info["k"] == 10 and len(spans) == 10
        for i, (a, b) in enumerate(spans):
            assert 0 < a < b <= len(s.ids)
            assert 44 <= b - a <= 50  # 48 tokens, give or take a merge at the edges
            if i:
                assert spans[i - 1][1] < a  # disjoint, in order, the next label in between
            passage = squash(tok.decode(s.ids[a:b]))
            assert passage in prose  # a passage of the shipped text (paragraphs joined)
            label = squash(tok.decode(s.ids[(spans[i - 1][1] if i else 0) : a], skip_special_tokens=True))
            assert label == f"document[{i + 1}]:"
        target = s.info["target"]
        assert s.info["answer"] == str(target + 1)
        word = s.info["keyword"].lower()
        assert word in squash(tok.decode(s.ids[slice(*spans[target])]))
        assert all(word not in tok.decode(s.ids[a:b]).lower().split() for j, (a, b) in enumerate(spans) if j != target)
        assert squash(tok.decode(s.ids, skip_special_tokens=True)).endswith(
            squash(f"{s.info['question']}Answer: Document [")
        )


def test_items_options_and_seed(llama):
    c = load_corpus("items:k=3:item_tokens=20", llama, 256, limit=4, seed=5)
    assert len(c) == 4
    for s in c.samples:
        assert s.info["k"] == 3 and len(s.info["items"]) == 3 and s.info["item_tokens"] == 20
        assert all(17 <= b - a <= 22 for a, b in s.info["items"])
    again = load_corpus("items:k=3:item_tokens=20", llama, 256, limit=4, seed=5)
    other = load_corpus("items:k=3:item_tokens=20", llama, 256, limit=4, seed=6)
    assert [s.ids for s in c.samples] == [s.ids for s in again.samples]
    assert [s.ids for s in c.samples] != [s.ids for s in other.samples]
    assert len({tuple(s.ids) for s in c.samples}) == 4  # every input draws new documents


def test_items_do_not_fit(llama):
    with pytest.raises(CorpusError, match=r"needs more than 481 tokens .* --max-length is 256"):
        load_corpus("items:item_tokens=48", llama, 256)
    # by default the documents shrink until k of them fit, down to 4 tokens each
    fitted = load_corpus("items", llama, 256)
    assert fitted.description["options"]["k"] == 10 and fitted.description["options"]["item_tokens"] < 48
    assert max(len(s.ids) for s in fitted.samples) <= 256
    with pytest.raises(CorpusError, match=r"--max-length is 40"):
        load_corpus("items", llama, 40)
    with pytest.raises(CorpusError) as err:
        load_corpus("items:k=4:item_tokens=20", llama, 90)
    need = int(re.search(r"needs (\d+) tokens", str(err.value)).group(1))
    assert f"--max-length >= {need}" in str(err.value) and need > 90
    c = load_corpus("items:k=4:item_tokens=20", llama, need)
    assert max(len(s.ids) for s in c.samples) == need


def test_probes_see_what_each_corpus_records(llama, tmp_path):
    class Needs(Probe):
        name = "needs"

    def applies(requires, corpus):
        probe = Needs()
        probe.requires = requires
        return probe.applies_to(corpus)

    needle = load_corpus("needle:depths=0.5", llama, 96)
    items = load_corpus("items:k=2:item_tokens=16", llama, 96, limit=1)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "a query and a key", "spans": {"q": "query"}}) + "\n")
    spans = load_corpus(path, llama, 96)
    text = load_corpus("text", llama, 32, limit=1)
    assert applies("needle", needle) is None and applies("items", items) is None and applies("spans", spans) is None
    assert "--corpus needle" in applies("needle", text) and "--corpus items" in applies("items", needle)
    assert "JSONL" in applies("spans", items)


# -- files: JSONL with spans, strict ---------------------------------------------------------------


def write_jsonl(tmp_path, rows, name="c.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["llama", "bytelevel", "metaspace", "no-offsets"])
def test_jsonl_offsets_and_markers(toks, tmp_path, kind):
    tok = toks[kind]
    text = "The quick brown fox jumps over the lazy dog. Then the fox sleeps soundly."
    rows = [
        {"text": text, "spans": {"animal": [4, 19], "key": "lazy dog", "later": "fox sleeps"}},
        "",
        {"text": "Only a text here.", "id": 7},
    ]
    c = load_corpus(write_jsonl(tmp_path, rows), tok, 64)
    assert c.description["format"] == "jsonl" and len(c) == 2
    first, second = c.samples
    assert first.ids == tok(text)["input_ids"]
    assert first.info["line"] == 1 and second.info["line"] == 3  # file line numbers
    spans = first.info["spans"]
    assert set(spans) == {"animal", "key", "later"}
    assert squash(tok.decode(first.ids[slice(*spans["animal"])])) == "quickbrownfox"
    assert squash(tok.decode(first.ids[slice(*spans["key"])])) == "lazydog"
    assert squash(tok.decode(first.ids[slice(*spans["later"])])) == "foxsleeps"  # a marker: its first occurrence
    assert spans["animal"][1] <= spans["key"][0] < spans["key"][1] <= spans["later"][0]
    assert second.info["spans"] == {}  # a line without spans, in a file with spans


def test_jsonl_span_partly_inside_a_token(llama, tmp_path):
    text = "unbelievably long words"
    c = load_corpus(write_jsonl(tmp_path, [{"text": text, "spans": {"part": [2, 4]}}]), llama, 32)
    s, e = c.samples[0].info["spans"]["part"]
    offsets = llama(text, return_offsets_mapping=True)["offset_mapping"]
    assert e - s >= 1 and all(offsets[t][0] < 4 and offsets[t][1] > 2 for t in range(s, e))


def test_jsonl_detected_by_its_first_line(llama, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text('\n{"text": "hello there", "spans": {"h": "hello"}}\n')
    c = load_corpus(path, llama, 32)
    assert c.description["format"] == "jsonl"
    assert c.samples[0].info == {"line": 2, "spans": {"h": [1, 2]}}


def test_jsonl_without_spans_records_none(llama, tmp_path):
    c = load_corpus(write_jsonl(tmp_path, [{"text": "one two"}, {"text": "three"}]), llama, 32)
    assert [s.info for s in c.samples] == [{"line": 1}, {"line": 2}]
    assert c.samples[1].ids == llama("three")["input_ids"]


@pytest.mark.parametrize(
    "row, words",
    [
        ('{"text": "unclosed', ["not valid JSON"]),
        ("[1, 2]", ["a JSON object is needed"]),
        ({"txt": "hello"}, ['no "text"']),
        ({"text": ""}, ['"text" must be a non-empty string']),
        ({"text": "hello world", "spans": [[0, 5]]}, ['"spans" must be an object']),
        ({"text": "hello world", "spans": {"who": "nobody"}}, ["span 'who'", "'nobody'", "not found"]),
        ({"text": "hello world", "spans": {"who": ""}}, ["span 'who'", "empty marker"]),
        ({"text": "hello world", "spans": {"far": [6, 40]}}, ["span 'far'", "out of range", "11 characters"]),
        ({"text": "hello world", "spans": {"neg": [-1, 3]}}, ["span 'neg'", "out of range"]),
        ({"text": "hello world", "spans": {"back": [5, 2]}}, ["span 'back'", "start must be before its end"]),
        ({"text": "hello world", "spans": {"flat": [3, 3]}}, ["span 'flat'", "start must be before its end"]),
        ({"text": "hello world", "spans": {"odd": [1.5, 3]}}, ["span 'odd'", "character offsets or a marker"]),
        ({"text": "hello     world", "spans": {"gap": [6, 9]}}, ["span 'gap'", "covers no token"]),
    ],
)
def test_jsonl_errors(llama, tmp_path, row, words):
    path = write_jsonl(tmp_path, [{"text": "a fine first line"}, "", row], name="bad.jsonl")
    with pytest.raises(CorpusError) as err:
        load_corpus(path, llama, 32)
    message = str(err.value)
    assert "bad.jsonl" in message and "line 3" in message
    for word in words:
        assert word in message


def test_jsonl_span_cut_off_by_truncation(llama, tmp_path):
    text = " ".join(["word"] * 40) + " target"
    path = write_jsonl(tmp_path, [{"text": text, "spans": {"early": "word", "late": "target"}}])
    with pytest.raises(CorpusError, match=r"line 1: span 'late' ends at token 42 .* --max-length 20"):
        load_corpus(path, llama, 20)
    path = write_jsonl(tmp_path, [{"text": text, "spans": {"early": "word"}}])
    with pytest.warns(UserWarning, match="truncated"):
        c = load_corpus(path, llama, 20)
    assert len(c.samples[0].ids) == 20 and c.samples[0].info["spans"] == {"early": [1, 2]}


def test_strict_text_file(llama, tmp_path):
    path = tmp_path / "c.txt"
    long_line = " ".join(["word"] * 30)
    path.write_text(f"short line\n\n{long_line}\nanother\n")
    with pytest.raises(CorpusError) as err:
        load_corpus(path, llama, 16, strict=True)
    message = str(err.value)
    assert "line 3" in message and "32 tokens" in message and "--max-length 16" in message
    assert "drop --strict" in message and "c.txt" in message
    with pytest.warns(UserWarning, match="truncated"):
        c = load_corpus(path, llama, 16)
    assert [len(s.ids) for s in c.samples] == [4, 16, 3]
    assert [s.info["line"] for s in c.samples] == [1, 3, 4]
    fits = load_corpus(path, llama, 32, strict=True)
    assert fits.samples[1].ids == llama(long_line)["input_ids"] and fits.description["strict"] is True


def test_strict_jsonl(llama, tmp_path):
    path = write_jsonl(tmp_path, [{"text": "ok"}, {"text": " ".join(["word"] * 30), "spans": {"w": "word"}}])
    with pytest.raises(CorpusError, match=r"line 2 .* has 32 tokens, more than --max-length 16; .*--strict"):
        load_corpus(path, llama, 16, strict=True)
    with pytest.warns(UserWarning, match="truncated"):
        c = load_corpus(path, llama, 16)
    assert len(c.samples[1].ids) == 16


def test_file_path_with_a_builtin_like_name(llama, tmp_path):
    path = tmp_path / "needle:lengths=3.txt"
    path.write_text("a line of text\n")
    c = load_corpus(path, llama, 32)
    assert c.description["kind"] == "file" and c.samples[0].ids == llama("a line of text")["input_ids"]


def test_a_registered_corpus_loads_by_name_with_its_options(llama):
    """The built-ins are entries of a registry (transformers' GeneralInterface pattern): a new corpus is
    one registered builder, and load_corpus and parse_spec find it with no other change."""
    from headmap.corpus import ALL_CORPORA, Built, CorpusInterface, Sample, register_corpus

    assert list(ALL_CORPORA)[:4] == ["text", "repeats", "needle", "items"]
    seen = {}

    @register_corpus("hello_test", {"times": ("int", "how many inputs")})
    def build(tokenizer, *, max_length, limit, seed, vocab_size, options):
        seen.update(options)
        ids = tokenizer("hello world")["input_ids"]
        return Built([Sample(ids, {"k": i}) for i in range(options.get("times", 1))], options, {"seed": seed})

    try:
        c = load_corpus("hello_test:times=3", llama, 64, seed=5)
        assert len(c) == 3 and seen == {"times": 3}
        assert c.description["kind"] == "builtin" and c.description["seed"] == 5
        assert c.description["options"] == {"times": 3}
        with pytest.raises(CorpusError, match="unknown option 'x'; valid options: times"):
            parse_spec("hello_test:x=1")
        local = CorpusInterface()
        local["only_here"] = ALL_CORPORA["text"]
        assert "only_here" in local and "only_here" not in ALL_CORPORA  # a local entry stays local
    finally:
        CorpusInterface._global_mapping.pop("hello_test")
    assert parse_spec("hello_test") is None


def test_no_private_name_crosses_a_module_in_the_corpus_and_evaluation_rooms():
    """Modules of headmap.corpus and headmap.evaluation (and the eval command) import public names only."""
    import ast

    root = Path(corpus_mod.__file__).parents[1]
    files = [*(root / "corpus").glob("*.py"), *(root / "evaluation").glob("*.py"), root / "cli" / "evaluate.py"]
    crossing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                crossing += [
                    f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__future__"
                ]
    assert crossing == []
