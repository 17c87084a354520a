"""Hugging Face resolution without network: a prepared cache in offline mode, the not-cached error, an
unreachable Hub (a closed local port as endpoint) failing fast, and the README's quick start offline."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from bitnet_batch.model.hub import DEFAULT_REPO, hub_unreachable, looks_like_repo_id

ROOT = Path(__file__).resolve().parents[1]

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


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_env(cache) -> dict:
    """No offline mode, and a Hub endpoint that refuses connections."""
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")


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


def test_an_unreachable_hub_fails_fast_with_one_clear_line(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from bitnet_batch.model.hub import resolve_model_path
        t0 = time.perf_counter()
        try:
            resolve_model_path({DEFAULT_REPO!r})
        except FileNotFoundError as e:
            print(round(time.perf_counter() - t0, 3), e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_unreachable_env(tmp_path / "empty"))
    assert res.returncode == 0, res.stderr
    seconds, message = res.stdout.split(" ", 1)
    assert float(seconds) < 2.0 and "Retrying" not in res.stderr
    assert message.startswith(f"cannot download {DEFAULT_REPO}/ggml-model-i2_s.gguf: http://127.0.0.1:")
    assert "cannot be reached: Connection refused" in message and "not in the local Hugging Face cache" in message
    assert f"bitnet-batch download {DEFAULT_REPO}" in message and "examples/models/" in message
    # the job with the default model: exit 1 and that one line, no other model used in its place
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi"}\n')
    res = subprocess.run([sys.executable, "-m", "bitnet_batch.cli", "run", str(src), "-o", str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, timeout=120, env=_unreachable_env(tmp_path / "empty"))
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: cannot download")
    assert not (tmp_path / "o.jsonl").exists()


def test_an_unreachable_hub_uses_the_cached_copy(tmp_path, small_model_path):
    _fake_cache(tmp_path / "hub", DEFAULT_REPO, "ggml-model-i2_s.gguf", small_model_path)
    code = f"from bitnet_batch.model.hub import resolve_model_path; print(resolve_model_path({DEFAULT_REPO!r}))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_unreachable_env(tmp_path / "hub"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ggml-model-i2_s.gguf") and str(tmp_path / "hub") in res.stdout


def test_the_probe_goes_through_the_https_proxy(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub_unreachable("https://huggingface.co") == (f"https://huggingface.co cannot be reached (through the "
                                                         f"proxy 127.0.0.1:{port}): Connection refused")
    monkeypatch.delenv("HTTPS_PROXY")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_readme_quick_start_runs_offline(tmp_path):
    """README command 1 (without its pip install) with the Hub unreachable: the shipped model's job finishes."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    line = next(x for x in block.splitlines() if x.startswith("pip install -e . && "))
    command = line.split(" && ", 1)[1].split("#")[0].strip()
    assert " -o out/answers.jsonl" in command and "--model examples/models/" in command
    command = command.replace("out/answers.jsonl", str(tmp_path / "answers.jsonl"))
    res = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_unreachable_env(tmp_path / "empty"))
    assert res.returncode == 0, res.stderr
    records = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    prompts = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    assert len(records) == len(prompts) and all(r["error"] is None and r["text"] for r in records)
