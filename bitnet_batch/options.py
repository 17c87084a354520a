"""Options declared once, on their config dataclasses: a field's name, type, default and docstring give its
command-line option (``click_options``), and the dataclass is built back from click's values (``pick``). The
pipeline loader and the per-record overrides read the same field lists (``SamplingParams.field_names()``,
``ENGINE_OPTIONS``), so a new field is an option everywhere without being listed again.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache

import click

from .config import ARGMAX_HEADS, KV_DTYPES, LM_HEAD_DTYPES, EngineConfig
from .sampling.params import SamplingParams

#: the engine settings a user sets (command line, pipeline [engine]); the rest are the engine's own
ENGINE_OPTIONS = ("max_batch", "prefill_chunk", "kv_cache_mb", "kv_dtype", "lm_head_dtype", "argmax_head",
                  "max_seq_len", "prefix_cache", "threads")
#: the sampling options of the command line: SamplingParams' fields but the per-request seed (``--seed`` is the
#: job seed from which request seeds derive)
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "seed")
_CHOICES = {(EngineConfig, "kv_dtype"): tuple(KV_DTYPES), (EngineConfig, "lm_head_dtype"): LM_HEAD_DTYPES,
            (EngineConfig, "argmax_head"): ARGMAX_HEADS}
_TYPES = {"int": int, "float": float, "str": str}


@lru_cache(maxsize=None)
def field_docs(cls) -> dict:
    """The docstring under each field of a dataclass (read from its source; {} when the source is absent)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def click_options(cls, names, help_for: dict | None = None, default_for: dict | None = None):
    """A decorator adding ``--field-name`` options for the fields ``names`` of dataclass ``cls``: type and
    default from the field (or ``default_for[name]``), help from its docstring (or ``help_for[name]``). bool
    fields are flags (``--x/--no-x`` when true by default), ``X | None`` fields take an X, tuple fields repeat."""
    help_for, default_for = help_for or {}, default_for or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)

    def decorate(func):
        for name in reversed(names):
            f = fields[name]
            default = default_for.get(name, f.default)
            flag = "--" + name.replace("_", "-")
            kwargs = {"help": help_for.get(name, docs.get(name, "")), "show_default": True}
            kind = str(f.type)
            if kind == "bool":
                decls = [f"{flag}/--no-{flag[2:]}"] if default else [flag]
                kwargs.update(is_flag=True, default=default, show_default=bool(default))
            elif kind.startswith("tuple["):
                decls = [flag]
                kwargs.update(multiple=True, show_default=False)
            else:
                decls = [flag]
                base = kind.split("|")[0].strip()
                choices = _CHOICES.get((cls, name))
                kwargs.update(type=click.Choice(choices) if choices else _TYPES[base], default=default)
            func = click.option(*decls, name, **kwargs)(func)
        return func
    return decorate


def pick(cls, values: dict, names=None, **fixed):
    """An instance of ``cls`` from click's ``values`` for the fields ``names`` (default: every field present),
    plus ``fixed`` ones; repeated options (tuples) arrive as tuples."""
    names = [f.name for f in dataclasses.fields(cls) if f.name in values] if names is None else names
    return cls(**{n: tuple(values[n]) if isinstance(values[n], list) else values[n] for n in names}, **fixed)
