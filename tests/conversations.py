"""Test conversations: multi-turn, system messages, non-ASCII, varied lengths."""

from __future__ import annotations

import random

_PHRASES = ["Could you explain how rainbows form?", "Sure: sunlight refracts in droplets.",
            "Grüße aus Köln, wie geht's?", "日本語で答えてください。", "Привет! Что нового?",
            "Write a haiku about reward models.", "def add(a, b):\n    return a + b",
            "I think the answer is 42, but let me check.", "No.", "🙂 Thanks, that helps a lot!",
            "The derivative of x^2 is 2x.", "Please be concise."]


def make_conversations(n: int, seed: int = 0, max_turns: int = 3) -> list[list[dict]]:
    """`n` deterministic conversations ending with an assistant message."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(_PHRASES)})
        for _ in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": " ".join(rng.choices(_PHRASES, k=rng.randint(1, 2)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(_PHRASES, k=rng.randint(1, 3)))})
        out.append(messages)
    return out
