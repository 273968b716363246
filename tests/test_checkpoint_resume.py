"""Resume and resharding for models with parameters smaller than the partition (0 rows on some ranks).

Issue #15, defect 1: any parameter with fewer rows than p made `load_checkpoint` fail on the ranks that hold
none of its rows (`cannot reshape tensor of 0 elements into shape [0, -1]`): BERT's 2-row
`token_type_embeddings` at p = 4, a 2-label classifier head (2 rows, and a 2-element bias). Here a tiny BERT
sequence classifier with both is

- resumed at p in {1, 2, 4, 8} (world 8): save after step 2, a fresh model, optimizer and scheduler in the
  same ranks load it and continue; losses, final weights, optimizer states and learning rates must be
  bit-identical to the straight run (fp32 on CPU, deterministic algorithms, dropout on so the RNG restore
  matters);
- resumed in new processes at p = 4 (world 4): nothing survives but the files;
- resharded around the chain p 1 -> 2 -> 4 -> 8 -> 1 (save, load at the next p, save again, ...), every
  parameter and optimizer state compared bit for bit with the original at every hop.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

import mics_hf
from distributed import DistPool
from models import VOCAB
from parity import full_optimizer_state

STEPS = 3
SAVE_AT = 1
SEQ = 8


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=16, type_vocab_size=2, num_labels=2, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.1,
    )
    return BertForSequenceClassification(cfg).float()


def _data(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, token_type_ids, labels) indexed [step, rank]: token types 0/1 so both embedding rows train."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (STEPS, world, 2, SEQ), generator=g)
    types = torch.randint(0, 2, (STEPS, world, 2, SEQ), generator=g)
    labels = torch.randint(0, 2, (STEPS, world, 2), generator=g)
    return ids, types, labels


def _make(p: int, seed: int, rank: int):
    """Model (initial weights from `seed`), AdamW and a scheduler; then a per-rank RNG stream for dropout."""
    torch.use_deterministic_algorithms(True)
    net = mics_hf.shard_model(tiny_bert_classifier(seed), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    torch.manual_seed(1000 + rank)
    return net, opt, sched


def _steps(net, opt, sched, rank: int, world: int, first: int, last: int) -> list[float]:
    ids, types, labels = _data(world)
    losses = []
    net.train()
    for step in range(first, last):
        loss = net(input_ids=ids[step, rank], token_type_ids=types[step, rank], labels=labels[step, rank]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _snapshot(net, opt, sched, losses) -> dict:
    return {"losses": losses, "params": mics_hf.full_state_dict(net, rank0_only=False), "optim": full_optimizer_state(net, opt),
            "lr": sched.get_last_lr()}


def _straight_and_resumed(rank: int, world: int, *, p: int, root: str) -> tuple[dict, dict]:
    net, opt, sched = _make(p, seed=0, rank=rank)
    straight = _snapshot(net, opt, sched, _steps(net, opt, sched, rank, world, 0, STEPS))

    net, opt, sched = _make(p, seed=0, rank=rank)
    first = _steps(net, opt, sched, rank, world, 0, SAVE_AT)
    mics_hf.save_checkpoint(root, net, opt, step=SAVE_AT, scheduler=sched, extra={"next_step": SAVE_AT})
    net, opt, sched = _make(p, seed=5, rank=rank)  # other weights, RNG reseeded: all must come from the checkpoint
    info = mics_hf.load_checkpoint(root, net, opt, scheduler=sched)
    assert info == {"step": SAVE_AT, "next_step": SAVE_AT}
    resumed = _snapshot(net, opt, sched, first + _steps(net, opt, sched, rank, world, info["next_step"], STEPS))
    return straight, resumed


def _assert_same(got: dict, ref: dict, where) -> None:
    assert got["losses"] == ref["losses"], where
    assert got["lr"] == ref["lr"], where
    for part in ("params", "optim"):
        assert set(got[part]) == set(ref[part]), where
        for key, value in ref[part].items():
            assert torch.equal(got[part][key], value), (where, part, key)


def test_resume_is_bit_identical_at_every_partition_size(pools, tmp_path):
    small = ["bert.embeddings.token_type_embeddings.weight", "classifier.weight", "classifier.bias"]
    for p in (1, 2, 4, 8):
        results = pools(8).run(_straight_and_resumed, p=p, root=str(tmp_path / f"p{p}"))
        for rank, (straight, resumed) in enumerate(results):
            _assert_same(resumed, straight, (p, rank))
        assert all(key in results[0][0]["params"] for key in small)


def _job(rank: int, world: int, *, root: str, part: int) -> dict:
    """Part 1 trains to SAVE_AT and saves; part 2 (other processes) builds everything anew, loads, finishes."""
    net, opt, sched = _make(4, seed=0 if part == 1 else 5, rank=rank)
    if part == 1:
        losses = _steps(net, opt, sched, rank, world, 0, SAVE_AT)
        mics_hf.save_checkpoint(root, net, opt, step=SAVE_AT, scheduler=sched, extra={"next_step": SAVE_AT})
        return {"losses": losses}
    info = mics_hf.load_checkpoint(root, net, opt, scheduler=sched)
    return _snapshot(net, opt, sched, _steps(net, opt, sched, rank, world, info["next_step"], STEPS))


def _straight(rank: int, world: int) -> dict:
    net, opt, sched = _make(4, seed=0, rank=rank)
    return _snapshot(net, opt, sched, _steps(net, opt, sched, rank, world, 0, STEPS))


def test_resume_in_new_processes_with_empty_shards(pools, tmp_path):
    root = str(tmp_path / "ckpt")
    straight = pools(4).run(_straight)
    with DistPool(4) as first_job:
        part1 = first_job.run(_job, root=root, part=1)
    with DistPool(4) as second_job:  # new processes: nothing survives but the files
        part2 = second_job.run(_job, root=root, part=2)
    for rank, (ref, a, b) in enumerate(zip(straight, part1, part2)):
        _assert_same({**b, "losses": a["losses"] + b["losses"]}, ref, rank)


# ---- resharding chain -------------------------------------------------------------------------------------
def _hop(rank: int, world: int, *, load_from: str | None, save_to: str, p: int) -> dict:
    net, opt, sched = _make(p, seed=0, rank=rank)
    if load_from is None:
        _steps(net, opt, sched, rank, world, 0, SAVE_AT)
    else:
        mics_hf.load_checkpoint(load_from, net, opt, scheduler=sched)
    mics_hf.save_checkpoint(save_to, net, opt, step=SAVE_AT, scheduler=sched)
    return {"losses": [], "params": mics_hf.full_state_dict(net, rank0_only=False), "optim": full_optimizer_state(net, opt),
            "lr": sched.get_last_lr()}


def test_resharding_chain_through_empty_shards(pools, tmp_path):
    chain = [1, 2, 4, 8, 1]
    original = None
    previous = None
    for i, p in enumerate(chain):
        root = str(tmp_path / f"hop{i}-p{p}")
        got = pools(8).run(_hop, load_from=previous, save_to=root, p=p)
        original = original or got[0]
        for rank, snapshot in enumerate(got):
            _assert_same(snapshot, original, (chain[: i + 1], rank))
        previous = root
