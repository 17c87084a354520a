"""Where a Ray job's records go: one output file, or a directory of part files; both through ``OutputSink``.

Either way the driver alone writes, through the same crash-safe sink as the local runner (fsynced journal,
fingerprint check, resume by id, ordered finalize), so a re-run after a crash skips what is written and no
record is written twice.

* ``out.jsonl`` / ``out.parquet`` (a path with a known extension): one file, exactly as a local job writes it
  (a job may even be started locally and resumed on Ray, or the other way round).
* ``out/answers/`` (a trailing slash, an existing directory or no extension): part files
  ``part-00000.parquet``, ``part-00001.parquet``, ... (format from ``--output-format``, default Parquet), part k
  holding the records of input items ``[k * rows_per_part, (k + 1) * rows_per_part)`` in input order. Each part
  is its own ``OutputSink`` kept in the sibling directory ``answers.journal/`` (journal, state, finished
  file); a finished part is hard-linked into ``answers/``, which so holds nothing but complete part files
  (readers that load the whole directory see no journals). A part is finished as soon as the reader has
  passed its last item and every one of its items came back, so only the parts in flight are open.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from ..errors import BitnetBatchError, ConfigError
from ..io.writers import OutputLock, OutputSink, _refuse_if_locked

_EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "openai": "jsonl"}


def is_directory_output(output: str) -> bool:
    """True when ``output`` names a directory of part files rather than one file."""
    return str(output).endswith(("/", os.sep)) or Path(output).is_dir() or not Path(output).suffix


def open_output(job, fingerprint: dict, model_name: str, rows_per_part: int, lock: OutputLock | None = None,
                columns: dict | None = None):
    """The job's output: ``SingleOutput`` or ``PartedOutput``. ``lock``: the output's ``OutputLock``, held by
    the caller (the driver, from before Ray starts) and handed to a single file's sink; a directory's part
    sinks lock their own files in ``<dir>.journal/`` under it. ``columns``: typed Parquet columns of the job's
    extra record keys (``JobBase.parquet_columns``)."""
    if is_directory_output(job.output):
        return PartedOutput(Path(job.output), fmt=job.output_format or "parquet", fingerprint=fingerprint,
                            overwrite=job.overwrite, ordered=job.ordered, model_name=model_name,
                            rows_per_part=rows_per_part, columns=columns)
    sink = OutputSink(job.output, fmt=job.output_format, fingerprint=fingerprint, overwrite=job.overwrite,
                      ordered=job.ordered, model_name=model_name, lock=lock, columns=columns)
    return SingleOutput(sink)


class SingleOutput:
    """One output file: one sink for every index."""

    def __init__(self, sink: OutputSink):
        self.sink = sink
        self.fmt = sink.fmt

    def lookup(self, index: int) -> OutputSink:
        return self.sink

    def started(self, index: int) -> None:
        """An item went to an actor."""

    def returned(self, index: int) -> None:
        """An item's task came back (records written) or failed for good."""

    def seal(self, next_index: int) -> None:
        """Every item below ``next_index`` has been read."""

    def finalize(self) -> Path:
        return self.sink.finalize()

    def close(self) -> None:
        self.sink.close()

    def files(self, final: Path) -> list[Path]:
        """The finished output's data files."""
        return [final]


class PartedOutput:
    """A directory of part files, one ``OutputSink`` per part (see the module doc)."""

    def __init__(self, directory: Path, *, fmt: str, fingerprint: dict, overwrite: bool, ordered: bool,
                 model_name: str, rows_per_part: int, columns: dict | None = None):
        if fmt not in _EXTENSIONS:
            raise ConfigError(f"output format must be one of {', '.join(_EXTENSIONS)}, got {fmt!r}")
        self.dir = directory
        self.journal_dir = directory.with_name(directory.name + ".journal")
        self.fmt, self.ext = fmt, _EXTENSIONS[fmt]
        self.rows = rows_per_part
        self._sink_args = dict(fmt=fmt, fingerprint=fingerprint, ordered=ordered, model_name=model_name,
                               columns=columns)
        self._open: dict[int, OutputSink] = {}      # part -> its open sink
        self._finished: set[int] = set()
        self._outstanding: Counter = Counter()      # part -> items at actors
        self._sealed: int | float = 0               # parts below this are fully read (inf: all)
        if overwrite:
            self._remove_previous()
        elif self.dir.exists() and any(self.dir.iterdir()) and not self.journal_dir.exists():
            raise ConfigError(f"{self.dir}: directory is not empty and has no job state {self.journal_dir.name} "
                              f"(not written by bitnet-batch); use --overwrite to replace its part files")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(exist_ok=True)

    def part_name(self, part: int) -> str:
        return f"part-{part:05d}.{self.ext}"

    def lookup(self, index: int) -> OutputSink:
        part = index // self.rows
        sink = self._open.get(part)
        if sink is None:
            if part in self._finished:
                raise BitnetBatchError(f"{self.dir}: part {part} is finished; item {index} came too late")
            sink = self._open[part] = OutputSink(self.journal_dir / self.part_name(part), **self._sink_args)
        return sink

    def started(self, index: int) -> None:
        self._outstanding[index // self.rows] += 1

    def returned(self, index: int) -> None:
        part = index // self.rows
        self._outstanding[part] -= 1
        self._try_finish(part)

    def seal(self, next_index: int) -> None:
        self._seal_parts(next_index // self.rows)

    def _seal_parts(self, sealed: int | float) -> None:
        if sealed > self._sealed:
            self._sealed = sealed
            for part in sorted(p for p in self._open if p < sealed):
                self._try_finish(part)

    def _try_finish(self, part: int) -> None:
        if part < self._sealed and self._outstanding[part] <= 0 and part in self._open:
            sink = self._open.pop(part)
            self._publish(sink.finalize())
            self._finished.add(part)

    def _publish(self, final: Path) -> None:
        """Hard-link (copy where links are unsupported) a finished part into the output directory, atomically."""
        dst = self.dir / final.name
        if dst.exists() and os.path.samefile(final, dst):     # published by an earlier run (rename would no-op)
            return
        tmp = self.dir / f".{final.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(final, tmp)
        except OSError:
            shutil.copyfile(final, tmp)
        os.replace(tmp, dst)

    def finalize(self) -> Path:
        """Finish every open part (the reader is done and no item is out); returns the directory."""
        self._seal_parts(float("inf"))
        if self._open:
            raise BitnetBatchError(f"{self.dir}: parts {sorted(self._open)} still have items at actors")
        return self.dir

    def close(self) -> None:
        for sink in self._open.values():
            sink.close()

    def files(self, final: Path) -> list[Path]:
        """The finished output's data files: its part files (of this run and earlier ones)."""
        return sorted(self.dir.glob(f"part-*.{self.ext}"))

    def _remove_previous(self) -> None:
        """--overwrite: drop the journals and our part files (refused while another job writes them)."""
        if self.journal_dir.exists():
            for journal in self.journal_dir.glob("part-*"):
                _refuse_if_locked(journal)
            shutil.rmtree(self.journal_dir)
        if self.dir.exists():
            for f in self.dir.glob(f"part-*.{self.ext}"):
                f.unlink()
