"""RULER-style long-context tasks, generated offline and seeded (``docs/methods/ruler.md``).

The task family of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), rebuilt from what ships with headmap so that it runs without a
network: needle retrieval with one needle, with distractor keys, with several values of one key
and with several queried keys; variable tracking; common-words extraction; and question answering
over documents cut from the shipped public-domain prose (``headmap.corpus.shipped_text()``).

Every item is fitted to a length in tokens of a given tokenizer, records the units it shares with
other items (its ``haystack``, its ``needle``s, the ``cluster`` the statistics resample, the ids
of the items built on the same haystack, and the prose paragraphs it uses), and carries a
multiple-choice form (``context``, ``options``, ``answer``) that :func:`headmap.evaluation.load_task`
reads as it is, beside the reference ``answers`` for generation scoring.

By default the question does not repeat the needle's wording (the text right before the answer is
``Answer:``); ``echo=True`` ends the prompt with the needle's own words instead, the induction
pattern a copying head completes, to measure how much of a result that pattern carries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..corpus import shipped_text
from ..errors import OptionError, TaskError
from ..specs import is_whole

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "qa",
)
ECHO_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "qa")
# stats.paired_sample_size(): a 2-point difference at accuracy 0.70, correlation 0.75 between the two
# conditions, 80% power, alpha 0.05 (docs/methods/statistics.md); tests/test_ruler.py checks the two agree
DEFAULT_ITEMS = 2026
DEFAULT_LENGTHS = (4096,)  # kvpress's leaderboard reports RULER at 4K
MIN_LENGTH = 64
DEFAULT_PER_HAYSTACK = 4
N_OPTIONS = 4
DEPTHS = tuple(round(k / 39, 4) for k in range(40))  # 40 depths from 0 to 1, as RULER samples them
NEEDLES_MULTI = 4  # keys (multikey, multiquery) or values (multivalue) per item
VT_HOPS = 4
VT_CHAINS = 2  # the queried chain and one distractor chain
CWE_COMMON = 10
QA_DOC_WORDS = 60  # a document is consecutive paragraphs with at least this many words
QA_DOC_MAX_WORDS = 150  # ... cut after the last sentence that ends within this many words
QA_MIN_WORDS = 20  # the last document, cut to fit the length, keeps at least this many words

_ADJECTIVES = (
    "amber", "ancient", "brisk", "calm", "clever", "copper", "crimson", "curious", "dusty", "eager",
    "faint", "fierce", "frozen", "gentle", "gilded", "golden", "hollow", "humble", "idle", "ivory",
    "jolly", "lively", "lunar", "mellow", "misty", "noble", "olive", "pale", "polite", "proud",
    "quiet", "rapid", "restless", "rosy", "rustic", "scarlet", "silent", "silver", "sleepy", "solemn",
    "steady", "stormy", "sunny", "swift", "tender", "velvet", "wary", "woolly",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "barrel", "beacon", "bridge", "candle", "canyon", "cellar", "cloak", "comet",
    "compass", "cottage", "falcon", "feather", "fountain", "garden", "harbor", "helmet", "kettle", "ladder",
    "lantern", "locket", "meadow", "mirror", "orchard", "otter", "parrot", "pebble", "pillow", "quarry",
    "ribbon", "saddle", "shovel", "spindle", "sparrow", "teapot", "thimble", "thistle", "tower", "trumpet",
    "tunnel", "violin", "wagon", "walnut", "willow", "window", "wizard", "zephyr",
)  # fmt: skip

_SENTENCE_END = re.compile(r"[.!?][\"'`)\]_]*$")
_WORD = re.compile(r"[A-Za-z]+")


# -- items -----------------------------------------------------------------------------------------


@dataclass
class RulerItem:
    """One generated item.

    ``context`` is the whole prompt up to the answer; ``options``/``answer`` its multiple-choice form
    (the right option's index), ``answers`` the reference strings for generation scoring (all must
    appear, RULER's ``string_match_all``; for ``qa`` any one, ``string_match_part``). ``length`` is the
    context's length in tokens of the generating tokenizer (special tokens included), at most
    ``target_length`` minus the longest option. ``haystack`` names the filler text (items with the same
    ``haystack`` read the same text; ``shares_haystack`` lists them), ``needle`` the queried needle(s)
    and ``needles`` every needle in the context; ``cluster`` is the unit the statistics resample (the
    haystack); ``paragraphs`` the lines of ``data/text.txt`` the context uses.
    """

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    options: list[str]
    answer: int
    length: int
    target_length: int
    cluster: str
    haystack: str
    needle: str
    needles: list[str]
    shares_haystack: list[str] = field(default_factory=list)
    depth: float | None = None
    echo: bool = False
    paragraphs: list[int] = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- tokens and text -------------------------------------------------------------------------------


class _Counter:
    """Token counts of a tokenizer (special tokens included, as the model reads a prompt)."""

    def __init__(self, tokenizer: Any) -> None:
        if not callable(tokenizer):
            raise OptionError(f"the tokenizer must be a Hugging Face tokenizer (got {type(tokenizer).__name__})")
        self.tokenizer = tokenizer

    def __call__(self, text: str, special: bool = True) -> int:
        try:
            ids = self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
        except TypeError:
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return len(ids)


@dataclass
class _Prose:
    """The shipped prose as words, each with its paragraph (a line of ``data/text.txt``)."""

    words: list[str]
    para: list[int]
    paragraphs: list[str]
    first: int  # first paragraph of the pool
    last: int  # one past the last

    @classmethod
    def load(cls, text_range: tuple[float, float], avoid: Iterable[int] = ()) -> _Prose:
        """The paragraphs in ``text_range`` except those in ``avoid`` (read by an excluded set)."""
        paragraphs = shipped_text()
        lo, hi = text_range
        first, last = int(round(lo * len(paragraphs))), int(round(hi * len(paragraphs)))
        avoid = set(avoid)
        kept = [p for p in range(first, last) if p not in avoid]
        if len(kept) < 2:
            raise OptionError(
                f"text_range {text_range} leaves {len(kept)} paragraph(s) of the shipped prose once the excluded "
                "sets' paragraphs are removed; give a wider range or exclude less"
            )
        words: list[str] = []
        para: list[int] = []
        for p in kept:
            for w in paragraphs[p].split():
                words.append(w)
                para.append(p)
        return cls(words, para, paragraphs, first, last)

    def starts(self) -> list[int]:
        """Word indices where a sentence or a paragraph begins: the places a haystack may start."""
        return [
            k
            for k in range(len(self.words))
            if k == 0 or self.para[k] != self.para[k - 1] or _SENTENCE_END.search(self.words[k - 1])
        ]

    def take(self, start: int, count: int) -> tuple[list[str], list[int]]:
        """``count`` words from word ``start``, wrapping around the pool."""
        n = len(self.words)
        idx = [(start + k) % n for k in range(count)]
        return [self.words[i] for i in idx], [self.para[i] for i in idx]


def _join(words: list[str], paras: list[int]) -> str:
    """Words with a space, or a newline where the paragraph changes."""
    out: list[str] = []
    for k, w in enumerate(words):
        if k:
            out.append("\n" if paras[k] != paras[k - 1] else " ")
        out.append(w)
    return "".join(out)


def _with_needles(words: list[str], paras: list[int], needles: list[tuple[float, str]]) -> str:
    """The haystack with each needle sentence at the sentence boundary nearest to its depth."""
    bounds = [0] + [k + 1 for k, w in enumerate(words) if _SENTENCE_END.search(w)]
    if bounds[-1] != len(words):
        bounds.append(len(words))
    at: dict[int, list[str]] = {}
    for depth, sentence in needles:
        b = min(bounds, key=lambda p: (abs(p - depth * len(words)), p))
        at.setdefault(b, []).append(sentence)
    parts: list[str] = []
    prev = 0
    for b in sorted(at):
        if b > prev:
            parts.append(_join(words[prev:b], paras[prev:b]))
        parts.extend(at[b])
        prev = b
    if prev < len(words):
        parts.append(_join(words[prev:], paras[prev:]))
    return " ".join(parts)


def _fit(
    build: Callable[[int], str], count: _Counter, length: int, reserve: int, estimate: int, smallest: int = 0
) -> tuple[int, str, int]:
    """The largest ``w >= smallest`` whose ``build(w)`` has at most ``length - reserve`` tokens: (w, text, tokens).

    Token counts grow with ``w`` (more filler, never less text); the search brackets the answer from
    ``estimate`` and bisects.
    """
    cache: dict[int, tuple[str, int]] = {}
    limit = length - reserve

    def size(w: int) -> int:
        if w not in cache:
            text = build(w)
            cache[w] = (text, count(text))
        return cache[w][1]

    if size(smallest) > limit:
        need = size(smallest) + reserve
        raise OptionError(
            f"length {length} tokens is too short: the prompt with the least filler and the longest answer "
            f"take {need} tokens; use lengths of at least {need}"
        )
    lo = smallest
    hi = max(estimate, smallest + 1)
    while size(hi) <= limit:
        lo = hi
        hi = hi + max(8, hi // 4)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= limit:
            lo = mid
        else:
            hi = mid
    text, tokens = cache[lo]
    return lo, text, tokens


# -- needles ---------------------------------------------------------------------------------------


def _value(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))  # 7 digits, as RULER's numbers


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _needle_sentence(key: str, value: str) -> str:
    return f"One of the magic numbers of {key} is {value}."


def _echo_prefix(key: str) -> str:
    return f"Answer: One of the magic numbers of {key} is"


def _needle_id(key: str, value: str) -> str:
    return f"{key}={value}"


class _Draw:
    """Seeded draws of fresh needles: never one already used in this set or in ``exclude``."""

    def __init__(self, rng: random.Random, exclude_needles: set[str]) -> None:
        self.rng = rng
        self.used = set(exclude_needles)
        self.values: set[str] = set()

    def pair(self, key: str | None = None, avoid_keys: Iterable[str] = ()) -> tuple[str, str]:
        avoid = set(avoid_keys)
        for _ in range(10_000):
            k = key if key is not None else _key(self.rng)
            v = _value(self.rng)
            if k in avoid or v in self.values or _needle_id(k, v) in self.used:
                continue
            self.used.add(_needle_id(k, v))
            self.values.add(v)
            return k, v
        raise OptionError("ran out of fresh needles; ask for fewer items or exclude fewer needles")

    def word(self, n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ") -> str:
        while True:
            w = "".join(self.rng.choice(alphabet) for _ in range(n))
            if w not in self.values:
                self.values.add(w)
                return w

    def fresh_value(self) -> str:
        while True:
            v = _value(self.rng)
            if v not in self.values:
                self.values.add(v)
                return v


def _options(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], int]:
    """``right`` among distinct ``wrong`` ones (up to N_OPTIONS in all), shuffled; each with a leading space."""
    pool: list[str] = []
    for w in wrong:
        if w != right and w not in pool:
            pool.append(w)
    options = [right] + pool[: N_OPTIONS - 1]
    order = list(range(len(options)))
    rng.shuffle(order)
    return [" " + options[i] for i in order], order.index(0)


# -- task builders ---------------------------------------------------------------------------------


@dataclass
class _Spec:
    """What one item puts into a haystack and asks: needle sentences at depths, the question, answers."""

    needles: list[tuple[float, str]]
    intro: str
    question: str
    prefix: str
    answers: list[str]
    right: str
    wrong: list[str]
    needle: str
    needle_ids: list[str]
    depth: float | None


def _niah_spec(task: str, draw: _Draw, depths: list[float], echo: bool) -> _Spec:
    intro = (
        "Some magic numbers are hidden in the text below, each tied to a name. Remember them: "
        "a question about them follows the text."
    )
    if task in ("niah_single", "niah_multikey"):
        key, value = draw.pair()
        pairs = [(key, value)]
        if task == "niah_multikey":
            pairs += [draw.pair(avoid_keys=[p[0] for p in pairs]) for _ in range(NEEDLES_MULTI - 1)]
            wrong = [v for _, v in pairs[1:]]
        else:
            wrong = [draw.fresh_value() for _ in range(N_OPTIONS - 1)]
        sentences = [_needle_sentence(k, v) for k, v in pairs]
        placed = list(zip(depths, sentences, strict=False))
        question = f"Which number does the text give for {key}?"
        return _Spec(
            placed,
            intro,
            question,
            _echo_prefix(key) if echo else "Answer:",
            [value],
            value,
            wrong,
            _needle_id(key, value),
            [_needle_id(k, v) for k, v in pairs],
            depths[0],
        )
    if task == "niah_multivalue":
        key, first = draw.pair()
        pairs = [(key, first)] + [draw.pair(key=key) for _ in range(NEEDLES_MULTI - 1)]
        placed = sorted(zip(depths, [_needle_sentence(k, v) for k, v in pairs], strict=False))
        values = [s.rsplit(" ", 1)[1].rstrip(".") for _, s in placed]  # in the order they appear
        right = ", ".join(values)
        wrong = []
        for pos in range(N_OPTIONS - 1):
            changed = list(values)
            changed[pos] = draw.fresh_value()
            wrong.append(", ".join(changed))
        question = f"Which numbers does the text give for {key}? List every one of them."
        ids = [_needle_id(k, v) for k, v in pairs]
        return _Spec(
            placed, intro, question, _echo_prefix(key) if echo else "Answer:", values, right, wrong,
            "+".join(ids), ids, placed[0][0],
        )  # fmt: skip
    # niah_multiquery: several keys, each with one value, all asked for
    pairs = []
    for _ in range(NEEDLES_MULTI):
        pairs.append(draw.pair(avoid_keys=[p[0] for p in pairs]))
    placed = list(zip(depths, [_needle_sentence(k, v) for k, v in pairs], strict=False))
    keys = [k for k, _ in pairs]
    values = [v for _, v in pairs]
    right = ", ".join(values)
    wrong = [", ".join(values[s:] + values[:s]) for s in range(1, N_OPTIONS)]  # right numbers, wrong keys
    question = (
        f"Which numbers does the text give for {', '.join(keys[:-1])} and {keys[-1]}? Give one for each, in that order."
    )
    ids = [_needle_id(k, v) for k, v in pairs]
    return _Spec(
        placed, intro, question, _echo_prefix(keys[0]) if echo else "Answer:", values, right, wrong,
        "+".join(ids), ids, depths[0],
    )  # fmt: skip


def _vt_spec(draw: _Draw, depths: list[float]) -> _Spec:
    chains: list[tuple[list[str], str]] = []
    while len(chains) < VT_CHAINS:
        names = [draw.word(5) for _ in range(VT_HOPS + 1)]
        value = str(draw.rng.randrange(10_000, 100_000))
        if value in draw.values or f"VAR {names[0]}={value}" in draw.used:
            continue
        draw.values.add(value)
        draw.used.add(f"VAR {names[0]}={value}")
        chains.append((names, value))
    placed: list[tuple[float, str]] = []
    per = VT_HOPS + 1
    for c, (names, value) in enumerate(chains):
        ds = sorted(depths[c * per : (c + 1) * per])
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(VT_HOPS)]
        placed += list(zip(ds, lines, strict=True))
    (names, value), (other, _) = chains[0], chains[1]
    right = ", ".join(names)
    wrong = [", ".join(other), ", ".join(names[:2] + other[2:]), ", ".join(names[:-1] + [other[-1]])]
    ids = [f"VAR {n[0]}={v}" for n, v in chains]
    return _Spec(
        placed,
        "The text below hides chains of variable assignments. Keep track of where each value goes.",
        f"Which variables end up holding the value {value}? Name all of them.",
        "Answer:",
        list(names),
        right,
        wrong,
        ids[0],
        ids,
        min(d for d, s in placed if s.startswith(f"VAR {names[0]} =")),
    )


def _vocabulary() -> list[str]:
    words = {w.lower() for p in shipped_text() for w in _WORD.findall(p) if len(w) >= 4}
    return sorted(words)


# -- the generator ---------------------------------------------------------------------------------


def _check_lengths(lengths: Sequence[int], max_length: int | None) -> list[int]:
    if isinstance(lengths, int):
        lengths = [lengths]
    out = []
    for length in lengths:
        if not is_whole(length) or length < MIN_LENGTH:
            raise OptionError(f"every length must be a whole number of tokens >= {MIN_LENGTH} (got {length!r})")
        if max_length is not None and length > max_length:
            raise OptionError(
                f"length {length} is above the model's limit of {max_length} tokens; use lengths up to {max_length}"
            )
        out.append(length)
    if not out:
        raise OptionError("no lengths given; pass at least one length in tokens, e.g. 4096")
    return out


def _model_limit(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10_000_000 else None


def _ids_of(items: Iterable[Any], name: str) -> list[str]:
    out: list[str] = []
    for item in items or ():
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if isinstance(value, list):
            out.extend(str(v) for v in value)
        elif value is not None:
            out.append(str(value))
    return out


def generate(
    task: str,
    tokenizer: Any,
    n: int = DEFAULT_ITEMS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    *,
    seed: int = 0,
    echo: bool = False,
    per_haystack: int = DEFAULT_PER_HAYSTACK,
    max_length: int | None = None,
    text_range: tuple[float, float] = (0.0, 1.0),
    exclude: Iterable[Any] | None = None,
) -> list[RulerItem]:
    """``n`` items of ``task`` (one of :data:`TASKS`), fitted to ``lengths`` tokens of ``tokenizer``.

    Items cycle through ``lengths``; ``per_haystack`` items in a row share one haystack (the same
    prose, each with its own needles at its own depths); ``common_words`` items each have their own
    word list. ``max_length`` is the model's limit (default: the tokenizer's ``model_max_length``);
    a length above it is an error. ``text_range`` is the share of the prose (by paragraph) the
    haystacks may use, so that sets made for selection, tuning and testing can read disjoint text;
    ``exclude`` (items or their dicts) lists sets whose needles, haystacks and prose paragraphs this
    one must avoid (a scan's corpus description, with ``needles``/``haystacks``/``paragraphs``, works too).
    The same arguments give the same items; another seed draws other needles.
    """
    if task not in TASKS:
        raise OptionError(f"unknown RULER-style task {task!r}; choose one of: {', '.join(TASKS)}")
    if not is_whole(n) or n < 1:
        raise OptionError(f"the number of items must be a whole number >= 1 (got {n!r})")
    if not is_whole(seed):
        raise OptionError(f"the seed must be a whole number (got {seed!r})")
    if not is_whole(per_haystack) or per_haystack < 1:
        raise OptionError(f"per_haystack must be a whole number >= 1 (got {per_haystack!r})")
    if echo and task not in ECHO_TASKS:
        raise OptionError(
            f"echo applies to tasks whose question can repeat a needle's wording ({', '.join(ECHO_TASKS)}), "
            f"not to {task}"
        )
    lo, hi = text_range
    if not (0.0 <= lo < hi <= 1.0):
        raise OptionError(f"text_range must be two fractions 0 <= start < end <= 1 (got {text_range!r})")
    limit = max_length if max_length is not None else _model_limit(tokenizer)
    lengths = _check_lengths(lengths, limit)
    count = _Counter(tokenizer)
    rng = random.Random(f"headmap-ruler-{task}-{seed}")
    exclude = list(exclude or ())
    draw = _Draw(rng, set(_ids_of(exclude, "needles")))
    avoid_haystacks = set(_ids_of(exclude, "haystack"))
    if task == "common_words":
        items = _common_words(count, rng, draw, n, lengths, seed, avoid_haystacks)
    else:
        avoid_paragraphs = {int(p) for p in _ids_of(exclude, "paragraphs")}
        prose = _Prose.load((lo, hi), avoid_paragraphs)
        items = _from_prose(task, count, prose, rng, draw, n, lengths, seed, echo, per_haystack, avoid_haystacks)
    by_haystack: dict[str, list[str]] = {}
    for item in items:
        by_haystack.setdefault(item.haystack, []).append(item.id)
    for item in items:
        item.shares_haystack = [i for i in by_haystack[item.haystack] if i != item.id]
    return items


def _item_id(task: str, seed: int, k: int, item: RulerItem) -> str:
    """``task-sSEED-NNNNN-DIGEST``: the digest of the context tells apart items of sets made with the
    same seed but other options (``text_range``, ``exclude``), so ids are shared only by identical items."""
    digest = hashlib.sha1(item.context.encode("utf-8")).hexdigest()[:6]
    return f"{task}-s{seed}-{k:05d}-{digest}"


def _prompt(intro: str, body: str, question: str, prefix: str) -> str:
    return f"{intro}\n\n{body}\n\nQuestion: {question}\n{prefix}"


def _from_prose(
    task: str,
    count: _Counter,
    prose: _Prose,
    rng: random.Random,
    draw: _Draw,
    n: int,
    lengths: list[int],
    seed: int,
    echo: bool,
    per_haystack: int,
    avoid: set[str],
) -> list[RulerItem]:
    items: list[RulerItem] = []
    sample = prose.words[:3000]
    words_per_token = len(sample) / max(count(" ".join(sample), special=False), 1)
    starts = prose.starts()
    fresh: dict[int, list[int]] = {}  # per length: starts not used yet, in a seeded order
    group = 0
    while len(items) < n:
        length = lengths[group % len(lengths)]
        group += 1
        start = _next_start(fresh.setdefault(length, []), starts, length, rng, avoid)
        haystack = f"prose:w{start}:L{length}"
        estimate: int | None = None
        for _ in range(per_haystack):
            if len(items) >= n:
                break
            k = len(items)
            if task == "qa":
                item, estimate = _qa_item(count, prose, rng, draw, start, length, estimate, echo, words_per_token)
            else:
                need = VT_CHAINS * (VT_HOPS + 1) if task == "variable_tracking" else NEEDLES_MULTI
                depths = rng.sample(DEPTHS, need)
                if task == "variable_tracking":
                    spec = _vt_spec(draw, depths)  # each chain's own depths are sorted when it is placed
                else:
                    spec = _niah_spec(task, draw, depths, echo)
                item, estimate = _haystack_item(count, prose, rng, spec, start, length, estimate, words_per_token)
            item.id = _item_id(task, seed, k, item)
            item.task = task
            item.haystack = item.cluster = haystack
            item.echo = echo
            item.seed = seed
            items.append(item)
    return items


def _next_start(queue: list[int], starts: list[int], length: int, rng: random.Random, avoid: set[str]) -> int:
    """A haystack start not used yet at this length and not excluded; once every start is used, they
    are used again (the items then share that haystack, and its cluster, with the earlier ones)."""
    if not queue:
        queue.extend(k for k in starts if f"prose:w{k}:L{length}" not in avoid)
        if not queue:
            raise OptionError("every haystack of this text range is excluded; widen text_range or exclude less")
        rng.shuffle(queue)
    return queue.pop()


def _haystack_item(
    count: _Counter,
    prose: _Prose,
    rng: random.Random,
    spec: _Spec,
    start: int,
    length: int,
    estimate: int | None,
    words_per_token: float,
) -> tuple[RulerItem, int]:
    options, answer = _options(rng, spec.right, spec.wrong)
    reserve = max(count(o, special=False) for o in options)
    budget = length - reserve

    def build(w: int) -> str:
        words, paras = prose.take(start, w)
        return _prompt(spec.intro, _with_needles(words, paras, spec.needles), spec.question, spec.prefix)

    guess = estimate if estimate is not None else int(budget * words_per_token * 0.95)
    w, context, tokens = _fit(build, count, length, reserve, guess)
    _, paras = prose.take(start, w)
    item = RulerItem(
        id="",
        task="",
        context=context,
        question=spec.question,
        answers=list(spec.answers),
        options=options,
        answer=answer,
        length=tokens,
        target_length=length,
        cluster="",
        haystack="",
        needle=spec.needle,
        needles=list(spec.needle_ids),
        depth=spec.depth,
        paragraphs=sorted(set(paras)),
    )
    return item, w


def _trim(text: str, most: int) -> str:
    """``text`` cut after its last sentence that ends within ``most`` words (or at ``most`` words)."""
    words = text.split()
    if len(words) <= most:
        return text
    ends = [k + 1 for k, w in enumerate(words[:most]) if _SENTENCE_END.search(w)]
    return " ".join(words[: ends[-1] if ends and ends[-1] >= most // 3 else most])


def _documents(prose: _Prose, start: int, words: int) -> list[tuple[str, list[int]]]:
    """Documents from the paragraph of word ``start`` on, ``words`` words in all: whole paragraphs merged
    until QA_DOC_WORDS words, cut to QA_DOC_MAX_WORDS; the last one cut to what is left (dropped when
    that is under QA_MIN_WORDS)."""
    docs: list[tuple[str, list[int]]] = []
    p = prose.para[start]
    span = prose.last - prose.first
    total = 0
    while total < words:
        parts, used, have = [], [], 0
        while have < QA_DOC_WORDS:
            parts.append(prose.paragraphs[p])
            used.append(p)
            have += len(prose.paragraphs[p].split())
            p = prose.first + (p - prose.first + 1) % span
        text = _trim(" ".join(parts), QA_DOC_MAX_WORDS)
        size = len(text.split())
        if total + size > words:
            rest = words - total
            if rest < QA_MIN_WORDS:
                break
            text, size = " ".join(text.split()[:rest]), rest
        docs.append((text, used))
        total += size
    return docs


def _keyword(docs: list[str], gold: int, rng: random.Random, banned: set[str]) -> str | None:
    others: set[str] = set(banned)
    for i, d in enumerate(docs):
        if i != gold:
            others.update(w.lower() for w in _WORD.findall(d))
    unique = {w for w in _WORD.findall(docs[gold]) if w.lower() not in others}
    for shortest in (7, 5):  # longer words first: more likely a content word than a function word
        pool = sorted(w for w in unique if len(w) >= shortest)
        if pool:
            return rng.choice(pool)
    return None


def _qa_item(
    count: _Counter,
    prose: _Prose,
    rng: random.Random,
    draw: _Draw,
    start: int,
    length: int,
    estimate: int | None,
    echo: bool,
    words_per_token: float,
) -> tuple[RulerItem, int]:
    intro = "Numbered documents follow. Read them: a question about one of them comes after the last."
    depth = rng.choice(DEPTHS)
    holder: dict[str, Any] = {}

    def build(words: int) -> str:
        docs = _documents(prose, start, words)
        ndocs = len(docs)
        gold = min(ndocs - 1, int(round(depth * (ndocs - 1))))
        para = docs[gold][1][0]
        banned = {u.split(":", 2)[2] for u in draw.used if u.startswith(f"qa:p{para}:")}
        kw = _keyword([d for d, _ in docs], gold, random.Random(f"{seed_word}-{words}"), banned)
        if kw is None:
            kw = "?"
        question = f'In which document does the word "{kw}" occur?'
        prefix = f'Answer: The word "{kw}" occurs in Document' if echo else "Answer:"
        body = "\n\n".join(f"Document {i + 1}: {d}" for i, (d, _) in enumerate(docs))
        holder[words] = (docs, gold, kw, question, prefix)
        return _prompt(intro, body, question, prefix)

    seed_word = rng.random()
    reserve = count(" Document 999", special=False)
    budget = length - reserve
    smallest = QA_DOC_MAX_WORDS + QA_MIN_WORDS  # two documents at least
    guess = estimate if estimate is not None else max(smallest, int(budget * words_per_token * 0.9))
    words, context, tokens = _fit(build, count, length, reserve, guess, smallest=smallest)
    docs, gold, kw, question, prefix = holder[words]
    if kw == "?":
        raise OptionError("could not find a word unique to one document; use a longer length or another seed")
    needle = f"qa:p{docs[gold][1][0]}:{kw.lower()}"
    draw.used.add(needle)
    labels = [str(i + 1) for i in range(len(docs))]
    right = labels[gold]
    near = [labels[j] for j in sorted(range(len(docs)), key=lambda j: (abs(j - gold), j)) if j != gold]
    wrong = near[: N_OPTIONS - 1]
    if echo:
        options, answer = _options(rng, right, wrong)
        answers = [right]
    else:
        options, answer = _options(rng, f"Document {right}", [f"Document {w}" for w in wrong])
        answers = [f"Document {right}"]
    item = RulerItem(
        id="",
        task="",
        context=context,
        question=question,
        answers=answers,
        options=options,
        answer=answer,
        length=tokens,
        target_length=length,
        cluster="",
        haystack="",
        needle=needle,
        needles=[needle],
        depth=round(gold / max(len(docs) - 1, 1), 4),
        paragraphs=sorted({p for _, used in docs for p in used}),
    )
    return item, words


def _cwe_frequencies(length: int) -> tuple[int, int]:
    """How often a common and a rare word occur: RULER's 30 and 3 from 4K tokens, 6 and 1 below; 3 and 1
    below 512 tokens, where 60 entries of common words would not fit."""
    if length >= 4096:
        return 30, 3
    return (6, 1) if length >= 512 else (3, 1)


def _common_words(
    count: _Counter, rng: random.Random, draw: _Draw, n: int, lengths: list[int], seed: int, avoid: set[str]
) -> list[RulerItem]:
    vocab = _vocabulary()
    intro = "A numbered list of words follows. A few of the words occur much more often than the others."
    question = f"Which {CWE_COMMON} words occur most often in the list?"
    items: list[RulerItem] = []
    estimate: int | None = None
    while len(items) < n:
        k = len(items)
        length = lengths[k % len(lengths)]
        f_common, f_rare = _cwe_frequencies(length)
        order = list(vocab)
        rng.shuffle(order)
        while "cw:" + "+".join(sorted(order[:CWE_COMMON])) in draw.used:
            rng.shuffle(order)
        common, rare_pool = order[:CWE_COMMON], order[CWE_COMMON:]
        shuffle_seed = rng.random()

        def build(u: int, common=common, rare_pool=rare_pool, f_common=f_common, f_rare=f_rare, s=shuffle_seed) -> str:
            listed = common * f_common + rare_pool[:u] * f_rare
            random.Random(s).shuffle(listed)
            body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
            return _prompt(intro, body, question, "Answer:")

        right = ", ".join(sorted(common))
        wrong = []
        for j in range(N_OPTIONS - 1):
            changed = sorted(common)
            changed[3 * j % CWE_COMMON] = rare_pool[j]
            changed[(3 * j + 5) % CWE_COMMON] = rare_pool[N_OPTIONS + j]
            wrong.append(", ".join(changed))
        options, answer = _options(rng, right, wrong)
        reserve = max(count(o, special=False) for o in options)
        guess = estimate if estimate is not None and lengths[0] == length else max(0, (length - reserve) // 12)
        u, context, tokens = _fit(build, count, length, reserve, guess)
        if u >= len(rare_pool):
            raise OptionError(
                f"length {length} needs more distinct words than the shipped prose has; use a shorter length"
            )
        estimate = u
        digest = hashlib.sha1(context.encode("utf-8")).hexdigest()[:12]
        haystack = f"words:{digest}"
        avoid.add(haystack)
        needle = "cw:" + "+".join(sorted(common))
        draw.used.add(needle)
        items.append(
            RulerItem(
                id="",
                task="common_words",
                context=context,
                question=question,
                answers=list(common),
                options=options,
                answer=answer,
                length=tokens,
                target_length=length,
                cluster=haystack,
                haystack=haystack,
                needle=needle,
                needles=[needle],
                seed=seed,
            )
        )
        items[-1].id = _item_id("common_words", seed, k, items[-1])
    return items


# -- files -----------------------------------------------------------------------------------------


def write_jsonl(items: Iterable[RulerItem | dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, as the task files ``headmap eval --task FILE`` reads; written whole or not at all."""
    path = Path(path)
    lines = [json.dumps(i.to_dict() if isinstance(i, RulerItem) else dict(i), ensure_ascii=False) for i in items]
    if not lines:
        raise OptionError("no items to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The items of a JSONL file written by :func:`write_jsonl` (as dicts)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TaskError(f"task file {path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"task file {path}, line {number}: a JSON object is needed")
        out.append(obj)
    return out


# -- held-out checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """What two item sets share: item ids, needle ids, haystack ids, and prose paragraphs."""

    items: frozenset[str]
    needles: frozenset[str]
    haystacks: frozenset[str]
    paragraphs: frozenset[int]

    @property
    def disjoint(self) -> bool:
        """No shared item, needle or haystack (text is :attr:`text_disjoint`)."""
        return not (self.items or self.needles or self.haystacks)

    @property
    def text_disjoint(self) -> bool:
        return not self.paragraphs

    def describe(self, limit: int = 5) -> str:
        """One line naming what is shared (at most ``limit`` of each kind), or that nothing is."""
        parts = []
        for name, values in (
            ("items", self.items),
            ("needles", self.needles),
            ("haystacks", self.haystacks),
            ("paragraphs", self.paragraphs),
        ):
            if values:
                shown = ", ".join(str(v) for v in sorted(values)[:limit])
                more = f" and {len(values) - limit} more" if len(values) > limit else ""
                parts.append(f"{len(values)} shared {name} ({shown}{more})")
        return "; ".join(parts) if parts else "disjoint: no shared item, needle, haystack or paragraph"


def _field_set(items: Iterable[Any], name: str, required: bool) -> set[str]:
    out: set[str] = set()
    for k, item in enumerate(items):
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if value is None:
            if required:
                which = item.get("id", k) if isinstance(item, dict) else getattr(item, "id", k)
                raise TaskError(
                    f"item {which!r} has no {name!r} field: the held-out check compares items by their needles and "
                    "haystacks; generate the items with headmap.evaluation.ruler"
                )
            continue
        out.update(str(v) for v in value) if isinstance(value, list) else out.add(str(value))
    return out


def overlap(a: Iterable[Any], b: Iterable[Any]) -> Overlap:
    """What item sets ``a`` and ``b`` (RulerItems or their dicts) share, by cluster: needles (every
    needle in a context, distractors included), haystacks, item ids and prose paragraphs."""
    a, b = list(a), list(b)
    if not a or not b:
        raise OptionError("the overlap check needs two non-empty item sets")

    def needles(items: list[Any]) -> set[str]:
        have = _field_set(items, "needles", required=False)
        return have | _field_set(items, "needle", required=True)

    def paragraphs(items: list[Any]) -> set[int]:
        return {int(p) for p in _field_set(items, "paragraphs", required=False)}

    return Overlap(
        frozenset(_field_set(a, "id", False) & _field_set(b, "id", False)),
        frozenset(needles(a) & needles(b)),
        frozenset(_field_set(a, "haystack", True) & _field_set(b, "haystack", True)),
        frozenset(paragraphs(a) & paragraphs(b)),
    )


def summary(items: Sequence[RulerItem]) -> dict[str, Any]:
    """Counts a report can print beside the items: items, haystacks, needles, lengths."""
    return {
        "items": len(items),
        "haystacks": len({i.haystack for i in items}),
        "needles": len({i.needle for i in items}),
        "lengths": sorted({i.target_length for i in items}),
        "mean_tokens": math.fsum(i.length for i in items) / max(len(items), 1),
    }
