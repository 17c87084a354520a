"""Job output: result records -> JSONL / Parquet / OpenAI Batch output, crash-safe and resumable.

Files next to the output ``out.jsonl``:

* ``out.jsonl.state.json``     the job fingerprint (model sha + parameters), written atomically at start;
                               ``"complete": true`` once the final file exists. A different fingerprint
                               is refused unless ``overwrite``.
* ``out.jsonl.partial.jsonl``  the journal: one JSON line per finished record, in completion order, each
                               flushed and fsynced before ``write`` returns. On reopen a torn tail (crash
                               mid-write) is cut off and its ids fill ``done``. With ``fmt="jsonl"`` and
                               ``ordered=False`` the output file itself is the journal.

``finalize()`` rewrites the journal in input order (sorted by ``index``, then ``sample_index``) into the
final format through a temporary file and ``os.replace``, marks the state complete and deletes the journal.
It streams: it keeps an index of line offsets (4 int64 per record), never all records as dicts.

* ``out.jsonl.lock``           one writer per output: ``OutputLock`` holds an exclusive ``flock`` on it (and
                               writes its pid into it) before any other file of the job is read, created,
                               written or deleted, so a second job on the same output stops at once with
                               ``out.jsonl is being written by another bitnet-batch job (pid N)`` and touches
                               nothing. It is never deleted (deleting a held lock file would let a third job lock
                               a new one); a job that takes it before opening its sink (``lock=``) holds it
                               until ``close()``, so the job's summary is written under it too.

A full disk (``ENOSPC``, ``EDQUOT``) while writing becomes a ``BitnetBatchError`` naming the file, the number of
records safely in the journal, and that the same command resumes; the journal never keeps a torn line.

The record contract is ``bitnet_batch.records``'s, checked by ``write``; Parquet stores extra keys as JSON
text columns. With ``sample_index`` several records may share an id (n samples); they are ordered by (index,
sample_index) and, in the OpenAI format, become the choices of one line. numpy scalars are accepted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import numbers
import os
import socket
import time
from array import array
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bitnet_batch.errors import BitnetBatchError, ConfigError
from bitnet_batch.io.readers import resolve_format
from bitnet_batch.records import ERROR_KEYS, KNOWN_KEYS, PARQUET_EXTRA_COLUMNS, TIMING_KEYS, USAGE_KEYS

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, single-writer is the user's duty
    fcntl = None

FORMATS = ("jsonl", "parquet", "openai")
STATE_SUFFIX = ".state.json"
JOURNAL_SUFFIX = ".partial.jsonl"
LOCK_SUFFIX = ".lock"
STATE_VERSION = 1
PARQUET_ROWS_PER_GROUP = 10_000   # records parsed and converted at a time during finalize
_MAX_READ_BYTES = 1 << 20         # finalize reads adjacent journal lines in blocks of up to 1 MiB

_KNOWN_SET = frozenset(KNOWN_KEYS)


def check_output_format(output, fmt: str | None = None) -> str:
    """The format of an output path (its extension, or ``fmt``), checked before the job takes the output's lock:
    a wrong extension stops the job before it creates anything."""
    return resolve_format(Path(output), fmt, formats=FORMATS, what="output")


class OutputLock:
    """The one-writer lock of an output (a file or a directory of part files): an exclusive, non-blocking
    ``flock`` on ``<output>.lock``, taken before anything else of the job is touched.

    The lock file is opened with O_CREAT and never truncated by a process that does not hold the lock, so a
    refused job changes nothing; its holder writes ``pid host`` into it for the refusal message. It is never
    deleted: a job that deleted it while another process had it open would let a third job lock a new file.
    The lock goes with the process (the kernel drops it when the descriptor closes), so a crashed job never
    leaves a stale lock behind. ``release()`` may be called more than once."""

    def __init__(self, output):
        self.output = Path(output)
        self.path = _sibling(self.output, LOCK_SUFFIX)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ConfigError(f"{self.output}: cannot create the output's lock file {self.path.name} in "
                              f"{self.path.parent} ({e.strerror or e})") from e
        try:
            self._acquire(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def _acquire(self, fd: int) -> None:
        if fcntl is None:  # pragma: no cover - no advisory locks on this platform
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.path}: cannot lock the output ({e.strerror or e}); the file system "
                                  f"may not support locks") from e
            raise ConfigError(f"{self.output} is being written by another bitnet-batch job "
                              f"({_lock_holder(fd)})") from None
        try:                        # who holds it, for the message of a refused job (best effort)
            os.ftruncate(fd, 0)     # a reader that finds it empty retries (see _lock_holder)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def _lock_holder(fd: int, tries: int = 20) -> str:
    """``pid N`` (``pid N on HOST`` from another machine) of the lock's holder, read from the lock file. The
    holder writes it right after locking, so an empty file is read again for up to ~0.1 s."""
    for _ in range(tries):
        fields = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if fields and fields[0].isdigit():
            host = fields[1] if len(fields) > 1 else None
            return f"pid {fields[0]}" + (f" on {host}" if host and host != socket.gethostname() else "")
        time.sleep(0.005)
    return "pid unknown"


class OutputSink:
    """Crash-safe writer of one job's output. ``done`` maps the id of every record already written (by a
    previous, interrupted run or by this one) to its index; a complete job has all of them.

    ``lock``: the output's ``OutputLock``, when the job took it already (before loading the model, so a second
    job fails fast); the sink then owns it and releases it in ``close()`` (also when this constructor fails).
    Without it the sink takes the lock itself, first thing, and releases it in ``finalize()`` or ``close()``."""

    def __init__(self, path, *, fmt: str | None = None, fingerprint: dict, overwrite: bool = False,
                 ordered: bool = True, model_name: str = "bitnet", lock: OutputLock | None = None,
                 columns: dict | None = None):
        self.path = Path(path)
        self._lock = lock if lock is not None else OutputLock(self.path)   # before anything is read or written
        self._keep_lock = lock is not None       # handed in: held until close(), past finalize()
        try:
            if self._lock.path != _sibling(self.path, LOCK_SUFFIX) or not self._lock.held:
                raise ConfigError(f"{self.path}: the lock given is not this output's held lock "
                                  f"({self._lock.path})")
            self.fmt = check_output_format(self.path, fmt)
            self.ordered = bool(ordered)
            self.model_name = model_name
            self.fingerprint = _plain_fingerprint(fingerprint)
            self.state_path = _sibling(self.path, STATE_SUFFIX)
            self.journal_path = self.path if self._is_own_journal else _sibling(self.path, JOURNAL_SUFFIX)
            self.done: dict[str | int, int] = {}
            self._samples: set[tuple[str | int, int]] = set()   # (id, sample_index) of records with one
            self._extra_keys: set[str] = set()                  # non-standard record keys -> Parquet JSON columns
            self._columns = dict(columns or {})                  # ... or typed ones: key -> pyarrow type
            self._index = _OffsetIndex()
            self._file = None                                    # the journal, O_APPEND
            self._offset = 0                                     # journal size = offset of the next line
            self._state: dict = {}
            self._complete = False
            self.replaced: list[str] = []   # what differed in an earlier job on this output that wrote nothing

            self.path.parent.mkdir(parents=True, exist_ok=True)
            if overwrite:
                self._remove_previous()
            state = self._read_state()
            with self._disk_full(self.state_path, "while starting the job"):
                if state is None:
                    self._start_fresh()
                else:
                    self._resume(state)
        except BaseException:
            self.close()
            raise

    @property
    def _is_own_journal(self) -> bool:
        return self.fmt == "jsonl" and not self.ordered

    @property
    def complete(self) -> bool:
        """True once ``finalize`` has produced the output (in this or an earlier run)."""
        return self._complete

    def is_done(self, record_id, sample_index: int | None = None) -> bool:
        """True when the record for ``record_id`` (sample ``sample_index`` of it, when given) is already
        written. A complete job has every sample of every id it holds."""
        if record_id not in self.done:
            return False
        return sample_index is None or self._complete or (record_id, sample_index) in self._samples

    # ------------------------------------------------------------------------------------------ public API

    def write(self, record: dict) -> None:
        """Append one finished record to the journal; it is on disk (fsync) when this returns."""
        if self._complete:
            raise BitnetBatchError(f"{self.path}: output is already complete; start again with --overwrite "
                                   f"to produce it anew")
        if self._file is None:
            raise BitnetBatchError(f"{self.path}: write() on a closed OutputSink")
        _check_record(record)
        key_id, sample = record["id"], record.get("sample_index")
        if (key_id in self.done) if sample is None else ((key_id, sample) in self._samples):
            what = f"id {key_id!r}" + ("" if sample is None else f" sample {sample}")
            raise BitnetBatchError(f"{self.path}: a record for {what} was already written")
        data = _encode_line(record)
        with self._disk_full(self.journal_path, "while writing a record"):
            self._append(data)
        self._register(record, self._offset, len(data))
        self._offset += len(data)

    def finalize(self) -> Path:
        """Write the final output in input order (atomically), mark the job complete, drop the journal."""
        if self._complete:
            self._release_own_lock()
            return self.path
        if self._file is None:
            raise BitnetBatchError(f"{self.path}: finalize() on a closed OutputSink")
        extra: dict = {}
        if not self._is_own_journal:
            tmp = _sibling(self.path, ".tmp")
            try:
                with self._disk_full(tmp, "while writing the final output"):
                    extra = _FINALIZERS[self.fmt](self, tmp)
                    _fsync_path(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)     # frees the space it took; the journal has every record
                raise
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        with self._disk_full(self.state_path, "while marking the job complete"):
            self._write_state({**self._state, "complete": True, "records": len(self._index), **extra})
        self._close_journal()
        if not self._is_own_journal:
            self.journal_path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
        self._complete = True
        self._release_own_lock()
        return self.path

    def close(self) -> None:
        """Close the journal and release the output's lock. The job can be resumed by a new OutputSink later."""
        self._close_journal()
        self._lock.release()

    def _release_own_lock(self) -> None:
        """After finalize: a lock the sink took itself goes now; one handed in stays until close()."""
        if not self._keep_lock:
            self._lock.release()

    def _close_journal(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "OutputSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- state file

    def _read_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.state_path}: unreadable job state ({e}); use --overwrite to start "
                              f"fresh") from e
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"{self.state_path}: not a bitnet-batch state file of version {STATE_VERSION}; "
                              f"use --overwrite to start fresh")
        return state

    def _write_state(self, state: dict) -> None:
        tmp = _sibling(self.state_path, ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.state_path)
        _fsync_dir(self.state_path.parent)
        self._state = state

    def _start_fresh(self) -> None:
        for stray in (self.path, self.journal_path):
            if stray.exists():
                raise ConfigError(f"{stray}: exists but has no job state {self.state_path.name} (not written "
                                  f"by bitnet-batch, or the state was deleted); use --overwrite to replace it")
        self._write_state({"version": STATE_VERSION, "fingerprint": self.fingerprint, "format": self.fmt,
                           "ordered": self.ordered, "started_at": time.time(), "complete": False})
        self._open_journal()

    def _resume(self, state: dict) -> None:
        changes = _state_changes(state, self.fingerprint, self.fmt, self.ordered)
        if changes and self._wrote_nothing(state):
            self._remove_previous()
            self.replaced = changes
            self._start_fresh()
            return
        if changes:
            what = "output" if state.get("complete") else "partial output"
            raise ConfigError(f"{self.path}: the existing {what} was made by a different job "
                              f"({'; '.join(changes)}); use --overwrite to start fresh (deletes it)")
        self._state = state
        if not state.get("complete"):
            self._open_journal()
            return
        if not self.path.exists():
            raise ConfigError(f"{self.path}: job state says complete but the output file is missing; use "
                              f"--overwrite to run it again")
        if not self._is_own_journal:  # a crash after marking complete, before deleting the journal
            self.journal_path.unlink(missing_ok=True)
        self.done = _DONE_READERS[self.fmt](self)
        self._complete = True

    def _wrote_nothing(self, state: dict) -> bool:
        """An unfinished earlier job that stopped before its first record (e.g. interrupted while compiling):
        replacing it loses nothing. Its journal was either file (whatever this job's format and order)."""
        return not state.get("complete") and all(not f.exists() or f.stat().st_size == 0
                                                 for f in (self.path, _sibling(self.path, JOURNAL_SUFFIX)))

    def _remove_previous(self) -> None:
        """--overwrite: delete the previous job's files (this process holds the output's lock)."""
        for old in (self.path, self.journal_path, self.state_path, _sibling(self.path, ".tmp"),
                    _sibling(self.state_path, ".tmp")):
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ journal

    def _open_journal(self) -> None:
        f = open(self.journal_path, "a+b", buffering=0)  # O_APPEND: every write lands at the end
        try:
            self._offset = self._load_journal(f)
        except BaseException:
            f.close()
            raise
        self._file = f
        _fsync_dir(self.journal_path.parent)

    def _load_journal(self, f) -> int:
        """Index the journal's records; cut off a torn tail. Returns the size of the good part."""
        good_end, bad_at = 0, None  # bad_at: (offset, line) of the first unusable line of the tail
        with open(self.journal_path, "rb") as r:
            for lineno, raw in enumerate(r, start=1):
                record = _decode_journal_line(raw)
                if record is None:
                    bad_at = bad_at or (good_end, lineno)
                    good_end += len(raw)
                    continue
                if bad_at is not None:
                    raise ConfigError(f"{self.journal_path}:{bad_at[1]}: corrupt journal line before good "
                                      f"ones (not a crash tail); repair it or use --overwrite")
                if not self._is_duplicate(record):
                    self._register(record, good_end, len(raw))
                good_end += len(raw)
        if bad_at is not None:
            f.truncate(bad_at[0])
            os.fsync(f.fileno())
            return bad_at[0]
        return good_end

    def _is_duplicate(self, record: dict) -> bool:
        sample = record.get("sample_index")
        return record["id"] in self.done if sample is None else (record["id"], sample) in self._samples

    def _register(self, record: dict, offset: int, length: int) -> None:
        sample = record.get("sample_index")
        self.done[record["id"]] = record["index"]
        if sample is not None:
            self._samples.add((record["id"], sample))
        if not record.keys() <= _KNOWN_SET:  # rare: extra keys become Parquet JSON columns
            self._extra_keys.update(record.keys() - _KNOWN_SET)
        self._index.add(record["index"], -1 if sample is None else sample, offset, length)

    def _append(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
            os.fsync(self._file.fileno())
        except OSError:
            # disk full or similar: leave no half line behind, so later lines cannot follow a torn one
            try:
                self._file.truncate(self._offset)
            except OSError:
                pass
            raise

    @contextlib.contextmanager
    def _disk_full(self, file: Path, when: str):
        """A full disk (or quota) in the block becomes an error that says what is safe and how to go on."""
        try:
            yield
        except OSError as e:
            if not _is_disk_full(e):
                raise
            file = Path(e.filename) if isinstance(getattr(e, "filename", None), str) else file
            n = len(self._index)
            kept = (f"the {n} finished record{'s' if n != 1 else ''} before it {'are' if n != 1 else 'is'} "
                    f"safely written in {self.journal_path}" if n else "no record was written yet")
            raise BitnetBatchError(f"{file}: no space left on device {when}; {kept}. Free some space and run "
                                   f"the same command again to resume (finished items are skipped)") from e

    def _blocks_in_order(self) -> Iterator[bytes]:
        """The journal's lines sorted by (index, sample_index), as blocks of whole lines: lines that are
        already adjacent in sorted order are read together (completion order is mostly input order)."""
        with open(self.journal_path, "rb") as r:
            for offset, length in self._index.sorted_spans():
                r.seek(offset)
                yield r.read(length)

    def _records_in_order(self) -> Iterator[dict]:
        for block in self._blocks_in_order():
            for line in block.split(b"\n")[:-1]:  # JSON text never holds a raw newline
                yield _JSON_DECODE(line.decode("utf-8"))

    # ---------------------------------------------------------------------------------------- finalizers

    def _finalize_jsonl(self, tmp: Path) -> dict:
        with open(tmp, "wb") as out:
            for block in self._blocks_in_order():
                out.write(block)
        return {}

    def _finalize_parquet(self, tmp: Path) -> dict:
        import pyarrow.parquet as pq

        extra = sorted(self._extra_keys | self._columns.keys())   # typed columns even where no record has one
        schema = _parquet_schema(extra, self._columns)
        int_ids, n_ids = [], 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for records in _chunks(self._records_in_order(), PARQUET_ROWS_PER_GROUP):
                int_ids += [r["index"] for r in records if isinstance(r["id"], int)]
                n_ids += len(records)
                writer.write_table(_parquet_table(records, schema), row_group_size=PARQUET_ROWS_PER_GROUP)
        # Parquet stores ids as strings; remember which were ints so a reopened job keys ``done`` correctly.
        return {"int_ids": "all" if len(int_ids) == n_ids else ("none" if not int_ids else int_ids)}

    def _finalize_openai(self, tmp: Path) -> dict:
        created = int(self._state.get("started_at", time.time()))
        with open(tmp, "wb") as out:
            for group in _group_by_index(self._records_in_order()):
                out.write(_encode_line(_openai_line(group, created, self.model_name)))
        return {}

    # ----------------------------------------------------------------------- done ids of a complete job

    def _done_from_jsonl(self) -> dict:
        done = {}
        with open(self.path, "rb") as f:
            for raw in f:
                record = _JSON_DECODE(raw.decode("utf-8"))
                done[record["id"]] = record["index"]
        return done

    def _done_from_parquet(self) -> dict:
        import pyarrow.parquet as pq

        table = pq.read_table(self.path, columns=["id", "index"])
        ids, indices = table.column("id").to_pylist(), table.column("index").to_pylist()
        int_ids = self._state.get("int_ids", "none")
        as_int = (lambda i: True) if int_ids == "all" else (lambda i: False) if int_ids == "none" \
            else set(int_ids).__contains__
        return {(int(s) if as_int(i) else s): i for s, i in zip(ids, indices)}

    def _done_from_openai(self) -> dict:
        done = {}
        with open(self.path, "rb") as f:
            for raw in f:
                line = _JSON_DECODE(raw.decode("utf-8"))
                done[line["custom_id"]] = int(line["id"].rsplit("_", 1)[1])
        return done


_FINALIZERS: dict[str, Callable] = {"jsonl": OutputSink._finalize_jsonl, "parquet": OutputSink._finalize_parquet,
                                    "openai": OutputSink._finalize_openai}
_DONE_READERS: dict[str, Callable] = {"jsonl": OutputSink._done_from_jsonl, "parquet": OutputSink._done_from_parquet,
                                      "openai": OutputSink._done_from_openai}


class _OffsetIndex:
    """(index, sample_index, offset, length) of every journal line, as 4 int64 arrays (32 bytes/record)."""

    def __init__(self):
        self._cols = tuple(array("q") for _ in range(4))

    def __len__(self) -> int:
        return len(self._cols[0])

    def add(self, index: int, sample: int, offset: int, length: int) -> None:
        c_index, c_sample, c_offset, c_length = self._cols
        c_index.append(index)
        c_sample.append(sample)
        c_offset.append(offset)
        c_length.append(length)

    def sorted_spans(self, max_bytes: int = _MAX_READ_BYTES) -> Iterator[tuple[int, int]]:
        """(offset, length) byte ranges that, read in turn, give the lines sorted by (index, sample).
        Lines adjacent both in sorted order and in the file are merged into one range of <= max_bytes."""
        if not len(self):
            return
        index, sample, offset, length = (np.frombuffer(c, dtype=np.int64) for c in self._cols)
        order = np.lexsort((sample, index))  # last key is primary: by index, then sample
        off, size = offset[order], length[order]
        piece = np.cumsum(size) // max_bytes  # caps a merged range at ~max_bytes
        starts = np.flatnonzero((off[1:] != off[:-1] + size[:-1]) | (piece[1:] != piece[:-1])) + 1
        bounds = np.concatenate(([0], starts, [len(off)])).tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            yield int(off[s]), int(off[e - 1] + size[e - 1] - off[s])


# ------------------------------------------------------------------------------------------ record checks

def _check_record(record) -> None:
    """The output record contract (module doc): Parquet needs these exact shapes, so every format
    checks them at write time, when the runner can still name the culprit."""
    if not isinstance(record, dict):
        raise TypeError(f"output record must be a dict, got {type(record).__name__}")
    _need(_is_int(record.get("id")) or isinstance(record.get("id"), str), "id", record.get("id"), "a str or int")
    _need(_is_int(record.get("index")) and record["index"] >= 0, "index", record.get("index"), "an int >= 0")
    _need(record.get("sample_index") is None or _is_int(record["sample_index"]), "sample_index",
          record.get("sample_index"), "an int")
    for key in ("text", "finish_reason"):
        _need(record.get(key) is None or isinstance(record[key], str), key, record.get(key), "a str or None")
    _check_struct(record, "usage", USAGE_KEYS, _is_int, "ints")
    _check_struct(record, "timing", TIMING_KEYS, _is_real, "numbers")
    _check_struct(record, "error", ERROR_KEYS, lambda v: isinstance(v, str), "strings")
    logprobs = record.get("logprobs")
    _need(logprobs is None or isinstance(logprobs, list), "logprobs", logprobs, "a list or None")
    for i, entry in enumerate(logprobs or ()):
        _check_logprob(entry, f"logprobs[{i}]", top_allowed=True)


def _check_struct(record: dict, key: str, allowed: tuple, ok: Callable, kind: str) -> None:
    value = record.get(key)
    if value is None:
        return
    _need(isinstance(value, dict), key, value, f"a dict with keys {', '.join(allowed)}")
    unknown = [k for k in value if k not in allowed]
    _need(not unknown, key, value, f"a dict with keys {', '.join(allowed)} only (unknown: {unknown})")
    bad = [k for k, v in value.items() if v is not None and not ok(v)]
    _need(not bad, key, value, f"a dict of {kind} (bad: {bad})")


def _check_logprob(entry, where: str, *, top_allowed: bool) -> None:
    _need(isinstance(entry, dict), where, entry, "a dict")
    _need(isinstance(entry.get("token"), str), f"{where}.token", entry.get("token"), "a str")
    _need(_is_int(entry.get("token_id")), f"{where}.token_id", entry.get("token_id"), "an int")
    _need(_is_real(entry.get("logprob")), f"{where}.logprob", entry.get("logprob"), "a number")
    top = entry.get("top")
    if not top_allowed:
        _need(top is None, f"{where}.top", top, "absent (no nesting)")
        return
    _need(top is None or isinstance(top, list), f"{where}.top", top, "a list or None")
    for j, alt in enumerate(top or ()):
        _check_logprob(alt, f"{where}.top[{j}]", top_allowed=False)


def _need(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        text = repr(value)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(f"output record field {field!r} must be {expected}, got {text}")


def _is_int(v) -> bool:
    """int or numpy integer, not bool (``type is`` first: the ABC check is slow on 1M-line journals)."""
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _is_real(v) -> bool:
    return type(v) in (float, int) or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _json_default(o):
    """numpy scalars / arrays (token ids, float32 logprobs) -> plain Python."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"output record value of type {type(o).__name__} is not JSON serialisable")


def _encode_line(record: dict) -> bytes:
    text = json.dumps(record, ensure_ascii=False, default=_json_default)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (broken detokenisation): \\u-escape everything instead
        return json.dumps(record, ensure_ascii=True, default=_json_default).encode("ascii") + b"\n"


_JSON_DECODE = json.JSONDecoder().decode  # json.loads minus its per-call encoding sniffing


def _decode_journal_line(raw: bytes) -> dict | None:
    """A complete, well-formed journal line as a dict; None for a torn or foreign one."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = _JSON_DECODE(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or not _is_int(record.get("index")) or record["index"] < 0:
        return None
    if not (isinstance(record.get("id"), str) or _is_int(record.get("id"))):
        return None
    sample = record.get("sample_index")
    return record if sample is None or _is_int(sample) else None


# ----------------------------------------------------------------------------------------------- Parquet

def _parquet_schema(extra: list[str], typed: dict):
    """Known keys as typed columns; extra keys as the type ``typed`` gives them, else JSON text (listed in the
    schema's metadata, so readers can decode them)."""
    import pyarrow as pa

    token = [("token", pa.string()), ("token_id", pa.int64()), ("logprob", pa.float64())]
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("usage", pa.struct([(k, pa.int64()) for k in USAGE_KEYS])),
        pa.field("timing", pa.struct([(k, pa.float64()) for k in TIMING_KEYS])),
        pa.field("error", pa.struct([(k, pa.string()) for k in ERROR_KEYS])),
        pa.field("logprobs", pa.list_(pa.struct(token + [("top", pa.list_(pa.struct(token)))]))),
    ]
    json_keys = [k for k in extra if k not in typed]
    fields += [pa.field(k, typed.get(k, pa.string())) for k in extra]   # JSON text: null where absent/None
    return pa.schema(fields, metadata={PARQUET_EXTRA_COLUMNS: json.dumps(json_keys)})


def _parquet_table(records: list[dict], schema):
    import pyarrow as pa

    json_keys = set(json.loads(schema.metadata[PARQUET_EXTRA_COLUMNS.encode()]))
    columns = {f.name: [r.get(f.name) for r in records] for f in schema if f.name not in json_keys}
    columns.update({k: [None if r.get(k) is None else json.dumps(r[k], ensure_ascii=False) for r in records]
                    for k in json_keys})
    columns["id"] = [str(r["id"]) for r in records]
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# ------------------------------------------------------------------------------------------------ OpenAI

def _group_by_index(records: Iterator[dict]) -> Iterator[list[dict]]:
    """Consecutive records of the same index (the n samples of one request) as one list."""
    group: list[dict] = []
    for record in records:
        if group and record["index"] != group[0]["index"]:
            yield group
            group = []
        group.append(record)
    if group:
        yield group


def _openai_line(group: list[dict], created: int, model_name: str) -> dict:
    """One OpenAI Batch output line for one request (all its samples as choices)."""
    first, index = group[0], group[0]["index"]
    head = {"id": f"batch_req_{index}", "custom_id": first["id"]}
    failed = next((r for r in group if r.get("error")), None)
    if failed is not None:
        error = failed["error"]
        return {**head, "response": None, "error": {"code": error.get("type"), "message": error.get("message")}}
    usage = first.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens") or 0
    completion_tokens = sum((r.get("usage") or {}).get("completion_tokens") or 0 for r in group)
    body = {
        "id": f"chatcmpl-{index}", "object": "chat.completion", "created": created, "model": model_name,
        "choices": [_openai_choice(r) for r in group],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    if "cached_tokens" in usage:      # the request's prompt, counted once like prompt_tokens (its first sample)
        body["usage"]["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    return {**head, "response": {"status_code": 200, "request_id": f"req_{index}", "body": body}, "error": None}


def _openai_choice(record: dict) -> dict:
    logprobs = record.get("logprobs")
    return {
        "index": record.get("sample_index") or 0,
        "message": {"role": "assistant", "content": record.get("text")},
        "logprobs": None if logprobs is None else {"content": [_openai_logprob(e) for e in logprobs]},
        "finish_reason": record.get("finish_reason"),
    }


def _openai_logprob(entry: dict, *, with_top: bool = True) -> dict:
    out = {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode("utf-8"))}
    if with_top:
        out["top_logprobs"] = [_openai_logprob(t, with_top=False) for t in entry.get("top") or ()]
    return out


# ---------------------------------------------------------------------------------------------- helpers

def _plain_fingerprint(fingerprint) -> dict:
    """The fingerprint as it will read back from JSON (tuples -> lists), so comparisons are exact."""
    if not isinstance(fingerprint, dict):
        raise ConfigError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"fingerprint must be JSON-serialisable: {e}") from e


def _state_changes(state: dict, fingerprint: dict, fmt: str, ordered: bool) -> list[str]:
    old_fp = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
    changes = _dict_changes(old_fp, fingerprint, prefix="")
    if state.get("format") != fmt:
        changes.append(f"output format: {state.get('format')!r} -> {fmt!r}")
    if state.get("ordered") != ordered:
        changes.append(f"ordered: {state.get('ordered')!r} -> {ordered!r}")
    return changes


def _dict_changes(old: dict, new: dict, prefix: str) -> list[str]:
    """``key: old -> new`` for every differing key; nested dicts (e.g. sampling) by dotted path."""
    changes, absent = [], "<absent>"
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, absent), new.get(k, absent)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _dict_changes(a, b, prefix=f"{prefix}{k}.")
        elif a != b or (k in old) != (k in new):
            changes.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _is_disk_full(e: OSError) -> bool:
    """ENOSPC / EDQUOT, also from pyarrow (whose IO errors carry the text, not always the errno)."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)


def _refuse_if_locked(path: Path) -> None:
    """Before --overwrite deletes anything: refuse if another process holds a lock on ``path``."""
    if not path.exists() or fcntl is None:
        return
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ConfigError(f"{path}: in use by another bitnet-batch process (cannot lock it)") from e


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make renames / new files durable. Some platforms cannot open directories; that is not fatal."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
