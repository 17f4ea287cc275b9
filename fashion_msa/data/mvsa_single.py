"""Importer for MVSA-Single (Niu et al., MMM 2016) in its release layout.

Expected layout under the input folder:

  labelResultAll.txt   tab-separated, header "ID<TAB>text,image", then one row
                       per post: the post id and its text and image labels,
                       e.g. "12<TAB>neutral,positive".
  data/{id}.txt        the tweet text, UTF-8 or a legacy encoding, CRLF line
                       endings.
  data/{id}.jpg        the tweet image.
  splits/{split}.txt   post ids of each split (train, val, optionally test),
                       one per line.

The two labels merge into one: equal labels give that label, neutral with
positive or negative gives the non-neutral one, and positive against negative
is a conflict. Conflicting posts are dropped and counted (`conflicts`); they
are not input errors. The text and image labels are kept as metadata.
"""

import pathlib

from fashion_msa.data.posts import (
    LABELS,
    SPLITS,
    DropReason,
    ImportResult,
    PathOutsideInputError,
    Post,
    Skip,
    SkipReason,
    check_image_path,
    check_unique_ids,
    resolve_inside,
    validate_id,
)

LABEL_FILE = "labelResultAll.txt"


def merge_labels(text_label: str, image_label: str) -> str | None:
    """Merge MVSA's text and image labels; None when they conflict."""
    if text_label == image_label:
        return text_label
    if text_label == "neutral":
        return image_label
    if image_label == "neutral":
        return text_label
    return None


# Windows-1252 as web browsers decode it (WHATWG Encoding Standard): the five
# bytes that Python's cp1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) map
# to the C1 control characters of the same code point, so decoding never fails.
_CP1252_UNDEFINED = frozenset({0x81, 0x8D, 0x8F, 0x90, 0x9D})
_CP1252_FROM_LATIN1 = {
    byte: bytes([byte]).decode("cp1252")
    for byte in range(0x80, 0xA0)
    if byte not in _CP1252_UNDEFINED
}

# The order in which tweet bytes are tried. The shared MVSA-Single copy has
# 3,046 UTF-8 texts and 920 that are not. All 920 decode strictly as GB18030
# and then read correctly: b"\xa1\xb0" is a left double quotation mark, and
# eight of them are Japanese. As cp1252 they become mojibake such as
# "\u00a1\u00b0". GB18030 is strict about its trail bytes, so typical Latin-1
# text ("caf\xe9 ") fails it and reaches the Windows-1252 fallback.
TEXT_ENCODINGS = ("utf-8", "gb18030", "cp1252")


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode a tweet as UTF-8, else GB18030, else Windows-1252.

    Returns the text and the encoding that decoded it (one of TEXT_ENCODINGS).
    Windows-1252 never fails, so no text is lost. Line endings become "\\n" and
    surrounding whitespace is stripped.
    """
    try:
        text, encoding = data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        try:
            text, encoding = data.decode("gb18030"), "gb18030"
        except UnicodeDecodeError:
            text = data.decode("latin-1").translate(_CP1252_FROM_LATIN1)
            encoding = "cp1252"
    return text.replace("\r\n", "\n").replace("\r", "\n").strip(), encoding


def _read_label_file(
    path: pathlib.Path,
) -> tuple[list[tuple[str, str, str]], list[Skip]]:
    rows: list[tuple[str, str, str]] = []
    skipped: list[Skip] = []
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip() or (line_number == 1 and line.lower().startswith("id")):
            continue
        fields = line.split("\t")
        labels = fields[1].split(",") if len(fields) == 2 else []
        if len(labels) != 2:
            skipped.append(
                Skip(
                    f"line {line_number}",
                    SkipReason.MALFORMED_RECORD,
                    f"{LABEL_FILE}: expected 'ID<TAB>text,image', got {line!r}",
                )
            )
            continue
        try:
            post_id = validate_id(fields[0])
        except ValueError as error:
            skipped.append(
                Skip(f"line {line_number}", SkipReason.INVALID_ID, str(error))
            )
            continue
        rows.append((post_id, labels[0].strip().lower(), labels[1].strip().lower()))
    return rows, skipped


def _read_splits(splits_dir: pathlib.Path) -> dict[str, str]:
    split_of: dict[str, str] = {}
    listed: list[str] = []
    for split in SPLITS:
        path = splits_dir / f"{split}.txt"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                listed.append(line.strip())
                split_of[line.strip()] = split
    check_unique_ids(listed, f"MVSA split files in {splits_dir}")
    return split_of


def import_mvsa_single(
    input_dir: str | pathlib.Path, default_split: str | None = None
) -> ImportResult:
    """Read MVSA-Single (layout in the module docstring).

    Args:
      input_dir: the MVSA-Single folder.
      default_split: split of labelled posts that no split file lists. None
        skips them (reason `no_split`).

    Raises:
      FileNotFoundError: no label file, or no split file and no
        `default_split`.
      DuplicateIdError: an id occurs twice in the label file or in the split
        files together.
    """
    root = pathlib.Path(input_dir)
    label_path = root / LABEL_FILE
    if not label_path.is_file():
        raise FileNotFoundError(
            f"{label_path} not found; is {root} an MVSA-Single folder?"
        )
    if default_split is not None and default_split not in SPLITS:
        raise ValueError(f"default_split {default_split!r} is not one of {SPLITS}")

    rows, skipped = _read_label_file(label_path)
    check_unique_ids((post_id for post_id, _, _ in rows), str(label_path))
    split_of = _read_splits(root / "splits")
    if not split_of and default_split is None:
        raise FileNotFoundError(
            f"no split files in {root / 'splits'}: add train.txt and val.txt (post "
            "ids, one per line) or pass default_split='train'"
        )

    posts: list[Post] = []
    dropped: list[Skip] = []
    texts_by_encoding = dict.fromkeys(TEXT_ENCODINGS, 0)
    labelled = set()
    for post_id, text_label, image_label in rows:
        labelled.add(post_id)
        if text_label not in LABELS or image_label not in LABELS:
            skipped.append(
                Skip(
                    post_id,
                    SkipReason.UNKNOWN_LABEL,
                    f"labels {text_label},{image_label} are not in {', '.join(LABELS)}",
                )
            )
            continue
        label = merge_labels(text_label, image_label)
        if label is None:
            dropped.append(
                Skip(
                    post_id,
                    DropReason.LABEL_CONFLICT,
                    f"text {text_label}, image {image_label}",
                )
            )
            continue
        split = split_of.get(post_id, default_split)
        if split is None:
            skipped.append(
                Skip(post_id, SkipReason.NO_SPLIT, "listed in no split file")
            )
            continue

        try:
            text_path = resolve_inside(root, f"data/{post_id}.txt")
            text, encoding = decode_text(text_path.read_bytes())
        except PathOutsideInputError as error:
            skipped.append(Skip(post_id, SkipReason.PATH_OUTSIDE_INPUT, str(error)))
            continue
        except FileNotFoundError:
            skipped.append(
                Skip(post_id, SkipReason.MISSING_TEXT, f"data/{post_id}.txt not found")
            )
            continue
        texts_by_encoding[encoding] += 1

        image_path = check_image_path(root, f"data/{post_id}.jpg", post_id)
        if isinstance(image_path, Skip):
            skipped.append(image_path)
            continue

        posts.append(
            Post(
                id=post_id,
                text=text,
                attributes="",
                image_path=image_path,
                label=label,
                split=split,
                metadata={"text_label": text_label, "image_label": image_label},
            )
        )

    for post_id in sorted(set(split_of) - labelled):
        skipped.append(
            Skip(
                post_id,
                SkipReason.MISSING_LABEL,
                f"in splits/{split_of[post_id]}.txt but not in {LABEL_FILE}",
            )
        )

    counts = {
        "labelled": len(rows),
        "conflicts": len(dropped),
        **{
            f"{name.replace('-', '')}_texts": count
            for name, count in texts_by_encoding.items()
        },
        "posts": len(posts),
        "skipped": len(skipped),
    }
    for split in SPLITS:
        counts[f"posts_{split}"] = sum(post.split == split for post in posts)
    return ImportResult(posts=posts, skipped=skipped, counts=counts, dropped=dropped)
