"""
Tokenizers for Llip's text tower: UTF-8 bytes (no vocabulary file), and CLIP's byte-level BPE,
which gives OpenAI's ids for ordinary text. data.py names them too (data.tokenize, ...).

    python -m pytest tests/test_data.py -k "tokenizer or clip" -q    # ids, round trips, cuts
"""
import functools
import gzip
import html
import itertools
import math
import os
import re
import unicodedata

import torch

CLIP_BPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'data', 'bpe_simple_vocab_16e6.txt.gz'
)


# ----------------------------------------------------------------------------- tokenizers
def _pack(rows, context_length, sot, eot):
    """Token id lists -> LongTensor (N, context_length): SOT, ids, EOT, zero padding. A row
    that is too long is cut and still ends with EOT, which the text tower pools at."""
    if context_length < 2:
        raise ValueError(
            f"context_length={context_length}: needs room for the start and end tokens (>= 2)"
        )
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = [sot] + ids[:context_length - 2] + [eot]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


class ByteTokenizer:
    """UTF-8 bytes, no vocabulary file: 0 = padding, byte b -> b + 1, 257 = SOT, 258 = EOT.
    EOT is the largest id, so argmax over a row finds it as it does for CLIP's tokenizer."""
    vocab_size, sot, eot = 259, 257, 258

    def encode(self, text, limit=None):
        """limit: at most that many ids, read from the first words only (a 1 GB caption is not
        joined whole to keep 75 bytes)."""
        if limit is None:
            return [b + 1 for b in ' '.join(text.split()).encode('utf-8')]
        kept = bytearray()
        for word in re.finditer(r'\S+', text):   # \S: what str.split() keeps
            kept += (b' ' if kept else b'') + word.group().encode('utf-8')
            if len(kept) >= limit:
                break
        return [b + 1 for b in kept[:limit]]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode('utf-8', errors='replace')

    def __call__(self, texts, context_length):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([self.encode(t, context_length - 2) for t in texts], context_length, self.sot,
                     self.eot)


# ftfy, which CLIP runs first, also straightens quotes, undoes ligatures and full-width forms
# and applies NFC; we do those (so "it’s" tokenizes as CLIP does) but not its mojibake repair.
_FTFY_LITE = str.maketrans(
    {
        **{c: "'" for c in '\u02bc\u2018\u2019\u201a\u201b'},
        **{c: '"' for c in '\u201c\u201d\u201e\u201f'},
        '\ufb00': 'ff',
        '\ufb01': 'fi',
        '\ufb02': 'fl',
        '\ufb03': 'ffi',
        '\ufb04': 'ffl',
        '\ufb06': 'st',
        '\u3000': ' ',
        **{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)},
    }
)
# CLIP's pre-tokenizer is r"'s|'t|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+" from the `regex` package.
# In `re`: [^\W\d_] is letters plus the non-decimal numbers (No, Nl: '²', '½', 'Ⅻ'), which
# _words splits off afterwards; (?:[^\s\w]|_) is "neither space nor letter nor number".
_WORDS = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
    re.IGNORECASE,
)


def _words(text):
    for word in _WORDS.findall(text):
        if (
            word[0].isalnum() and not word.isalpha() and not word.isdecimal()
        ):  # letters mixed with '²'
            for is_number, chars in itertools.groupby(
                word, lambda c: unicodedata.category(c)[0] == 'N'
            ):
                yield from chars if is_number else [''.join(chars)]  # each number a word of its own
        else:
            yield word


class ClipTokenizer:
    """CLIP's byte-level BPE: 49,408 ids, SOT 49406, EOT 49407, lower-cased, padded with 0.
    Gives the ids of OpenAI's tokenizer for ordinary text (see _FTFY_LITE for the difference)."""
    vocab_size, sot, eot = 49408, 49406, 49407

    def __init__(self, vocab_path=None):
        path = vocab_path or CLIP_BPE
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"ClipTokenizer: no BPE vocabulary at {path} (expected CLIP's "
                f"bpe_simple_vocab_16e6.txt.gz; the repository ships one in data/)"
            )
        with gzip.open(path, 'rt', encoding='utf-8') as f:
            lines = f.read().split('\n')
        merges = [
            tuple(line.split()) for line in lines[1 : 1 + 49408 - 256 * 2 - 2]
        ]  # the first line is a header
        # Every byte gets a printable stand-in character so BPE works on str; the printable
        # ASCII/Latin-1 bytes stand for themselves and come first in the vocabulary.
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {
            b: chr(256 + n) for n, b in enumerate(others)
        }
        chars = list(self.byte_char.values())
        vocab = (
            chars
            + [c + '</w>' for c in chars]
            + [''.join(m) for m in merges]
            + ['<|startoftext|>', '<|endoftext|>']
        )
        assert (
            len(vocab) == self.vocab_size
        ), f"{path}: {len(vocab)} tokens, expected {self.vocab_size}"
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.tokens = vocab
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.longest = max(len(t.removesuffix('</w>')) for t in vocab)   # characters in a token
        self.cache = {}

    def bpe(self, word):
        """Word (as byte stand-in characters) -> list of vocabulary tokens: merge the adjacent
        pair with the lowest merge rank, everywhere it occurs, until no listed pair is left."""
        parts = list(word[:-1]) + [word[-1] + '</w>']
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.rank.get(p, math.inf))
            if pair not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text, limit=None):
        """limit: stop once that many ids are made (what the context keeps; BPE works on each
        word alone, so these are the first ids of the whole text), and BPE at most limit x the
        longest token's characters of a word: BPE takes time faster than linear in a word's
        length, and a 100 KB word without spaces is no language (its ids past the cut may
        differ from CLIP's)."""
        text = html.unescape(html.unescape(text))
        text = ' '.join(unicodedata.normalize('NFC', text).translate(_FTFY_LITE).split()).lower()
        ids = []
        for word in _words(text):
            if limit is not None:
                if len(ids) >= limit:
                    break
                word = word[:limit * self.longest]
            if word in ('<|startoftext|>', '<|endoftext|>'):
                ids.append(self.ids[word])
                continue
            if word not in self.cache:
                if len(self.cache) > 100_000:   # bounded: web captions have endless rare words
                    self.cache.clear()
                chars = ''.join(self.byte_char[b] for b in word.encode('utf-8'))
                self.cache[word] = [self.ids[t] for t in self.bpe(chars)]
            ids += self.cache[word]
        return ids

    def decode(self, ids):
        """Ids (a row of __call__'s output or encode's) -> the cleaned, lower-cased text."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eot)] if self.eot in ids else ids   # what follows EOT is padding
        text = ''.join(self.tokens[i] for i in ids if i != self.sot).replace('</w>', ' ')
        char_byte = {c: b for b, c in self.byte_char.items()} | {' ': 32}
        return bytes(char_byte[c] for c in text).decode('utf-8', errors='replace').strip()

    def __call__(self, texts, context_length):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([self.encode(t, context_length - 2) for t in texts], context_length, self.sot,
                     self.eot)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """'byte' or 'clip' (the values of LlipConfig.tokenizer) -> a shared tokenizer instance."""
    if name == 'byte':
        return ByteTokenizer()
    if name == 'clip':
        return ClipTokenizer()
    raise ValueError(f"tokenizer={name!r}: expected 'byte' or 'clip'")


def tokenize(texts, context_length, tokenizer):
    """list of str -> LongTensor (len(texts), context_length). tokenizer: 'byte', 'clip' or a
    tokenizer object (ClipTokenizer(path) with another vocabulary file). No default: the model's
    own (model.config.tokenizer, 'clip' for every preset) is the only right one, and tokens of
    the other are valid ids that give wrong scores in silence; llip.load returns it bound."""
    tok = tokenizer if callable(tokenizer) else get_tokenizer(tokenizer)
    return tok(texts, context_length)
