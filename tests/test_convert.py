"""`bitnet-batch convert`: every --type round-trips a checkpoint to the same logits, writes what bitnet.cpp /
llama.cpp read (I2_S bytes as bitnet.cpp's quantizer writes them, TQ types with exact .scale tensors), the
tokenizer metadata and the provenance that `inspect` shows."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bitnet_batch
from bitnet_batch.cli import main
from bitnet_batch.convert import convert
from bitnet_batch.errors import ConfigError
from bitnet_batch.model.gguf import GGMLType, GGUFFile
from bitnet_batch.testing.hf_writer import write_checkpoint
from test_hf import FIXTURES, HF, pass_rule, sequences

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
TYPES = ["i2_s", "tq2_0", "tq1_0", "f16"]
PROJ_TYPE = {"i2_s": GGMLType.I2_S, "tq2_0": GGMLType.TQ2_0, "tq1_0": GGMLType.TQ1_0, "f16": GGMLType.F16}


@pytest.fixture(scope="module")
def dir_logits():
    out = {}
    for name in FIXTURES:
        model = bitnet_batch.load_model(HF / name)
        out[name] = {k: model.logits(s["ids"]) for k, s in sequences(name).items()}
    return out


@pytest.mark.parametrize("weight_type", TYPES)
@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip_gives_the_same_logits(name, weight_type, dir_logits, tmp_path):
    """Directory -> GGUF -> bit-identical logits, which therefore pass against transformers too."""
    res = convert(HF / name, tmp_path / "m.gguf", weight_type)
    model = bitnet_batch.load_model(res.path)
    assert model.config.arch == res.arch and model.config.ffn_act == "relu2"
    got = {k: model.logits(s["ids"]) for k, s in sequences(name).items()}
    for key, logits in got.items():
        np.testing.assert_array_equal(logits, dir_logits[name][key], err_msg=key)
    assert "PASS" in pass_rule(HF / f"{name}.json", got, tmp_path)


@pytest.mark.parametrize("fmt", ["packed", "master"])
def test_every_type_packs_whole_blocks_exactly(fmt, tmp_path):
    """Input widths of 256 and 512 fill I2_S and TQ blocks: every projection in the type itself (no fallback),
    the scale in the I2_S tail or in an F32 .scale tensor with TQ block scales of 1, and the same logits."""
    ckpt = write_checkpoint(tmp_path / "ckpt", fmt=fmt, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512,
                            seed=5)
    ref = bitnet_batch.load_model(ckpt)
    ids = np.arange(1, 50) * 13 % 512
    want = ref.logits(ids)
    for weight_type in TYPES:
        res = convert(ckpt, tmp_path / f"{weight_type}.gguf", weight_type)
        assert res.fallback == ()
        assert len(res.warnings) == (0 if weight_type == "i2_s" else 1)         # tied, relu2: only llama.cpp's SiLU
        assert all("SiLU" in w for w in res.warnings)
        gf = GGUFFile(res.path)
        proj = [t for n, t in gf.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
        assert len(proj) == 14 and {t.ggml_type for t in proj} == {PROJ_TYPE[weight_type]}
        scales = [n for n in gf.tensors if n.endswith(".scale")]
        assert len(scales) == (0 if weight_type == "i2_s" else 14)
        if weight_type in ("tq2_0", "tq1_0"):                  # fp16 d = 1 in every block: the scale is exact
            raw = gf.raw("blk.0.attn_q.weight")
            size = 66 if weight_type == "tq2_0" else 54
            d = raw.reshape(-1, size)[:, -2:].copy().view("<f2")
            assert np.all(d == 1.0)
        np.testing.assert_array_equal(bitnet_batch.load_model(res.path).logits(ids), want, err_msg=weight_type)


def test_i2s_bytes_are_bitnet_cpps(tmp_path):
    """The reference I2_S model (quantized by bitnet.cpp) converted to I2_S again: every tensor byte for byte."""
    src = DATA / "reference" / "tiny-i2s-b158.gguf"
    res = convert(src, tmp_path / "again.gguf", "i2_s")
    a, b = GGUFFile(src), GGUFFile(res.path)
    assert list(a.tensors) == list(b.tensors)
    for name, info in a.tensors.items():
        assert b.tensors[name].ggml_type == info.ggml_type and b.tensors[name].shape == info.shape, name
        np.testing.assert_array_equal(a.raw(name), b.raw(name), err_msg=name)
    res = convert(src, tmp_path / "tq.gguf", "tq2_0")
    ids = json.loads((DATA / "reference" / "tiny-i2s-b158.json").read_text())["sequences"]["s2_len40"]["ids"]
    np.testing.assert_array_equal(bitnet_batch.load_model(res.path).logits(ids),
                                  bitnet_batch.load_model(src).logits(ids))


def test_metadata_tokenizer_and_provenance(tmp_path):
    src = HF / "tiny-master-mha"
    res = convert(src, tmp_path / "m.gguf", "tq2_0", name="my-finetune")
    md = GGUFFile(res.path).metadata
    assert md["general.architecture"] == "bitnet" and md["general.name"] == "my-finetune"
    assert md["general.file_type"] == 37 and md["bitnet.hidden_activation"] == "relu2"
    assert md["bitnet.attention.head_count_kv"] == 4 and md["bitnet.context_length"] == 512
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"
    assert md["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (509, 510)
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["bitnet_batch.convert.source"] == str(src)
    assert md["bitnet_batch.convert.source_sha256"] == bitnet_batch.load_model(src).sha256()
    assert "BF16 master weights" in md["bitnet_batch.convert.source_format"]
    assert md["general.source.url"] == src.resolve().as_uri()
    assert any("lm_head is not tied" in w for w in res.warnings) and any("SiLU" in w for w in res.warnings)
    out = CliRunner().invoke(main, ["inspect", str(res.path)])
    assert out.exit_code == 0 and "source_sha256" in out.output and "my-finetune" in out.output


def test_cli_convert_reports_fallbacks(tmp_path):
    out = tmp_path / "p.gguf"
    res = CliRunner().invoke(main, ["convert", str(HF / "tiny-packed-gqa"), "-o", str(out), "--type", "i2_s"])
    assert res.exit_code == 0, res.output
    assert "arch bitnet-b1.58" in res.output and "21 projections" in res.output and "as F32" in res.output
    assert {GGUFFile(out).tensors["blk.2.ffn_down.weight"].ggml_type} == {GGMLType.F32}     # 864 wide: not 128s
    res = CliRunner().invoke(main, ["convert", str(HF / "tiny-packed-gqa"), "-o", str(out), "--type", "q4_0"])
    assert res.exit_code == 2 and "q4_0" in res.output
    with pytest.raises(ConfigError, match="--type must be one of"):
        convert(HF / "tiny-packed-gqa", out, "q4_0")
    res = CliRunner().invoke(main, ["inspect", str(HF / "tiny-packed-gqa")])
    assert res.exit_code == 0 and "Hugging Face checkpoint: packed 2-bit ternary" in res.output
    assert "(bitnet format)" in res.output


def test_llama3_vocabulary_gets_llama_bpe(tmp_path):
    """A checkpoint with the LLaMA-3 tokenizer.json: the GGUF carries tokenizer.ggml.pre = llama-bpe (the official
    2B4T GGUF lacks it) and both tokenize as the reference encoder does. In a child process: building the 128k
    vocabulary frees ~32 MB heap blocks, which raises glibc's mmap threshold, and later tests measure whether
    their (smaller) buffers are mapped lazily."""
    out = run_isolated(f"""
        import json
        from bitnet_batch.convert import convert
        from bitnet_batch.model.gguf import GGUFFile
        from bitnet_batch.testing.hf_writer import write_checkpoint
        from bitnet_batch.tokenizer import load_tokenizer
        vocab = {str(DATA / "tokenizer" / "ggml-vocab-llama-bpe.gguf")!r}
        ckpt = write_checkpoint({str(tmp_path / "ckpt")!r}, n_embd=128, n_layer=1, n_head=2, n_head_kv=1, n_ff=128,
                                tokenizer_from=vocab, embd_dtype="F16")
        res = convert(ckpt, {str(tmp_path / "l3.gguf")!r}, "i2_s")
        md = GGUFFile(res.path).metadata
        tok = load_tokenizer(res.path)
        print(json.dumps({{"pre": md["tokenizer.ggml.pre"], "n": len(md["tokenizer.ggml.tokens"]),
                          "bos": md["tokenizer.ggml.bos_token_id"], "eot": md["tokenizer.ggml.eot_token_id"],
                          "ids": tok.encode("Hello world, this is BitNet!"),
                          "eog": sorted(tok.eog_ids) == sorted(load_tokenizer(vocab).eog_ids)}}))
    """)
    assert out == {"pre": "llama-bpe", "n": 128256, "bos": 128000, "eot": 128009,
                   "ids": [9906, 1917, 11, 420, 374, 6631, 7099, 0], "eog": True}


def run_isolated(code: str):
    """Run ``code`` in a fresh interpreter (this checkout first on the path); its last stdout line as JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])
