"""RFC 9111 4.2 freshness and age, and 5.2 Cache-Control parsing."""

import pytest

from cache import cachecontrol
from cache.cachecontrol import INVALID
from cache.freshness import (
    age_header_value,
    current_age,
    freshness_lifetime,
    is_fresh,
    serve_headers,
)
from cache.httpdate import parse_http_date
from cache.model import Policy
from tests.cache_support import POLICY, T0, http_date, stored


def test_cache_control_directives_are_case_insensitive_and_combined_across_lines():
    d = cachecontrol.parse([("Cache-Control", "Max-Age=60, PUBLIC"), ("cache-control", "no-transform")])
    assert d.seconds("max-age") == 60 and "public" in d and "no-transform" in d


def test_cache_control_accepts_quoted_arguments():
    assert cachecontrol.parse([("Cache-Control", 'max-age="30"')]).seconds("max-age") == 30


def test_cache_control_skips_malformed_members_and_keeps_the_rest():
    d = cachecontrol.parse([("Cache-Control", 'max-age=60, =oops, "junk", public')])
    assert d.seconds("max-age") == 60 and "public" in d and d.malformed


@pytest.mark.parametrize("value", [
    'private="unterminated', 'no-cache="Set-Cookie', "max-age=60;", "public; max-age=60", "max-age=",
    'private="x"y', "max-age=60 public", "max-age=6 0", "=60", '"private"', "pub/lic", "max-age=[60]",
])
def test_a_cache_control_list_that_does_not_parse_is_marked_malformed(value):
    assert cachecontrol.parse([("Cache-Control", value)]).malformed


@pytest.mark.parametrize("value", [
    "", " ", "public", "max-age=60, public", "a, , b ,", ", public", "max-age = 60", 'no-cache="a, b", x',
    'private="a\\"b"', "max-age=60,\tpublic", "foo=bar-baz.1", 'ext="quoted, with, commas"',
])
def test_a_well_formed_cache_control_list_is_not_malformed(value):
    assert not cachecontrol.parse([("Cache-Control", value)]).malformed


def test_a_malformed_member_still_counts_as_its_directive_with_an_unusable_argument():
    d = cachecontrol.parse([("Cache-Control", 'private="unterminated, max-age=60;, no-store;')])
    assert "private" in d and "no-store" in d and d.seconds("max-age") is INVALID
    assert "no-store" in cachecontrol.request_directives([("Cache-Control", "no-store;")])


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


@pytest.mark.parametrize("value", [
    "Thu, 18 Aug 50 02:01:18 GMT",  # two-digit year in the IMF-fixdate form
    "Thu 18 Aug 2050 02:01:18 GMT",  # missing comma
    "Thu, 18  Aug  2050 02:01:18 GMT",  # several spaces
    "Thu,  18 Aug 2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT",  # dashes in the date
    "Thu, 18 Aug 2050 02.01.18 GMT",  # periods in the time
    "Thu, 18 Aug 2050 2:01:18 GMT",  # one-digit hour
    "Thu, 18 Aug 2050 02:01:18 UTC",  # a zone other than GMT
    "Thu, 18 Aug 2050 02:01:18 +0000",
    "Thu, 18 Aug 2050 02:01:18",
    "Thu, 8 Aug 2050 02:01:18 GMT",  # one-digit day outside asctime
    "Thu, 31 Feb 2050 02:01:18 GMT",  # no such day
    "Thu, 18 Aug 2050 24:00:00 GMT",
    "Thursday, 18-Aug-2050 02:01:18 GMT",  # four-digit year in the RFC 850 form
    "Thu, 18-Aug-50 02:01:18 GMT",  # RFC 850 with a short day name
    "Thu Aug 18 02:01:18 50",  # asctime with a two-digit year
    "Thu Aug 18 02:01:18 2050 GMT",
    "2050-08-18T02:01:18Z",
    "1700000300",
    "0",
    "",
])
def test_an_expires_that_is_not_an_http_date_in_one_of_the_three_forms_is_already_stale(value):
    s = stored([("Cache-Control", "public"), ("Expires", value), ("Last-Modified", http_date(T0 - 10000))])
    assert parse_http_date(value) is None
    assert freshness_lifetime(s, POLICY) == 0 and not is_fresh(s, T0, POLICY)


@pytest.mark.parametrize("value", [
    "Thu, 18 Aug 2050 02:01:18 GMT",  # IMF-fixdate
    "Thursday, 18-Aug-50 02:01:18 GMT",  # RFC 850 (two-digit year: not more than 50 years ahead)
    "Thu Aug 18 02:01:18 2050",  # asctime, two-digit day
    "Thu Aug  8 02:01:18 2050",  # asctime, a space and one digit
    "THU, 18 AUG 2050 02:01:18 gmt",  # names are matched case-insensitively by a cache (RFC 9111 4.2)
])
def test_the_three_http_date_forms_give_a_future_expires_its_lifetime(value):
    expires = parse_http_date(value, now=T0)
    assert expires is not None and expires > T0
    s = stored([("Expires", value)])
    assert freshness_lifetime(s, POLICY) > 0


def test_the_three_http_date_forms_mean_the_same_instant():
    forms = ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"]
    assert {parse_http_date(f, now=T0) for f in forms} == {784111777.0}


def test_a_two_digit_year_more_than_50_years_ahead_is_in_the_past_century():
    # now = 2023 (T0): "80" would be 2080, more than 50 years ahead, so it is 1980; "70" is 2070.
    assert parse_http_date("Tuesday, 01-Jan-80 00:00:00 GMT", now=T0) == 315532800.0
    assert parse_http_date("Tuesday, 01-Jan-70 00:00:00 GMT", now=T0) == 3155760000.0
    assert parse_http_date("Friday, 01-Jan-49 00:00:00 GMT", now=T0) == 2493072000.0


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
