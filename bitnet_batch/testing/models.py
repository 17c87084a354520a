"""Random BitNet b1.58 test models of any shape, written as GGUF (I2_S, TQ1_0, TQ2_0, F16, BF16, F32).

Tensor names, shapes and metadata keys follow the official BitNet-b1.58-2B-4T GGUF (i2s_format.md section 4).
Weights look like the tiny reference models: ternary values with P(-1, 0, +1) = (0.3, 0.4, 0.3), one scale
per projection drawn from U(0.5, 2) / sqrt(ne0), norm weights ~ N(1, 0.2), embeddings ~ N(0, (4/sqrt(D))^2),
which gives logits of a few units.

Every tensor has its own random stream, seeded by (seed, crc32(name)), so a test can regenerate exactly what
was written with ``ternary_values``, ``norm_values`` and ``embedding_values``. Scales are rounded to bf16
precision, which fp16 and fp32 hold exactly: a model holds the same weights in every weight type.

The writer produces one tensor at a time (the embedding in row chunks), so the 2B4T shape (~1.2 GB) is
written with low memory. CLI: ``python -m bitnet_batch.testing.models OUT.gguf --preset tiny``.
"""
from __future__ import annotations

import argparse
import functools
import heapq
import math
import pathlib
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError
from ..model import quants
from ..model.gguf import GGMLType, GGUFFile, GGUFValueType
from .gguf_writer import GGUFWriter

WEIGHT_TYPES = {"i2_s": GGMLType.I2_S, "tq1_0": GGMLType.TQ1_0, "tq2_0": GGMLType.TQ2_0,
                "f16": GGMLType.F16, "bf16": GGMLType.BF16, "f32": GGMLType.F32}
EMBD_TYPES = {"f16": GGMLType.F16, "f32": GGMLType.F32}
FILE_TYPES = {"i2_s": 40, "tq1_0": 36, "tq2_0": 37, "f32": 0, "f16": 1, "bf16": 32}   # general.file_type
ROW_BLOCK = {"i2_s": 128, "tq1_0": 256, "tq2_0": 256}     # rows must be whole blocks
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
EMBD_CHUNK_ROWS = 4096                                     # embedding rows generated per chunk (fixed: seeds)
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
MIN_SYNTHETIC_VOCAB = 256 + len(SPECIAL_TOKENS) + 5
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: "
                 "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")
_TERNARY_LUT = np.array([-1, -1, -1, 0, 0, 0, 0, 1, 1, 1], dtype=np.int8)   # uniform digit -> t

# Plain English for learning the synthetic BPE merges (written for this module).
SAMPLE_TEXT = """\
The small town sat at the edge of a wide river, and every morning the people who lived there walked down
to the water to see what the night had brought. Some days it was only mist and the sound of birds. Other
days there were boats from the north, heavy with wood and grain, and the market filled with voices before
the sun was high. The children liked the boats best, because the sailors told stories about the places
they had seen: cities with towers of glass, forests so old that nobody knew their names, and mountains
where the snow never melted, even in the middle of summer.

In the center of the town there was a library with a green door. It was not a large building, but it held
more books than anyone could read in a lifetime. The librarian was a patient woman who had worked there for
thirty years. She believed that every question deserved an answer, and that the best answers were the ones
you found for yourself. When a student asked her how the river was formed, she did not simply explain it.
She handed him three books, a map, and a pencil, and told him to come back when he had an idea of his own.

Science is a way of asking questions about the world and testing the answers with care. A good experiment
changes one thing at a time and measures what happens. If the result is surprising, the experiment should
be repeated, because a single measurement can be wrong for many reasons. Over time, the answers that
survive many tests become the theories we trust. They are still open to change, but they have earned
their place by working again and again.

Computers follow instructions very quickly, but they do only what they are told. A program is a list of
steps written in a language the machine can understand. When the steps are clear and complete, the
program runs well. When a step is missing or written in the wrong order, the program fails, and the
programmer must find the mistake. This process is called debugging, and most people who write software
spend a large part of their day doing it. Good tests make the work easier, because they show exactly
which part of the program is broken.

A language model reads text and learns which words tend to follow other words. It does not understand the
world the way a person does, but it can produce sentences that are useful, such as a summary of a long
report or an answer to a simple question. To run such a model on an ordinary computer, engineers store its
weights in compact formats. Some models use only three values for each weight: minus one, zero, and plus
one. These ternary models need much less memory, and they can run fast on a processor without a graphics
card.

The weather in the valley changed with the seasons. In spring the rain came every afternoon, and the
fields turned green within a week. Summer was long and warm, with clear nights full of stars. In autumn
the leaves on the hills turned red and gold, and the farmers worked from dawn until dark to bring in the
harvest before the first frost. Winter was quiet. Snow covered the roads, the river froze near its banks,
and families gathered around the fire to share food, music, and the news of the year.

Cooking a good meal takes time and attention. First you choose fresh ingredients, then you prepare them
with care: wash the vegetables, cut them into even pieces, and measure the spices. Heat the pan before
adding the oil, and do not crowd it, or the food will steam instead of brown. Taste as you go, and add
salt a little at a time. When the dish is ready, let it rest for a few minutes before you serve it, so
that the flavors can settle and the heat can spread evenly through every part.

History is the story of people making choices under uncertain conditions. Kings and farmers, merchants and
soldiers, teachers and travelers all acted with the knowledge they had at the time. When we study the past,
we try to see the world through their eyes, and to understand why they made the decisions that shaped the
world we live in today. The numbers 1, 2, 3, 10, 42, 100 and 2024 appear in many records; dates, prices and
names help us connect one event to another. What happened? Who was there? Why did it matter? These are
the questions every historian asks, and the answers are rarely simple.
"""
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


# ---- configuration ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RandomModelSpec:
    """Shape and contents of a random test model. Validated on construction (ConfigError names the field)."""
    arch: str = "bitnet-b1.58"           # general.architecture and metadata key prefix
    n_embd: int = 256                    # hidden size D
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 512                      # FFN width F
    n_vocab: int = 512                   # synthetic tokenizer size (ignored with tokenizer_from)
    weight_type: str = "i2_s"            # projections: i2_s | tq1_0 | tq2_0 | f16 | bf16 | f32
    embd_type: str = "f16"               # token_embd: f16 | f32
    seed: int = 0
    context_length: int = 1024
    rope_freq_base: float = 500000.0
    rms_eps: float = 1e-5
    hidden_activation: str | None = None  # None -> key absent
    tied: bool = True                    # False -> separate F16 output.weight
    scale_tensors: bool = False          # True -> unit-scale weights + F32 "<name>.scale" [1] tensors

    def __post_init__(self):
        _check_positive(self, ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_vocab", "context_length"))
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"arch must be a non-empty string, got {self.arch!r}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {self.weight_type!r}")
        if self.embd_type not in EMBD_TYPES:
            raise ConfigError(f"embd_type must be one of {sorted(EMBD_TYPES)}, got {self.embd_type!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"n_embd must be n_head times an even head_dim, got n_embd={self.n_embd}, "
                              f"n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"n_head must be a multiple of n_head_kv, got n_head={self.n_head}, "
                              f"n_head_kv={self.n_head_kv}")
        if not self.rms_eps > 0 or not self.rope_freq_base > 0:
            raise ConfigError(f"rms_eps and rope_freq_base must be > 0, got {self.rms_eps}, {self.rope_freq_base}")
        block = ROW_BLOCK.get(self.weight_type)
        for field in ("n_embd", "n_ff"):            # the two row lengths (ne0) of the projections
            if block and getattr(self, field) % block:
                raise ConfigError(f"weight_type {self.weight_type!r} stores rows in blocks of {block}: {field} "
                                  f"must be a multiple of {block}, got {getattr(self, field)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


def _check_positive(spec, fields) -> None:
    for f in fields:
        v = getattr(spec, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{f} must be a positive integer, got {v!r}")


# ---- deterministic tensor values ----------------------------------------------------------------------------

def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one tensor: independent of the other tensors and of the writing order."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _bf16_round(x: float) -> float:
    bits = np.array([x], dtype=np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return float(bits.view(np.float32)[0])


def ternary_values(seed: int, name: str, ne0: int, ne1: int) -> tuple[np.ndarray, float]:
    """-> (int8 ternary [ne1, ne0] with P(-1, 0, 1) = (.3, .4, .3), per-tensor scale ~ U(0.5, 2)/sqrt(ne0))."""
    rng = tensor_rng(seed, name)
    scale = _bf16_round(rng.uniform(0.5, 2.0) / math.sqrt(ne0))
    return _TERNARY_LUT[rng.integers(0, 10, size=(ne1, ne0), dtype=np.uint8)], scale


def norm_values(seed: int, name: str, n: int) -> np.ndarray:
    """float32 [n] ~ N(1, 0.2) clipped to [0.25, 1.75]."""
    rng = tensor_rng(seed, name)
    return np.clip(1.0 + 0.2 * rng.standard_normal(n), 0.25, 1.75).astype(np.float32)


def embedding_chunks(seed: int, name: str, n_embd: int, n_vocab: int) -> Iterator[np.ndarray]:
    """float32 rows [<= EMBD_CHUNK_ROWS, n_embd] ~ N(0, (4/sqrt(n_embd))^2), in order, for rows 0..n_vocab-1."""
    rng = tensor_rng(seed, name)
    std = np.float32(4.0 / math.sqrt(n_embd))
    for start in range(0, n_vocab, EMBD_CHUNK_ROWS):
        rows = min(EMBD_CHUNK_ROWS, n_vocab - start)
        yield rng.standard_normal((rows, n_embd), dtype=np.float32) * std


def embedding_values(seed: int, name: str, n_embd: int, n_vocab: int) -> np.ndarray:
    """The whole float32 [n_vocab, n_embd] matrix that embedding_chunks yields (before F16 rounding)."""
    return np.concatenate(list(embedding_chunks(seed, name, n_embd, n_vocab)))


# ---- synthetic tokenizer -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map, in its own order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def learn_merges() -> tuple[tuple[str, str], ...]:
    """All BPE merges SAMPLE_TEXT supports, learned greedily: most frequent pair first, ties broken by the
    smaller (left, right) string pair. Any prefix is what learning fewer merges would give."""
    b2u = bytes_to_unicode()
    counts: dict[str, int] = {}
    for w in _PRETOKENIZE.findall(SAMPLE_TEXT):
        counts[w] = counts.get(w, 0) + 1
    words = [[b2u[b] for b in w.encode()] for w in counts]
    freqs = list(counts.values())
    pairs: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        _count_pairs(w, freqs[i], i, pairs, where)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg or neg == 0:
            continue                                   # stale heap entry
        merges.append(pair)
        touched = set()
        for i in sorted(where.pop(pair, ())):
            _count_pairs(words[i], -freqs[i], i, pairs, None, touched)
            words[i] = _merge_word(words[i], pair)
            _count_pairs(words[i], freqs[i], i, pairs, where, touched)
        for p in touched:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return tuple(merges)


def _count_pairs(word, freq, i, pairs, where, touched=None) -> None:
    for p in zip(word, word[1:]):
        pairs[p] = pairs.get(p, 0) + freq
        if where is not None:
            where.setdefault(p, set()).add(i)
        if touched is not None:
            touched.add(p)


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def synthetic_tokenizer(n_vocab: int) -> dict[str, tuple[object, GGUFValueType | None]]:
    """tokenizer.* KVs of a byte-level BPE vocabulary of exactly n_vocab tokens.

    Order: the 256 byte tokens (bytes_to_unicode order), learned merges, then (only if the sample text runs
    out of merges) CONTROL tokens <|reserved_special_token_k|>, then <|begin_of_text|>, <|end_of_text|>,
    <|eot_id|>. Values are (value, GGUF type or array element type).
    """
    if n_vocab < MIN_SYNTHETIC_VOCAB:
        raise ConfigError(f"n_vocab must be >= {MIN_SYNTHETIC_VOCAB} for the synthetic tokenizer "
                          f"(256 bytes + merges + {len(SPECIAL_TOKENS)} special tokens), got {n_vocab}")
    tokens = list(bytes_to_unicode().values())
    known = set(tokens)
    merges = []
    n_normal = n_vocab - len(SPECIAL_TOKENS)
    for a, b in learn_merges():
        if len(tokens) == n_normal:
            break
        merges.append(f"{a} {b}")
        if a + b not in known:                 # two merge paths can give the same string: one token
            known.add(a + b)
            tokens.append(a + b)
    types = [TOKEN_NORMAL] * len(tokens)
    n_reserved = n_normal - len(tokens)
    tokens += [f"<|reserved_special_token_{k}|>" for k in range(n_reserved)] + list(SPECIAL_TOKENS)
    types += [TOKEN_CONTROL] * (n_reserved + len(SPECIAL_TOKENS))
    bos, eos, eot = (n_vocab - 3, n_vocab - 2, n_vocab - 1)
    S, U32, B = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    return {
        "tokenizer.ggml.model": ("gpt2", S), "tokenizer.ggml.pre": ("llama-bpe", S),
        "tokenizer.ggml.tokens": (tokens, S),
        "tokenizer.ggml.token_type": (np.array(types, dtype=np.int32), GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, S),
        "tokenizer.ggml.bos_token_id": (bos, U32), "tokenizer.ggml.eos_token_id": (eos, U32),
        "tokenizer.ggml.eot_token_id": (eot, U32),
        "tokenizer.ggml.add_bos_token": (True, B), "tokenizer.ggml.add_eos_token": (False, B),
        "tokenizer.chat_template": (CHAT_TEMPLATE, S),
    }


def copied_tokenizer(path) -> dict[str, tuple[object, GGUFValueType | None]]:
    """All tokenizer.* KVs of another GGUF, with their exact types."""
    with GGUFFile(path) as g:
        kvs = {k: (v, g.value_types[k][1] or g.value_types[k][0])
               for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in kvs:
        raise ConfigError(f"tokenizer_from: {path} has no tokenizer.ggml.tokens")
    return kvs


# ---- the model file ------------------------------------------------------------------------------------------

def _projection_shapes(spec: RandomModelSpec) -> dict[str, tuple[int, int]]:
    """ggml shapes (ne0 = in, ne1 = out) of the ternary projections of one layer."""
    d, kv, f = spec.n_embd, spec.kv_dim, spec.n_ff
    return {"attn_q": (d, d), "attn_k": (d, kv), "attn_v": (d, kv), "attn_output": (d, d),
            "ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d)}


def _projection_data(spec: RandomModelSpec, name: str, ne0: int, ne1: int) -> Callable[[], np.ndarray]:
    def produce():
        t, scale = ternary_values(spec.seed, name, ne0, ne1)
        s = 1.0 if spec.scale_tensors else scale
        if spec.weight_type == "i2_s":
            return quants.pack_i2s(t, s)
        if spec.weight_type == "tq2_0":
            return quants.pack_tq2_0(t, s)
        if spec.weight_type == "tq1_0":
            return quants.pack_tq1_0(t, s)
        return t.astype(np.float32) * np.float32(s)          # writer converts to F32/F16/BF16
    return produce


def _add_layer(w: GGUFWriter, spec: RandomModelSpec, i: int) -> None:
    wtype = WEIGHT_TYPES[spec.weight_type]
    shapes = _projection_shapes(spec)
    order = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
             "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")
    norm_len = {"attn_norm": spec.n_embd, "attn_sub_norm": spec.n_embd, "ffn_norm": spec.n_embd,
                "ffn_sub_norm": spec.n_ff}
    for part in order:
        name = f"blk.{i}.{part}.weight"
        if part in norm_len:
            n = norm_len[part]
            w.add_tensor(name, lambda name=name, n=n: norm_values(spec.seed, name, n), (n,), GGMLType.F32)
            continue
        ne0, ne1 = shapes[part]
        w.add_tensor(name, _projection_data(spec, name, ne0, ne1), (ne0, ne1), wtype)
        if spec.scale_tensors:
            scale = lambda name=name, ne0=ne0, ne1=ne1: np.array([ternary_scale(spec.seed, name, ne0)], np.float32)
            w.add_tensor(f"blk.{i}.{part}.scale", scale, (1,), GGMLType.F32)


def ternary_scale(seed: int, name: str, ne0: int) -> float:
    """The per-tensor scale of ternary_values without drawing the values."""
    return _bf16_round(tensor_rng(seed, name).uniform(0.5, 2.0) / math.sqrt(ne0))


def _add_metadata(w: GGUFWriter, spec: RandomModelSpec, n_vocab: int, name: str, tok_kvs: dict) -> None:
    a = spec.arch
    w.add_kv("general.architecture", a)
    w.add_kv("general.name", name)
    for key, value in [("vocab_size", n_vocab), ("context_length", spec.context_length),
                       ("embedding_length", spec.n_embd), ("block_count", spec.n_layer),
                       ("feed_forward_length", spec.n_ff), ("rope.dimension_count", spec.head_dim),
                       ("attention.head_count", spec.n_head), ("attention.head_count_kv", spec.n_head_kv)]:
        w.add_kv(f"{a}.{key}", int(value), GGUFValueType.UINT32)
    w.add_kv(f"{a}.attention.layer_norm_rms_epsilon", float(spec.rms_eps), GGUFValueType.FLOAT32)
    w.add_kv(f"{a}.rope.freq_base", float(spec.rope_freq_base), GGUFValueType.FLOAT32)
    if spec.hidden_activation is not None:
        w.add_kv(f"{a}.hidden_activation", str(spec.hidden_activation), GGUFValueType.STRING)
    w.add_kv("general.file_type", FILE_TYPES[spec.weight_type], GGUFValueType.UINT32)
    w.add_kv("general.quantization_version", 2, GGUFValueType.UINT32)
    for key, (value, vtype) in tok_kvs.items():
        w.add_kv(key, value, vtype)


def build_writer(spec: RandomModelSpec, *, tokenizer_from=None, name: str | None = None) -> GGUFWriter:
    """A GGUFWriter holding the model's metadata and lazy tensor producers (nothing generated yet)."""
    tok_kvs = copied_tokenizer(tokenizer_from) if tokenizer_from is not None else synthetic_tokenizer(spec.n_vocab)
    n_vocab = len(tok_kvs["tokenizer.ggml.tokens"][0])
    w = GGUFWriter()
    _add_metadata(w, spec, n_vocab, name or f"test-{spec.arch}-{spec.weight_type}", tok_kvs)
    d = spec.n_embd
    w.add_tensor("token_embd.weight", lambda: embedding_chunks(spec.seed, "token_embd.weight", d, n_vocab),
                 (d, n_vocab), EMBD_TYPES[spec.embd_type])
    w.add_tensor("output_norm.weight", lambda: norm_values(spec.seed, "output_norm.weight", d), (d,), GGMLType.F32)
    if not spec.tied:
        w.add_tensor("output.weight", lambda: embedding_chunks(spec.seed, "output.weight", d, n_vocab),
                     (d, n_vocab), GGMLType.F16)
    for i in range(spec.n_layer):
        _add_layer(w, spec, i)
    return w


def write_test_model(path, *, arch="bitnet-b1.58", n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512,
                     n_vocab=512, weight_type="i2_s", embd_type="f16", seed=0, context_length=1024,
                     rope_freq_base=500000.0, rms_eps=1e-5, hidden_activation=None, tokenizer_from=None,
                     tied=True, scale_tensors=False, name=None) -> pathlib.Path:
    """Write a random BitNet GGUF and return its path. With tokenizer_from, n_vocab is that file's token count."""
    spec = RandomModelSpec(arch=arch, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                           n_ff=n_ff, n_vocab=n_vocab, weight_type=weight_type, embd_type=embd_type, seed=seed,
                           context_length=context_length, rope_freq_base=rope_freq_base, rms_eps=rms_eps,
                           hidden_activation=hidden_activation, tied=tied, scale_tensors=scale_tensors)
    path = pathlib.Path(path)
    build_writer(spec, tokenizer_from=tokenizer_from, name=name).write(path)
    return path


# ---- CLI ------------------------------------------------------------------------------------------------------

PRESETS = {
    "tiny": dict(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512),
    "2b4t": dict(n_embd=2560, n_layer=30, n_head=20, n_head_kv=5, n_ff=6912, n_vocab=128256, context_length=4096),
}


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bitnet_batch.testing.models",
                                description="Write a random BitNet b1.58 GGUF test model.")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", choices=sorted(PRESETS), help="shape preset; explicit flags override it")
    p.add_argument("--arch", default="bitnet-b1.58")
    for flag, dest in [("--hidden", "n_embd"), ("--layers", "n_layer"), ("--heads", "n_head"),
                       ("--kv-heads", "n_head_kv"), ("--ffn", "n_ff"), ("--vocab", "n_vocab"),
                       ("--ctx", "context_length")]:
        p.add_argument(flag, dest=dest, type=int)
    p.add_argument("--wtype", dest="weight_type", choices=sorted(WEIGHT_TYPES), default="i2_s")
    p.add_argument("--embd-type", dest="embd_type", choices=sorted(EMBD_TYPES), default="f16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", dest="tokenizer_from", help="copy tokenizer.* metadata from this GGUF")
    p.add_argument("--hidden-activation", dest="hidden_activation")
    p.add_argument("--untied", action="store_true", help="also write output.weight")
    p.add_argument("--scale-tensors", action="store_true", help="unit-scale weights + <name>.scale tensors")
    p.add_argument("--name", help="general.name")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _parse_args(argv)
    shape = dict(PRESETS["tiny"], context_length=1024)
    shape.update(PRESETS.get(a.preset, {}))
    shape.update({k: getattr(a, k) for k in shape if getattr(a, k, None) is not None})
    t0 = time.perf_counter()
    try:
        path = write_test_model(a.out, arch=a.arch, weight_type=a.weight_type, embd_type=a.embd_type, seed=a.seed,
                                hidden_activation=a.hidden_activation, tokenizer_from=a.tokenizer_from,
                                tied=not a.untied, scale_tensors=a.scale_tensors, name=a.name, **shape)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
