"""Stop strings over streamed text: never emit a stop string, nor a partial one that may still complete.

The held-back tail is at most (longest stop string - 1) characters, so each step costs O(delta + held).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StopResult:
    emit: str  # text safe to send now
    held: str  # tail kept back: it might be the start of a stop string
    stopped: bool  # a stop string was found; `emit` ends just before it


def apply_stop_strings(held: str, delta: str, stops: Sequence[str], *, final: bool = False) -> StopResult:
    text = held + delta
    stops = [s for s in stops if s]
    if not stops:
        return StopResult(text, "", False)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return StopResult(text[:cut], "", True)
    if final:
        return StopResult(text, "", False)
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    split = len(text) - keep
    return StopResult(text[:split], text[split:], False)
