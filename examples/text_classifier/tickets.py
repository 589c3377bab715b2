"""Support tickets, generated: the example's data set (nothing downloaded, the same on every machine).

Four queues a help desk routes to, each ticket a sentence or two assembled from phrasings, subjects
and details of its queue, with shared filler, typos-free but varied; ``tickets(split)`` gives a
seeded 75 / 25 split of 2,000 tickets.
"""

from __future__ import annotations

import random

QUEUES = {
    "billing": (
        [
            "I was charged",
            "my invoice shows",
            "you billed me",
            "there is a refund missing for",
            "the payment failed for",
            "why did my card get charged for",
            "I need a receipt for",
            "the price doubled on",
        ],
        ["my subscription", "last month", "the annual plan", "an order I cancelled", "two licences", "the upgrade"],
        ["twice", "in the wrong currency", "after I cancelled", "without notice", "and the VAT is wrong", "again"],
    ),
    "delivery": (
        ["my parcel", "the package", "my order", "the shipment", "the courier", "the box"],
        [
            "has not arrived",
            "was left at the wrong address",
            "arrived damaged",
            "is stuck in customs",
            "shows delivered but",
            "is late by a week",
        ],
        [
            "and tracking has not moved",
            "the driver never rang",
            "the label is torn",
            "it was supposed to come friday",
            "can you resend it",
            "where is it now",
        ],
    ),
    "technical": (
        ["the app", "the website", "the sync", "the export", "the login page", "the dashboard"],
        ["crashes", "shows error 500", "freezes", "times out", "will not load", "is very slow"],
        [
            "since the last update",
            "on my phone",
            "when I upload a file",
            "in firefox",
            "every morning",
            "after I click save",
        ],
    ),
    "account": (
        ["I cannot", "please help me", "how do I", "I want to", "I forgot how to", "someone tried to"],
        [
            "reset my password",
            "change my email",
            "delete my account",
            "add a team member",
            "enable two factor",
            "merge two accounts",
        ],
        [
            "the code never comes",
            "my username is taken",
            "the link expired",
            "for security reasons",
            "before the trial ends",
            "it says access denied",
        ],
    ),
}
FILLER = ["hi", "hello", "thanks", "please", "urgent", "asap", "regards", "any update", "sorry to bother you", "ok"]
LABELS = tuple(QUEUES)
COUNT, HOLDOUT, SEED = 2000, 0.25, 0


def ticket(queue: str, rng: random.Random) -> str:
    head, middle, tail = QUEUES[queue]
    parts = [rng.choice(head), rng.choice(middle), rng.choice(tail)]
    if rng.random() < 0.5:
        parts.insert(0, rng.choice(FILLER))
    if rng.random() < 0.5:
        parts.append(rng.choice(FILLER))
    if rng.random() < 0.3:  # a word from another queue: tickets are not tidy
        other = QUEUES[rng.choice([q for q in LABELS if q != queue])]
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(other[rng.randrange(3)]))
    return " ".join(parts)


def tickets(split: str) -> tuple[list[str], list[int]]:
    """(texts, label indices) of the ``train`` or ``holdout`` split."""
    rng = random.Random(SEED)
    texts, labels = [], []
    for _ in range(COUNT):
        index = rng.randrange(len(LABELS))
        texts.append(ticket(LABELS[index], rng))
        labels.append(index)
    cut = int(COUNT * (1 - HOLDOUT))
    return (texts[:cut], labels[:cut]) if split == "train" else (texts[cut:], labels[cut:])
