"""A small CLIP-style BPE vocabulary for the embedded tiny SDXL, generated from code.

Laid out like CLIP's own ``vocab.json``: the 256 byte-level characters (``bytes_to_unicode``),
the same 256 with ``</w>`` (end of word), one token per merge, then ``<|startoftext|>`` and
``<|endoftext|>`` last. So ``"!"`` is id 0 (SDXL's ``tokenizer_2`` pads with it) and the end token
has the highest id, as in CLIP. Merges are learned here the way BPE training adds them: for each
word in ``WORDS``, in order, the pieces left after the existing merges are joined left to right,
so every listed word encodes to one whole-word token and any other word falls back to smaller pieces.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words that tiny-model prompts, captions and tests use. Order matters (it fixes the merge ranks);
# append new words at the end so existing ids stay put.
WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "at",
    "by",
    "for",
    "from",
    "to",
    "is",
    "photo",
    "picture",
    "image",
    "painting",
    "drawing",
    "render",
    "portrait",
    "style",
    "art",
    "sks",
    "toy",
    "robot",
    "dog",
    "cat",
    "pet",
    "person",
    "man",
    "woman",
    "face",
    "car",
    "house",
    "table",
    "figure",
    "object",
    "product",
    "subject",
    "beach",
    "snow",
    "forest",
    "city",
    "street",
    "park",
    "room",
    "studio",
    "background",
    "garden",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "pink",
    "purple",
    "brown",
    "wooden",
    "plastic",
    "metal",
    "small",
    "big",
    "cute",
    "close",
    "up",
    "shot",
    "view",
    "high",
    "quality",
    "low",
    "blurry",
    "ugly",
    "beautiful",
    "detailed",
    "sharp",
    "sitting",
    "standing",
    "lying",
    "running",
    # the toy world (dora_diffusion.world)
    "duck",
    "teddy",
    "bear",
    "rocket",
    "ball",
    "block",
    "teal",
    "grass",
    "carpet",
    "checkered",
    "floor",
    "heart",
    "star",
    "square",
    "circle",
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Encode one word (already byte-level characters) with CLIP's BPE rule: lowest rank first."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = set(pairwise(pieces))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks) + 1))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary (token -> id) and the ranked merges, deterministic."""
    base = list(bytes_to_unicode().values())
    tokens = base + [char + "</w>" for char in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_chars = bytes_to_unicode()
    for word in WORDS:
        encoded = "".join(byte_chars[b] for b in word.encode("utf-8"))
        pieces = _bpe(encoded, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    # A merge can rebuild a token that already exists; keep the first id (as a dict does).
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def write_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's file format) into ``folder``; return it."""
    vocab, merges = vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2 - tiny vocabulary written by dora_diffusion"]
    lines += [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
