"""The recipes' data side: offline corpus, local tokenizers and their cache, packed blocks, masking.

Everything runs offline: the corpus is the Python standard library, tokenizers are trained on a slice of it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub lookup must fail fast, never retry for ~46 s
os.environ["HF_DATASETS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `recipes`

import pytest  # noqa: E402
import torch  # noqa: E402

from recipes.common import data  # noqa: E402

# A slice of the offline corpus small enough to train a tokenizer in well under a second.
CORPUS_BYTES = 400_000
VOCAB = 1000
# Packed-block tests read less: each PackedBlocks tokenises its stream from the start.
BLOCK_BYTES = 60_000


def offline_texts(max_bytes: int | None = CORPUS_BYTES):
    return functools.partial(data.text_stream, dataset=None, dataset_config=None, train_file=None, max_bytes=max_bytes)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def tokenizers(cache_dir: Path) -> dict:
    return {
        family: data.get_tokenizer(family, name=None, cache_dir=cache_dir, texts=offline_texts(), vocab_size=VOCAB)
        for family in data.FAMILIES
    }


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def collect(blocks: data.PackedBlocks, num_batches: int, micro_batch: int = 1) -> list[torch.Tensor]:
    return [blocks.next_batch(micro_batch) for _ in range(num_batches)]


# ----------------------------------------------------------------------------------------------------------
# Text


def test_offline_corpus_is_deterministic_and_capped() -> None:
    everything = data.offline_corpus_files()
    assert len(everything) > 100
    assert everything == data.offline_corpus_files()
    assert all(p.suffix == ".py" for p in everything)
    skipped = {"test", "tests", "idlelib", "site-packages"}
    assert not any(skipped & set(p.parts) for p in everything)

    capped = data.offline_corpus_files(CORPUS_BYTES)
    assert capped and capped == everything[: len(capped)]
    assert sum(p.stat().st_size for p in capped) <= CORPUS_BYTES

    documents = list(offline_texts()())
    assert len(documents) == len(capped)
    assert documents == list(offline_texts()())
    assert sum(len(d.encode()) for d in documents) <= CORPUS_BYTES


def test_text_stream_max_bytes_cuts_the_last_document() -> None:
    documents = list(offline_texts(10_000)())
    assert sum(len(d.encode()) for d in documents) <= 10_000
    assert documents[0] == data.offline_corpus_files()[0].read_text(encoding="utf-8")


def test_train_file_txt_gives_paragraphs(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.txt", "first paragraph\nstill first\n\nsecond\n\n\nthird\n")
    stream = data.text_stream(dataset=None, dataset_config=None, train_file=path, max_bytes=None)
    assert list(stream) == ["first paragraph\nstill first", "second", "third"]


def test_train_file_jsonl_reads_the_text_column(tmp_path: Path) -> None:
    rows = [{"body": "alpha", "id": 1}, {"body": "", "id": 2}, {"body": "beta", "id": 3}]
    path = write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    stream = data.text_stream(dataset=None, dataset_config=None, train_file=path, text_column="body", max_bytes=None)
    assert list(stream) == ["alpha", "beta"]  # empty documents are dropped

    stream = data.text_stream(dataset=None, dataset_config=None, train_file=path, max_bytes=None)
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        list(stream)


def test_missing_train_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        data.text_stream(dataset=None, dataset_config=None, train_file=str(missing), max_bytes=None)
    odd = write(tmp_path / "corpus.csv", "a,b\n")
    with pytest.raises(ValueError, match="unsupported suffix '.csv'"):
        data.text_stream(dataset=None, dataset_config=None, train_file=odd, max_bytes=None)


def test_dataset_and_train_file_together_are_refused_by_stream_and_identity(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.txt", "one document\n")
    both = dict(dataset="wikitext", dataset_config=None, train_file=corpus, max_bytes=None)
    for read in (data.text_stream, data.corpus_identity):
        with pytest.raises(ValueError, match="both --dataset .* and --train_file .* pass one of them"):
            read(**both)


def test_hub_dataset_offline_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="--train_file.*drop --dataset"):
        data.text_stream(dataset="wikitext", dataset_config="wikitext-2-raw-v1", train_file=None, max_bytes=None)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def test_gpt_tokenizer_round_trips_and_has_special_tokens(tokenizers: dict) -> None:
    tokenizer = tokenizers["gpt"]
    text = 'def greet(name):\n    """Say hello."""\n    return f"Hello, {name}! ünïcode"\n'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE is lossless
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == eos
    assert len(tokenizer) == VOCAB


def test_bert_tokenizer_round_trips_and_has_special_tokens(tokenizers: dict) -> None:
    tokenizer = tokenizers["bert"]
    ids = tokenizer("Return the Value of the object.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "return the value of the object."
    for name in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(tokenizer, f"{name}_token_id") is not None, name
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token == "[PAD]"
    assert len({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id}) == 4


def test_second_call_hits_the_cache(tokenizers: dict, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*/tokenizer.json")}
    assert len(saved) == 2 and {p.parent.name.split("-")[0] for p in saved} == {"gpt", "bert"}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached tokenizer was trained again")

    monkeypatch.setattr(data, "_train_tokenizer", no_training)
    for family in data.FAMILIES:
        again = data.get_tokenizer(family, name=None, cache_dir=cache_dir, texts=offline_texts(), vocab_size=VOCAB)
        assert again.get_vocab() == tokenizers[family].get_vocab()
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*/tokenizer.json")} == saved
    assert not list(cache_dir.glob(".*")), "no staging directories left behind"


def test_corpus_id_finds_the_cache_without_reading_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus_id = data.corpus_identity(dataset=None, dataset_config=None, train_file=None, max_bytes=CORPUS_BYTES)
    assert corpus_id == data.corpus_identity(dataset=None, dataset_config=None, train_file=None, max_bytes=CORPUS_BYTES)
    texts = offline_texts(50_000)
    first = data.get_tokenizer("gpt", name=None, cache_dir=tmp_path, texts=texts, vocab_size=300, corpus_id=corpus_id)

    def unreadable():
        raise AssertionError("the corpus was read although corpus_id named a cached tokenizer")

    monkeypatch.setattr(data, "_train_tokenizer", unreadable)
    again = data.get_tokenizer(
        "gpt", name=None, cache_dir=tmp_path, texts=unreadable, vocab_size=300, corpus_id=corpus_id
    )
    assert again.get_vocab() == first.get_vocab()


def test_hub_tokenizer_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop --tokenizer"):
        data.get_tokenizer(
            "gpt", name="gpt2-does-not-exist-offline", cache_dir=tmp_path, texts=offline_texts(), vocab_size=VOCAB
        )


# ----------------------------------------------------------------------------------------------------------
# Packed blocks


def test_gpt_blocks_shape_and_document_separators(tokenizers: dict) -> None:
    tokenizer = tokenizers["gpt"]
    blocks = data.PackedBlocks(offline_texts(BLOCK_BYTES), tokenizer, seq_len=64, family="gpt")
    batch = blocks.next_batch(4)
    assert batch.shape == (4, 64) and batch.dtype == torch.long
    # The first file's tokens, then eos, exactly as the tokenizer encodes it.
    first = next(offline_texts(BLOCK_BYTES)())
    expected = tokenizer(first)["input_ids"] + [tokenizer.eos_token_id]
    assert batch.flatten()[: min(len(expected), 256)].tolist() == expected[:256]


def test_bert_blocks_are_cls_content_sep(tokenizers: dict) -> None:
    tokenizer = tokenizers["bert"]
    blocks = data.PackedBlocks(offline_texts(BLOCK_BYTES), tokenizer, seq_len=32, family="bert")
    batch = blocks.next_batch(3)
    assert batch.shape == (3, 32)
    assert (batch[:, 0] == tokenizer.cls_token_id).all() and (batch[:, -1] == tokenizer.sep_token_id).all()
    content = batch[:, 1:-1].flatten().tolist()
    first = next(offline_texts(BLOCK_BYTES)())
    assert content == tokenizer(first, add_special_tokens=False)["input_ids"][: 3 * 30]


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_ranks_take_disjoint_interleaved_blocks(tokenizers: dict, micro_batch: int) -> None:
    make = functools.partial(data.PackedBlocks, offline_texts(BLOCK_BYTES), tokenizers["gpt"], seq_len=48, family="gpt")
    single = torch.cat(collect(make(), 4, 2 * micro_batch))  # 8 * micro_batch global blocks, in order
    ranks = [torch.cat(collect(make(rank=r, world_size=2), 4, micro_batch)) for r in range(2)]
    assert not any(torch.equal(a, b) for a in ranks[0] for b in ranks[1])
    interleaved = torch.stack([row for pair in zip(*ranks) for row in pair])
    assert torch.equal(interleaved, single)


def test_epochs_wrap_around_dropping_the_short_tail(tmp_path: Path, tokenizers: dict) -> None:
    tokenizer = tokenizers["gpt"]
    paragraphs = [f"paragraph number {i} says something about item {i * 7}." for i in range(12)]
    path = write(tmp_path / "small.txt", "\n\n".join(paragraphs))
    texts = functools.partial(data.text_stream, dataset=None, dataset_config=None, train_file=path, max_bytes=None)
    stream: list[int] = []
    for p in paragraphs:
        stream += tokenizer(p)["input_ids"] + [tokenizer.eos_token_id]
    seq_len = 16
    per_epoch = len(stream) // seq_len
    assert per_epoch >= 3 and len(stream) % seq_len, "the test wants a short tail to drop"
    expected = torch.tensor(stream[: per_epoch * seq_len]).view(per_epoch, seq_len)

    blocks = data.PackedBlocks(texts, tokenizer, seq_len=seq_len, family="gpt")
    got = torch.cat(collect(blocks, 2 * per_epoch + 1))
    assert torch.equal(got[:per_epoch], expected)
    assert torch.equal(got[per_epoch : 2 * per_epoch], expected)  # epoch 2 is epoch 1 again
    assert torch.equal(got[-1], expected[0])
    assert blocks.epoch == 2 and blocks.state_dict()["blocks_consumed"] == 2 * per_epoch + 1


@pytest.mark.parametrize("family", data.FAMILIES)
def test_exact_resume_across_an_epoch(tmp_path: Path, tokenizers: dict, family: str) -> None:
    lines = [f"document {i}: " + " ".join(f"w{i * j % 97}" for j in range(5 + i % 7)) for i in range(30)]
    path = write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in lines))
    texts = functools.partial(data.text_stream, dataset=None, dataset_config=None, train_file=path, max_bytes=None)
    make = functools.partial(data.PackedBlocks, texts, tokenizers[family], seq_len=24, family=family)

    uninterrupted = make(rank=1, world_size=2)
    before = collect(uninterrupted, 3, 2)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # what a checkpoint stores
    after = collect(uninterrupted, 12, 2)
    assert uninterrupted.epoch >= 1, "the test wants the resumed run to cross an epoch boundary"

    resumed = make(rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, collect(resumed, 12, 2)))
    assert resumed.state_dict() == uninterrupted.state_dict()

    # The state is the same on every rank, and a different world size continues the same global order.
    other_rank = make(rank=0, world_size=2)
    collect(other_rank, 3, 2)
    assert other_rank.state_dict() == state
    one_rank = make()
    one_rank.load_state_dict(state)
    global_order = torch.cat(collect(one_rank, 4, 1))
    assert torch.equal(global_order[1::2], after[0])  # rank 1 of 2 had global blocks 1 and 3 of this round
    assert not torch.equal(before[-1], after[0])


def test_state_from_other_settings_is_refused(tokenizers: dict) -> None:
    blocks = data.PackedBlocks(offline_texts(BLOCK_BYTES), tokenizers["gpt"], seq_len=32, family="gpt")
    state = blocks.state_dict()
    other = data.PackedBlocks(offline_texts(BLOCK_BYTES), tokenizers["gpt"], seq_len=64, family="gpt")
    with pytest.raises(ValueError, match="seq_len=32.*seq_len=64"):
        other.load_state_dict(state)


def test_corpus_shorter_than_a_block_is_a_clear_error(tmp_path: Path, tokenizers: dict) -> None:
    path = write(tmp_path / "tiny.txt", "too short")
    texts = functools.partial(data.text_stream, dataset=None, dataset_config=None, train_file=path, max_bytes=None)
    blocks = data.PackedBlocks(texts, tokenizers["gpt"], seq_len=128, family="gpt")
    with pytest.raises(ValueError, match="fewer than one block"):
        blocks.next_batch(1)


# ----------------------------------------------------------------------------------------------------------
# Synthetic batches and masking


def test_synthetic_batch_is_deterministic_per_seed_step_rank() -> None:
    make = functools.partial(data.synthetic_batch, vocab_size=50, micro_batch=2, seq_len=16)
    batch = make(step=3, rank=1)
    assert batch.shape == (2, 16) and batch.dtype == torch.long
    assert 0 <= batch.min() and batch.max() < 50
    assert torch.equal(batch, make(step=3, rank=1))
    assert not torch.equal(batch, make(step=3, rank=0))
    assert not torch.equal(batch, make(step=4, rank=1))
    assert not torch.equal(batch, make(step=3, rank=1, seed=1))


def test_mask_tokens(tokenizers: dict) -> None:
    tokenizer = tokenizers["bert"]
    blocks = data.PackedBlocks(offline_texts(BLOCK_BYTES), tokenizer, seq_len=128, family="bert")
    input_ids = blocks.next_batch(32)
    input_ids[:, -20:] = tokenizer.pad_token_id  # padding, as a shorter last block would carry
    original = input_ids.clone()

    def generator(step: int = 0) -> torch.Generator:
        return data.step_generator(seed=0, step=step, rank=0, purpose="mask")

    masked, labels = data.mask_tokens(input_ids, tokenizer, generator=generator())
    assert torch.equal(input_ids, original), "the input is not modified in place"
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    picked = labels != -100
    assert not (picked & special).any(), "special tokens and padding are never masked"
    assert torch.equal(masked[special], original[special])
    assert torch.equal(labels[picked], original[picked])
    assert torch.equal(masked[~picked], original[~picked])
    assert 0.13 < picked.sum() / (~special).sum() < 0.17
    became_mask = (masked == tokenizer.mask_token_id) & picked
    assert 0.75 < became_mask.sum() / picked.sum() < 0.85
    unchanged = (masked == original) & picked
    assert 0.06 < unchanged.sum() / picked.sum() < 0.15  # 10% kept, plus random draws that hit the same id

    again = data.mask_tokens(input_ids, tokenizer, generator=generator())
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = data.mask_tokens(input_ids, tokenizer, generator=generator(step=1))
    assert not torch.equal(other[1], labels)
