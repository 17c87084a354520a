"""load_model on malformed models: each problem gives a typed error naming the file, tensor and problem."""
import mmap
import os

import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.errors import ModelFormatError
from bitnet_batch.model.gguf import GGMLType, GGUFFile
from bitnet_batch.model.quants import pack_tq2_0
from bitnet_batch.testing.gguf_writer import GGUFWriter
from bitnet_batch.testing.models import write_test_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_test_model(tmp_path_factory.mktemp("loader") / "base.gguf", n_embd=512, n_layer=2, n_head=4,
                            n_head_kv=2, n_ff=256, n_vocab=300, weight_type="tq2_0", seed=3)


def rewrite(src, dst, *, drop=(), replace=None, metadata=None):
    """Copy a GGUF, dropping tensors, replacing some (name -> (data, shape, type)) or metadata values."""
    gf = GGUFFile(src)
    w = GGUFWriter()
    md = dict(gf.metadata, **(metadata or {}))
    for key, value in md.items():
        vtype, etype = gf.value_types.get(key, (None, None))
        w.add_kv(key, value, etype if etype is not None else vtype)
    for name, info in gf.tensors.items():
        if name in drop:
            continue
        if replace and name in replace:
            data, shape, typ = replace[name]
            w.add_tensor(name, data, shape, typ)
        else:
            w.add_tensor(name, np.array(gf.raw(name)), info.shape, info.ggml_type)
    w.write(dst)
    return dst


def expect_error(path, *, tensor=None, match):
    with pytest.raises(ModelFormatError, match=match) as ei:
        bitnet_batch.load_model(path)
    assert str(path) in str(ei.value)
    if tensor:
        assert ei.value.tensor == tensor and tensor in str(ei.value)


def test_base_loads(base):
    assert bitnet_batch.load_model(base).config.n_layer == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_copied_tensors_leave_the_memory_map(base):
    """A ternary tensor copied into the kernel layout is dropped from the file's memory map and its range is
    marked as not for huge pages (VmFlags ``nh``): otherwise the kernel maps large page-cache folios back in
    whole and RSS counts the file's copy again."""
    model = bitnet_batch.load_model(base)
    gf = model.gguf
    base_addr = np.asarray(gf._data).ctypes.data
    info = gf.tensors["blk.0.ffn_gate.weight"]
    page = mmap.PAGESIZE
    lo = -(-(base_addr + info.offset) // page) * page
    hi = (base_addr + info.offset + info.nbytes) // page * page
    assert hi - lo >= page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        entries = np.frombuffer(f.read((hi - lo) // page * 8), np.uint64)
    assert not ((entries >> np.uint64(63)) & np.uint64(1)).any()          # no page of it present
    flags = {}
    start = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            a, b = (int(v, 16) for v in head.split("-"))
            start = (a, b)
        elif head == "VmFlags:" and start and start[0] <= lo < start[1]:
            flags = set(line.split()[1:])
    assert "nh" in flags


def test_missing_tensor(base, tmp_path):
    expect_error(rewrite(base, tmp_path / "m.gguf", drop={"blk.1.ffn_up.weight"}), tensor="blk.1.ffn_up.weight",
                 match="missing")


def test_shape_mismatch(base, tmp_path):
    gf = GGUFFile(base)
    info = gf.tensors["blk.0.attn_k.weight"]            # (512, 256) -> claim (1024, 128): same bytes, wrong shape
    bad = rewrite(base, tmp_path / "s.gguf", replace={info.name: (np.array(gf.raw(info.name)), (1024, 128),
                                                                   info.ggml_type)})
    expect_error(bad, tensor="blk.0.attn_k.weight", match="shape")


def test_unsupported_projection_type(base, tmp_path):
    n = 512 * 512 // 32 * 34                                  # Q8_0 bytes for a 512 x 512 matrix
    bad = rewrite(base, tmp_path / "q.gguf", replace={"blk.0.attn_q.weight": (np.zeros(n, np.uint8), (512, 512),
                                                                              GGMLType.Q8_0)})
    expect_error(bad, tensor="blk.0.attn_q.weight", match="unsupported tensor type Q8_0")


def test_block_scales_varying_within_a_row(base, tmp_path):
    t = np.random.default_rng(0).integers(-1, 2, (512, 512)).astype(np.int8)
    d = np.full((512, 1), 0.05, np.float32) * np.array([[1.0, 2.0]], np.float32)
    bad = rewrite(base, tmp_path / "d.gguf", replace={"blk.0.attn_q.weight": (pack_tq2_0(t, d), (512, 512),
                                                                              GGMLType.TQ2_0)})
    expect_error(bad, tensor="blk.0.attn_q.weight", match="block scales vary")


def test_unsupported_architecture_and_missing_key(base, tmp_path):
    expect_error(rewrite(base, tmp_path / "a.gguf", metadata={"general.architecture": "llama"}),
                 match="unsupported architecture 'llama'")
    gf = GGUFFile(base)
    arch = gf.metadata["general.architecture"]
    md = dict(gf.metadata)
    del md[f"{arch}.attention.layer_norm_rms_epsilon"]
    w = GGUFWriter()
    for key, value in md.items():
        vtype, etype = gf.value_types[key]
        w.add_kv(key, value, etype if etype is not None else vtype)
    for name, info in gf.tensors.items():
        w.add_tensor(name, np.array(gf.raw(name)), info.shape, info.ggml_type)
    w.write(tmp_path / "k.gguf")
    expect_error(tmp_path / "k.gguf", match="layer_norm_rms_epsilon")


def test_truncated_file(base, tmp_path):
    data = base.read_bytes()
    cut = tmp_path / "t.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    expect_error(cut, match="truncated")


def test_unknown_activation(base, tmp_path):
    arch = GGUFFile(base).metadata["general.architecture"]
    bad = rewrite(base, tmp_path / "act.gguf", metadata={f"{arch}.hidden_activation": "gelu"})
    expect_error(bad, match="gelu")
