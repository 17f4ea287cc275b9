"""Stage 1 through the OpenAI Batch API: request file, upload, batch, poll, collect.

The Batch API costs half the price of synchronous requests and returns within its
completion window (24 h). Each submitted batch is logged to `batch/batches.jsonl`
before polling starts, so a killed run resumes polling it instead of paying for
the same requests again. Results go into the same store as streamed results.

A second batch retries, once, the replies that were cut at max_tokens, refused,
filtered or unreadable, and the requests that failed with 429 or 5xx. Failures
left after that are final. A later run with `retry_failed` sends them again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import openai
from absl import logging
from openai.types.chat import ChatCompletion

from fashion_msa.data.posts import Post
from fashion_msa.pseudo import describe, replies
from fashion_msa.pseudo import prompt as prompt_lib
from fashion_msa.pseudo.layout import BATCH_DIR, DESCRIPTIONS_FILE
from fashion_msa.pseudo.report import RunSummary, Usage
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

BATCH_EVENTS_FILE = "batches.jsonl"
ENDPOINT = "/v1/chat/completions"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


def build_request_line(
    job: describe.DescribeJob, config: describe.DescribeConfig
) -> dict[str, Any]:
    """Build one line of a batch input file; its custom_id is the post id."""
    body: dict[str, Any] = {
        "model": config.model,
        "messages": prompt_lib.build_messages(job.post.text, job.post.attributes),
        "max_tokens": job.max_tokens,
        "temperature": config.temperature,
    }
    # A batch cannot move down formats mid-run, so "auto" means json_schema here.
    name = "json_schema" if config.response_format == "auto" else config.response_format
    response_format = prompt_lib.RESPONSE_FORMATS[name]
    if response_format is not None:
        body["response_format"] = response_format
    return {"custom_id": job.post.id, "method": "POST", "url": ENDPOINT, "body": body}


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def pending_batches(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the submission events of batches that were never collected."""
    collected = {e["batch_id"] for e in events if e.get("event") == "collected"}
    return [
        e
        for e in events
        if e.get("event") == "submitted" and e["batch_id"] not in collected
    ]


def _deserves_retry(record: dict[str, Any]) -> bool:
    """Return whether a first-round batch failure is sent again in a second round."""
    if record["reason"] in (describe.RATE_LIMITED, describe.SERVER_ERROR):
        return True
    return record["reason"] in replies.RETRY_ONCE_REASONS and record["attempts"] < 2


class _BatchRun:
    """The state of one batch-mode run of stage 1."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        config: describe.DescribeConfig,
        output_dir: pathlib.Path,
        store: JsonlLog,
        events: JsonlLog,
        summary: RunSummary,
        progress: bool,
    ):
        self.client = client
        self.config = config
        self.output_dir = output_dir
        self.store = store
        self.events = events
        self.summary = summary
        self.progress = progress

    async def submit(self, jobs: Sequence[describe.DescribeJob], round_: int) -> dict:
        """Write, upload and submit one batch; return its logged submission event."""
        lines = [build_request_line(job, self.config) for job in jobs]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        request_path = self.events.path.parent / f"requests-{stamp}-r{round_}.jsonl"
        payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        _write_atomically(request_path, payload.encode("utf-8"))

        with open(request_path, "rb") as handle:
            uploaded = await self.client.files.create(file=handle, purpose="batch")
        batch = await self.client.batches.create(
            input_file_id=uploaded.id,
            endpoint=ENDPOINT,
            completion_window=self.config.batch_completion_window,
            metadata={"prompt_hash": prompt_lib.PROMPT_HASH, "round": str(round_)},
        )
        event = {
            "event": "submitted",
            "batch_id": batch.id,
            "input_file_id": uploaded.id,
            "request_file": request_path.name,
            "model": self.config.model,
            "prompt_hash": prompt_lib.PROMPT_HASH,
            "custom_ids": [job.post.id for job in jobs],
            "replies_before": {
                job.post.id: job.replies_before for job in jobs if job.replies_before
            },
            "retries": [job.post.id for job in jobs if job.retry],
        }
        self.events.append(event)
        self.summary.requests += len(jobs)
        logging.info(
            "Submitted batch %s with %d requests (round %d, file %s)",
            batch.id,
            len(jobs),
            round_,
            request_path.name,
        )
        return event

    async def wait(self, batch_id: str, total: int) -> Any:
        """Poll a batch until it reaches a terminal status; return the batch."""
        from tqdm import tqdm

        last_status = None
        failures = 0
        with tqdm(
            total=total, desc=f"batch {batch_id}", unit="req", disable=not self.progress
        ) as bar:
            while True:
                try:
                    batch = await self.client.batches.retrieve(batch_id)
                    failures = 0
                except (openai.APIConnectionError, openai.InternalServerError) as error:
                    failures += 1
                    delay = min(self.config.batch_poll_interval_s * 2**failures, 600)
                    logging.warning(
                        "Polling batch %s failed (%s); retrying in %.0f s",
                        batch_id,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                counts = batch.request_counts
                if counts is not None:
                    bar.n = counts.completed + counts.failed
                    bar.refresh()
                if batch.status != last_status:
                    logging.info("Batch %s is %s", batch_id, batch.status)
                    last_status = batch.status
                if batch.status in TERMINAL_STATUSES:
                    return batch
                await asyncio.sleep(self.config.batch_poll_interval_s)

    async def _download(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await self.client.files.content(file_id)
        lines = []
        for number, line in enumerate(content.text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning(
                    "Skipping unreadable line %d of file %s", number, file_id
                )
        return lines

    async def collect(self, event: dict[str, Any]) -> None:
        """Wait for a submitted batch and append a record per request to the store."""
        batch_id = event["batch_id"]
        batch = await self.wait(batch_id, len(event["custom_ids"]))
        results = {}
        for line in await self._download(batch.output_file_id):
            results[line.get("custom_id")] = line
        for line in await self._download(batch.error_file_id):
            results.setdefault(line.get("custom_id"), line)

        # A run killed mid-collection wrote part of this batch already.
        stored = {
            r["id"]
            for r in read_jsonl(self.store.path)
            if r.get("batch_id") == batch_id
        }
        replies_before = event.get("replies_before", {})
        retries = set(event.get("retries", []))
        for post_id in event["custom_ids"]:
            if post_id in stored:
                continue
            record = self._record(
                post_id,
                results.get(post_id),
                batch.status,
                int(replies_before.get(post_id, 0)),
            )
            if record["status"] == "failed" and post_id not in retries:
                record["retryable"] = _deserves_retry(record)
            self.store.append({**record, "mode": "batch", "batch_id": batch_id})
            if record["status"] == "ok":
                self.summary.done += 1
            elif record["retryable"]:
                self.summary.retries[record["reason"]] += 1
            else:
                self.summary.failed[record["reason"]] += 1
        self.events.append(
            {"event": "collected", "batch_id": batch_id, "status": batch.status}
        )

    def _record(
        self,
        post_id: str,
        line: dict[str, Any] | None,
        batch_status: str,
        replies_before: int,
    ) -> dict[str, Any]:
        model = self.config.model
        usage = Usage()
        if line is None:
            reason = (
                "missing_from_batch_output"
                if batch_status == "completed"
                else f"batch_{batch_status}"
            )
            detail = f"no result for this request; the batch ended {batch_status}"
            return describe.failed_record(
                post_id, reason, detail, model, usage, replies_before
            )

        response = line.get("response") or {}
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status != 200:
            error = (body.get("error") if isinstance(body, dict) else None) or line.get(
                "error"
            )
            message = error.get("message") if isinstance(error, dict) else str(error)
            if status == 429:
                reason = describe.RATE_LIMITED
            elif status >= 500:
                reason = describe.SERVER_ERROR
            else:
                reason = describe.BAD_REQUEST
            return describe.failed_record(
                post_id,
                reason,
                f"HTTP {status}: {message}",
                model,
                usage,
                replies_before,
            )

        attempts = replies_before + 1
        try:
            completion = ChatCompletion.model_validate(body)
        except ValueError as error:
            return describe.failed_record(
                post_id,
                replies.INVALID_REPLY,
                f"malformed completion: {error}",
                model,
                usage,
                attempts,
            )
        usage.add(completion.usage)
        self.summary.usage.add(completion.usage)
        try:
            result = describe.interpret_completion(completion)
        except replies.ReplyError as error:
            return describe.failed_record(
                post_id, error.reason, error.detail, model, usage, attempts
            )
        return describe.ok_record(post_id, result, model, usage, attempts)


async def run_batch_mode(
    client: openai.AsyncOpenAI,
    posts: Sequence[Post],
    output_dir: pathlib.Path,
    config: describe.DescribeConfig,
    summary: RunSummary,
    progress: bool = True,
) -> None:
    """Run stage 1 through the Batch API; results land in descriptions.jsonl.

    First collects batches an earlier run submitted, then submits the posts still
    to do, then one retry batch for replies that were cut, refused, filtered or
    unreadable.
    """
    batch_dir = output_dir / BATCH_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    store_path = output_dir / DESCRIPTIONS_FILE
    with (
        JsonlLog(store_path) as store,
        JsonlLog(batch_dir / BATCH_EVENTS_FILE) as events,
    ):
        run = _BatchRun(client, config, output_dir, store, events, summary, progress)
        for event in pending_batches(read_jsonl(events.path)):
            logging.info(
                "Resuming batch %s submitted by an earlier run", event["batch_id"]
            )
            await run.collect(event)

        retry_config = dataclasses.replace(config, retry_failed=False)
        for round_ in (1, 2):
            state = describe.load_description_state(store_path, config.model)
            if round_ == 1:
                jobs = describe.select_jobs(posts, state, config, summary)
            else:
                scratch = RunSummary(stage="describe")
                jobs = [
                    job
                    for job in describe.select_jobs(posts, state, retry_config, scratch)
                    if job.retry
                ]
            if not jobs:
                break
            chunk = config.batch_max_requests
            events_submitted = [
                await run.submit(jobs[start : start + chunk], round_)
                for start in range(0, len(jobs), chunk)
            ]
            for event in events_submitted:
                await run.collect(event)
