"""ByteLRU: bounded in bytes, least recently used evicted first."""

from __future__ import annotations

from dicomweb_server.cache import ByteLRU


def test_least_recently_used_goes_first_and_size_stays_bounded() -> None:
    lru = ByteLRU(10)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # now "b" is the least recently used
    lru.put("c", b"1234")
    assert lru.get("b") is None and lru.get("a") == b"1234" and lru.get("c") == b"1234"
    assert lru.size == 8 and len(lru) == 2


def test_a_value_put_again_is_counted_once() -> None:
    lru = ByteLRU(10)
    lru.put("a", b"123456")
    lru.put("a", b"12")
    assert lru.size == 2 and lru.get("a") == b"12"


def test_a_value_larger_than_the_cache_is_not_kept_and_drops_the_old_one() -> None:
    """The old value of the key is stale once a new one is put, kept or not (a caller
    reading the key afterwards must not get the value it replaced)."""
    lru = ByteLRU(10)
    lru.put("a", b"old")
    lru.put("b", b"other")
    lru.put("a", b"x" * 11)
    assert lru.get("a") is None
    assert lru.get("b") == b"other" and lru.size == 5


def test_a_value_of_exactly_the_cache_size_is_kept() -> None:
    lru = ByteLRU(10)
    lru.put("a", b"1")
    lru.put("b", b"x" * 10)
    assert lru.get("b") == b"x" * 10 and lru.get("a") is None and lru.size == 10
