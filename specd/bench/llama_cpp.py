"""llama.cpp beside specd on one stream: the same GGUF file, threads, prompts and lengths, at the same time.

`specd bench --llama-cpp PATH` runs PATH, a `llama-bench` binary (docs/weights.md says how to build
one here), on the oracle's GGUF file, once per measured prompt and pass of the greedy speed section,
right after specd's configurations ran that prompt:

    llama-bench -m FILE -t THREADS -p 0 -n 0 -pg P,N -r 1 -o json

with P the prompt's own length (after the chat template, the tokens specd's oracle takes) and N the
tokens specd's oracle alone wrote for it. `-pg` times one whole request: the prompt in one batch,
then N tokens one at a time at the context that prompt left, as specd's rows count a request.
llama-bench fills the prompt with random tokens rather than the prompt's own; a step's cost depends
on the context length, not on which tokens fill it. As for specd's configurations, the fastest of
the passes counts per prompt (other work on the machine only adds time), and the row is all output
tokens over all those requests' seconds. Each request waits for specd's workers to go quiet first
(their engines hand freed memory back a while after their last pass), so that llama.cpp runs alone
on the cores. Measuring between specd's own requests keeps the ratio a ratio of one moment: on these
shared machines llama.cpp alone generated 96 and 125 tokens per second at two moments of one day.
Once specd's stack has stopped, every prompt's request runs once more, and that run too can be the
fastest: within the benchmark, llama.cpp has measured up to 1.5 times slower than from a shell a
minute apart, for reasons not found (no other process used the cores meanwhile), and the figure
kept is the faster one.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT_SECONDS = 600


@dataclass
class LlamaCppResult:
    binary: str
    build: str  # llama.cpp's commit and build number, as llama-bench reports them
    threads: int
    requests: list[tuple[int, int, float]] = field(default_factory=list)  # per prompt: (P, N, fastest seconds)

    @property
    def tokens_per_second(self) -> float:
        """Output tokens over the requests' whole time, prompt included (as specd's rows count)."""
        seconds = sum(s for _, _, s in self.requests)
        return sum(n for _, n, _ in self.requests) / seconds if seconds else 0.0

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(p for p, _, _ in self.requests) / len(self.requests) if self.requests else 0.0


class LlamaCppRows:
    """llama.cpp's requests beside the speed section's, the fastest per prompt (`record`)."""

    def __init__(self, binary: Path, model: Path, threads: int, settle_seconds: float = 0.0):
        """settle_seconds: how long specd's workers take to go quiet after a request (their engines hand freed
        memory back once idle a while); each llama.cpp request waits that long first, so that it runs alone."""
        self.binary, self.model, self.threads = binary, model, threads
        self.settle_seconds = settle_seconds
        self.build = "?"
        self.fastest: dict[int, tuple[int, int, float]] = {}

    def record(self, index: int, prompt_tokens: int, output_tokens: int) -> None:
        """Once specd's workers are quiet, run prompt `index`'s request (blocking); keep it if the fastest so far."""
        time.sleep(self.settle_seconds)
        self._run(index, prompt_tokens, output_tokens)

    def record_again(self) -> None:
        """Every prompt's request once more (blocking), after specd's stack has stopped: nothing to wait for."""
        for index, (prompt_tokens, output_tokens, _) in sorted(self.fastest.items()):
            self._run(index, prompt_tokens, output_tokens)

    def _run(self, index: int, prompt_tokens: int, output_tokens: int) -> None:
        seconds, self.build = run_llama_request(self.binary, self.model, self.threads, prompt_tokens, output_tokens)
        kept = self.fastest.get(index)
        if kept is None or seconds < kept[2]:
            self.fastest[index] = (prompt_tokens, output_tokens, seconds)

    def result(self) -> LlamaCppResult | None:
        if not self.fastest:
            return None
        return LlamaCppResult(
            str(self.binary), self.build, self.threads, [self.fastest[i] for i in sorted(self.fastest)]
        )


def run_llama_request(binary: Path, model: Path, threads: int, prompt_tokens: int, output_tokens: int) -> tuple[float, str]:
    """Seconds llama.cpp takes for one request (a prompt, then output tokens), and its build."""
    command = [
        str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", "0",
        "-pg", f"{prompt_tokens},{output_tokens}", "-r", "1", "-o", "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {' | '.join(tail)}")
    row = next(r for r in json.loads(done.stdout) if r.get("n_prompt") == prompt_tokens and r.get("n_gen") == output_tokens)
    return row["avg_ns"] / 1e9, f"{row.get('build_commit', '?')} ({row.get('build_number', '?')})"


def gguf_file(oracle: str) -> Path | None:
    """The GGUF file behind an oracle source, or None when it is not one."""
    from specd.models.sources import resolve_source

    kind, path = resolve_source(oracle)
    return path if kind == "gguf" else None
