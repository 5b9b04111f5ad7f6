"""The prompt set of `specd distill`: reading it, the held-out split, and prompts as the oracle sees them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from specd.core.errors import InvalidArgument
from specd.models.pretrained import LoadedModel

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "distill_prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    kind: str = ""

    @property
    def key(self) -> str:
        return json.dumps(self.messages, ensure_ascii=False)


def load_prompts(path: Path) -> list[Prompt]:
    """Read a JSONL prompt set: one object per line with "prompt" (a string) or "messages"
    (a list of {"role", "content"}), and an optional "kind"."""
    prompts: list[Prompt] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidArgument(f"cannot read prompts {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                messages = tuple((str(m["role"]), str(m["content"])) for m in row["messages"])
            else:
                messages = (("user", str(row["prompt"])),)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{path}:{number}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}") from exc
        prompts.append(Prompt(messages=messages, kind=str(row.get("kind", ""))))
    if not prompts:
        raise InvalidArgument(f"{path} holds no prompts")
    return prompts


def split_held_out(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic split into (training, held-out) by a hash of each prompt's text.

    The split depends on nothing but the text, so a prompt stays on its side whatever the seed,
    the order of the file, or the other prompts in it.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(f"--held-out must be in [0, 1), got {fraction}")

    def position(prompt: Prompt) -> float:
        return int(hashlib.sha256(prompt.key.encode()).hexdigest()[:12], 16) / float(1 << 48)

    train = [p for p in prompts if position(p) >= fraction]
    held_out = [p for p in prompts if position(p) < fraction]
    if fraction > 0 and not held_out and len(train) > 1:
        first = min(train, key=position)
        train.remove(first)
        held_out.append(first)
    if not train:
        raise InvalidArgument("no training prompts left after the held-out split")
    return train, held_out


def encode_prompt(loaded: LoadedModel, prompt: Prompt, max_tokens: int) -> list[int]:
    """Token ids of a prompt as the model sees it: chat template for chat models, else plain text."""
    tokenizer = loaded.tokenizer
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    return list(ids[-max_tokens:])
