"""`bitnet-batch` command line: a click group of verbs; no logic of its own beyond parsing and printing."""
from __future__ import annotations

import json
import sys

import click

from .config import EngineConfig
from .errors import BitnetBatchError, JobInterrupted
from .model.hub import DEFAULT_REPO
from .options import ENGINE_OPTIONS, SAMPLING_OPTIONS, click_options, pick
from .sampling.params import SamplingParams

EXIT_FATAL = 1          # model, config or output problem: the job could not run
EXIT_ITEM_ERRORS = 3    # the job ran, but some items are error records (--strict)
SINGLE_SAMPLING = tuple(o for o in SAMPLING_OPTIONS if o != "n")      # generate / chat: one sample


_job_seed_option = click.option(
    "--seed", type=int, default=0, show_default=True,
    help="Job seed; each item's RNG derives from (seed, id) unless the item sets 'seed'.")


def _sampling_options(names):
    """The SamplingParams options ``names`` and the job --seed (``_sampling_params`` reads them)."""
    def decorate(f):
        return click_options(SamplingParams, names)(_job_seed_option(f))
    return decorate


def _model_options(f):
    f = click.option("--ffn-act", type=click.Choice(["relu2", "silu"]), default=None,
                     help="Override the FFN activation the model file implies.")(f)
    f = click.option("--model-file", default=None, help="GGUF file name inside a Hugging Face repo.")(f)
    f = click.option("--model", "-m", default=DEFAULT_REPO, show_default=True,
                     help="GGUF path, Hugging Face checkpoint directory or hub repo id (downloaded and cached on "
                          "first use).")(f)
    return click_options(EngineConfig, ["threads"])(f)


def _engine_options(batch_help: str, seq_len_help: str, exclude=(), **defaults):
    """The EngineConfig options of a job (``pick(EngineConfig, ...)`` reads them), but ``exclude``."""
    return click_options(EngineConfig, [o for o in ENGINE_OPTIONS if o not in ("threads", *exclude)],
                         help_for={"max_batch": batch_help, "max_seq_len": seq_len_help}, default_for=defaults)


def _job_flags(f):
    """--unordered, --overwrite, --strict and --quiet of a job verb."""
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log (for cron).")(f)
    f = click.option("--strict", is_flag=True,
                     help=f"Exit with {EXIT_ITEM_ERRORS} when any item is an error record.")(f)
    f = click.option("--overwrite", is_flag=True, help="Start fresh instead of resuming.")(f)
    return click.option("--unordered", is_flag=True,
                        help="Write records as they finish (JSONL) instead of input order.")(f)


def _where_options(f):
    """--engine and the Ray options of a job verb (``_run_on`` reads them)."""
    f = click.option("--threads-per-actor", type=int, default=None,
                     help="With --engine ray: CPUs = Numba threads per actor (default: a node's CPUs).")(f)
    f = click.option("--actors", type=int, default=None,
                     help="With --engine ray: engine actors (default: fill the cluster).")(f)
    f = click.option("--ray-address", default=None,
                     help="With --engine ray: 'auto', HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS or a "
                          "local Ray).")(f)
    return click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="local: this process; ray: engine actors on a Ray cluster (pip install "
                             "'bitnet-batch[ray]').")(f)


def _sampling_params(kw, names=SINGLE_SAMPLING):
    return pick(SamplingParams, kw, names)


def _fail(e: Exception):
    if isinstance(e, JobInterrupted):          # a clean stop: what was kept and how to resume
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    click.echo(f"error: {_message(e)}", err=True)
    sys.exit(EXIT_FATAL)


def _message(e: Exception) -> str:
    """The error as the user should read it. A full disk outside the output's journal (the summary, a model
    download) names the file and says what to do; the journal's own says how many records are safe."""
    if isinstance(e, OSError) and not isinstance(e, BitnetBatchError):
        from .io.writers import _is_disk_full

        if _is_disk_full(e):
            where = f"{e.filename}: " if e.filename else ""
            return (f"{where}no space left on device; records already written are kept. Free some space and run "
                    f"the same command again to resume")
    return str(e)


@click.group()
@click.version_option(package_name="bitnet-batch")
def main():
    """Run ternary (BitNet b1.58) language models over whole datasets on CPUs."""


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--output", "-o", default=None, type=click.Path(),
              help="Output file (.jsonl or .parquet). Required unless a pipeline sets it.")
@click.option("--pipeline", "pipeline_file", default=None, type=click.Path(),
              help="Pipeline TOML file (a single INPUT ending in .toml is one too); INPUTS given with it replace "
                   "its inputs, and options given explicitly override its values.")
@click.option("--output-format", type=click.Choice(["jsonl", "parquet", "openai"]), default=None,
              help="Default: from the output extension.")
@click.option("--input-format", type=click.Choice(["jsonl", "parquet"]), default=None)
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--id-field", default="id", show_default=True)
@click.option("--system", default=None, help="System message; plain prompts are then rendered as chat.")
@click.option("--chat", is_flag=True, help="Render plain 'prompt' records with the chat template.")
@_engine_options("Sequences decoded together.", "Longest prompt + generation (0 = model context).")
@click.option("--truncate", type=click.Choice(["left", "right"]), default=None,
              help="Cut over-long prompts instead of writing an error record.")
@_job_flags
@click.option("--response-format", default=None,
              help='Structured output for every item: inline JSON or a JSON file, {"type": "json_object"} or '
                   '{"type": "json_schema", "json_schema": {"schema": {...}}}. Records may override it.')
@click.option("--json-schema", default=None, type=click.Path(), help="A JSON schema file every output must satisfy.")
@click.option("--regex", default=None, help="A regular expression (Rust syntax) every output must match.")
@click.option("--choice", multiple=True, help="Every output is exactly one of these strings (repeatable).")
@click.option("--json-limits", default=None, metavar="KEY=N,...|none",
              help="Bounds on what a JSON schema leaves open, so every JSON output can finish: digits (of a number "
                   "before its exponent), exponent (its digits), string (maxLength of strings that set none), items "
                   "(maxItems of arrays that set none); 0 = no bound, 'none' = the schema as given. "
                   "[default: digits=17,exponent=3,string=256,items=32]")
@click.option("--dedupe", is_flag=True, help="Drop samples whose text equals an earlier sample of the same input.")
@_where_options
@_model_options
@_sampling_options(SAMPLING_OPTIONS)
def run(inputs, pipeline_file, **opts):
    """Generate a completion for every record of INPUTS (JSONL / Parquet / OpenAI batch lines), or run a
    pipeline file (`bitnet-batch run pipelines/NAME.toml`)."""
    from .jobs.run import JobConfig, RunKind
    from .pipeline import is_pipeline_file, load_pipeline
    from .sampling.constraints import JsonLimits

    ctx = click.get_current_context()
    try:
        constraint = _constraint(*(opts[k] for k in _CONSTRAINT_OPTIONS))
        limits = JsonLimits() if opts["json_limits"] is None else JsonLimits.parse(opts["json_limits"])
        if pipeline_file is None and len(inputs) == 1 and is_pipeline_file(inputs[0]):
            pipeline_file, inputs = inputs[0], ()
        if pipeline_file is not None:
            job = load_pipeline(pipeline_file).job(_explicit_overrides(ctx, inputs, constraint, limits))
        else:
            if not inputs:
                raise click.UsageError("give INPUTS (JSONL / Parquet files) or a pipeline file")
            if opts["output"] is None:
                raise click.UsageError("--output / -o is required (only a pipeline file can set it)")
            job = JobConfig(inputs=tuple(inputs), **{k: opts[k] for k in _JOB_OPTIONS}, ordered=not opts["unordered"],
                            sampling=_sampling_params(opts, SAMPLING_OPTIONS), constraint=constraint,
                            json_limits=limits, engine=pick(EngineConfig, opts, ENGINE_OPTIONS))
        summary = _run_on(job, RunKind, opts)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    _exit_if_strict(opts, summary)


def _run_on(job, kind, opts) -> dict:
    """Run the job (of JobKind class ``kind``) in this process (the default; Ray is not imported) or on a Ray
    cluster, as the verb's ``_where_options`` and --quiet say."""
    engine, ray_address, actors, threads_per_actor = (opts[k] for k in _WHERE_OPTIONS)
    if engine == "ray":
        from .distributed import RayConfig, run_ray_job

        cfg = RayConfig(address=ray_address, actors=actors or 0, threads_per_actor=threads_per_actor or 0)
        return run_ray_job(job, cfg, kind=kind, quiet=opts["quiet"])
    given = [name for name, v in (("--ray-address", ray_address), ("--actors", actors),
                                  ("--threads-per-actor", threads_per_actor)) if v is not None]
    if given:
        raise click.UsageError(f"{given[0]} needs --engine ray")
    from .jobs.loop import run_local

    return run_local(job, kind, quiet=opts["quiet"])


def _exit_if_strict(opts, summary: dict) -> None:
    """--strict: a job whose output holds error records exits EXIT_ITEM_ERRORS (for cron)."""
    if opts["strict"] and summary["items"]["errors_in_output"]:
        sys.exit(EXIT_ITEM_ERRORS)


_CONSTRAINT_OPTIONS = ("response_format", "json_schema", "regex", "choice")
_NOT_FOR_PIPELINES = ("prompt_field", "chat")
_WHERE_OPTIONS = ("engine", "ray_address", "actors", "threads_per_actor")     # where a job runs, not what it is
# the options that are job fields as they are: every job's, then run's own
_BASE_OPTIONS = ("output", "model", "model_file", "output_format", "input_format", "overwrite", "ffn_act")
_JOB_OPTIONS = _BASE_OPTIONS + ("prompt_field", "id_field", "system", "chat", "seed", "truncate", "dedupe")


def _constraint(response_format, json_schema, regex, choice):
    """The job-level constraint from --response-format / --json-schema / --regex / --choice (at most one)."""
    from .sampling.constraints import job_constraint, load_json_arg

    return job_constraint(
        response_format=None if response_format is None else load_json_arg(response_format, "--response-format"),
        json_schema=None if json_schema is None else load_json_arg(json_schema, "--json-schema"),
        regex=regex, choice=choice)


def _explicit_overrides(ctx: click.Context, inputs, constraint, limits) -> dict:
    """The run options given on the command line (not defaults), as Pipeline.job overrides."""
    from click.core import ParameterSource

    given = {k for k in ctx.params
             if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    wrong = [k for k in _NOT_FOR_PIPELINES if k in given]
    if wrong:
        raise click.UsageError(f"--{wrong[0].replace('_', '-')} does not apply to a pipeline (its [prompt] "
                               f"template builds the prompts)")
    skip = {"inputs", "pipeline_file", "strict", "quiet", "unordered", *_CONSTRAINT_OPTIONS, *_WHERE_OPTIONS}
    out = {k: ctx.params[k] for k in given - skip}
    if "json_limits" in out:
        out["json_limits"] = limits
    if "stop" in out:
        out["stop"] = tuple(out["stop"])
    if "unordered" in given:
        out["ordered"] = not ctx.params["unordered"]
    if inputs:
        out["inputs"] = tuple(inputs)
    if given & set(_CONSTRAINT_OPTIONS):
        out["constraint"] = constraint
    return out


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Output file (.jsonl or .parquet).")
@click.option("--output-format", type=click.Choice(["jsonl", "parquet"]), default=None,
              help="Default: from the output extension.")
@click.option("--input-format", type=click.Choice(["jsonl", "parquet"]), default=None)
@click.option("--text-field", default="text", show_default=True, help="Scored whole.")
@click.option("--prompt-field", default="prompt", show_default=True, help="Context only (with --completion-field).")
@click.option("--completion-field", default="completion", show_default=True, help="Scored given the prompt.")
@click.option("--id-field", default="id", show_default=True)
@click.option("--token-logprobs", is_flag=True, help="Add every scored token's logprob to its record.")
@_engine_options("Sequences in flight together.", "Longest scored sequence (0 = model context).",
                 exclude=("argmax_head",))
@_job_flags
@_where_options
@_model_options
def score(inputs, **opts):
    """Log-likelihood, mean NLL and perplexity of every record's `text` (or of its `completion` given its
    `prompt`), plus the corpus perplexity in <output>.meta.json."""
    from .jobs.score import ScoreFields, ScoreJobConfig, ScoreKind

    try:
        fields = ScoreFields(**{k: opts[f"{k}_field"] for k in ("text", "prompt", "completion", "id")})
        job = ScoreJobConfig(inputs=tuple(inputs), **{k: opts[k] for k in _BASE_OPTIONS}, fields=fields,
                             token_logprobs=opts["token_logprobs"], ordered=not opts["unordered"],
                             engine=pick(EngineConfig, opts, [o for o in ENGINE_OPTIONS if o in opts]))
        summary = _run_on(job, ScoreKind, opts)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    if opts["quiet"]:
        click.echo(f"corpus perplexity: {summary['corpus']['perplexity']} over {summary['corpus']['tokens']} tokens")
    _exit_if_strict(opts, summary)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Output file (.parquet or .jsonl).")
@click.option("--output-format", type=click.Choice(["jsonl", "parquet"]), default=None,
              help="Default: from the output extension.")
@click.option("--input-format", type=click.Choice(["jsonl", "parquet"]), default=None)
@click.option("--text-field", default="text", show_default=True, help="The text to embed.")
@click.option("--instruction-field", default="instruction", show_default=True,
              help="Optional: a one-sentence task; the text is then embedded as a query in the model's format.")
@click.option("--id-field", default="id", show_default=True)
@click.option("--pooling", type=click.Choice(["last", "mean", "cls"]), default=None,
              help="How token states become one vector (default: the model's; mean for generative models).")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise each vector.")
@click.option("--dimensions", type=int, default=None, help="Keep the first N components (Matryoshka), then normalise.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "int8", "binary"]), default="float32",
              show_default=True, help="int8: per-vector scale in a 'scale' field; binary: sign bits, 8 per byte.")
@click.option("--truncate", type=click.Choice(["left", "right"]), default=None,
              help="Cut over-long texts instead of writing an error record.")
@_engine_options("Texts in flight together.", "Longest text (0 = the model's context, at most 8192).",
                 exclude=("kv_cache_mb", "prefix_cache", "lm_head_dtype", "argmax_head"), max_batch=64,
                 prefill_chunk=1024)
@_job_flags
@_where_options
@_model_options
def embed(inputs, **opts):
    """An embedding vector for every record's `text` (BitNet embedding models, or a generative model's pooled
    hidden states), as Parquet fixed-size lists or JSON lists."""
    from .jobs.embed import EmbedFields, EmbedJobConfig, EmbedKind

    try:
        fields = EmbedFields(**{k: opts[f"{k}_field"] for k in ("text", "instruction", "id")})
        job = EmbedJobConfig(inputs=tuple(inputs), **{k: opts[k] for k in _BASE_OPTIONS}, fields=fields,
                             **{k: opts[k] for k in ("pooling", "normalize", "dimensions", "dtype", "truncate")},
                             ordered=not opts["unordered"],
                             engine=pick(EngineConfig, opts, [o for o in ENGINE_OPTIONS if o in opts]))
        summary = _run_on(job, EmbedKind, opts)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    _exit_if_strict(opts, summary)


@main.command()
@click.argument("prompt")
@click.option("--system", default=None, help="Render the prompt as a chat with this system message.")
@click.option("--chat", is_flag=True, help="Render the prompt with the chat template.")
@_model_options
@_sampling_options(SINGLE_SAMPLING)
def generate(prompt, system, chat, model, model_file, ffn_act, threads, **kw):
    """Generate from one PROMPT, streaming the text to stdout."""
    from .generate import Generator

    try:
        gen = Generator.load(model, model_file=model_file, ffn_act=ffn_act, threads=threads)
        if system or chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = gen.model.tokenizer.apply_chat_template(msgs)
        else:
            ids = gen.model.tokenizer.encode(prompt, add_bos=gen.model.tokenizer.add_bos)
        result = gen.stream(ids, _sampling_params(kw), seed=kw["seed"], on_text=_echo_piece)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    click.echo()
    click.echo(f"[{result['finish_reason']}: {result['completion_tokens']} tokens, "
               f"{result['tokens_per_s']:.1f} tok/s]", err=True)


def _echo_piece(text):
    click.echo(text, nl=False)
    sys.stdout.flush()


@main.command()
@click.option("--system", default=None, help="System message.")
@_model_options
@_sampling_options(SINGLE_SAMPLING)
def chat(system, model, model_file, ffn_act, threads, **kw):
    """Interactive chat with the model's chat template and history (empty line or Ctrl-D to quit)."""
    from .generate import Generator

    try:
        gen = Generator.load(model, model_file=model_file, ffn_act=ffn_act, threads=threads)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    params = _sampling_params(kw)
    history = [{"role": "system", "content": system}] if system else []
    turn = 0
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        try:
            ids = gen.model.tokenizer.apply_chat_template(history)
            click.echo("assistant> ", nl=False)
            result = gen.stream(ids, params, seed=kw["seed"] + turn, on_text=_echo_piece)
        except BitnetBatchError as e:
            click.echo(f"\nerror: {e}", err=True)
            history.pop()
            continue
        click.echo()
        history.append({"role": "assistant", "content": result["text"]})
        turn += 1


@main.command()
@click.argument("model")
@click.option("--model-file", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model, model_file, as_json):
    """Show a model's architecture, tensors, tokenizer, chat template and memory estimate."""
    from .inspect import describe, format_description

    try:
        info = describe(model, filename=model_file)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    from jit_kernels import lm_head_bf16, lm_head_int8
    from jit_kernels._cpu import AVAILABLE, KERNEL          # the kernel family a job would run here

    fast = lm_head_bf16.has_fast_path()                     # whether --lm-head-dtype bf16 pays here
    bf16 = ("vdpbf16ps, faster for many streams" if fast else
            "same results, no faster here (vdpbf16ps: the avx512 kernels on an AVX512_BF16 CPU)")
    # the argmax lm_head's screen that --argmax-head auto takes for greedy and top-k rows (model/argmax_head.py)
    screen = "int8" if lm_head_int8.has_fast_path() else "off"
    click.echo(json.dumps(dict(info, kernel=KERNEL, lm_head_bf16_fast=fast, argmax_head_auto=screen), indent=2)
               if as_json else
               f"{format_description(info)}\nkernels   {KERNEL} (this CPU runs {', '.join(AVAILABLE)}); "
               f"--lm-head-dtype bf16: {bf16}; greedy and top-k rows (--argmax-head auto): "
               f"{'the int8 screen (lm_head tables of 16.8M entries or more)' if screen == 'int8' else 'float32'}")


@main.command()
@click.option("--model", "-m", required=True, help="GGUF path or hub repo id (e.g. a 2B4T-shaped test model).")
@click.option("--model-file", default=None)
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--prefill-chunk", type=int, default=128, show_default=True)
@click_options(EngineConfig, ["kv_dtype", "lm_head_dtype", "argmax_head", "threads"])
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Runs per batch size; the best (total tok/s) is reported, all are in the JSON.")
@click.option("--baseline", default=None, type=click.Path(dir_okay=False),
              help="JSON file of other engines' figures or targets (e.g. examples/bench-baselines.json): print "
                   "ours / theirs ratios per batch size.")
@click.option("--kernels", default=None,
              help="Comma list of kernel families (e.g. avx512,avx2) to run side by side, each in child processes "
                   "that take turns per batch size; prints each family's ratios to the last one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a 'results' list.")
def bench(model, model_file, batch_sizes, prompt_tokens, gen_tokens, prefill_chunk, kv_dtype, lm_head_dtype,
          argmax_head, threads, repeat, baseline, kernels, as_json):
    """Measure prefill and batched decode throughput (random prompts, greedy decode)."""
    from .bench import compare, format_comparison, load_baselines, run_bench, run_side_by_side

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        if not sizes or min(sizes) < 1 or prompt_tokens < 1 or gen_tokens < 1 or repeat < 1:
            raise click.BadParameter("batch sizes, --prompt-tokens, --gen-tokens and --repeat must be >= 1")
        if kernels and baseline:
            raise click.BadParameter("--baseline compares a single run: give it without --kernels")
        baselines = load_baselines(baseline) if baseline else None      # a bad file fails before the model loads
        log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
        if kernels:
            out = run_side_by_side([k.strip() for k in kernels.split(",") if k.strip()], model, sizes, prompt_tokens,
                                   gen_tokens, threads, model_file=model_file, prefill_chunk=prefill_chunk,
                                   kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype, repeat=repeat,
                                   argmax_head=argmax_head, log=log)
        else:
            out = run_bench(model, sizes, prompt_tokens, gen_tokens, threads, model_file=model_file,
                            prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype,
                            repeat=repeat, argmax_head=argmax_head, log=log)
        if baselines:
            out["comparisons"] = compare(out["results"], baselines)
            for line in format_comparison(out["comparisons"]):
                log(line)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(out))


@main.command()
@click.argument("src")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The GGUF file to write.")
@click.option("--type", "weight_type", type=click.Choice(["i2_s", "tq2_0", "tq1_0", "f16"]), default="i2_s",
              show_default=True, help="i2_s: bitnet.cpp (arch bitnet-b1.58); tq2_0 / tq1_0 / f16: mainline llama.cpp "
                                      "(arch bitnet).")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub repo SRC.")
@click.option("--name", default=None, help="general.name (default: the source's name).")
@click.option("--ffn-act", type=click.Choice(["relu2", "silu"]), default=None,
              help="Override the FFN activation the source implies.")
def convert(src, output, weight_type, revision, name, ffn_act):
    """Convert SRC (a Hugging Face BitNet checkpoint directory or repo id, or a GGUF) to a GGUF file."""
    from .convert import convert as run_convert

    try:
        res = run_convert(src, output, weight_type, revision=revision, ffn_act=ffn_act, name=name)
    except (BitnetBatchError, OSError) as e:
        _fail(e)
    click.echo(f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, arch {res.arch}, {res.tensors} tensors, "
               f"{res.weight_type})")
    if res.fallback:
        click.echo(f"{len(res.fallback)} projections whose input width does not fill {res.weight_type} blocks were "
                   f"written as {'F32' if res.weight_type == 'i2_s' else 'F16'} ternary values: "
                   f"{', '.join(res.fallback[:4])}{', ...' if len(res.fallback) > 4 else ''}")
    for warning in res.warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command("make-test-model", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def make_test_model(args):
    """Write a random BitNet GGUF (e.g. `OUT.gguf --preset 2b4t` for benchmarks); see --help of
    `python -m bitnet_batch.testing.models` for every option."""
    from .testing.models import main as testmodel_main

    sys.exit(testmodel_main(list(args)))


@main.command()
@click.argument("repo_id", default=DEFAULT_REPO)
@click.option("--filename", default=None, help="File in the repo (default for the 2B4T repo: the I2_S GGUF).")
def download(repo_id, filename):
    """Download a model into the Hugging Face cache and print its local path."""
    from .model.hub import resolve_model_path

    try:
        click.echo(str(resolve_model_path(repo_id, filename)))
    except BitnetBatchError as e:
        _fail(e)


if __name__ == "__main__":      # pragma: no cover
    main()
