"""Hugging Face BitNet checkpoints: logits against transformers (tests/data/hf, made by scripts/make_hf_reference.py),
the same weights as a GGUF, shards, malformed checkpoints, the tokenizer files, the hub path and jobs."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.errors import InputError, ModelFormatError, ModelNotFoundError
from bitnet_batch.model.hf import i2_rows, pack_rows_hf, unpack_rows
from bitnet_batch.model.layout import pack_rows
from bitnet_batch.model.safetensors import SafetensorsFile, float32
from bitnet_batch.testing.hf_writer import write_checkpoint, write_safetensors
from bitnet_batch.testing.models import write_test_model
from conftest import read_jsonl, write_jsonl

DATA = Path(__file__).parent / "data"
HF = DATA / "hf"
FIXTURES = ["tiny-packed-gqa", "tiny-master-mha"]
CHECK = DATA / "reference" / "check_logits.py"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def sequences(name):
    return json.loads((HF / f"{name}.json").read_text())["sequences"]


@pytest.fixture(scope="module")
def fixture_logits():
    """Our logits for every sequence of both fixtures, loaded from their directories once."""
    out = {}
    for name in FIXTURES:
        model = bitnet_batch.load_model(HF / name)
        out[name] = {k: model.logits(s["ids"]) for k, s in sequences(name).items()}
    return out


def pass_rule(sidecar: Path, logits: dict, tmp_path: Path) -> str:
    """Run the shared reference's check_logits.py (strict / cascade tiers) on our logits; its report."""
    cand = tmp_path / f"{sidecar.stem}.cand.npz"
    np.savez(cand, **logits)
    res = subprocess.run([sys.executable, str(CHECK), str(sidecar), str(cand)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


# ---- against transformers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_transformers(name, fixture_logits, tmp_path):
    """The pass rule against transformers' float32 logits (strict on the sequences where transformers' own float32
    and float64 runs agree, cascade on the others), and within 1e-4 of transformers in float64 (our activations are
    float64 between the int8 quantizers), on every stored float64 sequence."""
    side = json.loads((HF / f"{name}.json").read_text())
    ours = fixture_logits[name]
    report = pass_rule(HF / f"{name}.json", ours, tmp_path)
    assert "PASS" in report and report.count("[strict ]") >= 3
    f64 = np.load(HF / side["logits_files"]["float64"])
    assert len(f64.files) == 4
    for key in f64.files:
        assert ours[key].shape == (len(side["sequences"][key]["ids"]), 512)
        assert np.abs(ours[key] - f64[key]).max() < 1e-4, key


def test_fixtures_are_the_two_formats():
    packed = json.loads((HF / "tiny-packed-gqa" / "config.json").read_text())
    master = json.loads((HF / "tiny-master-mha" / "config.json").read_text())
    assert packed["quantization_config"]["linear_class"] == "bitlinear" and packed["num_key_value_heads"] == 1
    assert master["quantization_config"]["quantization_mode"] == "online" and not master["tie_word_embeddings"]
    st = SafetensorsFile(HF / "tiny-packed-gqa" / "model.safetensors")
    assert st.tensors["model.layers.0.mlp.gate_proj.weight"].dtype == "U8"
    assert st.tensors["model.layers.0.mlp.gate_proj.weight"].shape == (216, 320)
    assert SafetensorsFile(HF / "tiny-master-mha" / "model.safetensors").tensors[
        "model.layers.1.self_attn.q_proj.weight"].dtype == "BF16"


def test_autobitlinear_scales_multiply(tmp_path, fixture_logits):
    """linear_class autobitlinear stores alpha itself: the packed fixture with weight_scale inverted (in float32, as
    the bitlinear path inverts it) and that class is the same model."""
    src = HF / "tiny-packed-gqa"
    dst = copy_checkpoint(src, tmp_path / "auto", invert_scales=True,
                          config={"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                                          "quantization_mode": "offline"}})
    ids = sequences("tiny-packed-gqa")["s1_len8"]["ids"]
    want = fixture_logits["tiny-packed-gqa"]["s1_len8"]
    np.testing.assert_array_equal(bitnet_batch.load_model(dst).logits(ids), want)


# ---- the same weights as a GGUF ---------------------------------------------------------------------------------

SHAPE = dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, seed=21)


def test_packed_checkpoint_is_the_gguf_with_the_same_weights(tmp_path):
    """write_checkpoint draws the values write_test_model writes; with alpha stored as is (autobitlinear), F32 norms
    and an F16 embedding the two files hold the same model: bit-identical logits. And the tokenizers agree."""
    ckpt = write_checkpoint(tmp_path / "ckpt", linear_class="autobitlinear", float_dtype="F32", embd_dtype="F16",
                            **SHAPE)
    gguf = write_test_model(tmp_path / "same.gguf", **SHAPE)
    a, b = bitnet_batch.load_model(ckpt), bitnet_batch.load_model(gguf)
    ids = np.arange(1, 60) * 37 % 512
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    for text in ["The small town sat at the edge of a river.", "  numbers 1, 22, 333 and 4444!\n\n", "ünïcödé"]:
        assert a.tokenizer.encode(text, add_bos=True) == b.tokenizer.encode(text, add_bos=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hello "}]
    assert a.tokenizer.chat_format == "bitnet"
    assert a.tokenizer.apply_chat_template(chat) == b.tokenizer.apply_chat_template(chat)
    assert (a.tokenizer.bos_id, a.tokenizer.eos_id, a.tokenizer.eog_ids) == (b.tokenizer.bos_id, b.tokenizer.eos_id,
                                                                             b.tokenizer.eog_ids)


def test_pack_rows_matches_transformers_layout():
    """Packed row r holds rows r, r + R, r + 2R, r + 3R in bits 0-1, 2-3, 4-5, 6-7 (transformers pack_weights)."""
    t = np.array([[-1, 0], [0, 1], [1, 1], [1, -1], [0, 0], [-1, -1], [1, 0], [-1, 1]], np.int8)
    packed = pack_rows_hf(t)
    assert packed.shape == (2, 2)
    assert packed[0, 0] == (0 << 0) | (2 << 2) | (1 << 4) | (2 << 6)      # rows 0, 2, 4, 6 of column 0
    np.testing.assert_array_equal(unpack_rows(packed), t)
    big = np.random.default_rng(1).integers(0, 3, (96, 384)).astype(np.int8) - 1
    np.testing.assert_array_equal(i2_rows(pack_rows_hf(big)), pack_rows(big))      # the loader's direct path


def test_master_weights_are_ternarized_like_transformers():
    from bitnet_batch.model.hf import absmean_ternarize

    w = np.array([[0.9, -0.1, 0.3, -0.6], [0.0, 0.25, -2.0, 0.05]], np.float32)
    t, alpha = absmean_ternarize(w)
    s = np.float32(1) / np.float32(np.abs(w).mean())
    np.testing.assert_array_equal(t, np.clip(np.rint(w * s), -1, 1))
    assert alpha == np.float32(1) / s
    t, alpha = absmean_ternarize(np.array([[0.5, 0.0, -0.5, 0.0]], np.float32))   # no exact path: alpha = mean|W|
    assert alpha == np.float32(0.25) and t.tolist() == [[1, 0, -1, 0]]


# ---- shards, fingerprints ---------------------------------------------------------------------------------------

def test_sharded_checkpoint(tmp_path):
    one = write_checkpoint(tmp_path / "one", fmt="master", **SHAPE)
    three = write_checkpoint(tmp_path / "three", fmt="master", shards=3, **SHAPE)
    assert len(list(three.glob("*.safetensors"))) == 3 and (three / "model.safetensors.index.json").is_file()
    a, b = bitnet_batch.load_model(one), bitnet_batch.load_model(three)
    ids = [1, 2, 3, 50, 400]
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    assert a.sha256() != b.sha256() and len(b.checkpoint.files) == 8        # config, index, 3 shards, 3 tokenizer files
    # the index names a shard that is not there / a shard lacks a tensor the index lists
    index = json.loads((three / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    bad = copy_tree(three, tmp_path / "bad1")
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="names shard") as e:
        bitnet_batch.load_model(bad)
    assert e.value.tensor == name and "model.safetensors.index.json" in str(e.value)
    bad = copy_tree(three, tmp_path / "bad2")
    shard = json.loads((three / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    rewrite_file(bad / shard, drop={"model.norm.weight"})
    with pytest.raises(ModelFormatError, match="required tensor is missing") as e:
        bitnet_batch.load_model(bad)
    assert e.value.tensor == "model.norm.weight" and shard in str(e.value)


def test_sha256_covers_config_weights_and_tokenizer(tmp_path):
    src = copy_tree(HF / "tiny-master-mha", tmp_path / "m")
    first = bitnet_batch.load_model(src).sha256()
    assert first == bitnet_batch.load_model(src).sha256()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=False)))
    model = bitnet_batch.load_model(src)
    assert model.sha256() != first and not model.tokenizer.add_bos
    assert model.path == src and model.gguf is None
    assert model.metadata["general.architecture"] == "bitnet-b1.58" and "general.source.url" in model.metadata


# ---- malformed checkpoints ------------------------------------------------------------------------------------

def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_file(path: Path, *, drop=(), replace=None, add=None, invert_scales=False):
    """Rewrite one safetensors file: drop tensors, replace some (name -> (dtype, shape, array)), add some."""
    st = SafetensorsFile(path)
    tensors = {}
    for name, info in st.tensors.items():
        if name in drop:
            continue
        arr = np.array(st.array(name))
        dtype = info.dtype
        if invert_scales and name.endswith("weight_scale"):           # 1 / stored in float32, kept in F32
            arr, dtype = np.float32(1) / float32(arr, info.dtype), "F32"
        tensors[name] = (replace or {}).get(name, (dtype, info.shape, arr))
    tensors.update(add or {})
    tensors = {k: (dt, shape, lambda a=a: a) for k, (dt, shape, a) in tensors.items()}
    del st
    write_safetensors(path, tensors)


def copy_checkpoint(src: Path, dst: Path, *, config=None, **changes) -> Path:
    copy_tree(src, dst)
    if changes:
        rewrite_file(dst / "model.safetensors", **changes)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def expect_error(path, match, *, file, tensor=None):
    with pytest.raises(ModelFormatError, match=match) as e:
        bitnet_batch.load_model(path)
    assert file in str(e.value), str(e.value)
    if tensor is not None:
        assert e.value.tensor == tensor and tensor in str(e.value)
    return e.value


PACKED = HF / "tiny-packed-gqa"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def test_missing_tensor(tmp_path):
    bad = copy_checkpoint(PACKED, tmp_path / "m", drop={"model.layers.2.mlp.down_proj.weight"})
    down = "model.layers.2.mlp.down_proj.weight"
    expect_error(bad, "required tensor is missing", file="model.safetensors", tensor=down)
    bad = copy_checkpoint(PACKED, tmp_path / "s", drop={Q0 + "_scale"})
    expect_error(bad, "required tensor is missing", file="model.safetensors", tensor=Q0 + "_scale")


def test_wrong_shape(tmp_path):
    packed = np.array(SafetensorsFile(PACKED / "model.safetensors").array(Q0))      # [80, 320]
    bad = copy_checkpoint(PACKED, tmp_path / "w", replace={Q0: ("U8", (160, 160), packed)})
    expect_error(bad, r"shape \[160, 160\] but packed weights of a \[320, 320\] projection need \[80, 320\]",
                 file="model.safetensors", tensor=Q0)
    norm = "model.layers.1.mlp.ffn_sub_norm.weight"
    bad = copy_checkpoint(PACKED, tmp_path / "n", replace={norm: ("F32", (432,), np.ones(432, np.float32))})
    expect_error(bad, r"shape \[432\] but the model needs \[864\]", file="model.safetensors", tensor=norm)
    emb = "model.embed_tokens.weight"
    bad = copy_checkpoint(PACKED, tmp_path / "e", replace={emb: ("F32", (256, 320), np.ones((256, 320), np.float32))})
    expect_error(bad, "vocab_size, hidden_size", file="model.safetensors", tensor=emb)


def test_unknown_model_type_and_quantization(tmp_path):
    bad = copy_checkpoint(PACKED, tmp_path / "t", config={"model_type": "llama"})
    expect_error(bad, "model_type 'llama' is not supported", file="config.json")
    bad = copy_checkpoint(PACKED, tmp_path / "q", config={"quantization_config": {"quant_method": "gptq", "bits": 4}})
    expect_error(bad, "quant_method 'gptq' is not supported", file="config.json")
    bad = copy_checkpoint(PACKED, tmp_path / "c", config={"quantization_config": {"quant_method": "bitnet",
                                                                                  "linear_class": "fp8linear"}})
    expect_error(bad, "linear_class", file="config.json")
    bad = copy_checkpoint(PACKED, tmp_path / "n", config={"quantization_config": None})
    expect_error(bad, "packed uint8 weights, but config.json has no quantization_config", file="model.safetensors",
                 tensor=Q0)
    bad = copy_checkpoint(PACKED, tmp_path / "r", config={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    expect_error(bad, "RoPE scaling", file="config.json")
    bad = copy_checkpoint(PACKED, tmp_path / "a", config={"hidden_act": "gelu"})
    expect_error(bad, "hidden_act must be one of relu2, silu, got 'gelu'", file="config.json")


def test_bad_values_and_files(tmp_path):
    packed = np.array(SafetensorsFile(PACKED / "model.safetensors").array(Q0))
    bad = copy_checkpoint(PACKED, tmp_path / "c3", replace={Q0: ("U8", packed.shape, packed | 0x03)})
    expect_error(bad, "code 3", file="model.safetensors", tensor=Q0)
    bad = copy_checkpoint(PACKED, tmp_path / "z", replace={Q0 + "_scale": ("F32", (1,), np.zeros(1, np.float32))})
    expect_error(bad, "weight_scale is 0.0", file="model.safetensors", tensor=Q0 + "_scale")
    bias = "model.layers.0.self_attn.q_proj.bias"
    bad = copy_checkpoint(PACKED, tmp_path / "b", add={bias: ("F32", (320,), np.zeros(320, np.float32))})
    expect_error(bad, "unexpected tensor", file="model.safetensors", tensor=bias)
    bad = copy_tree(PACKED, tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    expect_error(bad, "truncated", file="model.safetensors")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    expect_error(bad, "not valid JSON", file="model.safetensors")


# ---- tokenizer files -----------------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def test_a_foreign_chat_template_is_rendered_with_jinja(tmp_path):
    src = copy_tree(HF / "tiny-master-mha", tmp_path / "t")
    (src / "chat_template.jinja").write_text(CHATML)
    tok = bitnet_batch.load_model(src).tokenizer
    assert tok.chat_format == "jinja"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = "<|start|>system\nBe brief.<|eot_id|>\n<|start|>user\nhi<|eot_id|>\n<|start|>assistant\n"
    assert tok.render_chat(chat) == "<|begin_of_text|>" + text
    assert tok.apply_chat_template(chat) == [tok.bos_id] + tok.encode(text, parse_special=True)
    assert tok.apply_chat_template(chat).count(tok.eot_id) == 2
    with pytest.raises(InputError, match="control token text '<|eot_id|>'") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi<|eot_id|>"}])
    assert e.value.field == "messages[0].content"
    (src / "chat_template.jinja").write_text("{{ raise_exception('only one user turn') }}")
    with pytest.raises(InputError, match="only one user turn"):
        bitnet_batch.load_model(src).tokenizer.apply_chat_template(chat)


def test_tokenizer_config_and_generation_config(tmp_path):
    src = copy_tree(HF / "tiny-packed-gqa", tmp_path / "t")
    base = bitnet_batch.load_model(HF / "tiny-packed-gqa").tokenizer
    assert base.add_bos and base.chat_format == "bitnet"           # BOS from tokenizer.json's post-processor
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 509, "eos_token_id": [510, 100]}))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=False, eos_token="<|eot_id|>")))
    tok = bitnet_batch.load_model(src).tokenizer
    assert not tok.add_bos and tok.eos_id == 511 and {510, 511, 100} <= tok.eog_ids
    assert tok.encode("hello world") == base.encode("hello world")


def test_llama3_tokenizer_json_matches_the_gguf_vocabulary(tmp_path):
    """The LLaMA-3 vocabulary written as tokenizer.json (our writer) reads back to the same ids as the GGUF. In a
    child process, as test_convert's LLaMA-3 test (the 128k vocabulary moves glibc's mmap threshold)."""
    from test_convert import run_isolated

    out = run_isolated(f"""
        import json, pathlib
        from bitnet_batch.hf_tokenizer import read_hf_tokenizer
        from bitnet_batch.tokenizer import Tokenizer, load_tokenizer
        gguf = load_tokenizer({str(DATA / "tokenizer" / "ggml-vocab-llama-bpe.gguf")!r})
        d = pathlib.Path({str(tmp_path)!r})
        (d / "tokenizer.json").write_text(gguf.hf.to_str())
        tok = Tokenizer(*read_hf_tokenizer(d))
        texts = ["  3.14159 and 1234567", "Ünïcödé — 日本語", "<|eot_id|> stays text", "a\\n\\n\\tb  "]
        print(json.dumps({{"n": tok.vocab_size, "pattern": tok.pattern,
                          "ids": tok.encode("Hello world, this is BitNet!"),
                          "same": [tok.encode(t) == gguf.encode(t) for t in texts],
                          "round_trip": [tok.decode(tok.encode(t)) == t for t in texts]}}))
    """)
    assert out == {"n": 128256, "pattern": "llama3", "ids": [9906, 1917, 11, 420, 374, 6631, 7099, 0],
                   "same": [True] * 4, "round_trip": [True] * 4}


# ---- hub repo ids ---------------------------------------------------------------------------------------------

def fake_snapshot(root: Path, repo: str, src: Path) -> Path:
    """huggingface_hub's cache layout for a checkpoint repo: refs/main -> commit, snapshots/<commit>/<file> -> blob."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = base / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def run_offline(code: str, cache: Path):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(Path(__file__).parent.parent))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_repo_id_from_an_offline_cache(tmp_path, fixture_logits):
    snap = fake_snapshot(tmp_path / "hub", "acme/tiny-bitnet-hf", HF / "tiny-master-mha")
    ids = sequences("tiny-master-mha")["s1_len8"]["ids"]
    res = run_offline(f"""
        import numpy as np, bitnet_batch
        m = bitnet_batch.load_model("acme/tiny-bitnet-hf")
        np.save({str(tmp_path / 'l.npy')!r}, m.logits({ids}))
        print(m.path, m.checkpoint.repo_id(), m.checkpoint.revision(), m.config.name)
        try:
            bitnet_batch.load_model("acme/not-cached")
        except bitnet_batch.ModelNotFoundError as e:
            print("ERR", e)
    """, tmp_path / "hub")
    assert res.returncode == 0, res.stderr
    first, err = res.stdout.splitlines()
    assert first.split() == [str(snap), "acme/tiny-bitnet-hf", COMMIT, "acme/tiny-bitnet-hf"]
    assert err.startswith("ERR acme/not-cached is not in the local Hugging Face cache") and "HF_HUB_OFFLINE" in err
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), fixture_logits["tiny-master-mha"]["s1_len8"])


def test_a_gguf_repo_without_a_file_name_is_not_a_checkpoint(tmp_path):
    from bitnet_batch.model.hub import resolve_model_path

    only_gguf = tmp_path / "src"
    only_gguf.mkdir()
    shutil.copy(DATA / "reference" / "tiny-i2s-b158.gguf", only_gguf / "m.gguf")
    fake_snapshot(tmp_path / "hub", "acme/gguf-only", only_gguf)
    res = run_offline("""
        from bitnet_batch.model.hub import resolve_model_path
        try:
            resolve_model_path("acme/gguf-only")
        except Exception as e:
            print(type(e).__name__, e)
    """, tmp_path / "hub")
    assert "ModelNotFoundError acme/gguf-only: no config.json" in res.stdout, res.stdout + res.stderr
    with pytest.raises(ModelNotFoundError, match="Hugging Face checkpoint"):
        resolve_model_path(tmp_path)                       # neither a checkpoint nor one GGUF


# ---- the job pipeline -----------------------------------------------------------------------------------------

def test_run_score_and_pipeline_accept_a_checkpoint(tmp_path):
    from click.testing import CliRunner

    from bitnet_batch.cli import main

    model = HF / "tiny-packed-gqa"
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "The small town", "max_tokens": 5},
                                              {"id": 2, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 4}])
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(model), "--quiet"])
    assert res.exit_code == 0, res.output
    recs = read_jsonl(tmp_path / "o.jsonl")
    assert [r["error"] for r in recs] == [None, None] and recs[0]["usage"]["completion_tokens"] == 5
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    assert meta["model"]["path"] == str(model) and meta["model"]["sha256"] == bitnet_batch.load_model(model).sha256()
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(model), "--quiet"])
    assert res.exit_code == 0, res.output                                  # resume: the same model is accepted
    texts = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "The small town sat at the edge"}])
    res = CliRunner().invoke(main, ["score", str(texts), "-o", str(tmp_path / "s.out.jsonl"), "-m", str(model),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert read_jsonl(tmp_path / "s.out.jsonl")[0]["error"] is None
    pipe = tmp_path / "p.toml"
    pipe.write_text(textwrap.dedent(f"""
        [input]
        path = "in.jsonl"
        [prompt]
        user = "{{prompt}}"
        [model]
        name = "{model}"
        [sampling]
        max_tokens = 3
        [output]
        path = "p.out.jsonl"
    """))
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hello"}])
    res = CliRunner().invoke(main, ["run", str(pipe), "--quiet"])
    assert res.exit_code == 0, res.output
    assert read_jsonl(tmp_path / "p.out.jsonl")[0]["usage"]["completion_tokens"] == 3


@pytest.mark.ray
def test_ray_job_accepts_a_checkpoint(tmp_path):
    """--engine ray: actors load the checkpoint directory by path and write the local runner's records."""
    import ray

    from bitnet_batch.distributed import RayConfig, run_ray_job
    from bitnet_batch.engine.engine import EngineConfig
    from bitnet_batch.jobs.run import JobConfig, run_job
    from bitnet_batch.sampling.params import SamplingParams

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": "The small town " * (1 + i % 3),
                                               "max_tokens": 3 + i % 4} for i in range(12)])

    def job(out):
        return JobConfig(inputs=(str(src),), output=str(tmp_path / out), model=str(HF / "tiny-master-mha"),
                         sampling=SamplingParams(temperature=0.8), engine=EngineConfig(max_batch=4, prefill_chunk=32))
    run_job(job("local.jsonl"), quiet=True)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        run_ray_job(job("ray.jsonl"), RayConfig(actors=1, threads_per_actor=1, items_per_task=4), quiet=True)
    finally:
        if started:
            ray.shutdown()
    strip = lambda recs: [{k: v for k, v in r.items() if k != "timing"} for r in recs]      # noqa: E731
    local, remote = read_jsonl(tmp_path / "local.jsonl"), read_jsonl(tmp_path / "ray.jsonl")
    assert strip(remote) == strip(local) and all(r["error"] is None for r in remote)
