"""RFC 9111 4.2 freshness and age, and 5.2 Cache-Control parsing."""

from cache import cachecontrol
from cache.cachecontrol import INVALID
from cache.freshness import (
    age_header_value,
    current_age,
    freshness_lifetime,
    is_fresh,
    serve_headers,
)
from cache.model import Policy
from tests.cache_support import POLICY, T0, http_date, stored


def test_cache_control_directives_are_case_insensitive_and_combined_across_lines():
    d = cachecontrol.parse([("Cache-Control", "Max-Age=60, PUBLIC"), ("cache-control", "no-transform")])
    assert d.seconds("max-age") == 60 and "public" in d and "no-transform" in d


def test_cache_control_accepts_quoted_arguments():
    assert cachecontrol.parse([("Cache-Control", 'max-age="30"')]).seconds("max-age") == 30


def test_cache_control_skips_malformed_members_and_keeps_the_rest():
    d = cachecontrol.parse([("Cache-Control", 'max-age=60, =oops, "junk", public')])
    assert d.seconds("max-age") == 60 and "public" in d


def test_cache_control_non_numeric_delta_is_invalid():
    assert cachecontrol.parse([("Cache-Control", "max-age=abc")]).seconds("max-age") is INVALID
    assert cachecontrol.parse([("Cache-Control", "max-age=-5")]).seconds("max-age") is INVALID


def test_cache_control_huge_delta_is_capped_at_2_pow_31():
    assert cachecontrol.parse([("Cache-Control", "max-age=99999999999999")]).seconds("max-age") == 2**31


def test_cache_control_qualified_no_cache_lists_field_names():
    d = cachecontrol.parse([("Cache-Control", 'no-cache="Set-Cookie, X-Foo"')])
    assert d.field_names("no-cache") == {"set-cookie", "x-foo"}


def test_pragma_no_cache_counts_only_without_cache_control():
    assert "no-cache" in cachecontrol.request_directives([("Pragma", "no-cache")])
    assert "no-cache" not in cachecontrol.request_directives([("Pragma", "no-cache"), ("Cache-Control", "max-age=5")])


def test_s_maxage_wins_over_max_age_in_a_shared_cache():
    s = stored([("Cache-Control", "max-age=10, s-maxage=100")])
    assert freshness_lifetime(s, POLICY) == 100


def test_max_age_wins_over_expires():
    s = stored([("Cache-Control", "max-age=10"), ("Expires", http_date(T0 + 1000))])
    assert freshness_lifetime(s, POLICY) == 10


def test_expires_minus_date_gives_the_lifetime():
    s = stored([("Expires", http_date(T0 + 300))])
    assert freshness_lifetime(s, POLICY) == 300


def test_expires_without_date_uses_the_time_of_receipt():
    s = stored([("Expires", http_date(T0 + 300))], date=False)
    assert freshness_lifetime(s, POLICY) == 300


def test_invalid_expires_means_already_expired():
    s = stored([("Expires", "0"), ("Last-Modified", http_date(T0 - 10000))])
    assert freshness_lifetime(s, POLICY) == 0
    assert not is_fresh(s, T0, POLICY)


def test_conflicting_duplicate_expires_means_stale():
    s = stored([("Expires", http_date(T0 + 100)), ("Expires", http_date(T0 + 200))])
    assert freshness_lifetime(s, POLICY) == 0


def test_duplicated_max_age_makes_the_response_stale():
    s = stored([("Cache-Control", "max-age=60"), ("Cache-Control", "max-age=3600")])
    assert freshness_lifetime(s, POLICY) == 0


def test_malformed_max_age_makes_the_response_stale_even_with_expires():
    s = stored([("Cache-Control", "max-age=soon"), ("Expires", http_date(T0 + 500))])
    assert freshness_lifetime(s, POLICY) == 0


def test_heuristic_freshness_is_ten_percent_of_the_time_since_last_modified():
    s = stored([("Last-Modified", http_date(T0 - 10000))])
    assert freshness_lifetime(s, POLICY) == 1000


def test_heuristic_fraction_is_configurable_and_capped():
    s = stored([("Last-Modified", http_date(T0 - 10_000_000))])
    assert freshness_lifetime(s, Policy(heuristic_fraction=0.5, heuristic_max=3600)) == 3600
    assert freshness_lifetime(s, Policy(heuristic_fraction=0.0001, heuristic_max=1e9)) == 1000


def test_no_heuristic_freshness_when_explicit_freshness_is_present():
    s = stored([("Last-Modified", http_date(T0 - 10000)), ("Cache-Control", "max-age=0")])
    assert freshness_lifetime(s, POLICY) == 0


def test_no_heuristic_freshness_for_a_status_not_heuristically_cacheable():
    s = stored([("Last-Modified", http_date(T0 - 10000))], status=302)
    assert freshness_lifetime(s, POLICY) == 0


def test_heuristic_freshness_for_any_status_marked_public():
    s = stored([("Last-Modified", http_date(T0 - 10000)), ("Cache-Control", "public")], status=302)
    assert freshness_lifetime(s, POLICY) == 1000


def test_no_heuristic_freshness_without_last_modified():
    assert freshness_lifetime(stored([]), POLICY) == 0


def test_current_age_adds_resident_time():
    s = stored([("Cache-Control", "max-age=60")])
    assert current_age(s, T0 + 25) == 25


def test_current_age_uses_apparent_age_from_an_old_date():
    s = stored([("Date", http_date(T0 - 40))])
    assert current_age(s, T0) == 40


def test_current_age_uses_age_header_plus_response_delay():
    s = stored([("Age", "30")], delay=2)
    assert current_age(s, T0 + 10) == 42


def test_age_header_list_uses_first_member_and_invalid_age_is_ignored():
    assert current_age(stored([("Age", "30, 50")]), T0) == 30
    assert current_age(stored([("Age", "thirty")]), T0) == 0


def test_response_is_stale_once_age_reaches_lifetime():
    s = stored([("Cache-Control", "max-age=60")])
    assert is_fresh(s, T0 + 59, POLICY)
    assert not is_fresh(s, T0 + 60, POLICY)


def test_age_header_value_is_whole_seconds():
    s = stored([("Cache-Control", "max-age=60"), ("Age", "5")])
    assert age_header_value(s, T0 + 10.7) == "15"


def test_served_headers_replace_the_stored_age():
    s = stored([("Cache-Control", "max-age=60"), ("Age", "5")])
    out = serve_headers(s, T0 + 10)
    assert [v for k, v in out if k == "Age"] == ["15"]
    assert sum(1 for k, _ in out if k.lower() == "age") == 1
