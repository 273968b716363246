"""Files of a checkpoint: opened as untrusted input, written durably, and one saver per root at a time.

[Note: reading files an attacker may have written] Every name that comes from inside a checkpoint (the
`latest` pointer, the file names in the metadata, the `tokenizer/` directory) must be one plain path
component, and is opened with O_NOFOLLOW (a symbolic link is refused, wherever it points) and O_NONBLOCK (a
FIFO cannot hang the reader); anything but a regular file is refused. Safetensors files are parsed here, from
the same file descriptor whose size and CRC32 were checked, so nothing is read from another file than the one
verified: every header entry is checked (known dtype, shape, byte range inside the file, no overlap) before a
byte of data is used. The directories above the checkpoint are the user's own path and trusted as given.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["CheckpointError", "SafetensorsFile"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_HEADER_LIMIT = 100 * 1024 * 1024  # what the safetensors library itself accepts
_BLOCK = 1 << 22

# safetensors dtype names -> torch dtypes (the ones a MiCS checkpoint can hold)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# the names the metadata uses (str(dtype) without "torch.")
DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message says why and what to do."""


def check_name(name: Any, field: str) -> str:
    """`name` (from an untrusted field) as one plain file name: no separator, no `..`, not absolute, not hidden."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"{field} is {str(name)[:120]!r}, not a plain file name inside the checkpoint (letters, digits, '._-'; no "
            "'/', no '..', not absolute): the checkpoint was tampered with or corrupted; load an earlier one"
        )
    return name


def open_inside(directory: Path, name: str, field: str, *, follow_links: bool = False) -> int:
    """Open directory/name for reading, refusing links (unless `follow_links`: a Hugging Face cache snapshot is
    made of links to its blobs) and anything but a regular file; returns the descriptor."""
    path = directory / check_name(name, field)
    flags = os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{field}: {path} is missing; the checkpoint is incomplete, load an earlier one") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(
                f"{field}: {path} is a symbolic link; checkpoints never contain links (one could point anywhere): "
                "replace it by the file itself or load an earlier checkpoint"
            ) from None
        raise CheckpointError(f"{field}: cannot open {path} ({exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{field}: {path} is not a regular file; the checkpoint was tampered with, load an earlier one")
    return fd


def pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    """Exactly `size` bytes at `offset` (a short read means the file changed under us: an error)."""
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 30), offset + done)
        if not chunk:
            raise CheckpointError(f"{path} ended {size - done} bytes early while reading it; it was truncated, load an earlier checkpoint")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` with the file's bytes from `offset` (a short read means the file changed under us: an error)."""
    done, size = 0, len(buffer)
    while done < size:
        n = os.preadv(fd, [buffer[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path} ended {size - done} bytes early while reading it; it was truncated, load an earlier checkpoint")
        done += n


def crc32_fd(fd: int) -> int:
    crc, offset = 0, 0
    while block := os.pread(fd, _BLOCK, offset):
        crc = zlib.crc32(block, crc)
        offset += len(block)
    return crc


def crc32_file(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return crc32_fd(fd)
    finally:
        os.close(fd)


def read_small(directory: Path, name: str, field: str, limit: int) -> bytes:
    """The whole content of a small untrusted file (metadata, pointer, config), at most `limit` bytes."""
    fd = open_inside(directory, name, field)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{field}: {directory / name} has {size} bytes, more than the {limit} this file can have; it is not ours")
        return pread_exact(fd, size, 0, directory / name)
    finally:
        os.close(fd)


def parse_json(data: bytes, field: str, path: Path) -> Any:
    """JSON from untrusted bytes; any failure (syntax, encoding, nesting, huge integers) is a CheckpointError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{field}: {path} is corrupted ({str(exc)[:200]}); restore it or load an earlier checkpoint") from None


class SafetensorsFile:
    """One safetensors file of a checkpoint, opened once and read in row ranges (see the Note above).

    `expect_bytes` / `expect_crc32` (from the metadata) are checked on the open descriptor before the header is
    parsed; `field` names the metadata entry in every error.
    """

    def __init__(
        self, directory: Path, name: str, field: str, *, expect_bytes: int | None = None, expect_crc32: int | None = None,
        follow_links: bool = False,
    ) -> None:
        self.path = directory / name
        self.field = field
        self.fd = open_inside(directory, name, field, follow_links=follow_links)
        try:
            self._check(expect_bytes, expect_crc32)
            self.entries, self.data_start = self._header()
        except BaseException:
            os.close(self.fd)
            raise

    def _check(self, expect_bytes: int | None, expect_crc32: int | None) -> None:
        size = os.fstat(self.fd).st_size
        if expect_bytes is not None and size != expect_bytes:
            raise CheckpointError(
                f"checkpoint file {self.path} has {size} bytes, {expect_bytes} were written: it is truncated or was "
                "replaced; load an earlier checkpoint"
            )
        if expect_crc32 is not None and crc32_fd(self.fd) != expect_crc32:
            raise CheckpointError(f"checkpoint file {self.path} fails its CRC32 check: it is corrupted; load an earlier checkpoint")
        self.size = size

    def _header(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
        if sys.byteorder != "little":
            raise CheckpointError("safetensors data is little-endian; this machine is big-endian and cannot read it")
        bad = f"checkpoint file {self.path} ({self.field}) is not a valid safetensors file"
        if self.size < 8:
            raise CheckpointError(f"{bad}: {self.size} bytes; load an earlier checkpoint")
        n = int.from_bytes(pread_exact(self.fd, 8, 0, self.path), "little")
        if n > min(self.size - 8, _HEADER_LIMIT):
            raise CheckpointError(f"{bad}: its header claims {n} bytes; load an earlier checkpoint")
        header = parse_json(pread_exact(self.fd, n, 8, self.path), self.field, self.path)
        if not isinstance(header, dict):
            raise CheckpointError(f"{bad}: the header is not a JSON object; load an earlier checkpoint")
        data_len = self.size - 8 - n
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, begin, end))
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok or not 0 <= begin <= end <= data_len or end - begin != _numel(shape) * dtype.itemsize:
                raise CheckpointError(f"{bad}: tensor {key!r} has an invalid header entry {str(entry)[:200]}; load an earlier checkpoint")
            entries[key] = (dtype, shape, begin, end)
        spans = sorted((b, e) for _, _, b, e in entries.values() if e > b)
        if any(b < e_prev for (_, e_prev), (b, _) in zip(spans, spans[1:])):
            raise CheckpointError(f"{bad}: two tensors share bytes; load an earlier checkpoint")
        return entries, 8 + n

    def keys(self) -> set[str]:
        return set(self.entries)

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor `key`; a missing tensor is an error naming the file."""
        if key not in self.entries:
            raise CheckpointError(f"checkpoint file {self.path} has no tensor {key!r}; the checkpoint is incomplete or was tampered with")
        dtype, shape, _, _ = self.entries[key]
        return dtype, shape

    def expect(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Refuse tensor `key` unless it has exactly this dtype and shape (never cast, never broadcast)."""
        got_dtype, got_shape = self.describe(key)
        if got_dtype != dtype or tuple(got_shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint file {self.path}: tensor {key!r} is {str(got_dtype).removeprefix('torch.')} "
                f"{list(got_shape)}, the metadata says {str(dtype).removeprefix('torch.')} {list(shape)}; the checkpoint "
                "was tampered with or corrupted, load an earlier one"
            )

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of tensor `key` along dim 0 (a 0-dim tensor counts as one row), read from disk only."""
        dtype, shape, begin, _ = self.entries[key]
        dims = shape or (1,)
        if not 0 <= lo <= hi <= dims[0]:
            raise CheckpointError(f"rows [{lo}, {hi}) are outside tensor {key!r} of {self.path} (shape {list(shape)})")
        row_bytes = _numel(dims[1:]) * dtype.itemsize
        out_shape = (hi - lo, *dims[1:])
        if hi == lo or row_bytes == 0:
            return torch.empty(out_shape, dtype=dtype)
        read_as = torch.uint8 if dtype == torch.bool else dtype
        tensor = torch.empty(out_shape, dtype=read_as)
        # read straight into the tensor's memory: no intermediate bytes object, no memory map of the file
        read_into(self.fd, memoryview(tensor.view(-1).view(torch.uint8).numpy()), self.data_start + begin + lo * row_bytes, self.path)
        if dtype == torch.bool:
            if bool((tensor > 1).any()):
                raise CheckpointError(f"checkpoint file {self.path}: bool tensor {key!r} holds bytes other than 0 and 1; it is corrupted")
            tensor = tensor.to(torch.bool)
        return tensor

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor `key`, in its own shape."""
        _, shape = self.describe(key)
        dims = shape or (1,)
        return self.rows(key, 0, dims[0]).reshape(shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- writing -----------------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (bottom up), so a rename of `path` publishes durable data."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to path through a temporary sibling, fsynced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree without following links (errors propagate: nothing silent)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on `root` for one save: a second saver into the same root fails at once, clearly.

    flock(2) locks are released by the kernel when the holder dies, so a crashed job never leaves a stale lock;
    the `.lock` file itself stays (removing a lock file is racy) and is ignored by loads.
    """
    path = root / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise CheckpointError(
                f"another save into {root} is running ({holder}); two jobs must not share a checkpoint root (they would "
                "delete each other's files): give each job its own root, or wait for the other save to end"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
