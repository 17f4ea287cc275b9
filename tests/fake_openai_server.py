"""An OpenAI-compatible HTTP server on 127.0.0.1 that injects faults, for tests.

It implements the part of the OpenAI API that `fashion_msa.pseudo` uses: chat
completions, file upload and download, and batches. Replies are made up from the
post text, so no model is needed. Each chat request gets a fault, chosen either by a
marker `[fault:NAME]` in the user message or, for messages without one, by a seeded
draw over `fault_rates` keyed on the message text (the same message always gets the
same fault). The faults:

  rate_limit      429 with a Retry-After header on the first attempt, then a reply.
  server_error    500 on the first attempt, then a reply.
  hang            the first attempt waits `hang_s` before replying, then a reply.
  fenced          the JSON reply inside a ```json code fence.
  wrapped         the JSON reply with prose before and after it.
  length          finish_reason "length" with the JSON cut in half, every attempt.
  length_once     like `length` on the first attempt, then a reply.
  refusal         a refusal message and no content, every attempt.
  content_filter  finish_reason "content_filter" and no content, every attempt.
  invalid_json    prose without any JSON object, every attempt.

Start it by hand for a manual run (stop it with Ctrl-C; it prints request counts):

  python -m tests.fake_openai_server --port 8011 \\
      --fault_rates=rate_limit=0.1,server_error=0.1,hang=0.05,length=0.05,refusal=0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import email.policy
import hashlib
import http.server
import json
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

FAULTS = (
    "ok",
    "rate_limit",
    "server_error",
    "hang",
    "fenced",
    "wrapped",
    "length",
    "length_once",
    "refusal",
    "content_filter",
    "invalid_json",
)
ALL_RESPONSE_FORMATS = ("json_schema", "json_object", "text")
_FAULT_MARKER = re.compile(r"\[fault:([a-z_]+)\]")
_CATEGORIES = ("dress", "jacket", "sneakers", "handbag", "jeans", "scarf")
_COLORS = ("red", "black", "white", "navy", "beige", "green")
_STYLES = ("casual", "formal", "sporty", "vintage")


@dataclasses.dataclass
class ChatRequestRecord:
    """One chat request the server received (streamed or inside a batch)."""

    message_key: str
    user_message: str
    fault: str
    response_format: str
    status: int  # 0 for a hung request, recorded before its late reply
    via_batch: bool = False
    received_at: float = dataclasses.field(default_factory=time.monotonic)


def _message_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _pick(options: Sequence[str], key: str, salt: str) -> str:
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return options[digest[0] % len(options)]


class FakeOpenAIServer:
    """A fault-injecting OpenAI-compatible server in a background thread.

    Attributes:
      api_key: when set, requests without `Authorization: Bearer <api_key>` get 401.
      fault_rates: probability of each fault for messages without a marker.
      retry_after_s: value of the Retry-After header sent with 429.
      hang_s: how long a hung request waits before its reply, in seconds.
      response_formats: response_format types accepted. Others get an error
        that names `response_format`, as endpoints without structured output
        respond.
      format_rejection_status: HTTP status of that error: 400 as OpenAI and
        vLLM send, or 500 as llama-cpp-python's server sends.
      batch_polls_to_complete: batch retrievals before a batch reports completed.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        fault_rates: Mapping[str, float] | None = None,
        seed: int = 0,
        retry_after_s: float = 1.0,
        hang_s: float = 5.0,
        response_formats: Sequence[str] = ALL_RESPONSE_FORMATS,
        batch_polls_to_complete: int = 2,
        format_rejection_status: int = 400,
        port: int = 0,
    ):
        unknown = set(fault_rates or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.api_key = api_key
        self.fault_rates = dict(fault_rates or {})
        self.seed = seed
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.response_formats = tuple(response_formats)
        self.batch_polls_to_complete = batch_polls_to_complete
        self.format_rejection_status = format_rejection_status
        self.chat_requests: list[ChatRequestRecord] = []
        self.unauthorized_requests = 0
        self._port = port
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._files: dict[str, dict[str, Any]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._next_id = 0
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle.

    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", self._port), handler
        )
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # Inspection helpers for tests.

    def requests_for(self, text: str) -> list[ChatRequestRecord]:
        """Return the chat requests whose user message contains `text`, in order."""
        with self._lock:
            return [r for r in self.chat_requests if text in r.user_message]

    @property
    def batches_created(self) -> int:
        with self._lock:
            return len(self._batches)

    def fault_counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for record in self.chat_requests:
                counts[record.fault] = counts.get(record.fault, 0) + 1
            return counts

    # Chat completions.

    def choose_fault(self, user_message: str) -> str:
        marker = _FAULT_MARKER.search(user_message)
        if marker:
            return marker.group(1) if marker.group(1) in FAULTS else "ok"
        if not self.fault_rates:
            return "ok"
        digest = hashlib.sha256(f"{self.seed}/{user_message}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        for fault, rate in self.fault_rates.items():
            if draw < rate:
                return fault
            draw -= rate
        return "ok"

    def _next_attempt(self, key: str) -> int:
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            return self._attempts[key]

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._next_id += 1
            return f"{prefix}-{self._next_id}"

    def _record(self, record: ChatRequestRecord) -> None:
        with self._lock:
            self.chat_requests.append(record)

    def handle_chat(self, body: dict[str, Any], via_batch: bool = False) -> _Reply:
        """Return the reply to one chat-completions request body."""
        messages = body.get("messages") or []
        user_message = next(
            (
                m.get("content", "")
                for m in reversed(messages)
                if m.get("role") == "user"
            ),
            "",
        )
        if not isinstance(user_message, str):
            user_message = json.dumps(user_message)
        response_format = (body.get("response_format") or {}).get("type", "text")
        key = _message_key(user_message)
        fault = self.choose_fault(user_message)

        def record(status: int) -> None:
            self._record(
                ChatRequestRecord(
                    key, user_message, fault, response_format, status, via_batch
                )
            )

        if response_format not in self.response_formats:
            record(self.format_rejection_status)
            return _error_reply(
                self.format_rejection_status,
                f"response_format of type '{response_format}' is not supported",
                "invalid_request_error",
                param="response_format",
            )

        attempt = self._next_attempt(key)
        if fault == "rate_limit" and attempt == 1:
            record(429)
            reply = _error_reply(429, "Rate limit reached, retry later", "requests")
            reply.headers["Retry-After"] = f"{self.retry_after_s:g}"
            return reply
        if fault == "server_error" and attempt == 1:
            record(500)
            return _error_reply(500, "The server had an error", "server_error")
        hung = fault == "hang" and attempt == 1 and not via_batch
        if hung:
            # Recorded on arrival: the client has given up long before the reply.
            record(0)
            time.sleep(self.hang_s)

        content, finish_reason, refusal = self._compose(user_message, fault, attempt)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if content and max_tokens and _count_tokens(content) > max_tokens:
            content = content[: 4 * int(max_tokens)]
            finish_reason = "length"
        prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = _count_tokens(content or refusal or "")
        if not hung:
            record(200)
        completion = {
            "id": self._new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": refusal,
                    },
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return _Reply(200, completion)

    def _compose(
        self, user_message: str, fault: str, attempt: int
    ) -> tuple[str | None, str, str | None]:
        """Return (content, finish_reason, refusal) for a reply."""
        key = _message_key(user_message)
        post_text = user_message.split("\n", 1)[0][:80]
        category = _pick(_CATEGORIES, key, "category")
        color = _pick(_COLORS, key, "color")
        payload = {
            "image_description": (
                f"A person wearing a {color} {category}, photographed close up, "
                f"in a mood that matches the post: {post_text}"
            ),
            "attributes": {
                "category": category,
                "color": color,
                "style": _pick(_STYLES, key, "style"),
            },
        }
        text = json.dumps(payload)
        if fault == "fenced":
            return f"```json\n{text}\n```", "stop", None
        if fault == "wrapped":
            return (
                f"Sure! Here is the JSON you asked for:\n{text}\nEnjoy.",
                "stop",
                None,
            )
        if fault == "length" or (fault == "length_once" and attempt == 1):
            return text[: len(text) // 2], "length", None
        if fault == "refusal":
            return None, "stop", "I'm sorry, but I can't help with that request."
        if fault == "content_filter":
            return None, "content_filter", None
        if fault == "invalid_json":
            return "The picture shows someone in nice clothes.", "stop", None
        return text, "stop", None

    # Files and batches.

    def create_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = self._new_id("file")
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        with self._lock:
            self._files[file_id] = {"meta": meta, "data": data}
        return meta

    def file(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._files.get(file_id)

    def create_batch(self, body: dict[str, Any]) -> _Reply:
        input_file = self.file(body.get("input_file_id", ""))
        if input_file is None:
            return _error_reply(404, "input file not found", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions":
            return _error_reply(400, "unsupported endpoint", "invalid_request_error")
        batch = {
            "id": self._new_id("batch"),
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        with self._lock:
            self._batches[batch["id"]] = {"batch": batch, "polls": 0}
        return _Reply(200, dict(batch))

    def retrieve_batch(self, batch_id: str) -> _Reply:
        with self._lock:
            entry = self._batches.get(batch_id)
            if entry is None:
                return _error_reply(404, "batch not found", "invalid_request_error")
            entry["polls"] += 1
            batch = entry["batch"]
            finished = batch["status"] == "completed"
            due = entry["polls"] >= self.batch_polls_to_complete
        if not finished and due:
            self._run_batch(batch)
        elif not finished:
            batch["status"] = "in_progress"
        return _Reply(200, dict(batch))

    def _run_batch(self, batch: dict[str, Any]) -> None:
        data = self.file(batch["input_file_id"])["data"].decode("utf-8")
        outputs, errors = [], []
        for line in data.splitlines():
            if not line.strip():
                continue
            request = json.loads(line)
            reply = self.handle_chat(request["body"], via_batch=True)
            result = {
                "id": self._new_id("batch_req"),
                "custom_id": request["custom_id"],
                "response": {
                    "status_code": reply.status,
                    "request_id": self._new_id("req"),
                    "body": reply.body,
                },
                "error": None,
            }
            (outputs if reply.status == 200 else errors).append(result)
        output_file = self.create_file(
            "batch_output.jsonl",
            "batch_output",
            "".join(json.dumps(r) + "\n" for r in outputs).encode(),
        )
        batch["output_file_id"] = output_file["id"]
        if errors:
            error_file = self.create_file(
                "batch_errors.jsonl",
                "batch_output",
                "".join(json.dumps(r) + "\n" for r in errors).encode(),
            )
            batch["error_file_id"] = error_file["id"]
        batch["request_counts"] = {
            "total": len(outputs) + len(errors),
            "completed": len(outputs),
            "failed": len(errors),
        }
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())


@dataclasses.dataclass
class _Reply:
    status: int
    body: Any
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: bytes | None = None


def _error_reply(
    status: int, message: str, error_type: str, param: str | None = None
) -> _Reply:
    error = {"message": message, "type": error_type, "param": param, "code": None}
    return _Reply(status, {"error": error})


def _count_tokens(text: str) -> int:
    """Approximate a token count as one token per four characters."""
    return max(1, len(text) // 4) if text else 0


class _Handler(http.server.BaseHTTPRequestHandler):
    app: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        del format, args  # Keep test output quiet.

    def _authorized(self) -> bool:
        if self.app.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.app.api_key}":
            return True
        with self.app._lock:
            self.app.unauthorized_requests += 1
        return False

    def _send(self, reply: _Reply) -> None:
        payload = (
            reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        )
        try:
            self.send_response(reply.status)
            content_type = (
                "application/octet-stream"
                if reply.raw is not None
                else "application/json"
            )
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # The client gave up (a hung request past its timeout).

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            self._send(_error_reply(401, "Incorrect API key", "invalid_request_error"))
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")
        if path == "/v1/models":
            model = {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}
            self._send(_Reply(200, {"object": "list", "data": [model]}))
        elif len(parts) == 4 and parts[2] == "files":
            stored = self.app.file(parts[3])
            reply = _Reply(200, stored["meta"]) if stored else None
            self._send(reply or _error_reply(404, "file not found", "not_found"))
        elif len(parts) == 5 and parts[2] == "files" and parts[4] == "content":
            stored = self.app.file(parts[3])
            if stored is None:
                self._send(_error_reply(404, "file not found", "not_found"))
            else:
                self._send(_Reply(200, None, raw=stored["data"]))
        elif len(parts) == 4 and parts[2] == "batches":
            self._send(self.app.retrieve_batch(parts[3]))
        else:
            self._send(_error_reply(404, f"no route for GET {path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if not self._authorized():
            self._send(_error_reply(401, "Incorrect API key", "invalid_request_error"))
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/v1/chat/completions":
                self._send(self.app.handle_chat(json.loads(body)))
            elif path == "/v1/files":
                self._send(self._upload(body))
            elif path == "/v1/batches":
                self._send(self.app.create_batch(json.loads(body)))
            else:
                self._send(_error_reply(404, f"no route for POST {path}", "not_found"))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            self._send(
                _error_reply(400, f"invalid request: {error}", "invalid_request")
            )

    def _upload(self, body: bytes) -> _Reply:
        content_type = self.headers.get("Content-Type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields:
            return _error_reply(
                400, "missing multipart field 'file'", "invalid_request"
            )
        filename, data = fields["file"]
        purpose = fields.get("purpose", (None, b""))[1].decode()
        return _Reply(200, self.app.create_file(filename or "upload", purpose, data))


def _parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        rates[name.strip()] = float(value)
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8011, help="TCP port on 127.0.0.1")
    parser.add_argument(
        "--fault_rates",
        default="",
        help="comma-separated NAME=PROBABILITY pairs for messages without a marker",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draw")
    parser.add_argument(
        "--retry_after_s", type=float, default=1.0, help="Retry-After sent with 429"
    )
    parser.add_argument(
        "--hang_s", type=float, default=30.0, help="seconds a hung request waits"
    )
    parser.add_argument(
        "--response_formats",
        default=",".join(ALL_RESPONSE_FORMATS),
        help="accepted response_format types; others get a 400",
    )
    parser.add_argument(
        "--api_key", default=None, help="require this bearer key (default: any)"
    )
    args = parser.parse_args(argv)

    server = FakeOpenAIServer(
        api_key=args.api_key,
        fault_rates=_parse_rates(args.fault_rates),
        seed=args.seed,
        retry_after_s=args.retry_after_s,
        hang_s=args.hang_s,
        response_formats=args.response_formats.split(","),
        port=args.port,
    ).start()
    print(f"Serving the fake OpenAI API at {server.base_url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()
    print(f"Chat requests by fault: {server.fault_counts()}", flush=True)


if __name__ == "__main__":
    main()
