"""Tolerant parsing and validation of stage-1 replies.

Models wrap JSON in code fences, put prose around it, or return attribute values as
numbers or lists. The parser accepts those forms and rejects what cannot be read as
`{"image_description": non-empty str, "attributes": flat map of strings}`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

# Failure reasons of a reply that arrived: each is retried once, then recorded.
LENGTH = "length"
REFUSAL = "refusal"
CONTENT_FILTER = "content_filter"
INVALID_REPLY = "invalid_reply"
RETRY_ONCE_REASONS = frozenset({LENGTH, REFUSAL, CONTENT_FILTER, INVALID_REPLY})

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
# Small models copy the prompt's template, e.g. "<the description>" or "<name>".
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")


class ReplyError(ValueError):
    """A reply without a usable description; `reason` is one of the reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class PseudoDescription:
    """A validated stage-1 result."""

    image_description: str
    attributes: dict[str, str]


def parse_reply(text: str | None) -> PseudoDescription:
    """Parse and validate a reply; raise ReplyError(INVALID_REPLY) if it is unusable."""
    if not text or not text.strip():
        raise ReplyError(INVALID_REPLY, "empty reply")
    candidates = [match.group(1) for match in _FENCE.finditer(text)] + [text]
    problem = "no JSON object found"
    for candidate in candidates:
        for obj in _json_objects(candidate):
            if "image_description" not in obj:
                problem = "JSON object without 'image_description'"
                continue
            return validate_reply(obj)
    raise ReplyError(INVALID_REPLY, problem)


def _json_objects(text: str):
    """Yield every JSON object that starts at a '{' in `text`, outermost first."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        start = text.find("{", end)


def validate_reply(obj: dict[str, Any]) -> PseudoDescription:
    """Check a decoded reply and normalise it.

    Whitespace in the description is collapsed. Attribute values may be strings,
    numbers or booleans (converted to strings) or lists of those (joined with
    ", "); nested objects are rejected. Attributes may also come as a list of
    {"name": ..., "value": ...} pairs. A description that is only a template
    placeholder such as "<the description>" is rejected, and attributes with
    empty or placeholder names or values are dropped. Because
    the dataset stores attributes as "name: value; name: value", ';' becomes ','
    everywhere and ':' becomes ',' in names.
    """
    description = obj.get("image_description")
    if not isinstance(description, str) or not description.strip():
        raise ReplyError(INVALID_REPLY, "'image_description' is not a non-empty string")
    description = " ".join(description.split())
    if _PLACEHOLDER.match(description):
        raise ReplyError(INVALID_REPLY, f"template placeholder {description!r}")

    raw = obj.get("attributes", {})
    if raw is None:
        raw = {}
    if isinstance(raw, list):
        raw = _pairs_to_dict(raw)
    if not isinstance(raw, dict):
        raise ReplyError(INVALID_REPLY, "'attributes' is not an object")

    attributes: dict[str, str] = {}
    for name, value in raw.items():
        text = _attribute_text(value)
        if text is None:
            raise ReplyError(INVALID_REPLY, f"attribute {name!r} is not a string")
        name = _clean(str(name).replace(":", ","))
        text = _clean(text)
        placeholder = _PLACEHOLDER.match(name) or _PLACEHOLDER.match(text)
        if name and text and not placeholder:
            attributes[name] = text
    return PseudoDescription(description, attributes)


def _pairs_to_dict(items: list[Any]) -> dict[str, Any]:
    pairs = {}
    for item in items:
        if not (isinstance(item, dict) and {"name", "value"} <= item.keys()):
            raise ReplyError(
                INVALID_REPLY, "'attributes' list without name/value pairs"
            )
        pairs[str(item["name"])] = item["value"]
    return pairs


def _attribute_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, list) and all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
    ):
        return ", ".join(str(v) for v in value)
    return None


def _clean(text: str) -> str:
    return " ".join(text.replace(";", ",").split())
