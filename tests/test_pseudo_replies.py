"""Parsing of stage-1 replies, the prompt, and the append-only JSONL store."""

import json
import logging
import os

import pytest

from fashion_msa.pseudo import prompt, replies
from fashion_msa.pseudo.inputs import parse_attributes
from fashion_msa.pseudo.report import RunSummary, Usage, estimate_cost_usd, lookup_price
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

REPLY = {"image_description": "A woman in a red dress.", "attributes": {"color": "red"}}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(REPLY),
        f"```json\n{json.dumps(REPLY)}\n```",
        f"```\n{json.dumps(REPLY, indent=2)}\n```",
        f"Here is the JSON:\n{json.dumps(REPLY)}\nHope it helps!",
        f'Note {{not json}} then {{"other": 1}} then {json.dumps(REPLY)}',
    ],
    ids=["plain", "fenced", "fenced-no-language", "wrapped", "decoys-first"],
)
def test_parse_reply_tolerates_wrapping(text):
    parsed = replies.parse_reply(text)
    assert parsed.image_description == "A woman in a red dress."
    assert parsed.attributes == {"color": "red"}


def test_parse_reply_normalises_attributes():
    text = json.dumps(
        {
            "image_description": "  A   coat\n in the rain ",
            "attributes": {
                "size": 38,
                "waterproof": True,
                "colors": ["navy", "white"],
                "style; cut": "slim: fitted; long",
                "empty": "",
            },
        }
    )
    parsed = replies.parse_reply(text)
    assert parsed.image_description == "A coat in the rain"
    assert parsed.attributes == {
        "size": "38",
        "waterproof": "true",
        "colors": "navy, white",
        "style, cut": "slim: fitted, long",
    }


def test_parse_reply_drops_placeholder_attributes():
    text = json.dumps(
        {
            "image_description": "A candle <brand> ad.",
            "attributes": {"<name>": "Bangor", "color": "<value>", "style": "cozy"},
        }
    )
    parsed = replies.parse_reply(text)
    assert parsed.image_description == "A candle <brand> ad."
    assert parsed.attributes == {"style": "cozy"}


def test_parse_reply_accepts_name_value_pairs():
    text = json.dumps(
        {
            "image_description": "Sneakers.",
            "attributes": [{"name": "category", "value": "sneakers"}],
        }
    )
    assert replies.parse_reply(text).attributes == {"category": "sneakers"}


@pytest.mark.parametrize(
    "text, detail",
    [
        (None, "empty reply"),
        ("   ", "empty reply"),
        ("The picture shows a dress.", "no JSON object"),
        ('{"description": "x", "attributes": {}}', "without 'image_description'"),
        ('{"image_description": "", "attributes": {}}', "non-empty string"),
        ('{"image_description": 3, "attributes": {}}', "non-empty string"),
        ('{"image_description": "x", "attributes": "red"}', "not an object"),
        ('{"image_description": "x", "attributes": {"a": {"b": "c"}}}', "not a string"),
        ('{"image_description": "x", "attributes": [1, 2]}', "name/value pairs"),
        ('{"image_description": "A dress", "attributes": {"color": "re', "no JSON"),
        ('{"image_description": "<the description>", "attributes": {}}', "template"),
    ],
)
def test_parse_reply_rejects_unusable(text, detail):
    with pytest.raises(replies.ReplyError, match=detail) as caught:
        replies.parse_reply(text)
    assert caught.value.reason == replies.INVALID_REPLY


def test_prompt_has_five_instructions_and_a_stable_hash():
    assert len(prompt.INSTRUCTIONS) == 5
    for number in range(1, 6):
        assert f"\n{number}. " in prompt.SYSTEM_PROMPT
    assert "JSON" in prompt.SYSTEM_PROMPT  # JSON mode requires the word.
    assert len(prompt.PROMPT_HASH) == 16
    assert prompt.PROMPT_HASH == prompt._compute_prompt_hash()


def test_build_messages_includes_text_and_attributes():
    messages = prompt.build_messages("So happy\nwith it!", "color: red")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "So happy with it!" in messages[1]["content"]
    assert "color: red" in messages[1]["content"]
    without = prompt.build_messages("text", "")[1]["content"]
    assert prompt.NO_ATTRIBUTES in without


def test_parse_attributes_keeps_order():
    parsed = parse_attributes("category: dress; color: red ;; pattern: floral")
    assert list(parsed.items()) == [
        ("category", "dress"),
        ("color", "red"),
        ("pattern", "floral"),
    ]
    assert parse_attributes("") == {}


def test_prices_and_cost():
    assert lookup_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert lookup_price("gpt-4o") == (2.50, 10.00)
    assert lookup_price("my-local-model") is None
    usage = Usage()
    usage.add({"prompt_tokens": 1_000_000, "completion_tokens": 500_000})
    assert estimate_cost_usd(usage, (0.5, 1.5)) == pytest.approx(1.25)
    assert estimate_cost_usd(usage, (0.5, 1.5), batch=True) == pytest.approx(0.625)
    assert estimate_cost_usd(usage, None) is None


def test_summary_format_names_unknown_cost():
    summary = RunSummary(stage="describe", total=3, done=2)
    summary.failed["length"] += 1
    text = summary.format()
    assert "3 items, 2 done now, 0 skipped, 1 failed" in text
    assert "length 1" in text
    assert "--price_input_per_mtok" in text


# The JSONL store.


def test_store_appends_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLog(path) as log:
        log.append({"id": "a", "text": "ünïcode"})
        log.append({"id": "b"})
    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 2
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert read_jsonl(path)[0]["text"] == "ünïcode"
    assert "time" in read_jsonl(path)[0]


def test_store_ignores_torn_last_line(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "sta')
    with caplog.at_level(logging.WARNING):
        records = read_jsonl(path)
    assert [r["id"] for r in records] == ["a"]
    assert "torn last line" in caplog.text

    with JsonlLog(path) as log:  # Opening cuts the torn tail off.
        log.append({"id": "c"})
    assert path.read_bytes().startswith(b'{"id": "a"}\n{"id": "c"')
    assert [r["id"] for r in read_jsonl(path)] == ["a", "c"]


def test_store_keeps_whole_record_without_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlLog(path) as log:
        log.append({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_store_skips_unreadable_middle_line(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n[1, 2]\n{"id": "b"}\n')
    with caplog.at_level(logging.WARNING):
        assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert "line 2" in caplog.text
    assert "line 3" in caplog.text


def test_store_missing_file_reads_empty(tmp_path):
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    log = JsonlLog(tmp_path / "sub" / "new.jsonl")
    log.close()
    assert os.path.getsize(tmp_path / "sub" / "new.jsonl") == 0
