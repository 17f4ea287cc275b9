"""The stage-1 prompt: five instructions, the reply's JSON schema, and the prompt hash.

The five instructions follow the prompt strategy of Zhao et al. (COLING 2025,
section 3.1): commands 1-2 ask for a picture description aligned with the post,
command 3 for the attributes of the fashion items, commands 4-5 fix the output
format. Every stored result carries `PROMPT_HASH`, so results of an edited prompt
never mix with older ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when build_messages changes how a post becomes messages: the hash covers
# the prompt texts and the schema below, not that code.
PROMPT_VERSION = 1

INSTRUCTIONS = (
    "Describe, in at most 50 words, one picture that would express the content and "
    "the feeling of the social media post below. Focus on the fashion items and the "
    "person wearing them, with little background.",
    "Keep the picture faithful to the post: it must match what the text says and the "
    "sentiment it conveys, and add no events, people or moods the text does not "
    "suggest.",
    "List the attributes of the fashion items shown in the picture (for example "
    "category, color, pattern, material, style) as attribute names with short "
    "values.",
    'Answer with one JSON object of the form {"image_description": "<the '
    'description>", "attributes": {"<name>": "<value>"}}, where every value is a '
    "string.",
    "Write nothing outside the JSON object: no explanation and no code fences.",
)

SYSTEM_PROMPT = (
    "You write picture descriptions for fashion-related social media posts.\n"
    + "\n".join(f"{number}. {text}" for number, text in enumerate(INSTRUCTIONS, 1))
)

USER_TEMPLATE = "Post text: {text}\nAttributes of the original image: {attributes}"
NO_ATTRIBUTES = "none given"

# `strict` stays off: strict mode needs every object key listed in advance, which
# rules out an open map of attribute names.
RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "image_description": {"type": "string"},
        "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["image_description", "attributes"],
}

RESPONSE_FORMATS: dict[str, dict[str, Any] | None] = {
    "json_schema": {
        "type": "json_schema",
        "json_schema": {
            "name": "pseudo_post",
            "schema": RESPONSE_SCHEMA,
            "strict": False,
        },
    },
    "json_object": {"type": "json_object"},
    "text": None,
}


def _compute_prompt_hash() -> str:
    material = {
        "version": PROMPT_VERSION,
        "system": SYSTEM_PROMPT,
        "user": USER_TEMPLATE,
        "no_attributes": NO_ATTRIBUTES,
        "schema": RESPONSE_SCHEMA,
    }
    encoded = json.dumps(material, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]


PROMPT_HASH = _compute_prompt_hash()


def build_messages(text: str, attributes: str = "") -> list[dict[str, str]]:
    """Build the chat messages for one post.

    Args:
      text: the post text.
      attributes: the original attributes as "name: value; name: value", or "".
    """
    user = USER_TEMPLATE.format(
        text=" ".join(text.split()), attributes=attributes.strip() or NO_ATTRIBUTES
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
