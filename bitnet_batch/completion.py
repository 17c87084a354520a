"""One request's generation state after the model: sampling, detokenization, stop conditions, logprobs.

``Completion.push(logits)`` takes the logits of the request's latest position and returns the text that
became final with the sampled token (stop strings and partial UTF-8 characters are held back). The runner,
``generate`` and ``chat`` all drive it; none of them samples or decodes on its own.
"""
from __future__ import annotations

import numpy as np

from .sampling.chain import make_sampler
from .sampling.params import SamplingParams
from .sampling.stops import StopMatcher


class Completion:
    def __init__(self, tokenizer, params: SamplingParams, seed: int, prompt_ids, max_new: int, *,
                 constraint=None):
        self.tok = tokenizer
        self.params = params
        self.max_new = max_new
        self.constraint = constraint         # a grammar (sampling.constraints.GrammarConstraint) or None
        # with ignore_eos the sampler masks these ids, so the check in push() never fires
        self.sampler = make_sampler(params, seed, tokenizer.vocab_size, tokenizer.eog_ids, prompt_ids,
                                    constraint=constraint)
        self.decoder = tokenizer.incremental_decoder()
        self.stops = StopMatcher(params.stop)
        self.tokens: list[int] = []          # generated ids (an end-of-generation token included)
        self.pieces: list[str] = []          # emitted text
        self.logprobs: list[dict] = []
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def argmax_only(self) -> bool:
        """The next token is the argmax of the logits (among the tokens the constraint allows, if any, but the
        ``banned_ids``) and nothing else of them is used."""
        return self.params.argmax_only

    @property
    def banned_ids(self) -> tuple[int, ...]:
        """The ids never sampled (``ignore_eos``: the end-of-generation ids): an engine that computes the logits
        near the maximum alone leaves them out, as it does the tokens a constraint forbids."""
        return self.sampler.banned_ids

    @property
    def top_k_only(self) -> int:
        """k when the next token is drawn from the k best logits alone (``SamplingParams.top_k_only``), else 0."""
        return self.params.top_k_only

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, logits: np.ndarray) -> str:
        """Sample the next token from ``logits`` (float [V]); returns newly final text."""
        if self.done:
            raise RuntimeError("push() on a finished completion")
        token = self.sampler.sample(logits)
        if self.params.logprobs is not None:
            self._record_logprobs(logits, token)
        self.sampler.accept(token)
        self.tokens.append(int(token))
        out = []
        if token in self.sampler.eog_ids:     # counted as generated, not part of the text
            self.finish_reason = "stop"
        else:
            emit, stopped = self.stops.push(self.decoder.push(token))
            out.append(emit)
            if stopped:                       # the stop string and anything after it are dropped
                self.finish_reason = "stop"
                return self._emit(out)
            if self.constraint is not None and self.constraint.finished:
                self.finish_reason = "stop"   # the grammar is complete: only EOG could follow
            elif len(self.tokens) >= self.max_new:
                self.finish_reason = "length"
        if self.done:                         # release text held back by the decoder / stop matcher
            emit, stopped = self.stops.push(self.decoder.flush())
            out.append(emit)
            if not stopped:
                out.append(self.stops.flush())
        return self._emit(out)

    def structured(self) -> dict:
        """Extra record fields of a constrained completion (``parsed``, ``incomplete``); {} without one."""
        if self.constraint is None:
            return {}
        return self.constraint.result(self.text, cut=self.stops.matched is not None)

    def _emit(self, out: list[str]) -> str:
        text = "".join(out)
        if text:
            self.pieces.append(text)
        return text

    def _record_logprobs(self, logits, token) -> None:
        lp, top = self.sampler.top_logprobs(logits, token, self.params.logprobs)
        self.logprobs.append({"token": self.tok.decode([token]), "token_id": int(token), "logprob": float(lp),
                              "top": [{"token": self.tok.decode([i]), "token_id": int(i), "logprob": float(v)}
                                      for i, v in top]})
