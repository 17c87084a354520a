"""A vocabulary's own Jinja chat template (``tokenizer_config.json`` / GGUF ``tokenizer.chat_template``), rendered
with jinja2's sandbox the way transformers renders it.

``Tokenizer`` renders the BitNet b1.58 chat format itself (header and content encoded separately, so message
text can never become a control token). It comes here only for a template that is something else: a fine-tune
with another chat format. ``is_bitnet_format`` decides by rendering a probe chat: a template that gives exactly
our text (BOS from the template or not) is ours, and so is any template with bitnet.cpp's "BITNET" marker (the
official GGUF's "Human: ... BITNETAssistant:" template, which bitnet.cpp itself replaces by this format).

Encoding a rendered template parses control-token text, as transformers does; a message whose content holds the
text of a control token (``<|eot_id|>``, ...) is refused with an ``InputError`` naming it, so user data cannot
inject turns. BOS: the rendered text is encoded without special-token post-processing, and BOS is prepended when
the tokenizer adds one (``add_bos``) and the template did not write it (transformers' model-card flow: render,
then tokenize with the BOS-adding post-processor).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime

from .errors import InputError, TokenizerError

#: the chat ``is_bitnet_format`` renders both ways (contents with spaces around them: ours strips them)
PROBE = (("system", " Be brief. "), ("user", " Hi there "), ("assistant", " Hello! "), ("user", " 2+2? "))
BITNET_MARKER = "BITNET"


class _TemplateRaised(Exception):
    """``raise_exception(message)`` called by a template."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in jinja2's immutable sandbox, with transformers' options and helpers."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(tok, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The template's text for validated (role, content) turns. A template that cannot be compiled is a
    TokenizerError; one that refuses the messages (``raise_exception``, a rendering error) an InputError."""
    import jinja2

    try:
        template = _compile(tok.chat_template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{tok.source}: the chat template cannot be compiled: {e}") from None
    special = {"bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
               "eos_token": tok.token_text(tok.eos_id) if tok.eos_id is not None else ""}
    try:
        return template.render(messages=[{"role": r, "content": c} for r, c in turns],
                               add_generation_prompt=add_generation_prompt, **special)
    except _TemplateRaised as e:
        raise InputError(f"the chat template refused the messages: {e}", field="messages") from None
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise InputError(f"the chat template cannot render the messages: {e}", field="messages") from None


def _bos_text(tok) -> str:
    return tok.token_text(tok.bos_id) if tok.add_bos and tok.bos_id is not None else ""


def is_bitnet_format(tok) -> bool:
    """True when ``tok.chat_template`` is the BitNet chat format that ``Tokenizer`` renders itself."""
    template = tok.chat_template
    if BITNET_MARKER in template:
        return True
    bos = _bos_text(tok)
    for add_generation_prompt in (True, False):
        ours = tok._render_bitnet(PROBE, add_generation_prompt)[len(bos):]
        try:
            theirs = render(tok, PROBE, add_generation_prompt)
        except (InputError, TokenizerError):
            return False
        if theirs not in (ours, tok.token_text(tok.bos_id) + ours if tok.bos_id is not None else ours):
            return False
    return True


def render_with_bos(tok, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The prompt as text: the rendered template, after the BOS text when the tokenizer adds one it lacks."""
    text = render(tok, turns, add_generation_prompt)
    bos = _bos_text(tok)
    return text if text.startswith(bos) else bos + text


def encode(tok, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> list[int]:
    """Prompt ids of the rendered template (control-token text parsed); see the module docstring."""
    for i, (_, content) in enumerate(turns):
        found = tok.control_text_in(content)
        if found is not None:
            raise InputError(f"messages[{i}].content contains the control token text {found!r}, which the chat "
                             "template would turn into a control token", field=f"messages[{i}].content")
    ids = tok.encode(render(tok, turns, add_generation_prompt), parse_special=True)
    if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids.insert(0, tok.bos_id)
    return ids
