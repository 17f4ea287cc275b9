"""Stage 1 against a fault-injecting OpenAI-compatible server on 127.0.0.1.

The real openai client talks HTTP to `fake_openai_server.FakeOpenAIServer`,
which picks a fault per post from a `[fault:NAME]` marker in the post text.
"""

import asyncio
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from absl import logging as absl_logging
from conftest import REPO_ROOT
from fake_openai_server import FakeOpenAIServer
from PIL import Image

from fashion_msa.data.posts import Post
from fashion_msa.pseudo import batch, describe, layout, prompt, report
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

API_KEY = "sk-test-4f9c2e1d8b7a6e5f-never-stored"

# Expected end state of a post per injected fault: (status, failure reason).
EXPECTED = {
    "ok": ("ok", None),
    "rate_limit": ("ok", None),
    "server_error": ("ok", None),
    "hang": ("ok", None),
    "fenced": ("ok", None),
    "wrapped": ("ok", None),
    "length_once": ("ok", None),
    "length": ("failed", "length"),
    "refusal": ("failed", "refusal"),
    "content_filter": ("failed", "content_filter"),
    "invalid_json": ("failed", "invalid_reply"),
}


def make_post(post_id: str, fault: str = "ok", text: str = "") -> Post:
    text = text or f"Loving my new look for post {post_id} [fault:{fault}]"
    return Post(
        id=post_id,
        text=text,
        attributes="category: dress; color: red",
        image_path=pathlib.Path("/nonexistent.jpg"),
        label="positive",
        split="train",
    )


def fault_posts() -> list[Post]:
    return [make_post(f"p{i}", fault) for i, fault in enumerate(EXPECTED)]


def fast_config(server: FakeOpenAIServer, **overrides) -> describe.DescribeConfig:
    settings = dict(
        model="gpt-4o-mini",
        base_url=server.base_url,
        request_timeout_s=0.5,
        retry_base_delay_s=0.01,
        requests_per_minute=0,
        concurrency=4,
        batch_poll_interval_s=0.01,
    )
    settings.update(overrides)
    return describe.DescribeConfig(**settings)


def final_records(output_dir: pathlib.Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(output_dir / layout.DESCRIPTIONS_FILE)}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with FakeOpenAIServer(api_key=API_KEY, retry_after_s=1.0, hang_s=2.0) as fake:
        yield fake


def test_faults_end_described_or_failed(server, tmp_path):
    posts = fault_posts()
    summary = describe.describe_posts(posts, tmp_path, fast_config(server), False)

    records = final_records(tmp_path)
    for post, fault in zip(posts, EXPECTED, strict=True):
        status, reason = EXPECTED[fault]
        assert records[post.id]["status"] == status, fault
        assert records[post.id].get("reason") == reason, fault
        assert records[post.id]["prompt_hash"] == prompt.PROMPT_HASH
    assert summary.done == 7
    assert dict(summary.failed) == {
        "length": 1,
        "refusal": 1,
        "content_filter": 1,
        "invalid_reply": 1,
    }
    assert server.unauthorized_requests == 0


def test_retries_follow_the_rules(server, tmp_path):
    posts = fault_posts()
    summary = describe.describe_posts(posts, tmp_path, fast_config(server), False)

    # Cut, refused, filtered and unreadable replies: exactly one retry each.
    for fault in ("length", "refusal", "content_filter", "invalid_json"):
        assert len(server.requests_for(f"[fault:{fault}]")) == 2, fault
    # Transient errors: one failed attempt, then success.
    for fault in ("rate_limit", "server_error", "hang", "length_once"):
        assert len(server.requests_for(f"[fault:{fault}]")) == 2, fault
    assert len(server.requests_for("[fault:ok]")) == 1

    limited = server.requests_for("[fault:rate_limit]")
    waited = limited[1].received_at - limited[0].received_at
    assert waited >= 0.9, "Retry-After: 1 was not honoured"
    assert summary.retries["rate_limited"] == 1
    assert summary.retries["timeout"] == 1
    assert summary.retries["server_error"] == 1
    assert summary.usage.total_tokens > 0
    assert summary.cost_usd is not None
    assert summary.cost_usd > 0


def test_rerun_sends_nothing_for_finished(server, tmp_path):
    posts = fault_posts()
    describe.describe_posts(posts, tmp_path, fast_config(server), False)
    sent = len(server.chat_requests)
    lines = len(read_jsonl(tmp_path / layout.DESCRIPTIONS_FILE))

    summary = describe.describe_posts(posts, tmp_path, fast_config(server), False)

    assert len(server.chat_requests) == sent
    assert len(read_jsonl(tmp_path / layout.DESCRIPTIONS_FILE)) == lines
    assert summary.skipped == {"already_done": 7, "failed_before": 4}
    assert summary.done == 0


def test_retry_failed_sends_only_failures(server, tmp_path):
    posts = fault_posts()
    describe.describe_posts(posts, tmp_path, fast_config(server), False)
    before = {fault: len(server.requests_for(f"[fault:{fault}]")) for fault in EXPECTED}

    config = fast_config(server, retry_failed=True)
    summary = describe.describe_posts(posts, tmp_path, config, False)

    for fault, (status, _) in EXPECTED.items():
        after = len(server.requests_for(f"[fault:{fault}]"))
        if status == "ok":
            assert after == before[fault], fault
        else:
            assert after == before[fault] + 2, fault
    assert summary.skipped == {"already_done": 7}


def test_new_model_or_prompt_is_a_new_key(server, tmp_path):
    posts = [make_post("a"), make_post("b")]
    describe.describe_posts(posts, tmp_path, fast_config(server), False)
    summary = describe.describe_posts(
        posts, tmp_path, fast_config(server, model="gpt-4o"), False
    )
    assert summary.done == 2
    models = [r["model"] for r in read_jsonl(tmp_path / layout.DESCRIPTIONS_FILE)]
    assert sorted(models) == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]


def test_api_key_written_nowhere(server, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    absl_logging.set_verbosity(absl_logging.DEBUG)
    try:
        describe.describe_posts(fault_posts(), tmp_path, fast_config(server), True)
        describe.describe_posts(
            fault_posts()[:3],
            tmp_path,
            fast_config(server, mode="batch", model="gpt-4o"),
            True,
        )
    finally:
        absl_logging.set_verbosity(absl_logging.INFO)

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) >= 3  # descriptions, batch events, batch request file
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert API_KEY not in caplog.text
    assert API_KEY not in captured.out + captured.err
    assert len(caplog.records) > 10  # the debug logs were captured at all


def test_missing_key_stops_before_sending(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(describe.FatalRequestError, match="OPENAI_API_KEY"):
        describe.describe_posts([make_post("a")], tmp_path, fast_config(server), False)
    assert server.chat_requests == []


def test_wrong_key_stops_the_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(describe.FatalRequestError, match="rejected the API key"):
        describe.describe_posts(
            [make_post(str(i)) for i in range(5)], tmp_path, fast_config(server), False
        )
    assert server.unauthorized_requests >= 1
    assert read_jsonl(tmp_path / layout.DESCRIPTIONS_FILE) == []


def test_format_falls_back_to_text(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    posts = [make_post(str(i), "wrapped") for i in range(12)]
    with FakeOpenAIServer(api_key=API_KEY, response_formats=("text",)) as server:
        summary = describe.describe_posts(
            posts, tmp_path, fast_config(server, concurrency=2), False
        )
        rejected = [r for r in server.chat_requests if r.status == 400]
        sent_as_text = [r for r in server.chat_requests if r.response_format == "text"]

    assert summary.done == 12
    assert summary.notes["response_format"] == "text"
    # Each format is rejected at most once per request in flight.
    assert 2 <= len(rejected) <= 2 * 2
    assert len(sent_as_text) == 12


def test_format_falls_back_after_500(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with FakeOpenAIServer(
        api_key=API_KEY,
        response_formats=("json_object", "text"),
        format_rejection_status=500,
    ) as server:
        config = fast_config(server, concurrency=1)
        summary = describe.describe_posts(
            [make_post("a"), make_post("b")], tmp_path, config, False
        )
        statuses = [r.status for r in server.chat_requests]
    assert summary.done == 2
    assert summary.notes["response_format"] == "json_object"
    assert statuses == [500, 200, 200]
    assert not summary.retries


def test_forced_format_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with FakeOpenAIServer(api_key=API_KEY, response_formats=("text",)) as server:
        config = fast_config(server, response_format="json_schema")
        summary = describe.describe_posts([make_post("a")], tmp_path, config, False)
    assert summary.failed == {"bad_request": 1}
    assert "response_format" in final_records(tmp_path)["a"]["detail"]


def test_connection_errors_fail_after_max_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with FakeOpenAIServer() as server:
        url = server.base_url  # Taken, then released: nothing listens there.
    config = describe.DescribeConfig(
        base_url=url, max_attempts=3, retry_base_delay_s=0.01, request_timeout_s=2
    )
    summary = describe.describe_posts([make_post("a")], tmp_path, config, False)
    record = final_records(tmp_path)["a"]
    assert record["reason"] == "connection_error"
    assert "after 3 attempts" in record["detail"]
    assert summary.retries["connection_error"] == 2


def test_rate_limiter_spaces_requests(server, tmp_path):
    posts = [make_post(str(i)) for i in range(8)]
    config = fast_config(server, requests_per_minute=600, concurrency=8)
    describe.describe_posts(posts, tmp_path, config, False)
    times = sorted(r.received_at for r in server.chat_requests)
    # 600 per minute is one start every 0.1 s, so 8 starts span at least 0.7 s.
    # Arrival times at the server lag the starts; the first request also opens
    # the connection, which can shorten the measured span by tens of ms.
    assert times[-1] - times[0] >= 0.6


def test_torn_line_is_cut_and_the_post_resent(server, tmp_path, caplog):
    posts = [make_post("a"), make_post("b")]
    describe.describe_posts(posts[:1], tmp_path, fast_config(server), False)
    store = tmp_path / layout.DESCRIPTIONS_FILE
    with open(store, "ab") as handle:
        handle.write(b'{"id": "b", "status": "ok", "image_descr')  # A torn write.

    with caplog.at_level(logging.WARNING):
        summary = describe.describe_posts(posts, tmp_path, fast_config(server), False)

    assert "torn last line" in caplog.text
    assert summary.done == 1
    assert summary.skipped == {"already_done": 1}
    lines = store.read_bytes().decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]


# Batch API mode.


def test_batch_mode_end_to_end(server, tmp_path):
    posts = fault_posts()
    config = fast_config(server, mode="batch")
    summary = describe.describe_posts(posts, tmp_path, config, False)

    records = final_records(tmp_path)
    for post, fault in zip(posts, EXPECTED, strict=True):
        status, reason = EXPECTED[fault]
        assert records[post.id]["status"] == status, fault
        assert records[post.id].get("reason") == reason, fault
        assert records[post.id]["mode"] == "batch"
    # Round 1 for every post, round 2 for the 429, 500 and cut/refused/... ones.
    assert server.batches_created == 2
    assert summary.done == 7
    assert sum(summary.failed.values()) == 4
    events = read_jsonl(tmp_path / "batch" / batch.BATCH_EVENTS_FILE)
    assert [e["event"] for e in events] == ["submitted", "collected"] * 2
    # Batch prices are half the synchronous ones.
    usage_cost = report.estimate_cost_usd(summary.usage, (0.15, 0.60))
    assert summary.cost_usd == pytest.approx(usage_cost / 2)

    sent = len(server.chat_requests)
    rerun = describe.describe_posts(posts, tmp_path, config, False)
    assert len(server.chat_requests) == sent
    assert server.batches_created == 2
    assert rerun.skipped == {"already_done": 7, "failed_before": 4}


def test_batch_resumes_without_resubmitting(server, tmp_path):
    posts = [make_post(str(i)) for i in range(4)]
    config = fast_config(server, mode="batch")

    async def submit_only():
        client = describe.make_client(config)
        try:
            with (
                JsonlLog(tmp_path / layout.DESCRIPTIONS_FILE) as store,
                JsonlLog(tmp_path / "batch" / batch.BATCH_EVENTS_FILE) as events,
            ):
                run = batch._BatchRun(
                    client, config, tmp_path, store, events, report.RunSummary("d"),
                    progress=False,
                )  # fmt: skip
                jobs = [describe.DescribeJob(p, 0, config.max_tokens) for p in posts]
                await run.submit(jobs, round_=1)
        finally:
            await client.close()

    asyncio.run(submit_only())  # A run killed right after submitting.
    assert server.batches_created == 1

    summary = describe.describe_posts(posts, tmp_path, config, False)
    assert server.batches_created == 1
    assert summary.done == 4
    assert all(r["status"] == "ok" for r in final_records(tmp_path).values())


# The command line, killed and rerun.


def write_manifest(folder: pathlib.Path, count: int) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "img.png")
    with open(folder / "manifest.jsonl", "w") as handle:
        for i in range(count):
            fault = ("ok", "rate_limit", "fenced", "server_error")[i % 4]
            row = {
                "id": f"post{i:03d}",
                "text": f"post {i} about my red dress [fault:{fault}]",
                "image": "img.png",
                "label": "positive",
                "split": "train",
            }
            handle.write(json.dumps(row) + "\n")
    return folder / "manifest.jsonl"


def cli_command(manifest: pathlib.Path, output_dir: pathlib.Path, url: str) -> list:
    return [
        sys.executable,
        "-m",
        "launch.generate_pseudo",
        "--stage=describe",
        "--source=manifest",
        f"--input={manifest}",
        f"--output_dir={output_dir}",
        f"--base_url={url}",
        "--model=gpt-4o-mini",
        "--requests_per_minute=900",
        "--concurrency=3",
        "--retry_base_delay_s=0.01",
        "--progress=false",
    ]


def test_cli_killed_and_rerun(tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    manifest = write_manifest(tmp_path / "posts", 40)
    output_dir = tmp_path / "pseudo"
    store = output_dir / layout.DESCRIPTIONS_FILE
    with FakeOpenAIServer(api_key=API_KEY, retry_after_s=0.2) as server:
        command = cli_command(manifest, output_dir, server.base_url)
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if len(read_jsonl(store)) >= 8:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kill_time = time.monotonic()
        killed_at = len(read_jsonl(store))
        assert 8 <= killed_at < 40

        finished = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
        assert "stage describe: 40 items" in finished.stdout
        assert f"already_done {killed_at}" in finished.stdout

        lines = store.read_bytes().split(b"\n")
        assert lines[-1] == b""  # The file ends with a whole line.
        records = [json.loads(line) for line in lines[:-1]]
        ids = [r["id"] for r in records if r["status"] == "ok"]
        assert sorted(ids) == [f"post{i:03d}" for i in range(40)]
        # Posts finished before the kill were never sent again.
        for record in records[:killed_at]:
            marker = f"post {int(record['id'][4:])} about"
            requests = server.requests_for(marker)
            assert all(r.received_at < kill_time for r in requests), record["id"]
    assert API_KEY not in finished.stdout + finished.stderr
