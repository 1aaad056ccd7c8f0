"""English-like texts made from a seed, with no data files and no network.

Sentences come from a few templates (reviews, requests, news, small talk) filled from a
built-in word list that includes people, places and organisations, so that every head
(sentiment, intent, topic, entities) sees plausible input. The same seed always gives the
same texts; a text of N words has exactly N words.
"""

from __future__ import annotations

import random

_WORDS: dict[str, tuple[str, ...]] = {
    "name": (
        "Alice", "Maria", "John", "Wei", "Fatima", "Carlos", "Priya", "Olga", "James",
        "Yuki", "Ahmed", "Sofia", "Daniel", "Grace", "Lukas", "Amara",
    ),
    "place": (
        "London", "Paris", "Tokyo", "Berlin", "Madrid", "Nairobi", "Toronto", "Sydney",
        "Chicago", "Mumbai", "Lisbon", "Seoul", "Cairo", "Boston", "Oslo", "Lima",
    ),
    "org": (
        "Google", "the United Nations", "Reuters", "Airbus", "Siemens", "the BBC",
        "Toyota", "Microsoft", "the World Bank", "Nestle", "Samsung", "NASA",
    ),
    "adj": (
        "new", "old", "great", "terrible", "quiet", "busy", "cheap", "expensive", "small",
        "large", "friendly", "slow", "fast", "strange", "beautiful", "boring", "bright",
        "cold", "warm", "famous", "local", "modern", "broken", "excellent", "awful",
    ),
    "noun": (
        "service", "hotel", "movie", "phone", "team", "market", "report", "game", "city",
        "company", "flight", "restaurant", "book", "car", "project", "meeting", "account",
        "order", "ticket", "price", "season", "storm", "election", "study", "product",
        "network", "station", "garden", "museum", "concert", "coach", "budget", "screen",
    ),
    "verb": (
        "opened", "closed", "announced", "missed", "changed", "won", "lost", "built",
        "ordered", "cancelled", "visited", "reviewed", "moved", "raised", "cut", "launched",
        "delayed", "praised", "criticised", "reported", "sold", "bought", "fixed", "shared",
    ),
    "adv": (
        "quickly", "slowly", "finally", "again", "quietly", "suddenly", "really",
        "barely", "easily", "already", "never", "often",
    ),
    "prep": ("in", "near", "at", "from", "after", "before", "during", "across", "with"),
    "feel": ("loved", "hated", "enjoyed", "liked", "regretted", "did not like"),
    "ask": ("book", "cancel", "check", "change", "find", "transfer", "reset", "track"),
    "when": ("today", "tomorrow", "tonight", "next week", "this morning", "on Friday"),
    "move": ("rose", "fell", "jumped", "dropped", "climbed", "slipped"),
    "num": ("two", "three", "five", "ten", "twelve", "forty", "a hundred", "several"),
}  # fmt: skip

_TEMPLATES: tuple[str, ...] = (
    "I {feel} the {adj} {noun} {prep} {place}, and the {noun} was {adj}.",
    "{name} {verb} a {adj} {noun} {prep} {place} {when}.",
    "Can you {ask} my {noun} for {when}?",
    "Please {ask} the {noun} {prep} {place} {adv}.",
    "Shares of {org} {move} after the {adj} {noun} {prep} {place}.",
    "{org} {verb} {num} {adj} projects {prep} {place} {when}.",
    "The {noun} {verb} {adv}, but {name} said the {noun} was {adj}.",
    "Honestly, this {noun} is {adj} and the {noun} is {adj}.",
    "{name} and {name} {verb} the {noun} {prep} the {adj} {noun}.",
    "The {adj} {noun} {prep} {place} {verb} {adv} {when}.",
)


class TextGenerator:
    """Deterministic English-like texts of a given number of words."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def sentence(self) -> str:
        """One sentence from a random template."""
        template = self._rng.choice(_TEMPLATES)
        return _fill(template, self._rng)

    def text(self, words: int) -> str:
        """A text of exactly `words` words: whole sentences, the last one cut to fit."""
        if words < 1:
            raise ValueError("a text needs at least 1 word")
        out: list[str] = []
        while len(out) < words:
            out.extend(self.sentence().split())
        out = out[:words]
        if out[-1][-1] not in ".?!":
            out[-1] = out[-1].rstrip(",") + "."
        return " ".join(out)


def _fill(template: str, rng: random.Random) -> str:
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, _, rest = part.partition("}")
        out.append(rng.choice(_WORDS[slot]))
        out.append(rest)
    text = "".join(out)
    return text[0].upper() + text[1:]
