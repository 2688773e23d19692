"""The server's counters and gauges, rendered in Prometheus' text exposition format (0.0.4)."""

from __future__ import annotations

import collections
import threading
import time

RATE_WINDOW_S = 10.0


class Metrics:
    """Counts requests and tokens; the engine and the HTTP layer report, `/metrics` renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()  # by outcome
        self.tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def generated(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens += tokens
            self.steps += 1
            self._recent.append((now, tokens))
            self._trim(now)

    def finished(self, prompt_tokens: int, latency_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.latency_sum += latency_s
            self.latency_count += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps a metric name to (help, value) read at call time."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP splice_requests_total Requests answered, by outcome.",
                     "# TYPE splice_requests_total counter"]
            for outcome in sorted(self.requests):
                lines.append(f'splice_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
            scalars = [
                ("splice_generated_tokens_total", "counter", "Tokens generated.", self.tokens),
                ("splice_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                 self.prompt_tokens),
                ("splice_decode_steps_total", "counter", "Batched decode forwards run.", self.steps),
                ("splice_tokens_per_second", "gauge",
                 f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", rate),
                ("splice_request_latency_seconds_sum", "counter",
                 "Total seconds from arrival to the last token, finished requests.",
                 self.latency_sum),
                ("splice_request_latency_seconds_count", "counter", "Finished requests timed.",
                 self.latency_count),
            ]
        scalars += [(name, "gauge", text, value) for name, (text, value) in gauges.items()]
        for name, kind, text, value in scalars:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Integers exactly, floats in full precision (`%g` would round large counters)."""
    return str(value) if isinstance(value, int) else repr(float(value))
