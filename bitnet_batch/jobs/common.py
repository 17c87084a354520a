"""What every job shares around its loop: opening the output (lock first), logging, the progress bar, the
summary's common pieces, and the clean stop after a signal."""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EngineConfig
from ..errors import ConfigError, JobInterrupted
from ..io.readers import check_inputs, count_records
from ..io.writers import OutputLock, OutputSink, check_output_format
from ..records import count_errors


@dataclass(frozen=True)
class JobBase:
    """What every kind of job names: its input files, its output, the model and the engine to run it on."""
    inputs: tuple[str, ...]                 # input files (JSONL / Parquet), read in order
    output: str                             # output path; format from the extension or output_format
    model: str                              # GGUF path, checkpoint directory or Hugging Face repo id
    model_file: str | None = None           # file inside a hub repo
    output_format: str | None = None        # e.g. "jsonl" | "parquet"
    input_format: str | None = None         # force "jsonl" / "parquet" for all inputs
    ordered: bool = True                    # output in input order (else as items finish; JSONL only)
    overwrite: bool = False                 # start afresh instead of resuming
    ffn_act: str | None = None              # override the model's FFN activation
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if not self.inputs:
            raise ConfigError("at least one input file is required")

    def parquet_columns(self, model) -> dict:
        """Typed Parquet columns of the job's extra record keys (name -> pyarrow type); the others are JSON text."""
        return {}


def open_job(job, model, log):
    """Take the output's lock, load the model (unless given), open the job's crash-safe output with the job's
    fingerprint, and say whether it resumes. Returns (model, model sha256, OutputSink)."""
    from ..model.model import load_model

    check_inputs(list(job.inputs), job.input_format)    # a mistyped path stops the job before it touches anything
    check_output_format(job.output, job.output_format)
    lock = OutputLock(job.output)        # then: a second job on this output stops here, having touched nothing
    try:
        if model is None:
            model = load_model(job.model, filename=job.model_file, ffn_act=job.ffn_act)
        log(f"model: {model.path} ({model.config.arch}, {model.config.n_layer} layers, vocab "
            f"{model.config.n_vocab}) loaded in {model.load_s:.2f}s")
        sha = model.sha256()
        sink = OutputSink(job.output, fmt=job.output_format, fingerprint=job.fingerprint(sha), overwrite=job.overwrite,
                          ordered=job.ordered, model_name=model.config.name or model.path.name, lock=lock,
                          columns=job.parquet_columns(model))
    except BaseException:
        lock.release()                   # the sink owns it once opened: released by sink.close()
        raise
    if sink.replaced:
        log(f"{job.output}: an unfinished earlier job on this output ({'; '.join(sink.replaced)}) had written "
            f"nothing; starting afresh")
    if sink.done:
        log(f"resuming: {len(sink.done)} items already done")
    return model, sha, sink


def raise_if_stopped(stop, sink: OutputSink, job) -> None:
    """After a job loop: if a signal stopped it, close the journal (every complete record is in it) and raise
    ``JobInterrupted`` with how many input items the output holds."""
    if stop.requested:
        sink.close()
        raise JobInterrupted(stop.signum, len(sink.done), count_records(list(job.inputs), job.input_format))


def job_logger(quiet: bool, out):
    """The job's log function: a line to ``out`` unless quiet."""
    def log(msg):
        if not quiet:
            print(msg, file=out, flush=True)
    return log


@contextlib.contextmanager
def progress_bar(total, quiet: bool, out):
    """A tqdm bar over output records for the block (None when quiet). ``total``: a callable giving the record
    count or None (called only when the bar is shown: counting scans the inputs)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total(), unit="record", file=out, disable=None, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def meta_path(output) -> Path:
    p = Path(output)
    return p.with_name(p.name + ".meta.json")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def threads() -> int:
    import numba

    return numba.get_num_threads()


def summary_head(ctx: dict, stats, errors_in_output: int) -> dict:
    """The summary keys every job has first: output, format, model (from ``ctx``, see ``JobKind.summary``), the
    kernel family and the item counts of this run (``stats``) and of the whole output."""
    from jit_kernels._cpu import KERNEL

    return {"output": str(ctx["output"]), "format": ctx["fmt"], "model": ctx["model"],
            "kernel": KERNEL,                               # the kernel family this process runs
            "items": {"total": stats.items, "ok": stats.ok, "error": stats.errors, "skipped_resume": stats.skipped,
                      "errors_in_output": errors_in_output}}


def errors_in_output(ctx: dict) -> int:
    """Error records in the job's output files (``ctx["files"]``): this run's and earlier runs'."""
    return sum(count_errors(path, ctx["fmt"]) for path in ctx["files"])


def summary_times(ctx: dict) -> dict:
    """Seconds spent loading the model, compiling, running the items and in all."""
    return {"load": round(ctx["load_s"], 3), "compile": round(ctx["compile_s"], 3), "run": round(ctx["run_s"], 3),
            "total": round(time.perf_counter() - ctx["t_start"], 3)}


def prefix_cache_summary(enabled: bool, prompt_tokens: int, cached_tokens: int) -> dict:
    """Prompt tokens computed vs served from the prefix cache (records written by this run)."""
    return {"enabled": enabled, "prompt_tokens_computed": prompt_tokens - cached_tokens,
            "prompt_tokens_cached": cached_tokens,
            "hit_rate": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else 0.0}


def prefix_cache_line(pc: dict) -> str:
    """The summary line's words on the prefix cache."""
    if not pc["enabled"]:
        return "prefix cache off"
    return (f"prompt tokens {pc['prompt_tokens_computed']} computed, {pc['prompt_tokens_cached']} from the prefix "
            f"cache ({100 * pc['hit_rate']:.0f}%)")
