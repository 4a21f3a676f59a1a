"""Deterministic, offline tiny tokenizers wrapped in the real ``transformers`` classes.

The Hub is unreachable in tests and the ``tokenizers`` trainers break ties in hash order (their output
changes between runs), so vocabularies here are *constructed*: a full byte alphabet plus one token per
pre-token of a fixed word corpus. Everything round-trips through ``save_pretrained`` /
``from_pretrained`` (transformers 5 writes ``tokenizer.json`` + ``tokenizer_config.json``).

BPE construction (CLIP, Qwen2): for each corpus pre-token, in order, simulate BPE with the merges so
far; while it is not a single token, *append* a merge joining its first two pieces. Appended merges
have the lowest priority, so they only fire once no earlier merge applies; a pre-token that already
became one token never reaches such a state, hence earlier words are never broken by later ones.
Every corpus pre-token is thus exactly one token, and unknown text falls back to smaller pieces and,
at worst, single bytes (never an error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

from transformers import AddedToken, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "QWEN2_SPECIAL_TOKENS",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_qwen2_tokenizer",
]

# Words of typical test prompts; anything else still tokenizes (as smaller pieces / bytes / <unk>).
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """a an the of on in at with and or to by from into onto over under near next behind above below
    is are it its this that there his her their my your make turn change add remove replace keep put
    cat cats dog dogs bird horse fish man woman person people girl boy child astronaut robot car house
    tree trees flower flowers mountain mountains river lake sea ocean beach sky cloud clouds sun moon
    star stars city street road forest field garden room table chair window door book cup hat shirt
    circle circles square squares triangle rectangle shape shapes line lines dot dots stripe stripes
    red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
    background foreground left right top bottom middle center corner edge side front back
    small large big tiny huge little tall short long wide bright dark light colorful shiny
    photo photograph picture image painting drawing sketch render video frame scene style portrait
    realistic cinematic detailed high quality resolution sharp blurry soft simple plain
    sitting standing walking running riding flying swimming jumping playing holding wearing looking
    day night morning evening sunset sunrise rain snow water fire grass sand stone wood glass metal
    one two three four five six seven eight nine ten text word letter number sign logo
    hello world test prompt negative empty""".split()
)

# Qwen2 / Qwen2.5-VL special tokens, in the real tokenizer's id order (151643 ... 151656).
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_PUNCT = list(",.!?:;'\"()-")


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2 byte -> printable-unicode table (``bytes_to_unicode``), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _apply_merges(symbols: Sequence[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as ``tokenizers`` does it: repeatedly merge the lowest-rank adjacent pair (leftmost on ties)."""
    pieces = list(symbols)
    while len(pieces) > 1:
        best = None
        for i in range(len(pieces) - 1):
            r = ranks.get((pieces[i], pieces[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _build_bpe(words: Iterable[Sequence[str]], alphabet: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab + merges under which every word (a symbol sequence) is exactly one token (see module doc)."""
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _apply_merges(symbols, ranks)
    return vocab, merges


def _pretokens(tokenizer, texts: Iterable[str]) -> list[str]:
    """Unique pre-tokens (first-seen order) of ``texts`` under ``tokenizer``'s own normalizer/pre-tokenizer."""
    backend = tokenizer.backend_tokenizer
    seen: dict[str, None] = {}
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            seen.setdefault(piece, None)
    return list(seen)


def _word_variants(words: Iterable[str]) -> list[str]:
    """Each word bare, space-prefixed and capitalised (byte-level BPE keeps the leading space)."""
    out = []
    for w in words:
        for v in (w, w.capitalize()):
            out += [v, " " + v]
    return out


def _default_corpus(words: Sequence[str] | None) -> list[str]:
    words = list(DEFAULT_WORDS if words is None else words)
    return _word_variants(words) + [str(d) for d in range(10)] + _PUNCT + [" " + p for p in _PUNCT]


# --------------------------------------------------------------------------------------------- CLIP
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer(words: Sequence[str] | None = None, pad_token: str = CLIP_EOS) -> CLIPTokenizer:
    """A tiny real ``CLIPTokenizer``: byte-level BPE with ``</w>`` word ends, lower-casing, max length 77.

    Vocab layout mirrors OpenAI CLIP: 256 bytes, 256 bytes + ``</w>``, merged words, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last, so ``eos_token_id == len(tokenizer) - 1``.
    Padding defaults to the eos token (as in ``openai/clip-vit-large-patch14``). A tiny
    ``CLIPTextConfig`` must use ``eos_token_id=tokenizer.eos_token_id``: the pooled output is read at
    the first eos position.
    """
    alphabet = list(_byte_alphabet())
    alphabet += [c + "</w>" for c in alphabet]
    probe = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[])
    pretoks = _pretokens(probe, _default_corpus(words))
    vocab, merges = _build_bpe(([*p[:-1], p[-1] + "</w>"] for p in pretoks), alphabet)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=77,
        do_lower_case=True,
    )


# ----------------------------------------------------------------------------------------------- T5
def tiny_t5_tokenizer(words: Sequence[str] | None = None) -> T5Tokenizer:
    """A tiny real ``T5Tokenizer`` (Unigram, SentencePiece layout): ``<pad>``=0, ``</s>``=1, ``<unk>``=2.

    Pieces: ``▁``, every printable ASCII character (bare and ``▁``-prefixed) and every word (bare,
    ``▁``-prefixed, lower-case and capitalised). Word pieces score far above character spellings, so
    known words are one token; unknown words split into characters; non-ASCII characters become
    ``<unk>``. Works for T5 (FLUX) and UMT5 (Wan) encoders alike; no sentinel ``<extra_id_*>`` tokens.
    """
    words = list(DEFAULT_WORDS if words is None else words)
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for c in map(chr, range(33, 127)):
        pieces.setdefault("▁" + c, -9.0)
        pieces.setdefault(c, -10.0)
    for w in words:
        for v in (w, w.capitalize()):
            pieces.setdefault("▁" + v, -3.0)
            pieces.setdefault(v, -4.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------------------------- Qwen2
def _qwen2_corpus(words: Sequence[str] | None, texts: Sequence[str]) -> list[str]:
    """Text segments (between special tokens): ``texts`` (a family's templates), chat-turn pieces, the words."""
    segments = list(texts) + ["\n", "user\n", "assistant\n", "Picture 1: ", "Picture 2: ", "Picture 3: "]
    return segments + _default_corpus(words)


def tiny_qwen2_tokenizer(words: Sequence[str] | None = None, texts: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A tiny real ``Qwen2Tokenizer``: byte-level BPE + Qwen special tokens as (special) added tokens.

    Every pre-token of ``texts`` is one token, so a family's templated prefixes can have the real
    tokenizer's lengths (the Qwen plugin's ``diffcore_qwen.testing.tiny_qwen_image_tokenizer`` passes its
    system prompts). Special tokens follow the BPE vocab in the real order (``QWEN2_SPECIAL_TOKENS``); eos
    is ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk (as Qwen2.5-VL).
    """
    probe = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    pretoks = _pretokens(probe, _qwen2_corpus(words, texts))
    vocab, merges = _build_bpe((list(p) for p in pretoks), _byte_alphabet())
    for tok in QWEN2_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    return tokenizer
