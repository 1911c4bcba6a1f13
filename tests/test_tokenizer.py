"""What this proves about tokenizer.py (run: python -m pytest tests/test_tokenizer.py): the byte
tokenizer's ids; CLIP's tokenizer gives OpenAI's ids for known captions, agrees with an
independent merge-by-rank BPE, round-trips text, and cuts long captions keeping EOT.
"""
import gzip
import os

import pytest
import torch

import data
from conftest import ROOT

BYTE = data.ByteTokenizer()

def test_byte_tokenizer_ids_padding_and_cut():
    ids = BYTE(['a cat'], 8)
    assert ids.tolist() == [
        [257, 98, 33, 100, 98, 117, 258, 0]
    ]  # SOT, 'a'+1, ' '+1, 'c'+1, ..., EOT, pad
    cut = BYTE(['abcdefgh', 'é'], 5)
    assert cut.tolist() == [[257, 98, 99, 100, 258], [257, 0xc3 + 1, 0xa9 + 1, 258, 0]]
    assert (cut.argmax(dim=1) == torch.tensor([4, 3])).all()       # the text tower pools at EOT
    assert BYTE.decode(BYTE(['a  photo\nof é'], 32)[0]) == 'a photo of é'
    assert BYTE.vocab_size == 259 and cut.dtype == torch.long
    with pytest.raises(ValueError, match='context_length'):
        BYTE(['a'], 1)


@pytest.fixture(scope='module')
def clip():
    return data.ClipTokenizer()


def test_clip_tokenizer_known_ids(clip):
    ids = clip(['a photo of a cat.', 'a diagram', 'a dog', 'a cat', 'Hello World!'], 12)
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0, 0, 0]
    assert ids[1, :4].tolist() == [49406, 320, 22697, 49407]
    assert ids[2, :4].tolist() == [49406, 320, 1929, 49407]
    assert ids[3, :4].tolist() == [49406, 320, 2368, 49407]
    assert ids[4, :5].tolist() == [49406, 3306, 1002, 256, 49407]
    # lower-cased; html entities and curly quotes cleaned as CLIP's ftfy + html step does
    assert clip.encode('A PHOTO OF A CAT.') == clip.encode('a photo of a cat.')
    assert clip.encode('fish &amp; chips') == clip.encode('fish & chips')
    assert clip.encode('it\u2019s') == clip.encode("it's")


def test_clip_pretokenizer_splits_like_clip(clip):
    def pieces(text):
        return [clip.tokens[i] for i in clip.encode(text)]
    assert pieces("it's 2024!") == ['it</w>', "'s</w>", '2</w>', '0</w>', '2</w>', '4</w>', '!</w>']
    assert pieces('hi_there') == ['hi</w>', '_</w>', 'there</w>']
    assert (
        pieces('x\u00b2')[-1] == clip.tokens[clip.encode('\u00b2')[0]]
    )  # '²' is a number: its own word
    assert len(pieces('x\u00b2')) == 2
    assert pieces('a  b\n\tc') == ['a</w>', 'b</w>', 'c</w>']


def reference_bpe(word, merges):
    """Apply the merges in rank order, each everywhere it occurs: the same result as CLIP's
    'merge the lowest-ranked pair present' loop, computed the slow, obvious way."""
    parts = list(word[:-1]) + [word[-1] + '</w>']
    for a, b in merges:
        i = 0
        while i < len(parts) - 1:
            if parts[i] == a and parts[i + 1] == b:
                parts[i:i + 2] = [a + b]
            i += 1
    return parts


def test_clip_bpe_matches_merge_by_rank_reference(clip):
    with gzip.open(
        os.path.join(ROOT, 'data', 'bpe_simple_vocab_16e6.txt.gz'), 'rt', encoding='utf-8'
    ) as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')[1:48895]]
    for word in [
        'unbelievably',
        'tokenization',
        'photograph',
        'llip',
        'xylophones',
        'caf\u00e9',
        'zzzzzz',
        'aaaaaaa',
    ]:
        chars = ''.join(clip.byte_char[b] for b in word.encode('utf-8'))
        expected = reference_bpe(chars, merges)
        assert [clip.tokens[i] for i in clip.encode(word)] == expected, word


def test_clip_round_trip_and_cut(clip):
    for text in [
        'a red circle left of a blue square',
        'über café, naïve résumé',
        '東京タワー at night 🌃',
        'numbers 3.14 and 1,000,000',
        "don't stop-believin'!",
    ]:
        ids = clip([text], 77)[0]
        assert clip.decode(ids).replace(' ', '') == text.lower().replace(' ', '')
        assert (
            ids.argmax().item() == (ids != 0).sum().item() - 1
        )  # EOT is the largest id, last non-pad
    long = clip(['word ' * 200], 77)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()


def test_tokenize_dispatch_and_cache(clip):
    assert torch.equal(data.tokenize(['a cat'], 10, 'byte'), BYTE(['a cat'], 10))
    assert torch.equal(data.tokenize(['a cat'], 10, 'clip'), clip(['a cat'], 10))
    with pytest.raises(TypeError, match='tokenizer'):   # no default: the model's must be named
        data.tokenize(['a cat'], 10)
    assert data.get_tokenizer('clip') is data.get_tokenizer('clip')
    with pytest.raises(ValueError, match="'bpe'"):
        data.tokenize(['a'], 10, 'bpe')
