"""The prefix cache's rule on its own: the longest shared prefix wins, then the
request's session label, then the most recently used; bounded by count and
bytes, least recently used out first. The engine side (reuse never changes an
answer) is in test_engine.py."""
from __future__ import annotations

import numpy as np

from anemlld.runtime.prefix_cache import PrefixCache, Session, state_nbytes


class States:
    """A new_state that counts what it made."""

    def __init__(self, state=None):
        self.made: list[Session] = []
        self.state = state

    def __call__(self) -> Session:
        self.made.append(Session(self.state() if callable(self.state) else self.state))
        return self.made[-1]


def held(tokens: list[int], made: States) -> Session:
    session = made()
    session.tokens = list(tokens)
    return session


def test_the_longest_shared_prefix_wins_over_label_and_recency():
    made = States()
    cache = PrefixCache(made, max_states=8, max_bytes=1 << 30)
    long, short = held([1, 2, 3, 4], made), held([1, 2], made)
    cache.put(long, None)
    cache.put(short, "s1")
    assert cache.take([1, 2, 3, 9], "s1") is long
    assert len(cache) == 1  # out of the pool while the request runs


def test_on_a_tie_the_requests_label_wins_then_the_most_recently_used():
    made = States()
    cache = PrefixCache(made, max_states=8, max_bytes=1 << 30)
    labelled, older, newer = held([5, 6, 7], made), held([5, 6, 8], made), held([5, 6, 9], made)
    for session, label in ((labelled, "s1"), (older, None), (newer, "s2")):
        cache.put(session, label)
    assert cache.take([5, 6, 0], "s1") is labelled
    assert cache.take([5, 6, 0], "nobody") is newer
    assert cache.take([5, 6, 0]) is older


def test_the_prompts_last_token_never_counts_as_shared_since_it_runs_again_for_its_logits():
    made = States()
    cache = PrefixCache(made, max_states=8, max_bytes=1 << 30)
    exact, longer = held([1, 2, 3], made), held([1, 2, 3, 4], made)
    cache.put(exact, "s1")
    cache.put(longer, None)  # more recent, and more tokens in common, but not more reusable
    assert cache.take([1, 2, 3], "s1") is exact
    one = held([7], made)
    cache.put(one, "s1")
    fresh = cache.take([7], "s1")  # a one-token prompt has nothing reusable: a state made for it
    assert fresh is not one and fresh is made.made[-1] and len(made.made) == 4


def cache_sessions(cache: PrefixCache) -> list[Session]:
    return [s for s, _ in cache._pool]


def test_without_a_shared_token_a_full_pool_overwrites_its_least_recently_used_state():
    made = States()
    cache = PrefixCache(made, max_states=2, max_bytes=1 << 30)
    first, second = held([1, 2], made), held([3, 4], made)
    cache.put(first)
    cache.put(second)
    got = cache.take([9, 9, 9])
    assert got is first and got.tokens == [] and len(made.made) == 2
    cache.put(got)
    assert cache_sessions(cache) == [second, first]


def test_the_pool_keeps_its_count_and_its_bytes_least_recently_used_out_first():
    made = States()
    cache = PrefixCache(made, max_states=3, max_bytes=250, state_bytes=100)
    assert cache.capacity == 2
    sessions = [held([i, i], made) for i in range(3)]
    for session in sessions:
        cache.put(session)
    assert cache_sessions(cache) == sessions[1:] and cache.bytes == 200
    assert PrefixCache(made, max_states=0, max_bytes=1 << 30).capacity == 0


def test_without_a_known_size_a_numpy_state_is_measured_and_an_opaque_one_is_counted_only():
    arrays = States(lambda: {"k": np.zeros((4, 8), np.float16), "v": np.zeros((4, 8), np.float16)})
    cache = PrefixCache(arrays, max_states=8, max_bytes=300)
    cache.put(held([1], arrays))
    assert cache.state_bytes == 128 and cache.capacity == 2
    opaque = PrefixCache(States(object), max_states=3, max_bytes=1)
    opaque.put(held([1], opaque._new_state))
    assert opaque.state_bytes is None and opaque.capacity == 3
    assert state_nbytes(np.zeros(10, np.float16)) == 20 and state_nbytes(object()) is None


def test_a_zero_state_pool_hands_out_fresh_states_and_keeps_none():
    made = States()
    cache = PrefixCache(made, max_states=0, max_bytes=1 << 30)
    session = cache.take([1, 2, 3], "s1")
    session.tokens = [1, 2, 3]
    cache.put(session, "s1")
    assert len(cache) == 0 and cache.take([1, 2, 3], "s1") is not session


def test_a_ring_state_counts_only_the_prefix_its_ring_can_continue_from():
    """Sliding-window layers keep their K/V in a ring (16 slots, window 4
    here): a state holding 40 tokens has lost positions 0..23, so a prompt
    sharing its first 26 tokens can reuse none of them (the 26th token needs
    positions 23..25), and a state holding the first 20 tokens wins with 20."""
    from anemlld.runtime.attention import Ring

    def ringed(n: int) -> Session:
        ring = Ring(16, 4)
        for pos in range(n):
            ring.write(pos, 1)
        return Session(None, list(range(n)), ring)

    made = States()
    cache = PrefixCache(made, max_states=8, max_bytes=1 << 30)
    longer, shorter = ringed(40), ringed(20)
    cache.put(longer, None)
    cache.put(shorter, None)
    prompt = list(range(26)) + [99, 98]
    assert cache.take(prompt) is shorter
    assert cache.take(list(range(30)) + [99]) is longer  # 30 >= 27: its window is held
