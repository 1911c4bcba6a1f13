"""
Data for Llip: the loader of WebDataset tar shards (reading the tars is shards.py, decoding
and transforming images images.py, the tokenizers tokenizer.py; data.tokenize,
data.ClipTokenizer, data.train_transform, ... name them as before). (The
built-in synthetic dataset, whose images each have several captions about different things,
is synthetic.py; it writes shards in the format read here.)

    python -m pytest tests/test_data.py -q    # what this file promises
    python bench_data.py                      # loader speed vs the webdataset library

Shards are what img2dataset writes: tar files whose members KEY.jpg|jpeg|png|webp and KEY.txt
(and optionally KEY.json) belong together. The caption is KEY.txt, or without one the "caption"
field of KEY.json (caption_key). For training, the whole text is one caption (a web caption may
hold a newline), except with caption_lines (the built-in synthetic data, COCO-style shards):
one caption per line, one of them drawn each time a sample is read (evaluation reads one caption
per line, as COCO-style retrieval sets hold several per image). With captions_per_image=C > 1
(train.py --captions_per_image) each image comes with C of its distinct captions, drawn without
replacement, and a batch's tokens are (B C, L), image-major: rows i C .. i C + C - 1 are image
i's. An image with fewer than C distinct captions gives all of them, then repeats them in the
same order until there are C (a repeat is still a positive of its own image in the loss). C is
not part of the saved position: the order of samples does not depend on it.

Shards are named by a brace pattern 'dir/{00000..09999}.tar', a list, a directory (every *.tar
in it) or 'pipe:COMMAND' (the tar comes from the command's stdout, e.g. 'pipe:aws s3 cp
s3://bucket/00001.tar -').

How ShardLoader orders samples, and why a resumed run continues exactly:
- the rank's DataLoader workers are "roles" 0..workers-1; role w of rank r is global worker
  g = r * workers + w of W = world_size * workers. Per epoch the shard list is shuffled with
  (seed, epoch) -- identically on every rank -- and global worker g reads shards g, g+W, ...
  (with fewer shards than W, every worker reads every shard and keeps every W-th sample), so
  in an epoch each sample is read by exactly one worker of one rank;
- a worker shuffles each shard's samples through a buffer (raw bytes, decoded on the way out)
  and makes its own batches; the random choices (the buffer's, the caption drawn, the crop)
  come from RNGs seeded by (seed, epoch, shard, worker / sample key), never from global state;
- torch's DataLoader hands out the workers' batches round robin: batch n comes from role
  n % workers. Each batch carries its role's position (epoch, shard index in its list, sample
  index in the shard's shuffled order). state_dict() holds the position of every role after
  the batches the trainer took, and which role is next; a new loader puts its worker 0 in that
  role's seat and each worker skips, without decoding, what its role had delivered. So batch
  n + 1 of a resumed run is batch n + 1 of the uninterrupted one (for resample=True; with
  resample=False the rest of the epoch still arrives exactly once, interleaved maybe otherwise).
  Resuming costs at most one shard read per worker: the buffer is emptied at each shard's end.
- on another number of ranks or workers (or another batch size), load_state_dict takes every
  saved rank's state: the saved workers' unread parts of each epoch they had begun (a shard, the
  first n of its shuffled order left out; or whole shards) are dealt to the new workers first,
  each read in its old order, then the next epoch is split the new way. So every sample of the
  interrupted epoch arrives exactly once, none replayed, none skipped.

Bad input never stops a run: a corrupt or truncated image, an image beyond the pixel budget
(images.MAX_PIXELS; a larger JPEG is decoded at reduced size instead), a sample without image,
caption or with an empty one, a caption that is not UTF-8, an image of an unknown extension
(.gif, ...), a truncated tar (also one cut inside a header; its samples before the damage are
kept) and a shard that cannot be opened (empty, not a tar) are skipped and counted in
ShardLoader.skipped, with one DataWarning per kind and a summary at the end of each epoch. A
worker whose share of an epoch is all bad goes on to the next epoch. A pattern that names no
file, and a dataset with no valid sample in a whole epoch, raise an error that quotes the
pattern and the first problem of each kind. (A tar cut exactly between two members looks
complete.)
"""

import functools
import io
import os
import random
import warnings

import torch

# images.py, shards.py and tokenizer.py hold the pieces; data.X names each of them as before
from images import (IMAGE_EXTENSIONS, MEAN, SHARD_IMAGE_KEYS, STD,  # noqa: F401
                    ImageTooLarge, eval_transform, open_image, random_resized_crop, to_rgb,
                    to_tensor, train_transform)
from shards import (DataWarning, _check, _shard_items, count_samples, expand_urls,  # noqa: F401
                    read_labelled_shards, read_shards)
from tokenizer import CLIP_BPE, ByteTokenizer, ClipTokenizer, get_tokenizer, tokenize  # noqa: F401


# ----------------------------------------------------------------------------- the loader
def _shuffled(items, size, rng):
    """Shuffle a stream through a buffer of `size` items; the buffer's random choices depend
    on rng alone, never on the items, so a replay with the same rng gives the same order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _pieces(epoch, g, workers, n_shards, seed, train, carry=None):
    """What global worker g of `workers` reads in `epoch`: a list of pieces (epoch, s, keep, n,
    g, skip), each shard s's samples j with j % n == keep (keep None: all of them), in the
    shuffled order of worker g's buffer, the first `skip` left out. Normally all pieces are of
    this epoch and this worker, with n = workers, skip = 0. The carried epoch of a run resumed
    on other ranks or workers (ShardLoader.load_state_dict) is the saved run's unread pieces
    instead, each keeping the epoch, worker and n that fixed its order, dealt round robin."""
    if carry is not None and epoch == carry[0]:
        return [tuple(piece) for piece in carry[1][g::workers]]
    order = list(range(n_shards))
    if train:
        random.Random(f'{seed}/shards/{epoch}').shuffle(order)   # the same on every rank
    if n_shards >= workers:
        return [(epoch, s, None, workers, g, 0) for s in order[g::workers]]
    # fewer shards than workers: every worker reads every shard, keeping every n-th sample; the
    # shard's place p staggers who starts
    return [(epoch, s, (g - p) % workers, workers, g, 0) for p, s in enumerate(order)]


def _unread(states, n_shards):
    """The pieces of a saved run (every rank's ShardLoader.state_dict()) that no rank delivered,
    in every epoch up to the latest any worker had reached: each worker's rest of its epoch,
    then its whole share of each later one. Returns (that epoch, pieces)."""
    workers = states[0]['world_size'] * states[0]['workers']
    carry = states[0].get('carry')
    last = max(p[0] for state in states for p in state['positions'])
    pieces = []
    for state in states:
        for role, (epoch0, k0, n0) in enumerate(state['positions']):
            g = state['rank'] * state['workers'] + role
            for epoch in range(epoch0, last + 1):
                share = _pieces(epoch, g, workers, n_shards, state['seed'], state['train'], carry)
                start = k0 if epoch == epoch0 else 0
                for k in range(start, len(share)):
                    piece = list(share[k])
                    if epoch == epoch0 and k == k0:
                        piece[5] = max(piece[5], n0)   # its first n0 were delivered
                    pieces.append(piece)
    return last, pieces


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's sample stream, run inside each DataLoader worker; it yields whole batches
    (images (B, 3, S, S), tokens (B, L), info) where info = {'role', 'position', 'problems',
    'empty_epoch'}. ShardLoader sets .start (per role: epoch, shard index, sample index) and
    .first_role. A worker whose share of an epoch holds no valid sample (a zero-byte shard where
    there are about as many shards as workers) yields an empty batch (images None) with
    empty_epoch = that epoch, and goes on: the DataLoader takes the workers' batches in turn and
    would wait for it forever. Whether the whole dataset is empty, ShardLoader decides."""

    def __init__(self, urls, pattern, batch_size, image_size, context_length, tokenizer, rank,
                 world_size, roles, seed, shuffle_buffer, resample, train, caption_lines=True,
                 caption_key='caption', captions_per_image=1):
        super().__init__()
        self.caption_lines, self.caption_key = caption_lines, caption_key
        self.captions_per_image = captions_per_image
        self.urls, self.pattern, self.batch_size, self.context_length = (
            urls,
            pattern,
            batch_size,
            context_length,
        )
        self.tokenizer, self.rank, self.world_size, self.roles, self.seed = (
            tokenizer,
            rank,
            world_size,
            roles,
            seed,
        )
        self.shuffle_buffer, self.resample, self.train, self.image_size = (
            shuffle_buffer,
            resample,
            train,
            image_size,
        )
        self.start, self.first_role = [(0, 0, 0)] * roles, 0
        self.carry = None   # (epoch, pieces): what a run on other ranks left of its epochs

    def shards_of(self, epoch, g):
        """The pieces global worker g reads in `epoch`, in order (see _pieces)."""
        return _pieces(epoch, g, self.world_size * self.roles, len(self.urls), self.seed,
                       self.train, self.carry)

    def items(self, piece):
        epoch, s, keep, n, g, _ = piece
        check = functools.partial(
            _check, caption_lines=self.caption_lines, caption_key=self.caption_key
        )
        items = (item for j, item in enumerate(_shard_items(self.urls[s], check=check))
                 if keep is None or j % n == keep)
        if self.train and self.shuffle_buffer > 1:
            items = _shuffled(
                items, self.shuffle_buffer, random.Random(f'{self.seed}/buffer/{epoch}/{s}/{g}')
            )
        return items

    def pick_captions(self, captions, rng):
        """The captions an image comes with: C = 1, one drawn (train) or the first; C > 1, C of
        its distinct ones, drawn without replacement (train) or the first C; with fewer than C,
        all of them, then again in the same order until C."""
        if self.captions_per_image == 1:
            return [rng.choice(captions) if self.train else captions[0]]
        distinct = list(dict.fromkeys(captions))
        if self.train:
            distinct = rng.sample(distinct, len(distinct))
        return [distinct[i % len(distinct)] for i in range(self.captions_per_image)]

    def decode(self, item, epoch, s, problems):
        """(image (3, S, S), its captions (a list of C)), or None after counting the problem."""
        problem, key, image_bytes, captions = item
        if problem is None:
            rng = random.Random(f'{self.seed}/{epoch}/{s}/{key}')   # this sample's caption and crop
            try:
                chosen = self.pick_captions(captions, rng)
                with open_image(io.BytesIO(image_bytes)) as im:
                    return self.transform(im, rng), chosen
            except ImageTooLarge as e:
                problem = ('image too large', f'{self.urls[s]}: {key}: {e}')
            except (
                Exception
            ) as e:  # PIL raises many kinds; one bad JPEG must not end a multi-day run
                problem = ('corrupt image', f'{self.urls[s]}: {key}: {type(e).__name__}: {e}')
        kind, detail = problem
        count, first = problems.get(kind, (0, detail))
        problems[kind] = (count + 1, first)
        return None

    def batch(self, samples, role, position, problems, empty_epoch=None):
        # default_collate stacks into shared memory when in a worker: no copy on the way to the
        # trainer
        images = (
            torch.utils.data.default_collate([x for x, _ in samples]) if samples else None
        )  # (B, 3, S, S)
        tokens = (
            tokenize([c for _, chosen in samples for c in chosen], self.context_length,
                     self.tokenizer)
            if samples
            else None
        )  # (B C, L), image-major
        return images, tokens, {'role': role, 'position': position, 'problems': problems,
                                'empty_epoch': empty_epoch}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # made here, not in __init__: a closure does not pickle, and spawned workers get a pickle
        self.transform = (train_transform if self.train else eval_transform)(self.image_size)
        role = ((info.id if info else 0) + self.first_role) % self.roles
        g = self.rank * self.roles + role
        epoch, k0, n0 = self.start[role]
        samples, problems = [], {}
        while True:
            shards, valid = self.shards_of(epoch, g), 0
            for k in range(k0, len(shards)):
                piece = shards[k]
                skip = max(piece[5], n0 if k == k0 else 0)
                for n, item in enumerate(self.items(piece), 1):
                    if n <= skip:
                        continue   # delivered before the resume: skipped, not decoded
                    sample = self.decode(item, piece[0], piece[1], problems)
                    if sample is None:
                        continue
                    valid += 1
                    samples.append(sample)
                    if len(samples) == self.batch_size:
                        yield self.batch(samples, role, (epoch, k, n), problems)
                        samples, problems = [], {}
            if not self.resample:
                break
            # a whole epoch with nothing to deliver: say so, and take the next one (the rest of
            # an epoch after a resume gave batches before the interruption, so it says nothing)
            carried = self.carry is not None and epoch == self.carry[0]   # maybe all read before
            if valid == 0 and not samples and (k0, n0) == (0, 0) and not carried:
                yield self.batch([], role, (epoch + 1, 0, 0), problems, epoch)
                problems = {}
            epoch, k0, n0 = epoch + 1, 0, 0
        if samples or problems:   # resample=False: the rest, and the count of what was skipped
            yield self.batch(samples, role, (epoch, len(shards), 0), problems)


# Epochs in a row in which a rank's workers find no valid sample before a rank of several that
# has never had a batch gives up (with one rank, one such epoch means an empty dataset).
EMPTY_EPOCHS = 10


class ShardLoader:
    """Batches (images (B, 3, S, S) float32, tokens (B C, L) int64) from WebDataset shards, for
    one rank: `for images, tokens in loader`; C = captions_per_image (default 1), C captions of
    each image in a row (module docstring; fewer distinct ones than C: repeated in order). See
    the module docstring for the order of samples; state_dict() / load_state_dict() resume
    exactly after the batches taken.

    urls: brace pattern, list or directory. workers: DataLoader processes (0: in this
    process, the same batches as 1). resample=True repeats epochs forever (training);
    False gives one epoch per `for` loop, the last batch of each worker possibly short.
    train=False: eval transform, first caption, shards in the given order, no shuffling.
    Skipped samples are counted by kind in .skipped; each kind warns once (DataWarning).
    caption_lines: True, each line of KEY.txt is a caption (one is drawn each time: the built-in
    data, COCO-style shards); False (default), the whole text is one caption, since web
    captions (img2dataset) may hold newlines. caption_key: the field of KEY.json read as the caption
    when a sample has no KEY.txt (None: never)."""

    def __init__(
        self,
        urls,
        batch_size,
        image_size,
        context_length,
        tokenizer='byte',
        rank=0,
        world_size=1,
        workers=2,
        seed=0,
        shuffle_buffer=1000,
        resample=True,
        train=True,
        caption_lines=False,
        caption_key='caption',
        captions_per_image=1,
    ):
        for name, value, low in (
            ('batch_size', batch_size, 1),
            ('image_size', image_size, 1),
            ('world_size', world_size, 1),
            ('workers', workers, 0),
            ('rank', rank, 0),
            ('shuffle_buffer', shuffle_buffer, 0),
            ('captions_per_image', captions_per_image, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShardLoader: {name}={value!r}, expected an integer >= {low}")
        if rank >= world_size:
            raise ValueError(f"ShardLoader: rank={rank} is not below world_size={world_size}")
        tokenize(
            [''], context_length, tokenizer
        )  # a bad name or vocabulary fails here, not in a worker
        self.urls = expand_urls(urls)
        self.pattern = urls if isinstance(urls, str) else str(urls)
        self.workers, self.roles = workers, max(workers, 1)
        self.caption_lines = caption_lines
        self.stream = _ShardStream(
            self.urls,
            self.pattern,
            batch_size,
            image_size,
            context_length,
            tokenizer,
            rank,
            world_size,
            self.roles,
            seed,
            shuffle_buffer,
            resample,
            train,
            self.caption_lines,
            caption_key,
            captions_per_image,
        )
        self.positions = [
            (0, 0, 0)
        ] * self.roles  # per role: (epoch, shard index, sample index) delivered
        self.next_role, self.batches, self.skipped, self._warned = 0, 0, {}, set()
        self._empty = {}   # epoch -> the roles that found no valid sample in all of it
        self._examples = {}   # kind -> the first skipped item's detail, for the error messages

    def _identity(self):
        s = self.stream
        return {
            'seed': s.seed,
            'rank': s.rank,
            'world_size': s.world_size,
            'workers': self.roles,
            'batch_size': s.batch_size,
            'shuffle_buffer': s.shuffle_buffer,
            'shards': len(self.urls),
            'resample': s.resample,
            'train': s.train,
        }

    def state_dict(self):
        """Plain Python values (fits torch.save and all_gather_object)."""
        carry = self.stream.carry
        carry = carry and [carry[0], [list(p) for p in carry[1]]]
        return {'batches': self.batches, 'positions': [list(p) for p in self.positions],
                'next_role': self.next_role, 'skipped': dict(self.skipped), 'carry': carry,
                **self._identity()}

    def load_state_dict(self, state):
        """Continue after the batches a saved loader delivered. `state`: this rank's state_dict(),
        or the list of every rank's. With the list, a run on another number of ranks, workers or
        another batch size continues too, each sample of the interrupted epoch delivered once:
        the samples no saved rank delivered, in every epoch that was begun, are shared out among
        this run's workers first (the carried epoch), then epochs go on with the new split."""
        states = state if isinstance(state, list) else [state]
        mine = states[self.stream.rank] if len(states) == self.stream.world_size else states[0]
        self.batches, self.skipped = mine['batches'], dict(mine['skipped'])
        changed = {k: (mine.get(k), v) for k, v in self._identity().items() if mine.get(k) != v}
        if not changed:
            self.positions = [tuple(p) for p in mine['positions']]
            self.next_role, self.stream.carry = mine['next_role'], mine.get('carry')
            return
        order = ('seed', 'shuffle_buffer', 'shards', 'train')   # what fixes the order of samples
        ranks = sorted(s['rank'] for s in states)
        if all(s.get(k) == mine.get(k) == self._identity()[k] for s in states for k in order) \
                and ranks == list(range(mine['world_size'])):
            epoch, pieces = _unread(states, len(self.urls))
            self.stream.carry = (epoch, pieces)
            self.positions, self.next_role = [(epoch, 0, 0)] * self.roles, 0
            # which batches the saved ranks had: counts for the messages, rank 0's alone
            self.batches = sum(s['batches'] for s in states)
            kinds = {k for s in states for k in s['skipped']}
            self.skipped = {} if self.stream.rank else \
                {k: sum(s['skipped'].get(k, 0) for s in states) for k in kinds}
            return
        epoch = min(p[0] for p in mine['positions'])
        what = changed if len(states) == 1 else 'the positions of only some ranks'
        warnings.warn(
            f"ShardLoader: the saved position is from other settings (saved vs now: "
            f"{what}); "
            f"exact resume is impossible, restarting epoch {epoch} from its beginning",
            DataWarning,
        )
        self.positions, self.next_role = [(epoch, 0, 0)] * self.roles, 0

    def _check_empty(self, role, epoch):
        """A worker found no valid sample in an epoch. One rank alone: every worker in the same
        epoch means the whole dataset, an error. Several ranks: the rank's share was empty, as
        may be by chance with about as many shards as workers; only a rank that has never had a
        batch, after EMPTY_EPOCHS such epochs, stops (the dataset has too few valid samples)."""
        self._empty.setdefault(epoch, set()).add(role)
        empty_epochs = sum(len(roles) == self.roles for roles in self._empty.values())
        world = self.stream.world_size
        if empty_epochs and (world == 1 or (self.batches == 0 and empty_epochs >= EMPTY_EPOCHS)):
            where = '' if world == 1 else (f" in the share of rank {self.stream.rank} of {world} "
                                           f"({EMPTY_EPOCHS} epochs)")
            raise ValueError(f"shards {self.pattern!r}: no valid sample in epoch {epoch}{where} "
                             f"({self._what_was_skipped()})")

    def _what_was_skipped(self):
        examples = '; '.join(f'{kind}: {detail}' for kind, detail in self._examples.items())
        return (
            f"skipped: {self.skipped}; first of each kind: {examples}"
            if self.skipped
            else 'nothing readable'
        )


    def _count(self, problems):
        for kind, (count, first) in problems.items():
            if kind not in self._warned:
                self._warned.add(kind)
                self._examples[kind] = first
                warnings.warn(f"shards {self.pattern!r}: skipping a sample: {kind}: {first} "
                              f"(further ones are counted in ShardLoader.skipped)", DataWarning)
            self.skipped[kind] = self.skipped.get(kind, 0) + count

    def __iter__(self):
        self.stream.start, self.stream.first_role = list(self.positions), self.next_role
        carry = self.stream.carry
        fresh = all(p[1:] == (0, 0) for p in self.positions) and \
            not (carry and min(p[0] for p in self.positions) == carry[0])
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available())
        epoch, delivered = min(p[0] for p in self.positions), 0
        for images, tokens, info in loader:
            self._count(info['problems'])
            if images is None and info['empty_epoch'] is None:
                continue   # the count of what was skipped at the end of a one-epoch pass
            self.positions[info['role']] = tuple(info['position'])
            self.next_role = (info['role'] + 1) % self.roles
            if images is None:
                self._check_empty(info['role'], info['empty_epoch'])
                continue
            self._empty.clear()
            self.batches += 1
            delivered += len(images)
            if (
                min(p[0] for p in self.positions) > epoch and self.skipped
            ):  # every role is past `epoch`
                warnings.warn(
                    f"shards {self.pattern!r}: epoch {epoch} done; skipped so far: {self.skipped}",
                    DataWarning,
                )
            epoch = min(p[0] for p in self.positions)
            yield images, tokens
        # only with resample=False: the epoch is over
        if delivered == 0 and fresh:
            raise ValueError(f"shards {self.pattern!r}: no valid sample in epoch {epoch} "
                             f"({self._what_was_skipped()})")
        if self.skipped:
            warnings.warn(
                f"shards {self.pattern!r}: epoch {epoch} done; skipped so far: {self.skipped}",
                DataWarning,
            )
        self.positions, self.next_role = [(epoch + 1, 0, 0)] * self.roles, 0
