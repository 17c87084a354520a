"""The trained demo model of examples/models: metadata, golden greedy continuations (catch numerical drift),
held-out perplexity equal to the training framework's, and TQ2_0 / TQ1_0 re-exports that score like I2_S.

No torch here: the training framework's numbers come from the training report committed next to the model
(``*-train.json``: per-record held-out NLL computed by scripts/train_demo_model.py with the same quantized
forward pass)."""
import json
import math
from pathlib import Path

import numba
import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.generate import Generator
from bitnet_batch.model import quants
from bitnet_batch.model.gguf import GGMLType, GGUFFile
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.jobs.score import ScoreJobConfig, score_job
from bitnet_batch.testing.gguf_writer import GGUFWriter
from bitnet_batch.testing.models import FILE_TYPES
from conftest import read_jsonl, write_jsonl

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
STEM = "shakespeare-b158"
MODEL = MODELS / f"{STEM}-i2s.gguf"
HELDOUT = MODELS / f"{STEM}-heldout.jsonl"
REPORT = MODELS / f"{STEM}-train.json"
STRIDE = 16                        # every 16th held-out record is scored (20 records over both plays)
ENGINE = EngineConfig(max_batch=8, prefill_chunk=256)

# Greedy continuations of fixed prompts: (prompt or chat, text, finish reason, tokens). Regenerate only for a
# deliberate change of numerics (a kernel or forward-pass change that moves logits is a bug until shown not).
GOLDEN = {
    "plain": ("To be, or not to be,",
              " and\nsay, and the man, and I will be a man, and\nsay, and I will", "length", 24),
    "speech": ("KING.\nWhat news, my lord?",
               " I'll be a man\nTo be a king, and the king, and the world\nTo be a man of", "length", 24),
    "chat": ([{"role": "user", "content": "Where is my horse?"}],              # stops at <|eot_id|>
             "I am a man, sir, I'll be a man.", "stop", 14),
}
GOLDEN_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Numba kernels on one thread here: on a busy 2-core machine two spinning threads ran 6x slower; the
    process-wide thread count is restored afterwards."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return bitnet_batch.load_model(MODEL)


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def subset(tmp_path_factory, report):
    """Every STRIDE-th held-out record (the training report lists them in the same order)."""
    records = read_jsonl(HELDOUT)
    assert len(records) == report["heldout"]["records"] == len(report["heldout"]["record_nll_float32"])
    picked = list(range(0, len(records), STRIDE))
    path = write_jsonl(tmp_path_factory.mktemp("heldout") / "subset.jsonl", [records[i] for i in picked])
    return path, picked


@pytest.fixture(scope="module")
def i2s_scored(model, subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("i2s") / "i2s.jsonl"
    return score_corpus(model, subset[0], out), read_jsonl(out)


def score_corpus(model, inputs: Path, out: Path) -> dict:
    cfg = ScoreJobConfig(inputs=(str(inputs),), output=str(out), model=str(model.path), engine=ENGINE)
    return score_job(cfg, model=model, quiet=True)


def test_metadata_tokenizer_and_shape(model, report):
    cfg, tok = model.config, model.tokenizer
    c = report["config"]
    assert (cfg.arch, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab, cfg.n_ctx) == \
        ("bitnet-b1.58", c["n_embd"], c["n_layer"], c["n_head"], c["n_head_kv"], c["n_ff"], c["n_vocab"], c["ctx"])
    assert cfg.ffn_act == "relu2" and cfg.tied_lm_head and cfg.rope_base == c["rope_base"]
    assert tok.add_bos and tok.vocab_size == cfg.n_vocab
    assert [tok.token_text(i) for i in (tok.bos_id, tok.eos_id, tok.eot_id)] == \
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert tok.chat_template and model.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    line = "Now is the winter of our discontent\nMade glorious summer by this sun of York;"
    ids = tok.encode(line)
    assert tok.decode(ids) == line and len(ids) < len(line) / 2.5          # a real BPE vocabulary, not bytes
    assert report["gguf_sha256"] == model.sha256()                          # the report describes this file
    with GGUFFile(MODEL) as g:
        kinds = {g.tensors[n].ggml_type for n in g.tensors if n.startswith("blk.") and "norm" not in n}
    assert kinds == {GGMLType.I2_S}


def test_greedy_continuations_are_golden(model):
    gen = Generator(model, EngineConfig(max_batch=1, prefill_chunk=64))
    tok = model.tokenizer
    params = SamplingParams(max_tokens=GOLDEN_TOKENS, temperature=0.0)
    for key, (prompt, text, finish, n) in GOLDEN.items():
        ids = tok.apply_chat_template(prompt) if isinstance(prompt, list) else tok.encode(prompt, add_bos=True)
        res = gen.stream(ids, params)
        assert (res["text"], res["finish_reason"], res["completion_tokens"]) == (text, finish, n), key


def test_heldout_perplexity_equals_the_training_framework(report, subset, i2s_scored):
    _, picked = subset
    summary, records = i2s_scored
    held = report["heldout"]
    nll = sum(held["record_nll_float32"][i] for i in picked)
    n = sum(held["record_tokens"][i] for i in picked)
    assert summary["corpus"]["tokens"] == n                                  # the same tokens are scored
    torch_ppl = math.exp(nll / n)
    assert summary["corpus"]["perplexity"] == pytest.approx(torch_ppl, rel=0.01)
    for rec, i in zip(records, picked):                                      # per record too, a little looser
        assert rec["tokens"] == held["record_tokens"][i]
        assert -rec["logprob"] == pytest.approx(held["record_nll_float32"][i], rel=0.02)


def requantize(src: Path, dst: Path, weight_type: str) -> Path:
    """The same model with its ternary projections re-packed as TQ2_0 / TQ1_0 (d = the I2_S scale, which
    fp16 rounds); every other tensor and all metadata copied."""
    pack = {"tq2_0": (quants.pack_tq2_0, GGMLType.TQ2_0), "tq1_0": (quants.pack_tq1_0, GGMLType.TQ1_0)}[weight_type]
    w = GGUFWriter()
    with GGUFFile(src) as g:
        for key, value in g.metadata.items():
            vtype, etype = g.value_types[key]
            value = FILE_TYPES[weight_type] if key == "general.file_type" else value
            w.add_kv(key, value, etype if etype is not None else vtype)
        for name, info in g.tensors.items():
            raw = np.array(g.raw(name))
            if info.ggml_type == GGMLType.I2_S:
                t, scale = quants.unpack_i2s(raw, *info.shape)
                w.add_tensor(name, pack[0](t, scale), info.shape, pack[1])
            else:
                w.add_tensor(name, raw, info.shape, info.ggml_type)
    w.write(dst)
    return dst


@pytest.mark.parametrize("weight_type", ["tq2_0", "tq1_0"])
def test_tq_exports_score_like_i2s(subset, i2s_scored, tmp_path, weight_type):
    path, _ = subset
    i2s = i2s_scored[0]["corpus"]
    tq_model = bitnet_batch.load_model(requantize(MODEL, tmp_path / f"demo-{weight_type}.gguf", weight_type))
    with GGUFFile(tq_model.path) as g:
        assert g.tensors["blk.0.ffn_down.weight"].ggml_type == GGMLType[weight_type.upper()]
    tq = score_corpus(tq_model, path, tmp_path / f"{weight_type}.jsonl")["corpus"]
    assert tq["tokens"] == i2s["tokens"]
    assert tq["perplexity"] == pytest.approx(i2s["perplexity"], rel=0.01)
    assert tq["perplexity"] != i2s["perplexity"]            # really another file: fp16 scales differ a little
