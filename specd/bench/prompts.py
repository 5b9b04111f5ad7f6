"""The benchmark's prompt set: held-out chat requests grouped by category.

specd/data/bench_prompts.jsonl holds one object per line: an "id", a "category" and the chat
"messages". The categories differ in how predictable the answer is for a draft: code and
extraction (answers that copy spans of the prompt) accept more draft tokens than open chat or
creative writing. Prompts of the category "warmup" are used only to warm up before measuring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specd.core.errors import InvalidArgument

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "bench_prompts.jsonl"
CATEGORIES = ("chat", "code", "extraction", "creative")
WARMUP = "warmup"


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def read_prompts(path: Path = PROMPTS_PATH) -> list[BenchPrompt]:
    prompts: list[BenchPrompt] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = tuple((m["role"], m["content"]) for m in row["messages"])
            prompts.append(BenchPrompt(id=str(row["id"]), category=str(row["category"]), messages=messages))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{path}:{number}: expected id, category and messages ({exc})") from exc
    return prompts


@dataclass(frozen=True)
class PromptSet:
    measured: list[BenchPrompt]  # category by category, in CATEGORIES order
    warmup: BenchPrompt

    @property
    def categories(self) -> list[str]:
        return [c for c in CATEGORIES if any(p.category == c for p in self.measured)]

    def first_of_each(self, count: int) -> list[BenchPrompt]:
        """The first `count` prompts of every category (for the sections that use a subset)."""
        return [p for c in self.categories for p in [q for q in self.measured if q.category == c][:count]]


def load_prompt_set(per_category: int, path: Path = PROMPTS_PATH) -> PromptSet:
    """The first `per_category` prompts of each category, and the warm-up prompt."""
    if per_category < 1:
        raise InvalidArgument(f"prompts per category must be at least 1, got {per_category}")
    prompts = read_prompts(path)
    measured: list[BenchPrompt] = []
    for category in CATEGORIES:
        chosen = [p for p in prompts if p.category == category][:per_category]
        if len(chosen) < per_category:
            raise InvalidArgument(f"{path} has {len(chosen)} {category} prompts, fewer than the {per_category} asked for")
        measured += chosen
    warmups = [p for p in prompts if p.category == WARMUP]
    if not warmups:
        raise InvalidArgument(f"{path} has no prompt of category {WARMUP!r}")
    return PromptSet(measured=measured, warmup=warmups[0])
