"""Reader for a pseudo-data folder, the output of `fashion_msa.pseudo`.

Layout of the folder:

  descriptions.jsonl  one JSON object a line, appended by the describe stage:
                      {"id", "status": "ok" | "failed", "image_description",
                      "attributes": {name: value}, ...}. The last "ok" line of
                      an id wins and "failed" lines are ignored.
  images/{id}.png     the pseudo image of a post.

A post has pseudo data when it has an "ok" description and an image file. The
builder joins this index to the posts by id.
"""

import dataclasses
import json
import pathlib

from fashion_msa.data.posts import (
    PathOutsideInputError,
    Skip,
    SkipReason,
    format_attributes,
    resolve_inside,
    validate_id,
)

DESCRIPTIONS_FILE = "descriptions.jsonl"
IMAGES_DIR = "images"


@dataclasses.dataclass(frozen=True)
class PseudoRecord:
    """The pseudo data of one post: description, "name: value; ..." and image file."""

    description: str
    attributes: str
    image_path: pathlib.Path


@dataclasses.dataclass
class PseudoIndex:
    """Pseudo data by post id.

    Attributes:
      records: ids with an "ok" description and an image file.
      problems: malformed lines and unusable files, each with its line or id.
      counts: ok_lines, failed_lines, malformed_lines, described_posts,
        descriptions_without_image, images_without_description.
    """

    records: dict[str, PseudoRecord]
    problems: list[Skip]
    counts: dict[str, int]


def _parse_line(line: str, line_number: int) -> tuple[str, dict] | Skip:
    where = f"{DESCRIPTIONS_FILE} line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Skip(where, SkipReason.MALFORMED_RECORD, str(error))
    if not isinstance(record, dict):
        return Skip(where, SkipReason.MALFORMED_RECORD, "expected a JSON object")
    try:
        post_id = validate_id(record.get("id"))
    except ValueError as error:
        return Skip(where, SkipReason.INVALID_ID, str(error))
    return post_id, record


def load_pseudo(pseudo_dir: str | pathlib.Path) -> PseudoIndex:
    """Index the pseudo data in `pseudo_dir` (layout in the module docstring).

    Raises:
      FileNotFoundError: `pseudo_dir` has no descriptions.jsonl.
    """
    root = pathlib.Path(pseudo_dir)
    descriptions_path = root / DESCRIPTIONS_FILE
    if not descriptions_path.is_file():
        raise FileNotFoundError(
            f"{descriptions_path} not found; is {root} a pseudo-data folder?"
        )

    counts = dict.fromkeys(("ok_lines", "failed_lines", "malformed_lines"), 0)
    problems: list[Skip] = []
    latest_ok: dict[str, dict] = {}
    with descriptions_path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parsed = _parse_line(line, line_number)
            if isinstance(parsed, Skip):
                problems.append(parsed)
                counts["malformed_lines"] += 1
                continue
            post_id, record = parsed
            if record.get("status") == "ok":
                counts["ok_lines"] += 1
                latest_ok[post_id] = record
            else:
                counts["failed_lines"] += 1

    records: dict[str, PseudoRecord] = {}
    without_image = 0
    for post_id, record in latest_ok.items():
        description = record.get("image_description") or ""
        try:
            if not isinstance(description, str):
                raise ValueError("image_description is not a string")
            attributes = format_attributes(record.get("attributes"))
            image_path = resolve_inside(root, f"{IMAGES_DIR}/{post_id}.png")
        except PathOutsideInputError as error:
            problems.append(Skip(post_id, SkipReason.PATH_OUTSIDE_INPUT, str(error)))
            continue
        except ValueError as error:
            problems.append(Skip(post_id, SkipReason.MALFORMED_RECORD, str(error)))
            continue
        if not image_path.is_file():
            without_image += 1
            continue
        records[post_id] = PseudoRecord(description, attributes, image_path)

    image_ids = {path.stem for path in (root / IMAGES_DIR).glob("*.png")}
    counts["described_posts"] = len(latest_ok)
    counts["descriptions_without_image"] = without_image
    counts["images_without_description"] = len(image_ids - set(latest_ok))
    return PseudoIndex(records=records, problems=problems, counts=counts)
