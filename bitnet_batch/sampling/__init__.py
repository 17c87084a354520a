"""Sampling: per-request parameters, the sampler chain (steps + selector) and stop strings.

``params``  SamplingParams (validated, documented), derive_seed / resolve_seed
``steps``   the small steps (penalties, masks, temperature, top-k, top-p, min-p) and the selectors
``chain``   Sampler / make_sampler (one per request), token_logprobs
``stops``   StopMatcher (stop strings over streamed text)
"""
from .chain import Sampler, SamplerChain, SamplingWorkspace, build_chain, make_sampler, token_logprobs
from .params import MAX_LOGPROBS, SamplingParams, derive_seed, resolve_seed
from .steps import MaskSource, SamplingError, as_allowed_mask
from .stops import StopMatcher

__all__ = [
    "SamplingParams", "derive_seed", "resolve_seed", "MAX_LOGPROBS",
    "Sampler", "SamplerChain", "SamplingWorkspace", "build_chain", "make_sampler", "token_logprobs",
    "MaskSource", "SamplingError", "as_allowed_mask", "StopMatcher",
]
