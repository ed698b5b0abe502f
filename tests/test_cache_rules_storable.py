"""RFC 9111 section 3 (storing), 4.1 (Vary), 4.4 (invalidation) and the cache key."""

import pytest

from cache.invalidation import invalidated_keys
from cache.key import BadURL, cache_key
from cache.storable import headers_to_store, is_complete, is_storable, make_stored, why_not_storable
from cache.vary import matches, normalise, vary_names
from tests.cache_support import T0, req, stored

OK = [("Content-Length", "3")]


def test_get_200_without_freshness_information_is_storable_by_default():
    assert is_storable(req(), 200, OK)


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_heuristically_cacheable_statuses_are_storable(status):
    assert is_storable(req(), status, [])


@pytest.mark.parametrize("status", [302, 307, 403, 500, 503])
def test_other_statuses_need_explicit_freshness(status):
    assert not is_storable(req(), status, [])
    assert is_storable(req(), status, [("Cache-Control", "max-age=60")])
    assert is_storable(req(), status, [("Expires", "Thu, 01 Jan 2037 00:00:00 GMT")])


def test_partial_and_not_modified_responses_are_not_stored():
    assert why_not_storable(req(), 206, [("Cache-Control", "max-age=60")]) == "status"
    assert why_not_storable(req(), 304, [("Cache-Control", "max-age=60")]) == "status"


@pytest.mark.parametrize("status", [100, 101, 102, 103, 150, 199])
def test_interim_responses_are_never_stored(status):
    assert why_not_storable(req(), status, [("Cache-Control", "max-age=60, public")]) == "interim"


@pytest.mark.parametrize("value", ['private="unterminated', 'no-cache="Set-Cookie', "max-age=600;", "public; max-age=600"])
def test_a_cache_control_that_does_not_parse_is_not_stored_by_a_shared_cache(value):
    assert why_not_storable(req(), 200, [("Cache-Control", value)]) == "malformed Cache-Control"
    assert why_not_storable(req(), 200, [("Cache-Control", "max-age=600"), ("Cache-Control", value)]) \
        == "malformed Cache-Control"


def test_a_malformed_request_cache_control_does_not_stop_storing():
    assert is_storable(req(("Cache-Control", "max-age=0;")), 200, [("Cache-Control", "max-age=600")])


def test_only_get_responses_are_stored():
    assert why_not_storable(req(method="HEAD"), 200, []) == "method"
    assert why_not_storable(req(method="POST"), 200, [("Cache-Control", "max-age=60")]) == "method"


def test_response_no_store_is_not_stored():
    assert why_not_storable(req(), 200, [("Cache-Control", "max-age=60, no-store")]) == "no-store"


def test_request_no_store_prevents_storing():
    assert why_not_storable(req(("Cache-Control", "no-store")), 200, []) == "request no-store"


def test_private_is_not_stored_by_a_shared_cache_even_when_qualified():
    assert why_not_storable(req(), 200, [("Cache-Control", "private")]) == "private"
    assert why_not_storable(req(), 200, [("Cache-Control", 'private="X-User"')]) == "private"


def test_must_understand_overrides_no_store_for_understood_statuses():
    h = [("Cache-Control", "must-understand, no-store, max-age=60")]
    assert is_storable(req(), 200, h)
    assert why_not_storable(req(), 299, h) == "must-understand"


@pytest.mark.parametrize("cc", ["public", "s-maxage=60", "must-revalidate"])
def test_authorized_request_is_stored_only_with_public_s_maxage_or_must_revalidate(cc):
    r = req(("Authorization", "Basic eDp5"))
    assert why_not_storable(r, 200, []) == "authorization"
    assert is_storable(r, 200, [("Cache-Control", cc)])


def test_set_cookie_response_is_not_stored_unless_explicitly_public():
    assert why_not_storable(req(), 200, [("Set-Cookie", "sid=1")]) == "set-cookie"
    assert is_storable(req(), 200, [("Set-Cookie", "sid=1"), ("Cache-Control", "public, max-age=60")])


def test_stored_copy_never_carries_set_cookie():
    kept = headers_to_store([("Set-Cookie", "sid=1"), ("Content-Type", "text/plain")])
    assert kept == [("Content-Type", "text/plain")]


def test_stored_copy_drops_hop_by_hop_and_connection_listed_fields():
    kept = headers_to_store(
        [("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Transfer-Encoding", "chunked"),
         ("Keep-Alive", "timeout=5"), ("ETag", '"a"')]
    )
    assert kept == [("ETag", '"a"')]


def test_qualified_no_cache_fields_are_not_stored():
    kept = headers_to_store([("Cache-Control", 'no-cache="X-Secret"'), ("X-Secret", "s"), ("ETag", '"a"')])
    assert ("X-Secret", "s") not in kept and ("ETag", '"a"') in kept


def test_content_range_is_stored_like_any_other_field():
    fields = [("Content-Range", "bytes 0-2/3"), ("Content-Length", "3")]
    assert ("Content-Range", "bytes 0-2/3") in headers_to_store(fields)


def test_stored_header_names_keep_their_case():
    s = make_stored(req(), 200, "OK", [("X-MixedCase", "v")], T0, T0)
    assert s.headers == [("X-MixedCase", "v")]


def test_vary_star_is_not_stored():
    assert why_not_storable(req(), 200, [("Vary", "*")]) == "vary *"


def test_incomplete_body_is_detected_by_content_length():
    assert is_complete([("Content-Length", "10")], 10)
    assert not is_complete([("Content-Length", "10")], 9)
    assert is_complete([], 9)  # no length: complete when the transfer ended normally


# --- Vary -----------------------------------------------------------------------------------


def test_vary_names_combine_lines_and_lowercase():
    assert vary_names([("Vary", "Accept-Encoding"), ("Vary", "accept-language, Accept-Encoding")]) == [
        "accept-encoding", "accept-language",
    ]


def test_vary_matches_same_request_value():
    s = stored([("Vary", "Accept-Encoding")], request_headers=[("Accept-Encoding", "gzip")])
    assert matches(s, [("Accept-Encoding", "gzip")])
    assert not matches(s, [("Accept-Encoding", "br")])


def test_vary_normalises_whitespace_case_and_multiple_lines():
    s = stored([("Vary", "Accept-Encoding")], request_headers=[("Accept-Encoding", "gzip,  br")])
    assert matches(s, [("accept-encoding", "GZIP"), ("Accept-Encoding", " br")])


def test_vary_keeps_case_of_case_sensitive_fields():
    assert normalise([("X-Token", "Abc")], "x-token") == "Abc"


def test_vary_absent_header_differs_from_empty_header():
    s = stored([("Vary", "X-A")], request_headers=[])
    assert matches(s, [])
    assert not matches(s, [("X-A", "")])


def test_vary_star_never_matches():
    assert not matches(stored([("Vary", "*")]), [])


# --- invalidation ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "FROBNICATE"])
def test_unsafe_method_success_invalidates_the_target(method):
    assert invalidated_keys(method, "http://Example.com:80/a", 200, []) == ["http://example.com/a"]


def test_safe_methods_and_errors_do_not_invalidate():
    assert invalidated_keys("GET", "http://e.com/a", 200, []) == []
    assert invalidated_keys("POST", "http://e.com/a", 500, []) == []
    assert invalidated_keys("POST", "http://e.com/a", 404, []) == []


def test_invalidation_includes_same_origin_location_and_content_location():
    keys = invalidated_keys(
        "POST", "http://e.com/a", 201, [("Location", "/b"), ("Content-Location", "http://e.com/c?x=1")]
    )
    assert keys == ["http://e.com/a", "http://e.com/b", "http://e.com/c?x=1"]


def test_invalidation_ignores_other_origins():
    keys = invalidated_keys("PUT", "http://e.com/a", 204, [("Location", "http://other.com/b"),
                                                            ("Content-Location", "https://e.com/c")])
    assert keys == ["http://e.com/a"]


# --- cache key ------------------------------------------------------------------------------


def test_cache_key_lowercases_scheme_and_host_and_drops_default_port():
    assert cache_key("HTTP://Example.COM:80/Path?Q=A") == "http://example.com/Path?Q=A"


def test_cache_key_keeps_other_ports_and_path_bytes():
    assert cache_key("http://e.com:8080/a%2Fb/%7E") == "http://e.com:8080/a%2Fb/%7E"


def test_cache_key_empty_path_is_slash_and_fragment_is_dropped():
    assert cache_key("http://e.com") == "http://e.com/"
    assert cache_key("http://e.com/a#frag") == "http://e.com/a"
    assert cache_key("https://e.com:443/") == "https://e.com/"


def test_cache_key_rejects_relative_urls():
    with pytest.raises(BadURL):
        cache_key("/just/a/path")
