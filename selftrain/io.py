"""Atomic writes, strict JSONL reading, content hashes, file locks and umask-following permissions."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line."""


# How many bad records one error message lists before it only counts the rest.
MAX_LISTED_ERRORS = 20

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set-and-restore
    under a lock (the judge client writes cache files from several threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    The file gets the permissions a plain open() would give (0666 less the umask), not mkstemp's 0600, so a
    group can share results and caches. An OS error (no space, file too large, no permission) names the file;
    the old content, if any, stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def follow_umask(path: str | Path) -> Path:
    """Give a file, or a folder and everything in it, the permissions a plain open()/mkdir() would: safetensors
    writes its files 0600 and tempfile.mkdtemp makes folders 0700, which a group sharing caches and checkpoints
    cannot read. Executable files stay executable (for those who may read them)."""
    path = Path(path)
    mask = current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in entries:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        full = 0o777 if p.is_dir() or mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)
    return path


def write_npy(path: str | Path, array: Any, record: bool = False) -> Path:
    """A numpy array as a .npy file, written atomically (as atomic_write_bytes); record=True also records its
    sha256 beside it (`write_recorded`), as a cache entry needs."""
    import io as _io

    import numpy as np

    buf = _io.BytesIO()
    np.save(buf, array)
    return (write_recorded if record else atomic_write_bytes)(path, buf.getvalue())


def load_cached_npy(path: str | Path, what: str) -> Any | None:
    """A cached array, only when its file is the one written (the sha256 recorded beside it, checked on every hit);
    None when there is no entry or, said in one line naming the entry, when it no longer matches (computed again)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        return None
    problem = recorded_problem(path)
    if problem is None:
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as e:
            problem = f"unreadable ({e})"
    print(f"{what} cache entry {path}: {problem}; computing it again")
    return None


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has neither, and a strict reader refuses Python's NaN token."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (allow_nan=False after NaN/inf became null), atomically."""
    text = json.dumps(_finite(obj), indent=2, ensure_ascii=False, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e


def write_csv(path: str | Path, frame: Any, index: bool = False) -> Path:
    """A pandas frame as CSV, atomically (as atomic_write_bytes)."""
    return atomic_write_text(path, frame.to_csv(index=index))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    lines = [json.dumps(_finite(r), ensure_ascii=False, allow_nan=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error): each line decoded as UTF-8 on its own, so one bad byte names its line
    and offset and the other lines still read."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a JSONL file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start} of the line)"


def scan_jsonl(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Every (line number, record) of a JSONL file and every bad line's error ("file:line: why"), all at once.
    Blank lines are skipped; anything else must be one JSON object."""
    path = Path(path)
    good, bad = [], []
    for lineno, line, err in _lines(path):
        if line is not None and not line.strip():
            continue
        if line is not None:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                err = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(rec, dict):
                    good.append((lineno, rec))
                    continue
                err = f"expected a JSON object, got {type(rec).__name__}"
        bad.append(f"{path}:{lineno}: {err}")
    return good, bad


_LINE = re.compile(r":(\d+): ")


def _line_of(error: str) -> int:
    """The line number of a "file:line: why" error; 0 (listed first) for one about the whole file."""
    m = _LINE.search(error)
    return int(m.group(1)) if m else 0


def raise_all(errors: list[str], what: str) -> None:
    """One DataError listing every bad record (the first MAX_LISTED_ERRORS, then a count)."""
    if not errors:
        return
    # In file order, whichever check found them (JSON errors are found in a first pass, shape errors after).
    errors = sorted(errors, key=_line_of)
    shown = errors[:MAX_LISTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    head = f"{len(errors)} bad record(s) in {what}:" if len(errors) > 1 else ""
    raise DataError((head + "\n  " if head else "") + "\n  ".join(shown) + more)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record); blank lines are skipped, anything else must be a JSON object. Every bad
    line of the file is reported at once (DataError), before any record is yielded."""
    good, bad = scan_jsonl(path)
    raise_all(bad, str(path))
    yield from good


def read_jsonl(path: str | Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------- recorded hashes


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_recorded(path: str | Path, data: bytes) -> Path:
    """Write `path` atomically and record its sha256 beside it (`<name>.sha256`), so a reader can tell the file
    is the one that was written (`recorded_problem`)."""
    path = atomic_write_bytes(path, data)
    atomic_write_text(_digest_file(path), hashlib.sha256(data).hexdigest() + "\n")
    return path


def recorded_problem(path: str | Path, digest: str | None = None) -> str | None:
    """None when `path` matches the sha256 recorded when it was written (`digest`, else its `<name>.sha256`
    file); else what is wrong, in a few words."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if digest is None:
        try:
            digest = _digest_file(path).read_text().strip()
        except OSError:
            return "no sha256 was recorded when it was written"
    if not digest:
        return "no sha256 was recorded when it was written"
    return None if sha256_file(path) == digest else "its content no longer matches the sha256 recorded when written"


def remove_recorded(path: str | Path) -> None:
    """Remove a file written by `write_recorded` and its recorded hash."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _digest_file(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- locks


class FileLock:
    """An flock on a lock file, exclusive or shared. The kernel releases it when the holder closes it or dies, so
    a killed owner never blocks anyone; nothing is left to clean up by hand. An exclusive holder writes who it is
    into the file (`owner`) for the messages of those who wait. Works wherever flock does (local disks; NFS
    emulates it with byte-range locks, which is what array tasks on a shared file system need)."""

    def __init__(self, path: str | Path, shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self.fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies: a group can share it
        except PermissionError:  # someone else's lock file we may read but not write: flock needs no write access
            return os.open(self.path, os.O_RDONLY)

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; False (without waiting) when `wait` is False and someone else holds it."""
        if self.fd is not None:
            return True
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file (`remove`): a lock on an unlinked file guards nothing.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        if not self.shared:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n"
                          .encode(), 0)  # fmt: skip
        return True

    def owner(self) -> str:
        """Who holds (or last held) the lock, as its holder wrote it; empty when unknown."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def remove(self) -> None:
        """Delete the lock file while holding it exclusively (whoever waits on it then locks a fresh one)."""
        assert self.fd is not None and not self.shared
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __del__(self) -> None:  # a forgotten lock is dropped with its object, not only with its process
        self.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
