"""Read what an offline W&B run logged: wandb writes `run-*.wandb` as a LevelDB-style log of protobuf Records.

Layout (wandb 0.17-0.31): a 7-byte file header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks
of records, each with a 7-byte header (CRC32 4, length 2 little-endian, type 1: full / first / middle / last);
a record never straddles a block, and a block tail shorter than a header is zero padding. wandb has no public
reader for it, so the tests keep this small one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < HEADER:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_run(run_file: str | Path) -> dict[str, Any]:
    """{'history': [ {key: value, ...} per logged step ], 'config': {key: value}} of one offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config = [], {}
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config}


def find_run_file(wandb_dir: str | Path) -> Path:
    files = sorted(Path(wandb_dir).rglob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {wandb_dir}")
    return files[-1]
