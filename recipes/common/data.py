"""The data side of the pretraining recipes: text, tokenizer, packed blocks, masking.

Read top to bottom, a recipe does:

1. ``texts = functools.partial(text_stream, dataset=..., dataset_config=..., train_file=..., max_bytes=...)``
   -- a factory that opens the corpus afresh each time it is called (a Hub dataset, a local file, or, with
   neither, the offline corpus: the Python standard library's own source).
2. ``tokenizer = get_tokenizer("gpt" | "bert", name=..., cache_dir=..., texts=texts, vocab_size=...)``
   -- a Hub tokenizer, or one trained in seconds on the corpus and cached on disk.
3. ``blocks = PackedBlocks(texts, tokenizer, seq_len=..., rank=..., world_size=..., family=...)`` and each
   step ``input_ids = blocks.next_batch(micro_batch)``; ``blocks.state_dict()`` goes into the checkpoint so
   a resumed run sees exactly the batches an uninterrupted one would have.
4. BERT only: ``input_ids, labels = mask_tokens(input_ids, tokenizer, generator=step_generator(...))``.

``synthetic_batch`` replaces 1-3 for pure throughput runs.

Corners cut, said plainly: no shuffling (the corpus is read in its own order every epoch; pretraining
corpora are usually shuffled when written), and every rank tokenises the whole stream and keeps only its
own blocks (simple and exact; tokenising costs far less than a training step of a model worth sharding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

FAMILIES = ("gpt", "bert")

# The offline corpus leaves out tests (huge, repetitive, full of deliberately odd code), IDLE, and installed
# third-party packages (not PSF-licensed and different on every machine).
_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
_MAX_STDLIB_FILE_BYTES = 1 << 20

GPT_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Bumped when the way tokenizers are trained changes, so old cache entries are not reused.
_TOKENIZER_FORMAT = 1
# Tokenizers are trained on at most this much text: a few MB gives a good small vocabulary in seconds.
DEFAULT_TOKENIZER_TRAIN_BYTES = 4_000_000
# Documents are tokenised this many bytes at a time: large enough for the Rust batch encoder to be fast,
# small enough that the token buffer stays small however large the corpus is.
_ENCODE_CHUNK_BYTES = 1 << 20
_ENCODE_CHUNK_DOCUMENTS = 64


# ----------------------------------------------------------------------------------------------------------
# Text


def offline_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The offline default corpus: the ``*.py`` files of this Python's standard library.

    Why this corpus: it exists on every machine that can run the recipes (no download, no network), it is
    real text -- English prose in docstrings and comments mixed with code -- so a tokenizer and a model
    learn something meaningful from it, and it is PSF-licensed, so using it raises no licence question.
    About 11 MB in CPython 3.11, enough for a tokenizer and for smoke-scale pretraining.

    Files are sorted by their path relative to the standard library root so every rank and every run sees
    the same order. ``max_bytes`` keeps the longest prefix of that order whose total size fits.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path, int]] = []
    for directory, subdirs, names in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (often far larger than the stdlib).
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS]
        for name in names:
            if not name.endswith(".py"):
                continue
            path = Path(directory, name)
            size = path.stat().st_size
            if size <= _MAX_STDLIB_FILE_BYTES:
                found.append((path.relative_to(root).as_posix(), path, size))
    found.sort()
    files: list[Path] = []
    total = 0
    for _, path, size in found:
        if max_bytes is not None and total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusOptions:
    """Which text to read: the keyword arguments of ``text_stream`` and ``corpus_identity``.

    Declared once so that the two functions cannot drift apart: an option added to the stream is then part
    of the identity's inputs too, and the tokenizer cache cannot mistake one corpus for another.
    """

    dataset: str | None
    dataset_config: str | None
    train_file: str | None
    split: str = "train"
    text_column: str = "text"
    max_bytes: int | None

    def __post_init__(self) -> None:
        # Here rather than in text_stream, so corpus_identity refuses the ambiguity too instead of naming one.
        if self.dataset is not None and self.train_file is not None:
            raise ValueError(
                f"both --dataset ({self.dataset!r}) and --train_file ({self.train_file!r}) were given; "
                "pass one of them"
            )


def text_stream(**options: Any) -> Iterator[str]:
    """The training text, one document at a time, read lazily.

    - ``dataset``: a Hub dataset, streamed (nothing is downloaded up front); column ``text_column``.
    - ``train_file``: a local ``.txt`` file (one document per paragraph, paragraphs separated by a blank
      line) or ``.json``/``.jsonl`` (one document per record, field ``text_column``).
    - neither: the offline corpus (``offline_corpus_files``), one document per file.

    ``max_bytes`` caps the UTF-8 bytes yielded (the last document is cut), so a recipe can train on a
    fixed slice of a large corpus. The source is opened now, so a missing file or an unreachable Hub
    dataset is a ``ValueError`` at the call, not at the first ``next()``. ``options`` are the fields of
    ``CorpusOptions``, by keyword.
    """
    o = CorpusOptions(**options)
    if o.dataset is not None:
        documents = _hub_documents(o.dataset, o.dataset_config, o.split, o.text_column)
    elif o.train_file is not None:
        documents = _file_documents(o.train_file, o.text_column)
    else:
        documents = _offline_documents(o.max_bytes)
    return _cap_bytes(documents, o.max_bytes)


def _hub_documents(dataset: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    import datasets  # imported here: `datasets` takes ~1 s to import and synthetic runs never need it

    try:
        rows = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as err:  # re-raised with the fix: offline, a Hub lookup fails in many different ways
        raise ValueError(
            f"could not open the Hub dataset {dataset!r} (config {config!r}, split {split!r}): {err}. "
            "Without network access pass --train_file with a local .txt/.jsonl file, or drop --dataset to "
            "use the offline corpus (the Python standard library's source)"
        ) from err
    return _column(rows, text_column, f"Hub dataset {dataset!r}")


def _file_documents(train_file: str, text_column: str) -> Iterator[str]:
    import datasets

    path = Path(train_file)
    if not path.is_file():
        raise ValueError(f"--train_file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        # Paragraphs, not lines: a line of prose is too short to be a document, and joining every line with
        # an end-of-text token would teach a GPT to stop after each line.
        rows = datasets.load_dataset(
            "text", data_files=str(path), split="train", streaming=True, sample_by="paragraph"
        )
        return (text.strip("\n") for text in _column(rows, "text", str(path)))
    if suffix in (".json", ".jsonl"):
        rows = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        return _column(rows, text_column, str(path))
    raise ValueError(f"--train_file {str(path)!r}: unsupported suffix {suffix!r}; use .txt, .json or .jsonl")


def _column(rows: Iterable[dict[str, Any]], text_column: str, source: str) -> Iterator[str]:
    for row in rows:
        if text_column not in row:
            raise ValueError(
                f"{source} has no column {text_column!r} (columns: {sorted(row)}); pass --text_column"
            )
        text = row[text_column]
        if isinstance(text, str) and text.strip():  # empty rows would become lone separator tokens
            yield text


def _offline_documents(max_bytes: int | None) -> Iterator[str]:
    files = offline_corpus_files(max_bytes)
    # A handful of stdlib files declare a non-UTF-8 coding; replacing the odd byte is harmless here.
    return (path.read_text(encoding="utf-8", errors="replace") for path in files)


def _cap_bytes(documents: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    if max_bytes is None:
        yield from documents
        return
    left = max_bytes
    for text in documents:
        if left <= 0:
            return
        data = text.encode("utf-8")
        if len(data) > left:
            text = data[:left].decode("utf-8", errors="ignore")  # never split a character
        left -= len(data)
        yield text


def corpus_identity(**options: Any) -> str:
    """A short string naming the corpus ``text_stream`` would read with the same arguments.

    Pass it to ``get_tokenizer(corpus_id=...)`` to find a cached tokenizer without reading any text (for a
    Hub dataset that saves streaming megabytes on every start). A local file is named by its path, size and
    modification time, the offline corpus by the Python version and its file list. ``options`` are the fields
    of ``CorpusOptions``, by keyword.
    """
    o = CorpusOptions(**options)
    if o.dataset is not None:
        return f"hub:{o.dataset}:{o.dataset_config}:{o.split}:{o.text_column}:{o.max_bytes}"
    if o.train_file is not None:
        path = Path(o.train_file).resolve()
        stat = path.stat() if path.is_file() else None
        size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (None, None)
        return f"file:{path}:{size}:{mtime}:{o.text_column}:{o.max_bytes}"
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in offline_corpus_files(o.max_bytes)]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return f"stdlib:{sys.version_info.major}.{sys.version_info.minor}:{digest}:{o.max_bytes}"


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def get_tokenizer(
    family: str,
    *,
    name: str | None,
    cache_dir: Path,
    texts: Callable[[], Iterator[str]],
    vocab_size: int,
    corpus_id: str | None = None,
    max_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
) -> PreTrainedTokenizerFast:
    """The tokenizer for ``family`` ("gpt" or "bert"): a Hub tokenizer by ``name``, else one trained here.

    Trained tokenizers (the default, so the recipes run offline): GPT gets byte-level BPE, like GPT-2, with
    ``<|endoftext|>`` as its only special token, used as bos, eos and pad; BERT gets lowercase WordPiece,
    like bert-base-uncased, with [PAD] [UNK] [CLS] [SEP] [MASK]. Training reads at most ``max_train_bytes``
    of ``texts()`` and takes seconds.

    The result is saved under ``cache_dir/<family>-<vocab_size>-<hash>/`` and loaded from there next time
    without retraining. The hash covers the corpus identity: ``corpus_id`` when given (see
    ``corpus_identity``), else the training text itself (read, but not trained on, for a cache hit).

    A small corpus can give fewer than ``vocab_size`` tokens: size the model's embedding with
    ``len(tokenizer)``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if name is not None:
        return _hub_tokenizer(family, name)
    minimum = 257 if family == "gpt" else len(BERT_SPECIALS) + 1  # byte-level BPE starts from 256 bytes
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a {family} tokenizer; use >= {minimum}")

    key = hashlib.sha256()
    key.update(f"{_TOKENIZER_FORMAT}:{family}:{vocab_size}:{max_train_bytes}:".encode())
    if corpus_id is not None:
        key.update(corpus_id.encode())
    else:
        for text in _cap_bytes(texts(), max_train_bytes):
            key.update(text.encode("utf-8", errors="replace"))
            key.update(b"\0")  # document boundaries are part of the identity
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{family}-{vocab_size}-{key.hexdigest()[:16]}"
    if (target / "tokenizer.json").is_file():
        return _load_cached(target)

    tokenizer = _train_tokenizer(family, _cap_bytes(texts(), max_train_bytes), vocab_size)
    # Save into a private directory and rename it into place: ranks or runs that train at the same time
    # never see a half-written tokenizer; the loser of the rename throws its copy away.
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return _load_cached(target)


def _hub_tokenizer(family: str, name: str) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # re-raised with the fix: offline, a Hub lookup fails in many different ways
        raise ValueError(
            f"could not load the tokenizer {name!r}: {err}. Without network access drop --tokenizer to "
            "train one locally on the corpus (a few seconds, cached)"
        ) from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer; pick another")
    if family == "gpt":
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has no eos token, which GPT packing needs between documents")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without one
    else:
        missing = [t for t in ("mask_token", "cls_token", "sep_token", "pad_token") if getattr(tokenizer, t) is None]
        if missing:
            raise ValueError(f"tokenizer {name!r} lacks {missing}, which masked-LM pretraining needs")
    return tokenizer


def _load_cached(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _train_tokenizer(family: str, texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a fresh tokenizer; a module-level function so tests can check a cache hit never calls it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if family == "gpt":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[GPT_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=GPT_EOS,
            eos_token=GPT_EOS,
            unk_token=GPT_EOS,
            pad_token=GPT_EOS,
            clean_up_tokenization_spaces=False,  # byte-level BPE round-trips text exactly; keep it so
        )

    pad, unk, cls, sep, mask = BERT_SPECIALS
    backend = Tokenizer(models.WordPiece(unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BERT_SPECIALS),
        limit_alphabet=1000,  # as bert-base: rare characters become [UNK] instead of eating the vocabulary
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # `tokenizer(text)` gives [CLS] text [SEP], as for any BERT; PackedBlocks adds these itself.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        clean_up_tokenization_spaces=True,  # "hello , world" -> "hello, world" when decoding
    )


# ----------------------------------------------------------------------------------------------------------
# Packed blocks


class PackedBlocks:
    """Fixed-length training blocks packed from a text stream, sharded across ranks, resumable exactly.

    Documents are tokenised lazily, a chunk at a time, and concatenated into one token stream: for "gpt"
    each document is followed by eos (GPT-2 style: the model learns where documents end); for "bert" by
    [SEP], and each block is ``[CLS] + seq_len-2 tokens + [SEP]``. The stream is cut into blocks in one
    global order; rank ``r`` of ``W`` takes global blocks ``r, r+W, r+2W, ...`` so the ranks together see
    exactly what one rank would. When the stream ends the tokens short of a full block are dropped and the
    next epoch starts from the first document, so training never runs dry and every epoch is the same.

    Every ``next_batch`` moves all ranks past the same number of global blocks, so ``state_dict()`` is the
    same on every rank (save it from one) and can be loaded with a different ``world_size``.
    """

    def __init__(
        self,
        texts: Callable[[], Iterator[str]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        family: str,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        minimum = 1 if family == "gpt" else 3
        if seq_len < minimum:
            raise ValueError(f"seq_len {seq_len} is too short for {family}; use >= {minimum}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if family == "gpt":
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no eos token, which GPT packing puts between documents")
            self._separator = int(tokenizer.eos_token_id)
            self._prefix: list[int] = []
            self._suffix: list[int] = []
        else:
            if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
                raise ValueError("the tokenizer lacks [CLS] or [SEP], which BERT blocks begin and end with")
            self._separator = int(tokenizer.sep_token_id)
            self._prefix = [int(tokenizer.cls_token_id)]
            self._suffix = [int(tokenizer.sep_token_id)]
        self.texts = texts
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.family = family
        self._content_len = seq_len - len(self._prefix) - len(self._suffix)
        self._seek(epoch=0, document=0, token_offset=0, blocks_consumed=0, block_in_epoch=0)

    # The cursor: the next token is token `_offset` of document `_document` (its tokens plus the separator)
    # in epoch `_epoch`; `_blocks_consumed` global blocks lie before it, `_block_in_epoch` of them in this
    # epoch. Only the current document's tokens and one encoded chunk are held in memory.

    def _seek(self, *, epoch: int, document: int, token_offset: int, blocks_consumed: int, block_in_epoch: int) -> None:
        self._epoch = epoch
        self._document = document
        self._offset = token_offset
        self._blocks_consumed = blocks_consumed
        self._block_in_epoch = block_in_epoch
        self._documents = self._tokenized_documents(skip=document)
        self._tokens: list[int] | None = None  # the current document, loaded on first use

    def _tokenized_documents(self, skip: int) -> Iterator[list[int]]:
        # Skipped documents are read but not tokenised: resuming costs a pass over the text, not the tokenizer.
        documents = itertools.islice(self.texts(), skip, None)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        for chunk in _chunks(documents):
            if backend is not None:  # the Rust encoder directly: batched, and no max-length warnings
                encoded = [e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)]
            else:
                encoded = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            for ids in encoded:
                ids.append(self._separator)
                yield ids

    def _next_block(self) -> list[int]:
        """The next global block's content tokens; crosses into the next epoch when the stream ends."""
        out: list[int] = []
        while len(out) < self._content_len:
            if self._tokens is None:
                self._tokens = next(self._documents, None)
                if self._tokens is None:
                    self._start_next_epoch()
                    out = []  # the tail of an epoch shorter than a block is dropped
                    continue
            need = self._content_len - len(out)
            piece = self._tokens[self._offset : self._offset + need]
            out.extend(piece)
            self._offset += len(piece)
            if self._offset >= len(self._tokens):
                self._document += 1
                self._offset = 0
                self._tokens = None
        self._blocks_consumed += 1
        self._block_in_epoch += 1
        return out

    def _start_next_epoch(self) -> None:
        if self._block_in_epoch == 0:
            raise ValueError(
                f"the corpus holds fewer than one block ({self._content_len} tokens after special tokens) in "
                "total; use a larger corpus (raise --max_bytes) or a shorter --seq_len"
            )
        self._seek(
            epoch=self._epoch + 1,
            document=0,
            token_offset=0,
            blocks_consumed=self._blocks_consumed,
            block_in_epoch=0,
        )

    def next_batch(self, micro_batch: int) -> torch.LongTensor:
        """This rank's next ``micro_batch`` blocks, ``[micro_batch, seq_len]`` token ids (CPU, int64)."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        rows: list[list[int]] = []
        for _ in range(micro_batch):
            # One round of W global blocks: the others' blocks are read and skipped, this rank's kept.
            for position in range(self.world_size):
                block = self._next_block()
                if position == self.rank:
                    rows.append(self._prefix + block + self._suffix)
        return torch.tensor(rows, dtype=torch.long)

    @property
    def epoch(self) -> int:
        """The epoch the next block comes from (0-based)."""
        return self._epoch

    def state_dict(self) -> dict[str, int | str]:
        """The position in the stream, JSON-able and the same on every rank."""
        return {
            "blocks_consumed": self._blocks_consumed,
            "epoch": self._epoch,
            "block_in_epoch": self._block_in_epoch,
            "document": self._document,
            "token_offset": self._offset,
            "seq_len": self.seq_len,
            "family": self.family,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` so the next batch is the one an uninterrupted run would have produced.

        Requires the same corpus, tokenizer, family and seq_len; the world size may differ.
        """
        keys = ("blocks_consumed", "epoch", "block_in_epoch", "document", "token_offset", "seq_len", "family")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"data state lacks {missing}; was it saved by PackedBlocks.state_dict()?")
        if state["family"] != self.family or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"data state was saved with family={state['family']!r}, seq_len={state['seq_len']}, but this "
                f"run uses family={self.family!r}, seq_len={self.seq_len}; resume with the same settings"
            )
        self._seek(
            epoch=int(state["epoch"]),
            document=int(state["document"]),
            token_offset=int(state["token_offset"]),
            blocks_consumed=int(state["blocks_consumed"]),
            block_in_epoch=int(state["block_in_epoch"]),
        )


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= _ENCODE_CHUNK_BYTES or len(chunk) >= _ENCODE_CHUNK_DOCUMENTS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------
# Randomness, synthetic data and masking


def step_generator(
    *, seed: int, step: int, rank: int, purpose: str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator seeded from (purpose, seed, step, rank) alone, so a resumed run draws the same numbers.

    Hashing rather than ``seed + step`` keeps nearby seeds, steps and ranks from sharing streams.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}:{step}:{rank}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def synthetic_batch(
    *, vocab_size: int, micro_batch: int, seq_len: int, step: int, rank: int, seed: int = 0
) -> torch.LongTensor:
    """Uniformly random token ids ``[micro_batch, seq_len]``, deterministic per (seed, step, rank).

    For throughput runs: no corpus, no tokenizer, and nothing for the input pipeline to slow down.
    """
    generator = step_generator(seed=seed, step=step, rank=rank, purpose="synthetic")
    return torch.randint(0, vocab_size, (micro_batch, seq_len), generator=generator, dtype=torch.long)


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    mlm_probability: float = 0.15,
    generator: torch.Generator,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """BERT's masking: pick ``mlm_probability`` of the tokens; of those 80% -> [MASK], 10% -> a random token,
    10% unchanged. Returns new ``(input_ids, labels)``; labels are -100 (ignored by the loss) where not picked.

    Special tokens ([CLS], [SEP], [PAD], ...) are never picked. All randomness comes from ``generator``
    (e.g. ``step_generator(seed=..., step=..., rank=..., purpose="mask")``), so a resumed run masks the same
    positions as an uninterrupted one -- unlike DataCollatorForLanguageModeling, which uses the global RNG.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; masked-LM pretraining needs one ([MASK])")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    # Draw on the generator's device, then move: the draws are then the same whichever device holds the batch.
    draw_device = generator.device
    shape = input_ids.shape
    ids = input_ids.to(draw_device)
    special = torch.isin(ids, torch.tensor(sorted(set(tokenizer.all_special_ids)), device=draw_device))

    probability = torch.full(shape, mlm_probability, device=draw_device).masked_fill_(special, 0.0)
    picked = torch.bernoulli(probability, generator=generator).bool()
    to_mask = torch.bernoulli(torch.full(shape, 0.8, device=draw_device), generator=generator).bool() & picked
    to_random = (
        torch.bernoulli(torch.full(shape, 0.5, device=draw_device), generator=generator).bool() & picked & ~to_mask
    )
    random_ids = torch.randint(len(tokenizer), shape, generator=generator, device=draw_device, dtype=torch.long)

    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    masked = torch.where(to_mask, torch.full_like(ids, tokenizer.mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked.to(input_ids.device), labels.to(input_ids.device)
