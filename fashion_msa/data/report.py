"""The build report: what a dataset build wrote, skipped and dropped, and why."""

import collections
import dataclasses
import json
import pathlib
from typing import Any

from fashion_msa.data.posts import Skip

REPORT_JSON = "build_report.json"
REPORT_TEXT = "build_report.txt"


@dataclasses.dataclass
class BuildReport:
    """Everything a build did with its input.

    Attributes:
      source: the builder config (manifest, fashion_senti, mvsa_single,
        synthetic).
      input_dir, pseudo_dir: where the posts and the pseudo data came from.
      dataset_dir: the finished TFDS dataset folder.
      strict: whether a skip would have failed the build.
      max_pixels: the pixel limit applied to every image.
      split_sizes: posts written per split.
      pseudo_sizes: posts written with pseudo data, per split.
      import_counts: the importer's counts (e.g. conflicts, gb18030_texts).
      skipped: posts left out as bad input, with reasons.
      dropped: posts the source's rules exclude (e.g. MVSA label conflicts).
      pseudo_counts: counts from the pseudo-data folder and the join.
      pseudo_problems: unusable pseudo lines and images; those posts are kept
        with has_pseudo False.
      build_seconds: wall time of reading, checking and writing.
    """

    source: str
    input_dir: str
    pseudo_dir: str | None
    dataset_dir: str
    strict: bool
    max_pixels: int | None
    split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    pseudo_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    import_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    dropped: list[Skip] = dataclasses.field(default_factory=list)
    pseudo_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    pseudo_problems: list[Skip] = dataclasses.field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped posts per reason."""
        return dict(collections.Counter(str(skip.reason) for skip in self.skipped))

    @property
    def drop_counts(self) -> dict[str, int]:
        """Dropped posts per reason."""
        return dict(collections.Counter(str(skip.reason) for skip in self.dropped))

    def to_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        for key in ("skipped", "dropped", "pseudo_problems"):
            result[key] = [
                {"id": skip.id, "reason": str(skip.reason), "detail": skip.detail}
                for skip in getattr(self, key)
            ]
        result["skip_counts"] = self.skip_counts
        result["drop_counts"] = self.drop_counts
        return result

    def format_text(self, max_listed: int | None = None) -> str:
        """Format the report as text, listing at most `max_listed` problems per kind."""
        total = sum(self.split_sizes.values())
        lines = [
            f"Dataset {self.source} built in {self.build_seconds:.1f} s: "
            f"{self.dataset_dir}",
            f"  input: {self.input_dir}",
            f"  pseudo data: {self.pseudo_dir or 'none'}",
            f"  posts written: {total} "
            + "("
            + ", ".join(f"{split} {size}" for split, size in self.split_sizes.items())
            + ")",
            "  posts with pseudo data: "
            + ", ".join(f"{split} {size}" for split, size in self.pseudo_sizes.items()),
            "  importer counts: "
            + ", ".join(f"{key} {value}" for key, value in self.import_counts.items()),
        ]
        if self.pseudo_counts:
            lines.append(
                "  pseudo-data counts: "
                + ", ".join(
                    f"{key} {value}" for key, value in self.pseudo_counts.items()
                )
            )
        lines.append(
            f"  dropped by source rules: {len(self.dropped)}"
            + "".join(f", {reason} {n}" for reason, n in self.drop_counts.items())
        )
        lines.append(
            f"  skipped: {len(self.skipped)}"
            + "".join(f", {reason} {n}" for reason, n in self.skip_counts.items())
        )
        for title, problems in (
            ("Skipped posts", self.skipped),
            (
                "Pseudo-data problems (posts kept without pseudo data)",
                self.pseudo_problems,
            ),
        ):
            if not problems:
                continue
            lines.append(f"{title}:")
            shown = problems if max_listed is None else problems[:max_listed]
            lines.extend(f"  {problem}" for problem in shown)
            if len(shown) < len(problems):
                lines.append(
                    f"  ... and {len(problems) - len(shown)} more in {REPORT_JSON}"
                )
        return "\n".join(lines)

    def write(self, directory: str | pathlib.Path) -> None:
        """Write build_report.json and build_report.txt into `directory`."""
        directory = pathlib.Path(directory)
        (directory / REPORT_JSON).write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        (directory / REPORT_TEXT).write_text(
            self.format_text() + "\n", encoding="utf-8"
        )


def read_report(dataset_dir: str | pathlib.Path) -> dict[str, Any]:
    """Load build_report.json from a dataset folder."""
    return json.loads(
        (pathlib.Path(dataset_dir) / REPORT_JSON).read_text(encoding="utf-8")
    )
