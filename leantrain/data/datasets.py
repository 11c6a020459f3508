"""Batches: packed pretraining windows and padded SFT samples, in a seeded, resumable order."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from leantrain.errors import DataError
from leantrain.precision import IGNORE_INDEX

from .corpus import _read_jsonl, eval_count, load_documents, split_documents
from .tokenizer import Tokenizer, _encode_many

# --------------------------------------------------------------------------------------------
# Order and resumable state (shared by all dataset kinds)
# --------------------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFFFFFFFFFFFFFF)


class _Sampler:
    """An infinite stream of item indices: epoch e is a permutation of range(n) drawn from a
    torch.Generator seeded by (seed, e) (or range(n) in order when shuffle=False). Batches take
    the next ``batch_size * world_size`` indices, crossing epoch boundaries when needed (so nothing
    is dropped and n < batch size still works); rank r keeps its slice of them."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int, world_size: int):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                self._order = torch.randperm(self.n, generator=_epoch_generator(self.seed, self.epoch))
            else:
                self._order = torch.arange(self.n)
        return self._order

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` indices of the global order (every rank's)."""
        parts = [torch.zeros(0, dtype=torch.int64)]
        while count > 0:
            order = self._epoch_order()
            take = min(count, self.n - self.position)
            parts.append(order[self.position:self.position + take])
            self.position += take
            count -= take
            if self.position == self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return torch.cat(parts) if len(parts) > 2 else parts[-1]

    def next_indices(self) -> torch.Tensor:
        idx = self.take(self.batch_size * self.world_size)
        return idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._order = int(epoch), int(position), None


# --------------------------------------------------------------------------------------------
# Packed pretraining data
# --------------------------------------------------------------------------------------------


def _check_sizes(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"data.seq_len must be a positive integer, got {seq_len!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"data.local_batch_size must be a positive integer, got {batch_size!r}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")


class _Batches:
    """What both dataset kinds share: the seeded, resumable training order and the fixed eval pass.

    A subclass sets ``_sampler`` (a :class:`_Sampler`), ``batch_size``, ``seed`` and ``name``, and defines
    ``_num_items`` (windows or samples) and ``_batch(idx)`` -> (inputs, labels).
    """

    _IDENTITY: tuple[str, ...] = ()  # sizes that identify the data: a checkpoint's must be the same
    _KIND, _ITEMS = "", "items"  # for messages

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch, (inputs, labels), both LongTensor [batch_size, seq_len]."""
        return self._batch(self._sampler.next_indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed pass over every item in order, ``batch_size`` at a time (the last batch may be smaller),
        at most ``max_batches`` batches. Does not touch the training order or state. It ignores rank:
        every rank gets the same batches (the same count, as FSDP needs)."""
        n, size = self._num_items(), self.batch_size
        n_batches = math.ceil(n / size)
        if max_batches is not None:
            n_batches = min(n_batches, max(int(max_batches), 0))
        for b in range(n_batches):
            yield self._batch(torch.arange(b * size, min((b + 1) * size, n)))

    def state_dict(self) -> dict:
        """The position in the training order (epoch, position) and what identifies the data."""
        return {**self._sampler.state_dict(), "seed": self.seed, **{k: getattr(self, k) for k in self._IDENTITY}}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the order where a checkpoint left it; the data and seed must be the same."""
        for key in self._IDENTITY:
            if key in sd and int(sd[key]) != getattr(self, key):
                raise DataError(
                    f"The checkpoint's {self._KIND}{self.name} data state was saved with {key}={int(sd[key])}, "
                    f"but the data now has {key}={getattr(self, key)}: data.path, tokenizer.path or "
                    "data.seq_len changed since the checkpoint. Resume with the same data settings, "
                    "or start a new run (another job.dump_folder).")
        if "seed" in sd and int(sd["seed"]) != self.seed:
            raise DataError(f"The checkpoint's {self._KIND}{self.name} data order was drawn with job.seed="
                            f"{int(sd['seed'])}, this run has job.seed={self.seed}. Resume with the "
                            "same seed, or start a new run.")
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if epoch < 0 or not 0 <= position < self._num_items():
            raise DataError(f"The checkpoint's {self._KIND}{self.name} data state (epoch={epoch}, "
                            f"position={position}) is out of range for {self._num_items()} {self._ITEMS}.")
        self._sampler.load_state_dict(epoch, position)


class PackedDataset(_Batches):
    """Documents tokenized, concatenated with EOS after each document (and BOS before each when
    the tokenizer has one), cut into windows of ``seq_len + 1`` tokens (inputs = w[:-1],
    labels = w[1:]).

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows share
    one token so every token except the first is a label once. The tail shorter than a window
    is not used. The tokens are an int32 array in memory (documents tokenized here) or a
    :class:`leantrain.data.prepared.TokenStream` over memory-mapped shards (:meth:`from_tokens`):
    a batch reads only its own windows.

    Order: an infinite stream over epochs; epoch ``e`` is a permutation of the windows drawn from
    a ``torch.Generator`` seeded by ``(seed, e)`` (in order when ``shuffle=False``). Each
    :meth:`next_batch` takes the next ``batch_size`` windows (``batch_size * world_size`` under
    data parallelism, rank ``r`` keeping the r-th slice, so ranks see disjoint windows and every
    rank computes the same order). A batch may cross an epoch boundary.

    :meth:`state_dict` / :meth:`load_state_dict` carry ``epoch`` and ``position`` so a resumed
    run sees the same batches as an uninterrupted one.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, name: str = "train", *,
                 rank: int = 0, world_size: int = 1):
        _check_sizes(seq_len, batch_size, rank, world_size)
        self._setup(self._pack(list(docs), tokenizer), seq_len, batch_size, seed, shuffle, name, rank, world_size)

    @classmethod
    def from_tokens(cls, tokens: Any, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                    name: str = "train", *, rank: int = 0, world_size: int = 1) -> PackedDataset:
        """Windows over tokens already packed as ``[BOS] ids EOS`` per document (``len(tokens)`` and
        ``tokens[a:b]`` -> an integer array): a prepared folder's split."""
        _check_sizes(seq_len, batch_size, rank, world_size)
        self = cls.__new__(cls)
        self._setup(tokens, seq_len, batch_size, seed, shuffle, name, rank, world_size)
        return self

    def _setup(self, tokens: Any, seq_len: int, batch_size: int, seed: int, shuffle: bool, name: str,
               rank: int, world_size: int) -> None:
        self.name, self.seq_len, self.batch_size, self.seed, self.shuffle = name, seq_len, batch_size, seed, shuffle
        self.tokens = tokens
        self.num_tokens = len(tokens)
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"The {name} split has {self.num_tokens} tokens after tokenization, but one "
                f"window needs data.seq_len + 1 = {seq_len + 1}. Use a smaller "
                f"data.seq_len (at most {max(self.num_tokens - 1, 1)}) or more text in data.path.")
        self.num_windows = (self.num_tokens - 1) // seq_len
        if isinstance(tokens, torch.Tensor):  # in memory: every window is a view, a batch one gather
            self.windows = tokens.unfold(0, seq_len + 1, seq_len)[: self.num_windows]
        self._sampler = _Sampler(self.num_windows, batch_size, seed, shuffle, rank, world_size)

    @staticmethod
    def _pack(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        head = np.asarray([] if bos is None else [bos], dtype=np.int32)
        tail = np.asarray([eos], dtype=np.int32)
        parts: list[np.ndarray] = []
        for ids in _encode_many(tokenizer, docs):
            parts.extend((head, ids.astype(np.int32, copy=False), tail))
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))

    _IDENTITY = ("num_tokens", "num_windows", "seq_len")
    _ITEMS = "windows"

    def _num_items(self) -> int:
        return self.num_windows

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both LongTensor [len(idx), seq_len]; labels are inputs shifted by one."""
        if isinstance(self.tokens, torch.Tensor):
            w = self.windows[idx].long()
        else:  # memory-mapped: read this rank's windows only
            span = self.seq_len + 1
            w = torch.from_numpy(np.stack([self.tokens[i * self.seq_len:i * self.seq_len + span]
                                           for i in idx.tolist()]))
        return w[:, :-1], w[:, 1:]

    def __repr__(self) -> str:
        return (f"PackedDataset(name={self.name!r}, num_tokens={self.num_tokens}, "
                f"num_windows={self.num_windows}, seq_len={self.seq_len}, batch_size={self.batch_size})")


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning data
# --------------------------------------------------------------------------------------------

_ALLOWED_SFT = ('data.format=sft needs data.path to be a .jsonl file (one JSON object per line with '
                '"prompt" and "response" strings) or a folder of such files')


def load_sft_samples(path: str) -> list[tuple[str, str]]:
    """``data.path`` for ``data.format=sft`` -> (prompt, response) pairs, in file and line order.

    A ``.jsonl`` file, or a folder whose ``.jsonl`` files (recursively, sorted, hidden ones skipped)
    are read. Every non-blank line must be an object with ``prompt`` and ``response`` strings;
    anything else raises :class:`DataError` naming the file and line.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist. {_ALLOWED_SFT}.")
    if p.is_dir():
        files = sorted((f for f in p.rglob("*.jsonl") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise DataError(f"data.path={path!r} is a folder with no .jsonl files in it. {_ALLOWED_SFT}.")
    elif p.suffix.lower() == ".jsonl":
        files = [p]
    else:
        raise DataError(f"data.path={path!r} is not a .jsonl file. {_ALLOWED_SFT}.")
    samples = []
    for f in files:
        for lineno, rec in _read_jsonl(f):
            for key in ("prompt", "response"):
                if key not in rec:
                    keys = ", ".join(repr(k) for k in list(rec)[:10]) or "none"
                    raise DataError(f"{f}:{lineno}: the JSON object has no \"{key}\" field (its keys: {keys}). "
                                    f"{_ALLOWED_SFT}.")
                if not isinstance(rec[key], str):
                    raise DataError(f"{f}:{lineno}: \"{key}\" is a {type(rec[key]).__name__}, not a string. "
                                    f"{_ALLOWED_SFT}.")
            samples.append((rec["prompt"], rec["response"]))
    if not samples:
        raise DataError(f"data.path={path!r} holds no samples (only blank lines). {_ALLOWED_SFT}.")
    return samples


class SftDataset(_Batches):
    """Prompt/response pairs for supervised fine-tuning: one sample per row, padded to ``seq_len``.

    A sample is ``[BOS] + prompt + response + [EOS]`` (BOS when the tokenizer has one; prompt and
    response are tokenized separately and used as they are, so apply a chat template before writing
    the jsonl). Row ``i`` holds sample ``i``'s first ``seq_len + 1`` tokens, then ``pad_id``;
    inputs = row[:-1], labels = row[1:], with labels set to IGNORE_INDEX (skipped by the loss) where the
    label is a prompt token or padding: the loss is on the response and its EOS only.

    No sample attends to another: each is alone in its row, and its padding comes after it, where
    the causal mask hides it (padding positions have no label). A sample longer than
    ``seq_len + 1`` tokens is cut at the end (one warning counts them); a sample whose prompt fills
    the whole window has nothing to learn and is dropped (warning).

    Order, rank slicing, :meth:`eval_batches` and :meth:`state_dict` work as in
    :class:`PackedDataset`, over samples instead of windows. ``num_tokens`` counts the samples'
    tokens (after cutting), not the padding.
    """

    def __init__(self, samples: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, name: str = "train", *, rank: int = 0, world_size: int = 1):
        _check_sizes(seq_len, batch_size, rank, world_size)
        self.name, self.seq_len, self.batch_size, self.seed = name, seq_len, batch_size, seed
        self.pad_id = tokenizer.pad_id
        self.tokens, self.offsets, self.prompt_lens = self._tokenize(list(samples), tokenizer, seq_len, name)
        self.num_samples = len(self.prompt_lens)
        self.num_tokens = int(self.tokens.numel())
        self._sampler = _Sampler(self.num_samples, batch_size, seed, shuffle, rank, world_size)

    @staticmethod
    def _tokenize(samples: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int,
                  name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompts = _encode_many(tokenizer, [p for p, _ in samples])
        responses = _encode_many(tokenizer, [r for _, r in samples])
        parts, offsets, prompt_lens, cut, dropped = [], [0], [], 0, 0
        for prompt, response in zip(prompts, responses):
            ids = np.concatenate([np.asarray(head, dtype=np.int64), prompt, response,
                                  np.asarray([tokenizer.eos_id], dtype=np.int64)])
            n_prompt = len(head) + len(prompt)
            if n_prompt >= seq_len + 1:  # not one response token would be a label
                dropped += 1
                continue
            if len(ids) > seq_len + 1:
                ids, cut = ids[:seq_len + 1], cut + 1
            parts.append(ids.astype(np.int32))
            offsets.append(offsets[-1] + len(ids))
            prompt_lens.append(n_prompt)
        if cut or dropped:
            warnings.warn(f"SFT {name} data: {cut} sample(s) longer than data.seq_len + 1 = {seq_len + 1} tokens were "
                          f"cut at the end, and {dropped} whose prompt alone fills the window were dropped. Raise "
                          f"data.seq_len to keep them whole.", UserWarning, stacklevel=3)
        if not parts:
            raise DataError(f"The SFT {name} split has no sample whose response fits in data.seq_len = {seq_len} "
                            f"tokens. Raise data.seq_len.")
        return (torch.from_numpy(np.concatenate(parts)), torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(prompt_lens, dtype=torch.int64))

    _IDENTITY = ("num_samples", "num_tokens", "seq_len")
    _KIND, _ITEMS = "SFT ", "samples"

    def _num_items(self) -> int:
        return self.num_samples

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.full((len(idx), self.seq_len + 1), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(idx), self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        for r, i in enumerate(idx.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            rows[r, :b - a] = self.tokens[a:b]
            # label j is token j + 1: learned from the first response token to the EOS
            first = int(self.prompt_lens[i]) - 1
            labels[r, first:b - a - 1] = rows[r, first + 1:b - a]
        return rows[:, :-1], labels

    def __repr__(self) -> str:
        return (f"SftDataset(name={self.name!r}, num_samples={self.num_samples}, num_tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size})")


# --------------------------------------------------------------------------------------------
# Several prepared corpora, mixed by weight
# --------------------------------------------------------------------------------------------

_MIX_STREAM = 0x6D6978  # "mix": keeps the mixture's draws apart from the data order's generators


class MixedDataset:
    """Prepared corpora drawn by weight: each slot of a global batch (``batch_size * world_size`` windows) comes
    from source ``s`` with probability ``weights[s]``, drawn from a generator seeded by (seed, batch number), and
    takes that source's next window in its own seeded order (so each source is still seen a whole epoch at a
    time). Every rank draws the same global batch and reads only its slice's windows. The state (batches drawn,
    each source's position) resumes exactly. Evaluation is every source's eval split in turn."""

    def __init__(self, sources: Sequence[PackedDataset], names: Sequence[str], weights: Sequence[float],
                 batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.sources, self.names = list(sources), list(names)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.weights /= self.weights.sum()
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.draws = 0
        self.num_tokens = sum(src.num_tokens for src in self.sources)

    def _choices(self) -> torch.Tensor:
        g = _epoch_generator(self.seed ^ _MIX_STREAM, self.draws)
        return torch.multinomial(self.weights, self.batch_size * self.world_size, replacement=True, generator=g)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        choice = self._choices()
        self.draws += 1
        window = torch.empty_like(choice)
        for s, src in enumerate(self.sources):  # every source advances by its global count, on every rank
            slots = (choice == s).nonzero().flatten()
            window[slots] = src._sampler.take(len(slots))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        inputs = torch.empty(self.batch_size, self.sources[0].seq_len, dtype=torch.int64)
        labels = torch.empty_like(inputs)
        for s, src in enumerate(self.sources):
            rows = (choice[mine] == s).nonzero().flatten()
            if len(rows):
                inputs[rows], labels[rows] = src._batch(window[mine][rows])
        return inputs, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"draws": self.draws, "seed": self.seed,
                "sources": {str(i): src.state_dict() for i, src in enumerate(self.sources)}}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("seed", self.seed)) != self.seed or set(sd.get("sources", {})) != {
                str(i) for i in range(len(self.sources))}:
            raise DataError(f"The checkpoint's data state is not one of this mixture of {len(self.sources)} prepared "
                            "corpora with this job.seed: resume with the same data.mix and seed, or start a new run.")
        for i, src in enumerate(self.sources):
            src.load_state_dict(sd["sources"][str(i)])
        self.draws = int(sd["draws"])


class _EvalMix:
    """The eval splits of a mixture, one source after another."""

    def __init__(self, sources: Sequence[PackedDataset]):
        self.sources = list(sources)
        self.num_tokens = sum(src.num_tokens for src in self.sources)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        left = math.inf if max_batches is None else max(int(max_batches), 0)
        for src in self.sources:
            for batch in src.eval_batches():
                if left <= 0:
                    return
                left -= 1
                yield batch


# --------------------------------------------------------------------------------------------
# The datasets of a config
# --------------------------------------------------------------------------------------------

RAW_WARN_BYTES = 100 * 10**6  # above this much raw text, tokenizing in memory at every start is worth a warning


def parse_mix(mix: str) -> list[tuple[str, float]]:
    """``data.mix`` ("DIR=WEIGHT,DIR=WEIGHT") -> [(DIR, WEIGHT)]; DataError when malformed."""
    pairs = []
    for part in (p.strip() for p in mix.split(",")):
        path, sep, weight = part.rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not sep or not path or not (0 < value < math.inf):
            raise DataError(f"data.mix={mix!r}: {part!r} is not DIR=WEIGHT. data.mix lists prepared folders with "
                            "positive weights, e.g. data.mix='web=0.7,code=0.3' (the weights need not sum to 1).")
        pairs.append((path, value))
    if len(pairs) < 2:
        raise DataError(f"data.mix={mix!r} names {len(pairs)} folder; a mixture needs at least two (for one, set "
                        "data.path to it).")
    return pairs


def _prepared_splits(path: str, tokenizer: Tokenizer, tokenizer_path: str, data: Any, seed: int,
                     common: dict) -> tuple[PackedDataset, PackedDataset]:
    from .prepared import open_prepared

    if data.format != "text":
        raise DataError(f"data.path={path!r} is a prepared corpus of text documents; data.format={data.format!r} "
                        "needs raw files. Use data.format=text with it.")
    corpus = open_prepared(path)
    corpus.check_tokenizer(tokenizer, tokenizer_path)
    return (PackedDataset.from_tokens(corpus.train, data.seq_len, data.local_batch_size, seed, **common),
            PackedDataset.from_tokens(corpus.eval, data.seq_len, data.local_batch_size, seed, shuffle=False,
                                      name="eval", **common))


def _warn_if_large(path: str) -> None:
    from .corpus import source_files

    if path == "builtin":
        return
    size = sum(f.stat().st_size for f in source_files(path))
    if size > RAW_WARN_BYTES:
        warnings.warn(f"data.path={path!r} holds {size / 1e6:.0f} MB of raw text, which every start (and every rank) "
                      f"reads and tokenizes in memory, at about 8 bytes of memory per byte of text. `leantrain prepare "
                      f"--data.path={path} --out DIR` tokenizes it once into memory-mapped shards; train with "
                      "data.path=DIR then.", UserWarning, stacklevel=3)


def build_datasets(data: Any, tokenizer: Tokenizer, seed: int, *, rank: int = 0, world_size: int = 1,
                   tokenizer_path: str = "") -> tuple[Any, Any]:
    """(train, eval) datasets for the config's ``data`` section: raw files (tokenized here), a prepared folder
    (memory-mapped), or a mixture of prepared folders (``data.mix``). The eval split is the last 5% of documents
    (text) or samples (sft); it is read in order, never shuffled."""
    from .prepared import is_prepared

    common = dict(rank=rank, world_size=world_size)
    if data.mix:
        splits = [_prepared_splits(path, tokenizer, tokenizer_path, data, seed, dict(rank=0, world_size=1))
                  for path, _ in parse_mix(data.mix)]
        names, weights = zip(*parse_mix(data.mix))
        return (MixedDataset([t for t, _ in splits], names, weights, data.local_batch_size, seed, **common),
                _EvalMix([e for _, e in splits]))
    if is_prepared(data.path):
        return _prepared_splits(data.path, tokenizer, tokenizer_path, data, seed, common)
    _warn_if_large(data.path)
    if data.format == "sft":
        samples = load_sft_samples(data.path)
        if len(samples) < 2:
            raise DataError(f"data.path={data.path!r} holds {len(samples)} SFT sample; at least 2 are needed "
                            "(the last 5%, at least one, are the held-out eval split).")
        n_eval = eval_count(len(samples))
        train_samples, eval_samples = samples[:-n_eval], samples[-n_eval:]
        return (SftDataset(train_samples, tokenizer, data.seq_len, data.local_batch_size, seed, **common),
                SftDataset(eval_samples, tokenizer, data.seq_len, data.local_batch_size, seed, shuffle=False,
                           name="eval", **common))
    train_docs, eval_docs = split_documents(load_documents(data.path, data.text_field))
    return (PackedDataset(train_docs, tokenizer, data.seq_len, data.local_batch_size, seed, **common),
            PackedDataset(eval_docs, tokenizer, data.seq_len, data.local_batch_size, seed, shuffle=False,
                          name="eval", **common))
