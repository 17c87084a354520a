"""Hugging Face resolution without network: a prepared cache in offline mode, and the not-cached error."""
import os
import shutil
import subprocess
import sys
import textwrap

from bitnet_batch.model.hub import DEFAULT_REPO, looks_like_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo, filename, src):
    """The on-disk layout huggingface_hub uses: refs/main -> commit, snapshots/<commit>/<file> -> blob."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    (base / "blobs").mkdir()
    blob = base / "blobs" / "deadbeef"
    shutil.copy(src, blob)
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snap), snap / filename)


def _run(code, cache, offline="1"):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE=offline, HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_repo_id_resolves_from_the_cache_offline(tmp_path, small_model_path):
    _fake_cache(tmp_path / "hub", DEFAULT_REPO, "ggml-model-i2_s.gguf", small_model_path)
    res = _run(f"""
        import bitnet_batch
        m = bitnet_batch.load_model({DEFAULT_REPO!r})
        print(m.path.name, m.config.n_layer, m.logits([1, 2, 3]).shape)
    """, tmp_path / "hub")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ggml-model-i2_s.gguf", "2", "(3,", "512)"]


def test_not_cached_offline_gives_a_clear_error(tmp_path):
    res = _run("""
        import bitnet_batch
        try:
            bitnet_batch.load_model("someone/other-model-gguf", filename="model.gguf")
        except bitnet_batch.ModelNotFoundError as e:
            print("ERR", e)
    """, tmp_path / "empty")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR someone/other-model-gguf/model.gguf is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in res.stdout


def test_cli_run_with_repo_id_offline(tmp_path, small_model_path):
    _fake_cache(tmp_path / "hub", "acme/tiny-bitnet", "tiny.gguf", small_model_path)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi", "max_tokens": 2}\n')
    res = _run(f"""
        import sys
        from bitnet_batch.cli import main
        sys.argv = ["bitnet-batch", "run", {str(src)!r}, "-o", {str(tmp_path / 'o.jsonl')!r}, "-m",
                    "acme/tiny-bitnet", "--model-file", "tiny.gguf", "--quiet"]
        main()
    """, tmp_path / "hub")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o.jsonl").read_text().count("\n") == 1


def test_repo_id_shape():
    assert looks_like_repo_id(DEFAULT_REPO)
    assert not looks_like_repo_id("models/x.gguf") and not looks_like_repo_id("x.gguf")
