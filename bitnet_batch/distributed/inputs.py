"""Job input on a Ray cluster: input shards read by Ray Data, parsed in the driver exactly like the local reader.

A job's inputs are files or directories, local or on any filesystem pyarrow knows (``s3://``, ``gs://``,
``hdfs://``, ...). Directories are expanded to their JSONL / Parquet files, sorted by path, so the item order,
indices and stand-in ids (``row-N``) are the same on every run and resume can skip by id. Ray Data reads the
shards (one file = one shard, read whole by a zero-CPU task so engine actors holding every CPU never starve
it) and the driver turns their bytes into items / ``BadRecord`` with the job kind's record spec (what its local
reader parses with: ``JobKind.record_spec``) and one duplicate-id registry for the whole job: items, errors and
``file:line`` locations are identical to the local reader's (``read_requests``, a pipeline template's reader,
``read_score_items``, ``read_embed_items``).
"""
from __future__ import annotations

import inspect
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import ConfigError
from ..io import readers as R

_PARQUET_BATCH_ROWS = 1024      # rows converted to dicts at a time (as the local reader)


@dataclass(frozen=True)
class Shard:
    """One input file."""
    uri: str            # what Ray Data reads: a local absolute path or a filesystem URI
    name: str           # the path as error locations show it (as the user gave it, or expanded from a directory)
    fmt: str            # "jsonl" | "parquet"

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri


def expand_inputs(inputs, fmt: str | None = None) -> list[Shard]:
    """The job's input files in read order: given files as they are, directories as their sorted data files."""
    shards: list[Shard] = []
    for spec in inputs:
        spec = str(spec)
        found = _expand_uri(spec, fmt) if "://" in spec else _expand_local(Path(spec), fmt)
        if not found:
            raise ConfigError(f"{spec}: input directory holds no {fmt or 'JSONL / Parquet'} files")
        shards += found
    return shards


def _expand_local(path: Path, fmt: str | None) -> list[Shard]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p.relative_to(path), fmt))
        return [Shard(str(p.resolve()), str(p), R.resolve_format(p, fmt)) for p in files]
    file_fmt = R.resolve_format(path, fmt)
    R.check_readable(path, file_fmt)       # same errors as the local reader: not found, unreadable, bad footer
    return [Shard(str(path.resolve()), str(path), file_fmt)]


def _expand_uri(uri: str, fmt: str | None) -> list[Shard]:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
    except Exception as e:   # unknown scheme, missing credentials, unreachable service
        raise ConfigError(f"{uri}: cannot open the input filesystem ({e})") from e
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{uri}: input file not found")
    if info.type != pafs.FileType.Directory:
        return [Shard(uri, uri, R.resolve_format(PurePosixPath(root), fmt))]
    base = uri.rstrip("/")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rels = sorted(PurePosixPath(e.path).relative_to(root) for e in entries if e.type == pafs.FileType.File)
    return [Shard(f"{base}/{rel}", f"{base}/{rel}", R.resolve_format(rel, fmt))
            for rel in rels if _is_data_file(rel, fmt)]


def _is_data_file(rel, fmt: str | None) -> bool:
    """Hidden and ``_``-prefixed names (``_SUCCESS``, ``.crc``) are not data, as in Spark / Arrow datasets."""
    if any(part.startswith((".", "_")) for part in rel.parts):
        return False
    return fmt is not None or rel.suffix.lower() in R.FORMAT_BY_SUFFIX


# ------------------------------------------------------------------------------------------- reading

def read_shards(ray, shards: list[Shard], *, pin_local: bool = True) -> Iterator[tuple[Shard, bytes]]:
    """(shard, its bytes) in shard order, read by Ray Data. ``pin_local``: local paths are read on the driver's
    node (``local://``), where they certainly exist; off for a Ray Client driver, which is on no node."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True       # rows in shard order: indices and ids depend on it
    ctx.enable_progress_bars = False
    uris = [f"local://{s.uri}" if pin_local and s.is_local else s.uri for s in shards]
    try:
        ds = ray.data.read_binary_files(uris, include_paths=True, **_zero_cpu(ray))
        rows = iter(ds.iter_rows())
    except Exception as e:      # listing failed: permissions, a vanished file, an unreachable service
        raise ConfigError(f"Ray Data cannot read the inputs ({type(e).__name__}: {e})") from e
    finally:       # the dataset keeps its own copy of the context
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    for shard in shards:
        try:
            row = next(rows, None)
        except Exception as e:
            raise ConfigError(f"{shard.name}: Ray Data could not read it ({type(e).__name__}: {e})") from e
        if row is None or PurePosixPath(str(row["path"])).name != PurePosixPath(shard.uri).name:
            got = None if row is None else row["path"]
            raise ConfigError(f"{shard.name}: Ray Data returned {got!r} in its place (input order lost)")
        yield shard, bytes(row["bytes"])


def _zero_cpu(ray) -> dict:
    """Read tasks take no CPU slot: the actors may hold all of them (a 1-CPU read task would wait forever)."""
    if "num_cpus" in inspect.signature(ray.data.read_binary_files).parameters:
        return {"num_cpus": 0}
    return {"ray_remote_args": {"num_cpus": 0}}     # Ray < 2.5x


def shard_rows(shard: Shard, data: bytes) -> Iterator[tuple[int, bytes | dict]]:
    """(position, raw record) of one shard, as the local reader sees its file: JSONL (1-based line number, raw
    line bytes) for every non-blank line; Parquet (0-based row, record with nulls dropped) row group by row group."""
    if shard.fmt == "parquet":
        yield from _parquet_rows(shard, data)
        return
    for lineno, raw in enumerate(io.BytesIO(data), start=1):   # splits on b"\n" only, like a binary file
        if raw.strip():
            yield lineno, raw


def _parquet_rows(shard: Shard, data: bytes) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        for group in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], use_threads=False):
                for record in batch.to_pylist():
                    yield row, R.drop_nulls(record)
                    row += 1
    except (OSError, ValueError) as e:     # ArrowInvalid derives from ValueError
        what = "not a readable Parquet file" if row == 0 else f"corrupt Parquet data near row {row}"
        raise ConfigError(f"{shard.name}: {what} ({e})") from e


# ------------------------------------------------------------------------------------------- parsing

def parse_shards(shard_bytes: Iterator[tuple[Shard, bytes]], shards: list[Shard], spec: R.RecordSpec):
    """Every record of every shard as ``spec``'s item or BadRecord, with job-wide indices and duplicate-id
    checks."""
    # names stay strings: Path() would fold "s3://b/k" into "s3:/b/k"
    ids = R.IdRegistry([(s.name, s.fmt) for s in shards])     # names a duplicate's first use as file:line
    index = 0
    for file_no, (shard, data) in enumerate(shard_bytes):
        for pos, raw in shard_rows(shard, data):
            yield R.parse_record(raw, index, R.location(shard.name, shard.fmt, pos), spec, ids, file_no, pos)
            index += 1

