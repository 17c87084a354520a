"""Single-sequence generation for `generate` and `chat`: prefill in chunks, then decode token by token."""
from __future__ import annotations

import time

import numpy as np

from .completion import Completion
from .engine.engine import Engine, EngineConfig
from .errors import ContextOverflowError
from .sampling.params import SamplingParams


class Generator:
    def __init__(self, model, engine_config: EngineConfig | None = None):
        self.model = model
        # every step asks for whole logits (no argmax rows), so no argmax lm_head and no copy of its table
        self.engine = Engine(model, engine_config or EngineConfig(max_batch=1, prefill_chunk=128, argmax_head="off"))

    @classmethod
    def load(cls, model, *, model_file=None, ffn_act=None, threads=0) -> "Generator":
        from .model.model import load_model

        return cls(load_model(model, filename=model_file, ffn_act=ffn_act),
                   EngineConfig(max_batch=1, prefill_chunk=128, threads=threads, argmax_head="off"))

    def stream(self, prompt_ids, params: SamplingParams, *, seed: int = 0, on_text=None) -> dict:
        """Generate for one prompt; ``on_text(piece)`` gets text as it becomes final. Returns a summary."""
        eng = self.engine
        ids = np.asarray(prompt_ids, np.int32)
        limit = eng.max_seq_len
        if len(ids) == 0 or len(ids) >= limit:
            raise ContextOverflowError(f"prompt has {len(ids)} tokens; it must have 1 to {limit - 1}")
        max_new = min(params.max_tokens, limit - len(ids))
        comp = Completion(self.model.tokenizer, params, seed, ids.tolist(), max_new)
        t0 = time.perf_counter()
        slot = eng.kv.allocate()
        try:
            logits = None
            for c0 in range(0, len(ids), eng.max_rows):
                chunk = ids[c0:c0 + eng.max_rows]
                logits = eng.step([(slot, chunk, c0, c0 + len(chunk) == len(ids))])[0]
            t_first = time.perf_counter()
            pos = len(ids)
            while max_new > 0:
                piece = comp.push(logits)
                if piece and on_text:
                    on_text(piece)
                if comp.done:
                    break
                logits = eng.step([(slot, np.array(comp.tokens[-1:], np.int32), pos, True)])[0]
                pos += 1
        finally:
            eng.kv.free(slot)
        t_end = time.perf_counter()
        n = len(comp.tokens)
        return {"text": comp.text, "finish_reason": comp.finish_reason or "length", "prompt_tokens": len(ids),
                "completion_tokens": n, "ttft_s": t_first - t0, "total_s": t_end - t0,
                "tokens_per_s": n / (t_end - t0) if t_end > t0 else 0.0}
