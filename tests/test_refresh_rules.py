"""cache.refresh: the pure rules of active refresh, with the clock as a parameter."""

from __future__ import annotations

import pytest

from cache import refresh as r
from cache.model import Policy, StoredResponse

T0 = 1_000_000.0
POLICY = Policy()
S = r.Settings(window=0.1, min_window=5.0, popularity_window=600.0, min_hits=2, max_per_second=5.0,
               max_concurrent=2, max_client_rate=200.0, max_upstream_fetches=32, interval=1.0)


def stored(cc: str = "max-age=100", etag: str | None = '"v1"', size: int = 1000, status: int = 200,
           fetch: float = 0.0, extra: list[tuple[str, str]] | None = None) -> StoredResponse:
    headers = [("Cache-Control", cc)] if cc else []
    if etag:
        headers.append(("ETag", etag))
    headers += extra or []
    return StoredResponse(status, "OK", headers, T0 - fetch, T0, (), size)


# --- popularity -------------------------------------------------------------------------------


def test_first_sample_of_an_old_row_seeds_one_recent_use_not_the_all_time_count():
    pop, new = r.observe(None, 5000, T0 - 1, T0 - 9000, T0, 600)
    assert (pop.hits(T0, 600), new) == (1, 0)


def test_first_sample_of_a_row_stored_within_the_window_counts_all_its_uses():
    pop, _ = r.observe(None, 7, T0 - 1, T0 - 30, T0, 600)
    assert pop.hits(T0, 600) == 7


def test_a_row_never_used_seeds_no_popularity():
    pop, _ = r.observe(None, 0, T0, T0, T0, 600)
    assert pop.hits(T0, 600) == 0


def test_new_uses_add_up_within_the_window():
    pop, _ = r.observe(None, 3, T0, T0 - 5000, T0, 600)
    pop, new = r.observe(pop, 7, T0 + 300, T0 - 5000, T0 + 300, 600)
    assert new == 4 and pop.hits(T0 + 300, 600) == 5


def test_hits_older_than_the_popularity_window_no_longer_count():
    pop, _ = r.observe(None, 0, T0, T0 - 5000, T0, 600)
    pop, _ = r.observe(pop, 4, T0 + 10, T0 - 5000, T0 + 10, 600)
    pop, _ = r.observe(pop, 6, T0 + 500, T0 - 5000, T0 + 500, 600)
    assert pop.hits(T0 + 500, 600) == 6
    assert pop.hits(T0 + 700, 600) == 2  # the first four are more than a window old
    assert pop.hits(T0 + 1200, 600) == 0


def test_buckets_stay_few_however_many_samples():
    pop, _ = r.observe(None, 0, T0, T0 - 5000, T0, 600)
    for i in range(1, 2000):
        pop, _ = r.observe(pop, i, T0 + i, T0 - 5000, T0 + i, 600)
    assert len(pop.buckets) <= r.BUCKETS + 1
    assert 540 <= pop.hits(T0 + 1999, 600) <= 660


def test_a_replaced_row_counts_its_uses_from_zero():
    pop = r.Popularity((), 40, T0 - 100, T0)
    pop2, new = r.observe(pop, 3, T0 + 1, T0 + 0.5, T0 + 1, 600)
    assert new == 3 and pop2.count == 3 and pop2.stored_at == T0 + 0.5


def test_a_use_taken_back_is_not_a_reset():
    pop = r.Popularity(((T0, 2),), 40, T0 - 100, T0)
    pop2, new = r.observe(pop, 39, T0 + 1, T0 - 100, T0 + 1, 600)
    assert new == 0 and pop2.hits(T0 + 1, 600) == 2


def test_a_key_is_forgotten_only_long_after_its_last_hit():
    pop = r.Popularity(((T0, 2),), 40, T0 - 100, T0)
    assert not r.forgettable(pop, T0 + 700, 600)  # no recent hits, but seen recently
    assert r.forgettable(pop, T0 + 1300, 600)
    assert not r.forgettable(r.Popularity(((T0 + 1250, 1),), 41, T0 - 100, T0), T0 + 1300, 600)


# --- window and eligibility -------------------------------------------------------------------


@pytest.mark.parametrize(("lifetime", "expected"), [(3600, 360.0), (20, 5.0), (6, 3.0), (2, 1.0)])
def test_window_is_a_fraction_of_the_lifetime_at_least_min_window_at_most_half(lifetime, expected):
    assert r.refresh_window(lifetime, S) == expected


@pytest.mark.parametrize(("cc", "etag", "why"), [
    ("max-age=100, private", '"a"', "private"),
    ("max-age=100, no-cache", '"a"', "no-cache"),
    ("max-age=100, no-store", '"a"', "no-store"),
    ("max-age=100, must-revalidate", None, "must-revalidate without validators"),
    ("max-age=100, proxy-revalidate", None, "must-revalidate without validators"),
    ("max-age=0", '"a"', "no lifetime"),
    ("", None, "no lifetime"),
])
def test_objects_that_may_not_be_refreshed(cc, etag, why):
    assert r.why_not_refreshable(stored(cc, etag), POLICY) == why


@pytest.mark.parametrize(("cc", "etag"), [
    ("max-age=100", '"a"'),
    ("max-age=100", None),
    ("max-age=100, must-revalidate", '"a"'),
    ('max-age=100, no-cache="set-cookie"', None),
    ("s-maxage=100, public", None),
])
def test_objects_that_may_be_refreshed(cc, etag):
    assert r.why_not_refreshable(stored(cc, etag), POLICY) is None


def test_a_partial_response_is_never_refreshed():
    assert r.why_not_refreshable(stored(status=206), POLICY) == "status"


def test_must_revalidate_with_only_last_modified_counts_as_validated():
    s = stored("max-age=100, must-revalidate", None, extra=[("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")])
    assert r.why_not_refreshable(s, POLICY) is None


# --- candidates -------------------------------------------------------------------------------


def test_popular_object_inside_its_window_is_a_candidate():
    c = r.candidate("k", stored(), hits=5, now=T0 + 96, policy=POLICY, s=S)
    assert c is not None and c.left == pytest.approx(4) and c.window == 10


def test_popular_object_before_its_window_is_not_a_candidate_yet():
    assert r.candidate("k", stored(), hits=5, now=T0 + 89, policy=POLICY, s=S) is None


def test_unpopular_object_is_not_a_candidate():
    assert r.candidate("k", stored(), hits=1.9, now=T0 + 96, policy=POLICY, s=S) is None


def test_expired_object_is_left_to_the_passive_path():
    assert r.candidate("k", stored(), hits=50, now=T0 + 100.5, policy=POLICY, s=S) is None


def test_private_object_is_not_a_candidate_however_popular():
    assert r.candidate("k", stored("max-age=100, private"), hits=500, now=T0 + 96, policy=POLICY, s=S) is None


def test_the_original_fetch_time_stands_in_until_a_refresh_is_measured():
    slow = r.candidate("k", stored(fetch=3.0), hits=5, now=T0 + 96, policy=POLICY, s=S)
    fast = r.candidate("k", stored(fetch=3.0), hits=5, now=T0 + 96, policy=POLICY, s=S, fetch_seconds=0.0)
    assert slow is not None and fast is not None and fast.score > slow.score


# --- score ------------------------------------------------------------------------------------


def test_more_recent_hits_score_higher():
    assert r.score(10, 5, 10, 1) > r.score(3, 5, 10, 1)


def test_closer_to_expiry_scores_higher():
    assert r.score(5, 1, 10, 1) > r.score(5, 9, 10, 1)
    assert r.score(5, 0, 10, 1) == pytest.approx(2 * r.score(5, 10, 10, 1))


def test_validators_make_a_large_object_cheap():
    big = 50 << 20
    assert r.fetch_cost(big, 0.0, validators=True) == 1.0
    assert r.fetch_cost(big, 0.0, validators=False) == pytest.approx(51.0)


def test_object_with_validators_is_preferred_over_one_without():
    with_etag = r.candidate("a", stored(size=4 << 20), 5, T0 + 96, POLICY, S, 0.0)
    without = r.candidate("b", stored(etag=None, size=4 << 20), 5, T0 + 96, POLICY, S, 0.0)
    assert with_etag is not None and without is not None
    assert r.plan([without, with_etag], 1) == [with_etag]


def test_slow_origin_costs_more():
    assert r.fetch_cost(1000, 2.0, True) > r.fetch_cost(1000, 0.1, True)


def test_plan_takes_the_best_and_breaks_ties_by_expiry():
    cs = [r.Candidate("a", stored(), 5, 4, 10, 1.0), r.Candidate("b", stored(), 5, 2, 10, 1.0),
          r.Candidate("c", stored(), 9, 8, 10, 3.0)]
    assert [c.key for c in r.plan(cs, 2)] == ["c", "b"]
    assert r.plan(cs, 0) == []


# --- load and caps ----------------------------------------------------------------------------


def test_load_above_either_threshold_stops_refresh():
    assert r.load_allows(199.0, 31, S)
    assert not r.load_allows(201.0, 0, S)
    assert not r.load_allows(0.0, 32, S)


def test_rate_of_a_running_counter():
    assert r.rate(100, T0, 400, T0 + 2) == 150.0
    assert r.rate(100, T0, 400, T0) == 0.0


def test_token_bucket_caps_starts_per_second_over_time():
    b = r.TokenBucket(5.0, T0)
    assert sum(b.take(T0) for _ in range(20)) == 1  # starts with one token, no initial burst
    started = 0
    for i in range(1, 101):  # ten seconds in 0.1 s steps, trying 20 starts each step
        started += sum(b.take(T0 + i / 10) for _ in range(20))
    assert 49 <= started <= 51


def test_token_bucket_burst_is_at_most_one_second_of_rate():
    b = r.TokenBucket(3.0, T0)
    assert b.available(T0 + 3600) == 3


def test_slow_rate_below_one_per_second():
    b = r.TokenBucket(0.5, T0)
    assert b.take(T0) and not b.take(T0 + 1.0) and b.take(T0 + 2.0)


def test_slots_respect_max_concurrent():
    assert r.slots(5, 0, S) == 2
    assert r.slots(5, 2, S) == 0
    assert r.slots(1, 0, S) == 1


def test_failed_refresh_waits_before_trying_again():
    assert r.retry_after(T0, 10, 1.0) == T0 + r.FAILURE_BACKOFF_MIN
    assert r.retry_after(T0, 600, 1.0) == T0 + 200


def test_hits_produced_only_while_the_refreshed_freshness_lasts():
    done = r.Refreshed(T0, T0 + 100)
    assert r.produced_hits(done, 3, T0 + 50) == 3
    assert r.produced_hits(done, 3, T0 + 101) == 0
    assert r.produced_hits(None, 3, T0 + 50) == 0


def test_settings_from_the_config_section_ignore_unknown_keys():
    s = r.Settings.from_config({"enabled": False, "window": 0.2, "future_key": 1})
    assert (s.enabled, s.window, s.min_hits) == (False, 0.2, 2)
