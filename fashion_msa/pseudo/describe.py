"""Stage 1: LLM descriptions and attributes of posts, through the openai client.

`describe_posts` sends one chat-completions request per post to any
OpenAI-compatible endpoint, with bounded concurrency and a requests-per-minute
limit, and appends each result to `descriptions.jsonl` in the output folder.
Transient errors (429, 5xx, timeouts, lost connections) are retried with
exponential backoff, honouring Retry-After. A reply cut at max_tokens, a refusal,
a content-filter stop or an unreadable reply is retried once (a cut reply with
twice the token budget) and then recorded as failed with its reason.

The store is keyed by (post id, prompt hash, model): a rerun skips posts that are
done or that failed before, unless `retry_failed` is set. The API key is read
by the openai client from OPENAI_API_KEY and is never logged or written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import openai
from absl import logging

from fashion_msa.data.posts import Post
from fashion_msa.pseudo import prompt as prompt_lib
from fashion_msa.pseudo import replies
from fashion_msa.pseudo.layout import DESCRIPTIONS_FILE
from fashion_msa.pseudo.report import RunSummary, Usage, estimate_cost_usd, lookup_price
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

FORMAT_ORDER = ("json_schema", "json_object", "text")

# Transport failure reasons, recorded when every attempt failed.
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_REQUEST = "bad_request"

# A Retry-After longer than this is treated as this long, so that one bad header
# cannot stall a run for hours.
MAX_RETRY_AFTER_S = 600.0

# Error statuses the openai client itself would retry (it runs with max_retries=0
# here, so this module owns every retry and its log line).
_RETRY_STATUSES = {408, 409, 429}


@dataclasses.dataclass(frozen=True)
class DescribeConfig:
    """Settings of stage 1.

    Attributes:
      model: chat model name sent to the endpoint.
      base_url: the endpoint, e.g. "http://127.0.0.1:8080/v1"; None means the
        openai client's default (OPENAI_BASE_URL, else api.openai.com).
      concurrency: maximum requests in flight.
      requests_per_minute: maximum request starts per minute, retries included;
        0 disables the limit.
      request_timeout_s: limit on one request, from sending to the whole reply.
      max_attempts: attempts per post on transient errors before it fails.
      retry_base_delay_s: first backoff delay; it doubles per attempt.
      retry_max_delay_s: cap on a computed backoff delay; a server's Retry-After
        is honoured above it, up to MAX_RETRY_AFTER_S.
      max_tokens: completion token budget of a request.
      temperature: sampling temperature.
      response_format: "auto" tries json_schema, then json_object, then plain
        text, moving down when the endpoint rejects one; or one of those three.
      retry_failed: also send posts whose last result failed.
      prices: (input, output) USD per million tokens; None takes the model's
        entry in the built-in table.
      mode: "stream" sends requests now; "batch" goes through the Batch API.
      batch_poll_interval_s: seconds between status checks of a batch.
      batch_completion_window: the Batch API completion window.
      batch_max_requests: requests per batch (the Batch API allows 50,000).
    """

    model: str = "gpt-3.5-turbo"
    base_url: str | None = None
    concurrency: int = 8
    requests_per_minute: float = 500.0
    request_timeout_s: float = 60.0
    max_attempts: int = 6
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    max_tokens: int = 300
    temperature: float = 0.7
    response_format: str = "auto"
    retry_failed: bool = False
    prices: tuple[float, float] | None = None
    mode: str = "stream"
    batch_poll_interval_s: float = 30.0
    batch_completion_window: str = "24h"
    batch_max_requests: int = 50_000

    def __post_init__(self) -> None:
        if self.response_format not in ("auto", *FORMAT_ORDER):
            raise ValueError(
                f"response_format {self.response_format!r} is not one of auto, "
                + ", ".join(FORMAT_ORDER)
            )
        if self.mode not in ("stream", "batch"):
            raise ValueError(f"mode {self.mode!r} is not 'stream' or 'batch'")
        if self.concurrency < 1 or self.max_attempts < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, max_attempts and max_tokens must be >= 1")


class FatalRequestError(RuntimeError):
    """An error that every later request would hit too: no key, a bad key or model."""


class _RequestFailed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class _PostCounts:
    requests: int = 0  # HTTP requests sent for the post
    replies: int = 0  # completions received for the post


class RateLimiter:
    """Spaces request starts to at most `requests_per_minute`, and pauses on 429."""

    def __init__(self, requests_per_minute: float):
        self._interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start, self._paused_until)
            self._next_start = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    def pause(self, seconds: float) -> None:
        """Hold back every request start for `seconds` (a server-asked wait)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)


class ResponseFormatChooser:
    """The response format in use, moving down FORMAT_ORDER when one is rejected.

    The choice is shared by every request of a run, so a rejected format costs
    one failed request per request already in flight, not one per post.
    """

    def __init__(self, requested: str):
        self.fixed = requested != "auto"
        self._index = 0 if not self.fixed else FORMAT_ORDER.index(requested)

    @property
    def current(self) -> str:
        return FORMAT_ORDER[self._index]

    def reject(self, rejected: str) -> bool:
        """Record that the endpoint rejected `rejected`; return whether to retry."""
        if self.fixed:
            return False
        if rejected != self.current:
            return True  # Another request already moved down.
        if self._index + 1 >= len(FORMAT_ORDER):
            return False
        self._index += 1
        logging.warning(
            "The endpoint rejected response_format %s; using %s from now on",
            rejected,
            self.current,
        )
        return True


def _is_format_rejection(error: openai.APIStatusError) -> bool:
    """Return whether the endpoint rejected the request's response_format."""
    if getattr(error, "param", None) == "response_format":
        return True
    message = str(error.message).lower()
    return any(word in message for word in ("response_format", "json_schema"))


def _error_text(error: openai.APIStatusError) -> str:
    """Return the server's own error message, without the client's prefix."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(error.message)


def _retry_after_s(error: openai.APIStatusError) -> float | None:
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # An HTTP date: fall back to the computed backoff.
    return None


class _Describer:
    """The state of one streamed stage-1 run."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        config: DescribeConfig,
        log: JsonlLog,
        summary: RunSummary,
        progress: Any,
    ):
        self.client = client
        self.config = config
        self.log = log
        self.summary = summary
        self.progress = progress
        self.limiter = RateLimiter(config.requests_per_minute)
        self.formats = ResponseFormatChooser(config.response_format)

    async def run(self, jobs: Sequence[DescribeJob]) -> None:
        queue: asyncio.Queue[DescribeJob] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        workers = [
            asyncio.create_task(self._worker(queue))
            for _ in range(min(self.config.concurrency, len(jobs)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, queue: asyncio.Queue[DescribeJob]) -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await self._describe(job)
            self.progress.update(1)

    async def _describe(self, job: DescribeJob) -> None:
        """Describe one post and append its final result to the store."""
        post = job.post
        messages = prompt_lib.build_messages(post.text, post.attributes)
        usage = Usage()
        counts = _PostCounts(replies=job.replies_before)
        max_tokens = job.max_tokens
        while True:
            try:
                completion, response_format = await self._request(
                    post.id, messages, max_tokens, counts
                )
            except _RequestFailed as failure:
                self._record_failure(
                    post, failure.reason, failure.detail, usage, counts
                )
                return
            counts.replies += 1
            usage.add(completion.usage)
            self.summary.usage.add(completion.usage)
            try:
                result = interpret_completion(completion)
            except replies.ReplyError as error:
                if counts.replies < 2:
                    self.summary.retries[error.reason] += 1
                    logging.info(
                        "Post %s: %s (%s); retrying once",
                        post.id,
                        error.reason,
                        error.detail,
                    )
                    if error.reason == replies.LENGTH:
                        max_tokens *= 2
                    continue
                self._record_failure(post, error.reason, error.detail, usage, counts)
                return
            self.log.append(
                ok_record(
                    post.id,
                    result,
                    self.config.model,
                    usage,
                    counts.replies,
                    requests=counts.requests,
                    response_format=response_format,
                    mode="stream",
                )
            )
            self.summary.done += 1
            return

    def _record_failure(
        self, post: Post, reason: str, detail: str, usage: Usage, counts: _PostCounts
    ) -> None:
        logging.warning("Post %s failed: %s (%s)", post.id, reason, detail)
        self.log.append(
            failed_record(
                post.id,
                reason,
                detail,
                self.config.model,
                usage,
                counts.replies,
                requests=counts.requests,
                mode="stream",
            )
        )
        self.summary.failed[reason] += 1

    async def _request(
        self,
        post_id: str,
        messages: list[dict[str, str]],
        max_tokens: int,
        counts: _PostCounts,
    ) -> tuple[Any, str]:
        """Send one request, retrying transient errors; return (completion, format)."""
        config = self.config
        attempt = 0
        while True:
            attempt += 1
            response_format = self.formats.current
            await self.limiter.acquire()
            self.summary.requests += 1
            counts.requests += 1
            kwargs: dict[str, Any] = {}
            body_format = prompt_lib.RESPONSE_FORMATS[response_format]
            if body_format is not None:
                kwargs["response_format"] = body_format
            try:
                # NOTE: OpenAI's reasoning models take max_completion_tokens and
                # reject max_tokens; the paper's gpt-3.5-turbo and llama.cpp take it.
                async with asyncio.timeout(config.request_timeout_s):
                    completion = await self.client.chat.completions.create(
                        model=config.model,
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=config.temperature,
                        timeout=config.request_timeout_s,
                        **kwargs,
                    )
                return completion, response_format
            except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
                if _is_format_rejection(error) and self.formats.reject(response_format):
                    attempt -= 1  # A format probe is not a failed attempt.
                    continue
                raise _RequestFailed(
                    BAD_REQUEST, f"HTTP {error.status_code}: {_error_text(error)}"
                ) from None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise FatalRequestError(
                    f"the endpoint rejected the API key (HTTP {error.status_code}: "
                    f"{_error_text(error)}). Check OPENAI_API_KEY and --base_url."
                ) from None
            except openai.NotFoundError as error:
                raise FatalRequestError(
                    f"the endpoint returned 404 for model {config.model!r} "
                    f"({_error_text(error)}). Check --model and --base_url."
                ) from None
            except openai.APIStatusError as error:
                # llama-cpp-python's server rejects json_schema with a 500 whose
                # message names the response_format field.
                if _is_format_rejection(error) and self.formats.reject(response_format):
                    attempt -= 1
                    continue
                status = error.status_code
                if status < 500 and status not in _RETRY_STATUSES:
                    raise _RequestFailed(
                        BAD_REQUEST, f"HTTP {status}: {_error_text(error)}"
                    ) from None
                reason = {429: RATE_LIMITED, 408: TIMEOUT}.get(status, SERVER_ERROR)
                delay = self._backoff_s(attempt, _retry_after_s(error))
                if status == 429:
                    self.limiter.pause(delay)
                detail = f"HTTP {status}: {_error_text(error)}"
            except (TimeoutError, openai.APITimeoutError):
                reason, delay = TIMEOUT, self._backoff_s(attempt, None)
                detail = f"no complete reply within {config.request_timeout_s:g} s"
            except openai.APIConnectionError as error:
                reason, delay = CONNECTION_ERROR, self._backoff_s(attempt, None)
                detail = str(error)
            if attempt >= config.max_attempts:
                raise _RequestFailed(reason, f"{detail} (after {attempt} attempts)")
            self.summary.retries[reason] += 1
            logging.warning(
                "Post %s: %s on attempt %d of %d; retrying in %.1f s",
                post_id,
                detail,
                attempt,
                config.max_attempts,
                delay,
            )
            await asyncio.sleep(delay)

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, MAX_RETRY_AFTER_S)
        delay = self.config.retry_base_delay_s * 2 ** (attempt - 1)
        # Up to 25 % jitter, so posts that failed together do not retry together.
        return min(delay, self.config.retry_max_delay_s) * (1 - 0.25 * random.random())


def interpret_completion(completion: Any) -> replies.PseudoDescription:
    """Turn a chat completion into a description, or raise replies.ReplyError."""
    if not completion.choices:
        raise replies.ReplyError(replies.INVALID_REPLY, "reply without choices")
    choice = completion.choices[0]
    message = choice.message
    if choice.finish_reason == "content_filter":
        raise replies.ReplyError(
            replies.CONTENT_FILTER, "stopped by the content filter"
        )
    refusal = getattr(message, "refusal", None)
    if refusal:
        raise replies.ReplyError(replies.REFUSAL, refusal)
    try:
        return replies.parse_reply(message.content)
    except replies.ReplyError as error:
        if choice.finish_reason == "length":
            # A cut reply that still parses is whole; one that does not was cut.
            raise replies.ReplyError(
                replies.LENGTH, f"reply cut at max_tokens ({error.detail})"
            ) from None
        raise


def load_description_state(
    path: pathlib.Path, model: str, prompt_hash: str = prompt_lib.PROMPT_HASH
) -> dict[str, dict[str, Any]]:
    """Return the deciding record per post id for (model, prompt_hash).

    An "ok" record decides over any failure; otherwise the last failure decides.
    """
    state: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(path):
        if record.get("model") != model or record.get("prompt_hash") != prompt_hash:
            continue
        post_id = record.get("id")
        previous = state.get(post_id)
        if previous is None or previous.get("status") != "ok":
            state[post_id] = record
    return state


@dataclasses.dataclass(frozen=True)
class DescribeJob:
    """A post to send, with what an unfinished earlier attempt left.

    Attributes:
      post: the post.
      replies_before: replies already received for it. A reply that was cut,
        refused, filtered or unreadable is retried only while this is below 2.
      max_tokens: completion token budget (doubled after a reply cut at the limit).
      retry: whether this is the one retry of a failure marked retryable.
    """

    post: Post
    replies_before: int
    max_tokens: int
    retry: bool = False


def is_unfinished(record: Mapping[str, Any]) -> bool:
    """Return whether a failed record awaits its one retry (set by batch round 1)."""
    return record.get("status") == "failed" and bool(record.get("retryable"))


def select_jobs(
    posts: Sequence[Post],
    state: Mapping[str, Mapping[str, Any]],
    config: DescribeConfig,
    summary: RunSummary,
) -> list[DescribeJob]:
    """Return the posts to send; count the others in `summary.skipped`.

    Sent: posts without a result, posts with an unfinished failure (their one
    retry), and with `config.retry_failed` every failed post, with a fresh budget.
    """
    jobs = []
    for post in posts:
        record = state.get(post.id)
        if record is None:
            jobs.append(DescribeJob(post, 0, config.max_tokens))
        elif record.get("status") == "ok":
            summary.skipped["already_done"] += 1
        elif is_unfinished(record) and not config.retry_failed:
            cut = record.get("reason") == replies.LENGTH
            max_tokens = config.max_tokens * (2 if cut else 1)
            attempts = int(record.get("attempts") or 0)
            jobs.append(DescribeJob(post, attempts, max_tokens, retry=True))
        elif config.retry_failed:
            jobs.append(DescribeJob(post, 0, config.max_tokens))
        else:
            summary.skipped["failed_before"] += 1
    return jobs


def ok_record(
    post_id: str,
    result: replies.PseudoDescription,
    model: str,
    usage: Usage,
    attempts: int,
    **extra: Any,
) -> dict[str, Any]:
    """Build the store record of a described post."""
    return {
        "id": post_id,
        "status": "ok",
        "image_description": result.image_description,
        "attributes": result.attributes,
        "prompt_hash": prompt_lib.PROMPT_HASH,
        "model": model,
        "usage": usage.to_dict(),
        "attempts": attempts,
        **extra,
    }


def failed_record(
    post_id: str,
    reason: str,
    detail: str,
    model: str,
    usage: Usage,
    attempts: int,
    retryable: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Build the store record of a failed post.

    `attempts` counts the replies received. A `retryable` failure is not final:
    the next run (or the next batch round) sends the post once more.
    """
    return {
        "id": post_id,
        "status": "failed",
        "image_description": "",
        "attributes": {},
        "prompt_hash": prompt_lib.PROMPT_HASH,
        "model": model,
        "reason": reason,
        "detail": detail[:500],
        "usage": usage.to_dict(),
        "attempts": attempts,
        "retryable": retryable,
        **extra,
    }


def make_client(config: DescribeConfig) -> openai.AsyncOpenAI:
    """Create the AsyncOpenAI client; the key comes from OPENAI_API_KEY only."""
    if not os.environ.get("OPENAI_API_KEY"):
        raise FatalRequestError(
            "OPENAI_API_KEY is not set. Export it (any non-empty value for a local "
            "server that ignores keys)."
        )
    return openai.AsyncOpenAI(
        base_url=config.base_url,
        max_retries=0,
        timeout=config.request_timeout_s,
    )


def describe_posts(
    posts: Sequence[Post],
    output_dir: str | os.PathLike[str],
    config: DescribeConfig,
    progress: bool = True,
) -> RunSummary:
    """Describe every post not yet done, appending results to descriptions.jsonl.

    Returns:
      The run summary. Raises FatalRequestError when the endpoint rejects the key
      or the model; the results stored until then are kept.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(stage="describe", total=len(posts))
    started = time.monotonic()
    if config.mode == "batch":
        from fashion_msa.pseudo import batch

        async def run_batch() -> None:
            client = make_client(config)
            try:
                await batch.run_batch_mode(
                    client, posts, output_dir, config, summary, progress
                )
            finally:
                await client.close()

        asyncio.run(run_batch())
        response_format = "json_schema (batch)"
    else:
        response_format = _describe_streamed(
            posts, output_dir, config, summary, progress
        )

    price = config.prices or lookup_price(config.model)
    summary.cost_usd = estimate_cost_usd(
        summary.usage, price, batch=config.mode == "batch"
    )
    summary.notes["mode"] = config.mode
    summary.notes["response_format"] = response_format
    summary.notes["prompt_hash"] = prompt_lib.PROMPT_HASH
    summary.notes["elapsed_s"] = round(time.monotonic() - started, 1)
    return summary


def _describe_streamed(
    posts: Sequence[Post],
    output_dir: pathlib.Path,
    config: DescribeConfig,
    summary: RunSummary,
    progress: bool,
) -> str:
    """Send the posts still to do now; return the response format used last."""
    from tqdm import tqdm

    path = output_dir / DESCRIPTIONS_FILE
    state = load_description_state(path, config.model)
    jobs = select_jobs(posts, state, config, summary)
    logging.info(
        "Describing %d of %d posts with %s (prompt %s), %d in flight at most",
        len(jobs),
        len(posts),
        config.model,
        prompt_lib.PROMPT_HASH,
        config.concurrency,
    )
    if not jobs:
        return config.response_format

    async def run() -> str:
        client = make_client(config)
        try:
            with (
                JsonlLog(path) as log,
                tqdm(
                    total=len(jobs), desc="describe", unit="post", disable=not progress
                ) as bar,
            ):
                describer = _Describer(client, config, log, summary, bar)
                await describer.run(jobs)
                return describer.formats.current
        finally:
            await client.close()

    return asyncio.run(run())
