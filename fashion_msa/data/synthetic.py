"""Procedurally drawn fashion posts with pseudo data, for the demo and the tests.

`write_synthetic` draws posts into a folder in the manifest layout
(`manifest.jsonl`, `images/`) with a pseudo-data folder beside them
(`pseudo/descriptions.jsonl`, `pseudo/images/`), so the builder imports them
like any manifest and joins the pseudo data like real generation output.

Each post shows one garment (dress, t-shirt, skirt, trousers, handbag or hat)
in a colour and a pattern. Its label is carried by exactly one modality,
chosen per post (the post's `cue` metadata):

- text (half of the posts): a positive, negative or neutral sentence;
- image (30%): yellow sparkles (positive), dark stains and a tear (negative)
  or nothing (neutral) drawn on the picture;
- attributes (20%): `fit: perfect` (positive), `fit: too small` (negative)
  or `fit: regular` (neutral).

The other modalities then look neutral: a neutral sentence, an unmarked
picture, `fit: regular`. Text alone therefore reaches about 67% accuracy
(every positive or negative sentence is right, a neutral-looking one is
neutral half of the time), image alone about 53% and attributes alone about
47%; all three together determine the label.

Pseudo data is written as an LLM and a diffusion model would from the text
alone: a description, attributes with a `mood`, and a picture marked like the
text's sentiment. About 15% of the posts get a deliberately inconsistent
pseudo record (another garment and a random mood), 5% a failed description
and 5% a description without an image, so that the adapter has something to
filter and the builder has posts without pseudo data.

Everything is drawn from one `numpy` generator seeded with `seed`; the same
arguments give byte-identical files.
"""

import dataclasses
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from fashion_msa.data.manifest import import_manifest
from fashion_msa.data.posts import LABELS, ImportResult

CATEGORIES = ("dress", "t-shirt", "skirt", "trousers", "handbag", "hat")
# Yellow and dark browns are left out: they are the image cues.
COLOURS = {
    "red": (200, 30, 40),
    "blue": (40, 70, 190),
    "green": (40, 150, 70),
    "pink": (240, 130, 180),
    "purple": (120, 50, 160),
    "white": (245, 245, 245),
    "grey": (130, 130, 135),
    "orange": (240, 130, 30),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
STYLES = ("casual", "formal", "sporty", "vintage")
FIT_BY_LABEL = {"positive": "perfect", "negative": "too small", "neutral": "regular"}
MOOD_BY_LABEL = {"positive": "cheerful", "negative": "gloomy", "neutral": "calm"}
CUES = ("text", "image", "attributes")
CUE_PROBABILITIES = (0.5, 0.3, 0.2)

TEXT_TEMPLATES = {
    "positive": (
        "Absolutely love my new {colour} {category}!",
        "This {pattern} {category} is perfect, so happy with it",
        "Best {category} I have bought this year #ootd",
        "Obsessed with this {colour} {category}, great quality",
        "Such a gorgeous {category}, I feel amazing in it",
    ),
    "negative": (
        "Really disappointed with this {colour} {category}.",
        "The {category} fell apart after one wash, awful",
        "Worst {category} ever, sending it back",
        "Hate how this {pattern} {category} looks, cheap fabric",
        "Terrible {category}, the seams ripped on day one",
    ),
    "neutral": (
        "Wearing a {colour} {category} today.",
        "Here is the {category} I picked up this week",
        "A {pattern} {category} for the office #ootd",
        "Trying a {colour} {category} with jeans",
        "New {category} arrived, {colour} with a {pattern} look",
    ),
}
DESCRIPTION_BY_MOOD = {
    "cheerful": "the fabric looks brand new and the wearer smiles",
    "gloomy": "the fabric is stained and torn and the wearer frowns",
    "calm": "the wearer stands in a plain studio",
}

SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
INCONSISTENT_FRACTION = 0.15
FAILED_DESCRIPTION_FRACTION = 0.05
MISSING_IMAGE_FRACTION = 0.05
PARAMETERS_FILE = "synthetic.json"
# Shapes are drawn at this multiple of the output size and downsampled, so
# edges are anti-aliased at any image size.
_SUPERSAMPLING = 4


@dataclasses.dataclass(frozen=True)
class _Garment:
    category: str
    colour: str
    pattern: str


def _garment_outline(category: str, size: int) -> list[list[tuple[float, float]]]:
    """Return polygons (in pixels) whose union is the garment's silhouette."""
    unit = {
        "dress": [
            [
                (0.42, 0.15),
                (0.58, 0.15),
                (0.62, 0.45),
                (0.82, 0.9),
                (0.18, 0.9),
                (0.38, 0.45),
            ]
        ],
        "t-shirt": [
            [(0.3, 0.25), (0.7, 0.25), (0.7, 0.85), (0.3, 0.85)],
            [(0.3, 0.25), (0.12, 0.42), (0.2, 0.52), (0.3, 0.42)],
            [(0.7, 0.25), (0.88, 0.42), (0.8, 0.52), (0.7, 0.42)],
        ],
        "skirt": [[(0.35, 0.3), (0.65, 0.3), (0.82, 0.8), (0.18, 0.8)]],
        "trousers": [
            [(0.3, 0.15), (0.7, 0.15), (0.72, 0.35), (0.28, 0.35)],
            [(0.28, 0.3), (0.5, 0.3), (0.46, 0.92), (0.26, 0.92)],
            [(0.5, 0.3), (0.72, 0.3), (0.74, 0.92), (0.54, 0.92)],
        ],
        "handbag": [
            [(0.2, 0.45), (0.8, 0.45), (0.85, 0.85), (0.15, 0.85)],
            [
                (0.34, 0.46),
                (0.4, 0.26),
                (0.6, 0.26),
                (0.66, 0.46),
                (0.6, 0.46),
                (0.56, 0.32),
                (0.44, 0.32),
                (0.4, 0.46),
            ],
        ],  # fmt: skip
        "hat": [
            [(0.1, 0.62), (0.9, 0.62), (0.85, 0.72), (0.15, 0.72)],
            [(0.3, 0.62), (0.33, 0.3), (0.67, 0.3), (0.7, 0.62)],
        ],
    }[category]
    return [[(x * size, y * size) for x, y in polygon] for polygon in unit]


def _pattern_layer(
    pattern: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw a full-canvas texture in the garment's colour and a darker shade of it."""
    shade = tuple(int(channel * 0.55) for channel in colour)
    layer = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(layer)
    period = size // int(rng.integers(6, 10))
    if pattern == "striped":
        for y in range(0, size, period):
            draw.rectangle([0, y, size, y + period // 2], fill=shade)
    elif pattern == "dotted":
        radius = period // 4
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                draw.ellipse(
                    [x - radius, y - radius, x + radius, y + radius], fill=shade
                )
    elif pattern == "checked":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + period, y + period], fill=shade)
    return layer


def _draw_sparkles(
    draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator
) -> None:
    for _ in range(int(rng.integers(5, 8))):
        x, y = rng.uniform(0.1, 0.9, size=2) * size
        arm = size * rng.uniform(0.06, 0.09)
        waist = arm / 4
        star = [
            (x, y - arm), (x + waist, y - waist), (x + arm, y), (x + waist, y + waist),
            (x, y + arm), (x - waist, y + waist), (x - arm, y), (x - waist, y - waist),
        ]  # fmt: skip
        draw.polygon(star, fill=(255, 215, 0))


def _draw_damage(
    draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator
) -> None:
    for _ in range(int(rng.integers(3, 5))):
        x, y = rng.uniform(0.3, 0.7, size=2) * size
        rx, ry = rng.uniform(0.06, 0.11, size=2) * size
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=(70, 45, 20))
    start = rng.uniform(0.3, 0.5) * size
    points = [
        (start + step * size * 0.06, size * (0.35 + 0.07 * (step % 2)))
        for step in range(6)
    ]
    draw.line(points, fill=(15, 10, 10), width=max(1, size // 40))


def draw_post_image(
    garment: _Garment, mark: str, image_size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw a garment on a light background with the cue marks of `mark` (a label)."""
    size = image_size * _SUPERSAMPLING
    background = tuple(int(value) for value in rng.integers(205, 250, size=3))
    canvas = Image.new("RGB", (size, size), background)

    # Jitter position and scale so that no two pictures of a garment are equal.
    scale = rng.uniform(0.85, 1.05)
    offset = rng.uniform(-0.06, 0.06, size=2) * size
    mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(mask)
    centre = size / 2
    for polygon in _garment_outline(garment.category, size):
        moved = [
            (
                (x - centre) * scale + centre + offset[0],
                (y - centre) * scale + centre + offset[1],
            )
            for x, y in polygon
        ]
        mask_draw.polygon(moved, fill=255)
    texture = _pattern_layer(garment.pattern, COLOURS[garment.colour], size, rng)
    canvas.paste(texture, (0, 0), mask)

    draw = ImageDraw.Draw(canvas)
    if mark == "positive":
        _draw_sparkles(draw, size, rng)
    elif mark == "negative":
        _draw_damage(draw, size, rng)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _random_garment(rng: np.random.Generator) -> _Garment:
    return _Garment(
        category=str(rng.choice(CATEGORIES)),
        colour=str(rng.choice(list(COLOURS))),
        pattern=str(rng.choice(PATTERNS)),
    )


def _text(label: str, garment: _Garment, rng: np.random.Generator) -> str:
    template = str(rng.choice(TEXT_TEMPLATES[label]))
    return template.format(
        colour=garment.colour, category=garment.category, pattern=garment.pattern
    )


def _split_names(num_posts: int, rng: np.random.Generator) -> list[str]:
    names: list[str] = []
    for split, fraction in SPLIT_FRACTIONS[:-1]:
        names += [split] * round(fraction * num_posts)
    names += [SPLIT_FRACTIONS[-1][0]] * (num_posts - len(names))
    return [names[index] for index in rng.permutation(num_posts)]


def _pseudo_record(
    post_id: str,
    text_label: str,
    garment: _Garment,
    consistent: bool,
    rng: np.random.Generator,
) -> tuple[dict, _Garment, str]:
    """Return the describe-stage record, the pictured garment and its mood's label."""
    if not consistent:
        garment = _random_garment(rng)
        text_label = str(rng.choice(LABELS))
    mood = MOOD_BY_LABEL[text_label]
    description = (
        f"A photo of a {garment.colour} {garment.pattern} {garment.category}, "
        f"{DESCRIPTION_BY_MOOD[mood]}."
    )
    record = {
        "id": post_id,
        "status": "ok",
        "image_description": description,
        "attributes": {
            "category": garment.category,
            "color": garment.colour,
            "pattern": garment.pattern,
            "mood": mood,
        },
        "prompt_hash": "synthetic",
        "model": "synthetic",
    }
    return record, garment, text_label


def write_synthetic(
    output_dir: str | pathlib.Path,
    num_posts: int = 600,
    image_size: int = 64,
    seed: int = 0,
) -> pathlib.Path:
    """Draw `num_posts` posts and their pseudo data into `output_dir`.

    Writes manifest.jsonl, images/{id}.png, pseudo/descriptions.jsonl,
    pseudo/images/{id}.png and synthetic.json (the arguments). Splits are 70%
    train, 15% val and 15% test. Returns the pseudo-data folder.
    """
    if num_posts < 3:
        raise ValueError(
            f"num_posts must be at least 3, one per split; got {num_posts}"
        )
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    root = pathlib.Path(output_dir)
    pseudo_dir = root / "pseudo"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (pseudo_dir / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    splits = _split_names(num_posts, rng)
    manifest_lines: list[str] = []
    description_lines: list[str] = []
    for index in range(num_posts):
        post_id = f"syn{index:05d}"
        label = str(rng.choice(LABELS))
        cue = str(rng.choice(CUES, p=CUE_PROBABILITIES))
        garment = _random_garment(rng)
        text_label = label if cue == "text" else "neutral"
        image_label = label if cue == "image" else "neutral"
        fit_label = label if cue == "attributes" else "neutral"

        draw_post_image(garment, image_label, image_size, rng).save(
            root / "images" / f"{post_id}.png"
        )
        attributes = {
            "category": garment.category,
            "color": garment.colour,
            "pattern": garment.pattern,
            "style": str(rng.choice(STYLES)),
            "fit": FIT_BY_LABEL[fit_label],
        }

        draw = rng.uniform()
        if draw < FAILED_DESCRIPTION_FRACTION:
            pseudo = "failed"
            description_lines.append(
                json.dumps({"id": post_id, "status": "failed", "reason": "synthetic"})
            )
        else:
            consistent = rng.uniform() >= INCONSISTENT_FRACTION
            record, pictured, mood_label = _pseudo_record(
                post_id, text_label, garment, consistent, rng
            )
            description_lines.append(json.dumps(record))
            if draw < FAILED_DESCRIPTION_FRACTION + MISSING_IMAGE_FRACTION:
                pseudo = "no_image"
            else:
                pseudo = "consistent" if consistent else "inconsistent"
                draw_post_image(pictured, mood_label, image_size, rng).save(
                    pseudo_dir / "images" / f"{post_id}.png"
                )

        manifest_lines.append(
            json.dumps(
                {
                    "id": post_id,
                    "text": _text(text_label, garment, rng),
                    "image": f"images/{post_id}.png",
                    "attributes": attributes,
                    "label": label,
                    "split": splits[index],
                    "metadata": {"cue": cue, "pseudo": pseudo},
                }
            )
        )

    (root / "manifest.jsonl").write_text("\n".join(manifest_lines) + "\n")
    (pseudo_dir / "descriptions.jsonl").write_text("\n".join(description_lines) + "\n")
    parameters = {"num_posts": num_posts, "image_size": image_size, "seed": seed}
    (root / PARAMETERS_FILE).write_text(json.dumps(parameters, sort_keys=True) + "\n")
    return pseudo_dir


def import_synthetic(
    input_dir: str | pathlib.Path,
    num_posts: int = 600,
    image_size: int = 64,
    seed: int = 0,
) -> ImportResult:
    """Draw a synthetic set into `input_dir` (unless it is there) and import it.

    `input_dir` must be empty, absent, or contain a set written with the same
    arguments, which is then reused as it is.

    Raises:
      FileExistsError: `input_dir` contains other files or another synthetic set.
    """
    root = pathlib.Path(input_dir)
    parameters = {"num_posts": num_posts, "image_size": image_size, "seed": seed}
    parameters_path = root / PARAMETERS_FILE
    if parameters_path.is_file():
        written = json.loads(parameters_path.read_text())
        if written != parameters:
            raise FileExistsError(
                f"{root} contains a synthetic set drawn with {written}, not "
                f"{parameters}; choose an empty input_dir"
            )
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and contains no {PARAMETERS_FILE}; the synthetic "
            "source writes its posts into input_dir, so choose an empty folder"
        )
    else:
        write_synthetic(root, num_posts=num_posts, image_size=image_size, seed=seed)

    result = import_manifest(root)
    for cue in CUES:
        result.counts[f"cue_{cue}"] = sum(
            post.metadata.get("cue") == cue for post in result.posts
        )
    return result
