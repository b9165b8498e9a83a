"""Synthetic self-instruct-like instruction corpora for the filter benchmarks.

Instructions are built from task verbs, function words and a Zipf-distributed content vocabulary (so a few
content words are very common, as in real generated data), and about a third of them are near-duplicates of an
earlier instruction (a few words dropped, inserted or replaced), which is what the ROUGE-L filter is for.
"""
from __future__ import annotations

import random

VERBS = ("write give list explain describe classify summarize generate create suggest identify rewrite translate "
         "find compare convert predict tell make design answer compose edit determine outline").split()
FUNCTION = "a an the of to in for on with about and or from by as that this your".split()
NOUNS = ("sentence paragraph story poem email list essay question answer example reason word number recipe plan "
         "title summary tweet review letter description").split()


def _word(rng: random.Random, i: int) -> str:
    syll = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "ne", "pi", "del", "qua", "zo", "ber", "ti", "gan"]
    r = random.Random(i)
    return "".join(r.choice(syll) for _ in range(r.randint(2, 4)))


def corpus(n: int, seed: int = 0, vocab: int = 20000, near_dup: float = 0.35) -> list[str]:
    rng = random.Random(seed)
    from itertools import accumulate

    cum = list(accumulate(1.0 / (r + 1) for r in range(vocab)))
    content = [_word(rng, i) for i in range(vocab)]
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < near_dup:
            toks = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                if op < 0.35 and len(toks) > 3:
                    toks.pop(rng.randrange(len(toks)))
                elif op < 0.7:
                    toks.insert(rng.randrange(len(toks) + 1), rng.choice(FUNCTION + content[:50]))
                else:
                    toks[rng.randrange(len(toks))] = rng.choices(content, cum_weights=cum)[0]
            out.append(" ".join(toks))
            continue
        words = [rng.choice(VERBS).capitalize(), rng.choice(FUNCTION), rng.choice(NOUNS)]
        for _ in range(rng.randint(3, 25)):
            words.append(rng.choice(FUNCTION) if rng.random() < 0.35 else rng.choices(content, cum_weights=cum)[0])
        out.append(" ".join(words) + rng.choice([".", "?", ":", ""]))
    return out


ENGLISH = ("the of and to a in is that for it as with was on be by this are or from at an not but have which "
           "you they we can will your what all their if there more when so about one also how would should into "
           "them these each other its may been than some could our only any out then just like such use where "
           "over most make new first well after two many very because between both those through while same").split()


def long_corpus(n: int, seed: int = 0, vocab: int = 30000, near_dup: float = 0.2) -> list[str]:
    """Longer prompts (ShareGPT / Dolly-like context + question, 20 to ~400 tokens, median ~90): about 45% function
    words from a fixed list of common English words (so unrelated prompts share many tokens and ROUGE-L between
    them is 0.2-0.4, as for real English), the rest from a Zipf content vocabulary; `near_dup` of them are edited
    copies of an earlier prompt (a few words dropped, inserted or replaced, or a sentence appended)."""
    rng = random.Random(seed)
    from itertools import accumulate

    cum = list(accumulate(1.0 / (r + 1) for r in range(vocab)))
    fcum = list(accumulate(1.0 / (r + 1) ** 0.7 for r in range(len(ENGLISH))))
    content = [_word(rng, i) for i in range(vocab)]

    def sentence() -> list[str]:
        return [rng.choices(ENGLISH, cum_weights=fcum)[0] if rng.random() < 0.45
                else rng.choices(content, cum_weights=cum)[0] for _ in range(rng.randint(6, 24))]

    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < near_dup:
            toks = rng.choice(out).split()
            for _ in range(rng.randint(1, 8)):
                op = rng.random()
                if op < 0.3 and len(toks) > 3:
                    toks.pop(rng.randrange(len(toks)))
                elif op < 0.6:
                    toks.insert(rng.randrange(len(toks) + 1), rng.choice(ENGLISH[:30]))
                elif op < 0.9:
                    toks[rng.randrange(len(toks))] = rng.choices(content, cum_weights=cum)[0]
                else:
                    toks += sentence()
            out.append(" ".join(toks))
            continue
        words = [rng.choice(VERBS).capitalize(), rng.choice(FUNCTION), rng.choice(NOUNS)]
        for _ in range(min(20, max(1, int(rng.lognormvariate(1.3, 0.7))))):
            words += sentence()
        out.append(" ".join(words) + rng.choice([".", "?", ":", ""]))
    return out
