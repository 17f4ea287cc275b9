"""Run summaries, token usage and cost estimates for pseudo-data generation."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

# Estimated list prices in USD per million tokens (input, output), as OpenAI
# published them in 2025. Prices change: check the current price page, or pass
# explicit prices, before trusting a cost. The Batch API costs half of these.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}
BATCH_DISCOUNT = 0.5


@dataclasses.dataclass
class Usage:
    """Token counts of one or more chat completions."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: Any) -> None:
        """Add an openai `CompletionUsage`, a usage dict, or a Usage; None adds 0."""
        if usage is None:
            return
        if isinstance(usage, Mapping):
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        else:
            self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def lookup_price(
    model: str, prices: Mapping[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """Return (input, output) USD per million tokens for `model`, or None if unknown.

    A dated snapshot such as "gpt-4o-mini-2024-07-18" takes the price of the
    longest table name it starts with.
    """
    table = PRICES_USD_PER_MTOK if prices is None else prices
    if model in table:
        return table[model]
    matches = [name for name in table if model.startswith(name + "-")]
    return table[max(matches, key=len)] if matches else None


def estimate_cost_usd(
    usage: Usage, price: tuple[float, float] | None, batch: bool = False
) -> float | None:
    """Estimate the cost of `usage` in USD; None when the price is unknown."""
    if price is None:
        return None
    cost = (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1e6
    return cost * BATCH_DISCOUNT if batch else cost


@dataclasses.dataclass
class RunSummary:
    """Outcome of one run of a stage.

    Attributes:
      stage: describe, render, rotate, color or cutout.
      total: posts (or descriptions, for render) considered.
      done: items completed by this run.
      skipped: items not attempted, by reason (already done, failed before, ...).
      failed: items that ended failed in this run, by reason.
      usage: tokens of every reply received, failed attempts included.
      cost_usd: estimated cost of `usage`; None when no price is known.
      requests: HTTP requests sent (describe) or images generated (render).
      retries: retried requests, by reason.
      notes: further facts worth printing (response format, truncations).
    """

    stage: str
    total: int = 0
    done: int = 0
    skipped: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    failed: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    usage: Usage = dataclasses.field(default_factory=Usage)
    cost_usd: float | None = None
    requests: int = 0
    retries: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def format(self) -> str:
        """Return the summary as a few lines for the terminal."""
        lines = [
            f"stage {self.stage}: {self.total} items, {self.done} done now, "
            f"{sum(self.skipped.values())} skipped, "
            f"{sum(self.failed.values())} failed"
        ]
        if self.skipped:
            lines.append(f"  skipped: {_format_counts(self.skipped)}")
        if self.failed:
            lines.append(f"  failed by reason: {_format_counts(self.failed)}")
        if self.stage == "describe":
            lines.append(
                f"  requests: {self.requests}, retries: "
                f"{_format_counts(self.retries) or 'none'}"
            )
            lines.append(
                f"  tokens: {self.usage.prompt_tokens} prompt + "
                f"{self.usage.completion_tokens} completion = "
                f"{self.usage.total_tokens}"
            )
            cost = (
                f"${self.cost_usd:.4f} (estimate)"
                if self.cost_usd is not None
                else "unknown (no price for this model; pass --price_input_per_mtok "
                "and --price_output_per_mtok)"
            )
            lines.append(f"  cost: {cost}")
        for name, value in self.notes.items():
            lines.append(f"  {name}: {value}")
        return "\n".join(lines)


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
