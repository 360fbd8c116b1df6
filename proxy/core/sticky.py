"""Sticky splits: deterministic weighted rendezvous hashing.

A sticky key (a header or cookie value) is mapped to an upstream so that the same key gets the
same upstream in every worker, process and proxy instance, for as long as the weights are the
same, and so that a weight change moves as few keys as a stateless scheme can (docs/routing.md
has the guarantee, its limits and the proof of those limits).

Each (upstream, key) pair gets a uniform number `u` in (0, 1) from a 64-bit BLAKE2b digest; the
upstream with the largest `w / -ln(u)` wins. `-ln(u)` is exponentially distributed, so an
upstream wins with probability `w / sum(w)`, and raising one weight only ever raises that
upstream's own score: keys can move towards it, never away from it.

This module must never use Python's `hash()` (it is seeded per process) and never import
anything that does I/O or reads time or randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from math import log
from typing import Final

# The top 52 bits h of the digest give x = (h + 0.5) * 2**-52, computed exactly: never 0 (the
# logarithm would be -inf) and never 1 (the score would be infinite).
_SCALE: Final = 2.0**-52
_SEP: Final = b"\x00"


def key_unit(key: str, salt: str) -> float:
    """A number in the open interval (0, 1), uniform over keys and stable everywhere.

    It depends only on `salt` and `key` (as UTF-8), never on the process or its hash seed.
    `salt` must not contain a NUL character (it separates salt from key).
    """
    data = salt.encode("utf-8", "surrogatepass") + _SEP + key.encode("utf-8", "surrogatepass")
    digest = blake2b(data, digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) * _SCALE


def choose(key: str, upstreams: Sequence[str], weights: Sequence[float]) -> str:
    """The upstream that `key` sticks to under these weights.

    Only upstreams with a weight > 0 can be chosen; a tie goes to the earlier one. The salt of
    each score is the upstream's name alone (not the route), so a user lands in the same cohort
    on every route that has the same split. Raises ValueError when no weight is > 0 or the
    sequences differ in length.
    """
    suffix = _SEP + key.encode("utf-8", "surrogatepass")
    best: str | None = None
    best_score = -1.0  # every real score is > 0
    # key_unit is inlined here: this loop runs once per upstream on every sticky request.
    for name, weight in zip(upstreams, weights, strict=True):
        if weight > 0.0:
            digest = blake2b(name.encode() + suffix, digest_size=8).digest()
            score = weight / -log(((int.from_bytes(digest, "big") >> 12) + 0.5) * _SCALE)
            if score > best_score:
                best = name
                best_score = score
    if best is None:
        raise ValueError("no upstream has a weight > 0")
    return best


# Sticky keys repeat (a user sends many requests), and a choice depends only on the key and the
# split: a bounded memo of `choose` spares ~2 us of hashing per request on a hit. It is a pure
# function's memo, so it can never make two workers or two calls disagree.
MEMO_SIZE: Final = 4096


class ChoiceMemo:
    """`choose` for one split's upstreams and weights, remembered for up to MEMO_SIZE keys.

    Each compiled split owns one (the table stays a value: the memo only saves work). When it
    is full it starts over, which costs one `choose` per key again and nothing else.
    """

    __slots__ = ("_memo", "upstreams", "weights")

    def __init__(self, upstreams: tuple[str, ...], weights: tuple[float, ...]) -> None:
        self.upstreams = upstreams
        self.weights = weights
        self._memo: dict[str, str] = {}

    def choose(self, key: str) -> str:
        """The upstream `key` sticks to (as `choose(key, upstreams, weights)`)."""
        memo = self._memo
        chosen = memo.get(key)
        if chosen is None:
            chosen = choose(key, self.upstreams, self.weights)
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[key] = chosen
        return chosen
