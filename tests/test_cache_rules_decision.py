"""The lookup decision: request directives, response directives, HEAD, ranges, conditionals,
revalidation outcomes (RFC 9111 4, 5.2; RFC 9110 13, 14; RFC 5861; RFC 8246)."""

from cache.conditional import (
    FORWARD_ERROR,
    REFETCH,
    REPLACE,
    SERVE_STALE,
    UPDATE,
    merge_304,
    revalidation_outcome,
    revalidation_request_headers,
    validation_headers,
)
from cache.decision import Action, decide, head_for, respond
from cache.model import Policy, get_one
from cache.ranges import MULTIPLE, UNSATISFIABLE, ByteRange, parse_range
from tests.cache_support import POLICY, T0, http_date, req, stored

FRESH60 = [("Cache-Control", "max-age=60"), ("ETag", '"v1"')]


def d(request, s, now=T0 + 10, policy=POLICY):
    return decide(request, s, now, policy)


def test_nothing_stored_is_a_miss():
    assert d(req(), None).action is Action.MISS


def test_fresh_stored_response_is_a_hit():
    r = d(req(), stored(FRESH60))
    assert r.action is Action.HIT and r.status == 200


def test_unsafe_method_passes_through():
    assert d(req(method="POST"), stored(FRESH60)).action is Action.PASS


def test_head_is_answered_from_a_stored_get():
    r = d(req(method="HEAD"), stored(FRESH60, body_size=1234))
    assert r.action is Action.HIT
    status, _, headers = head_for(r, T0 + 10)
    assert status == 200 and get_one(headers, "content-length") == "1234"


def test_stale_response_with_etag_is_revalidated_with_if_none_match():
    r = d(req(), stored(FRESH60 + [("Last-Modified", http_date(T0 - 100))]), now=T0 + 61)
    assert r.action is Action.REVALIDATE
    assert r.validation_headers == [("If-None-Match", '"v1"')]


def test_stale_response_without_etag_is_revalidated_with_if_modified_since():
    lm = http_date(T0 - 100)
    r = d(req(), stored([("Cache-Control", "max-age=1"), ("Last-Modified", lm)]), now=T0 + 61)
    assert r.validation_headers == [("If-Modified-Since", lm)]


def test_stale_response_without_validators_is_fetched_unconditionally():
    r = d(req(), stored([("Cache-Control", "max-age=1")]), now=T0 + 61)
    assert r.action is Action.REVALIDATE and r.validation_headers == []


def test_request_no_cache_forces_revalidation_of_a_fresh_response():
    assert d(req(("Cache-Control", "no-cache")), stored(FRESH60)).action is Action.REVALIDATE


def test_pragma_no_cache_forces_revalidation_without_cache_control():
    assert d(req(("Pragma", "no-cache")), stored(FRESH60)).action is Action.REVALIDATE


def test_response_no_cache_forces_revalidation_every_time():
    s = stored([("Cache-Control", "no-cache, max-age=600"), ("ETag", '"x"')])
    assert d(req(), s).action is Action.REVALIDATE


def test_response_no_cache_with_field_names_does_not_force_revalidation():
    s = stored([("Cache-Control", 'no-cache="X-Secret", max-age=600')])
    assert d(req(), s).action is Action.HIT


def test_request_max_age_rejects_an_older_response():
    assert d(req(("Cache-Control", "max-age=5")), stored(FRESH60)).action is Action.REVALIDATE
    assert d(req(("Cache-Control", "max-age=20")), stored(FRESH60)).action is Action.HIT


def test_request_min_fresh_requires_remaining_freshness():
    assert d(req(("Cache-Control", "min-fresh=55")), stored(FRESH60)).action is Action.REVALIDATE
    assert d(req(("Cache-Control", "min-fresh=30")), stored(FRESH60)).action is Action.HIT


def test_request_max_stale_without_value_accepts_any_staleness():
    r = d(req(("Cache-Control", "max-stale")), stored(FRESH60), now=T0 + 100000)
    assert r.action is Action.HIT


def test_request_max_stale_with_value_limits_staleness():
    s = stored(FRESH60)
    assert d(req(("Cache-Control", "max-stale=30")), s, now=T0 + 80).action is Action.HIT
    assert d(req(("Cache-Control", "max-stale=30")), s, now=T0 + 100).action is Action.REVALIDATE


def test_must_revalidate_forbids_serving_stale_even_with_max_stale():
    s = stored([("Cache-Control", "max-age=60, must-revalidate")])
    assert d(req(("Cache-Control", "max-stale")), s, now=T0 + 100).action is Action.REVALIDATE


def test_proxy_revalidate_forbids_serving_stale_in_a_shared_cache():
    s = stored([("Cache-Control", "max-age=60, proxy-revalidate")])
    assert d(req(("Cache-Control", "max-stale")), s, now=T0 + 100).action is Action.REVALIDATE


def test_s_maxage_implies_proxy_revalidate():
    s = stored([("Cache-Control", "s-maxage=60")])
    assert d(req(("Cache-Control", "max-stale")), s, now=T0 + 100).action is Action.REVALIDATE


def test_only_if_cached_miss_is_a_504():
    r = d(req(("Cache-Control", "only-if-cached")), None)
    assert r.action is Action.ONLY_IF_CACHED_MISS and r.status == 504


def test_only_if_cached_with_fresh_response_is_a_hit():
    assert d(req(("Cache-Control", "only-if-cached")), stored(FRESH60)).action is Action.HIT


def test_only_if_cached_with_stale_response_is_a_504():
    r = d(req(("Cache-Control", "only-if-cached")), stored(FRESH60), now=T0 + 100)
    assert r.action is Action.ONLY_IF_CACHED_MISS


def test_only_if_cached_with_max_stale_serves_stale():
    r = d(req(("Cache-Control", "only-if-cached, max-stale")), stored(FRESH60), now=T0 + 100)
    assert r.action is Action.HIT


def test_stale_while_revalidate_serves_stale_and_asks_for_background_revalidation():
    s = stored([("Cache-Control", "max-age=60, stale-while-revalidate=30"), ("ETag", '"e"')])
    r = d(req(), s, now=T0 + 80)
    assert r.action is Action.STALE_WHILE_REVALIDATE
    assert r.validation_headers == [("If-None-Match", '"e"')]
    assert d(req(), s, now=T0 + 95).action is Action.REVALIDATE


def test_stale_while_revalidate_is_not_used_with_must_revalidate():
    s = stored([("Cache-Control", "max-age=60, stale-while-revalidate=30, must-revalidate")])
    assert d(req(), s, now=T0 + 80).action is Action.REVALIDATE


def test_immutable_fresh_response_satisfies_a_reload_but_not_a_forced_reload():
    s = stored([("Cache-Control", "max-age=600, immutable")])
    assert d(req(("Cache-Control", "max-age=0")), s).action is Action.HIT
    assert d(req(("Cache-Control", "no-cache")), s).action is Action.REVALIDATE


def test_vary_mismatch_is_a_miss():
    s = stored(FRESH60 + [("Vary", "Accept-Encoding")], request_headers=[("Accept-Encoding", "gzip")])
    assert d(req(("Accept-Encoding", "br")), s).action is Action.MISS
    assert d(req(("Accept-Encoding", "gzip")), s).action is Action.HIT


def test_write_preconditions_go_to_the_origin():
    assert d(req(("If-Match", '"v1"')), stored(FRESH60)).action is Action.PASS


# --- client conditionals --------------------------------------------------------------------


def test_if_none_match_weak_comparison_answers_304():
    r = d(req(("If-None-Match", 'W/"v1"')), stored(FRESH60))
    assert r.action is Action.HIT and r.status == 304
    status, _, headers = head_for(r, T0 + 10)
    assert status == 304 and get_one(headers, "etag") == '"v1"' and get_one(headers, "content-length") is None


def test_if_none_match_mismatch_serves_the_full_response():
    assert d(req(("If-None-Match", '"v0", "v9"')), stored(FRESH60)).status == 200


def test_if_none_match_star_answers_304():
    assert d(req(("If-None-Match", "*")), stored(FRESH60)).status == 304


def test_if_modified_since_answers_304_when_not_modified():
    s = stored([("Cache-Control", "max-age=60"), ("Last-Modified", http_date(T0 - 100))])
    assert d(req(("If-Modified-Since", http_date(T0 - 50))), s).status == 304
    assert d(req(("If-Modified-Since", http_date(T0 - 500))), s).status == 200


def test_if_none_match_takes_precedence_over_if_modified_since():
    s = stored(FRESH60 + [("Last-Modified", http_date(T0 - 100))])
    r = d(req(("If-None-Match", '"other"'), ("If-Modified-Since", http_date(T0))), s)
    assert r.status == 200


def test_conditionals_are_not_evaluated_on_a_stored_error():
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"x"')], status=404)
    assert d(req(("If-None-Match", '"x"')), s).status == 404


# --- ranges ---------------------------------------------------------------------------------


def test_single_range_on_a_fresh_complete_object_is_a_206():
    r = d(req(("Range", "bytes=10-19")), stored(FRESH60, body_size=100))
    assert r.status == 206 and r.byte_range == ByteRange(10, 19)
    status, _, headers = head_for(r, T0 + 10)
    assert get_one(headers, "content-range") == "bytes 10-19/100" and get_one(headers, "content-length") == "10"


def test_a_stored_content_range_is_returned_like_any_other_field():
    s = stored(FRESH60 + [("Content-Range", "bytes 0-99/100")], body_size=100)
    status, _, headers = head_for(d(req(), s), T0 + 10)
    assert status == 200 and get_one(headers, "content-range") == "bytes 0-99/100"
    assert get_one(headers, "content-length") == "100"


def test_a_range_served_from_the_cache_replaces_a_stored_content_range():
    s = stored(FRESH60 + [("Content-Range", "bytes 0-99/100")], body_size=100)
    _, _, headers = head_for(d(req(("Range", "bytes=10-19")), s), T0 + 10)
    assert [v for k, v in headers if k.lower() == "content-range"] == ["bytes 10-19/100"]


def test_a_stored_416_keeps_its_content_range():
    s = stored([("Cache-Control", "max-age=60"), ("Content-Range", "bytes */5000")], status=416, body_size=0)
    status, _, headers = head_for(d(req(), s), T0 + 10)
    assert status == 416 and get_one(headers, "content-range") == "bytes */5000"


def test_suffix_and_open_ranges():
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99)
    assert parse_range("bytes=95-", 100) == ByteRange(95, 99)
    assert parse_range("bytes=90-500", 100) == ByteRange(90, 99)


def test_multiple_ranges_go_to_the_origin():
    assert parse_range("bytes=0-1, 5-6", 100) == MULTIPLE
    assert d(req(("Range", "bytes=0-1,5-6")), stored(FRESH60)).action is Action.PASS


def test_unsatisfiable_range_is_a_416():
    assert parse_range("bytes=100-", 100) == UNSATISFIABLE
    r = d(req(("Range", "bytes=500-")), stored(FRESH60, body_size=100))
    status, _, headers = head_for(r, T0 + 10)
    assert status == 416 and get_one(headers, "content-range") == "bytes */100"


def test_invalid_range_is_ignored():
    assert d(req(("Range", "bytes=z-")), stored(FRESH60)).status == 200
    assert d(req(("Range", "lines=1-2")), stored(FRESH60)).status == 200


def test_if_range_match_serves_the_range_and_mismatch_the_whole_object():
    s = stored(FRESH60, body_size=100)
    assert d(req(("Range", "bytes=0-9"), ("If-Range", '"v1"')), s).status == 206
    assert d(req(("Range", "bytes=0-9"), ("If-Range", '"v0"')), s).status == 200


def test_if_range_with_weak_etag_never_matches():
    s = stored([("Cache-Control", "max-age=60"), ("ETag", 'W/"v1"')])
    assert d(req(("Range", "bytes=0-9"), ("If-Range", 'W/"v1"')), s).status == 200


def test_range_is_ignored_for_head():
    assert d(req(("Range", "bytes=0-9"), method="HEAD"), stored(FRESH60)).status == 200


# --- revalidation ---------------------------------------------------------------------------


def test_revalidation_request_replaces_client_conditionals_and_range():
    s = stored(FRESH60)
    out = revalidation_request_headers([("Accept", "*/*"), ("If-None-Match", '"old"'), ("Range", "bytes=0-1")], s)
    assert out == [("Accept", "*/*"), ("If-None-Match", '"v1"')]


def test_304_updates_headers_and_renews_freshness_but_keeps_content_length():
    s = stored(FRESH60 + [("Content-Length", "100"), ("X-Old", "1")], body_size=100)
    o = revalidation_outcome(
        req(), s, 304,
        [("Date", http_date(T0 + 100)), ("Cache-Control", "max-age=120"), ("ETag", '"v1"'),
         ("Content-Length", "0"), ("X-Old", "2")],
        T0 + 100, T0 + 100, POLICY,
    )
    assert o.action == UPDATE
    m = o.stored
    assert get_one(m.headers, "content-length") == "100" and get_one(m.headers, "x-old") == "2"
    assert get_one(m.headers, "cache-control") == "max-age=120" and m.body_size == 100
    assert decide(req(), m, T0 + 150, POLICY).action is Action.HIT


def test_304_with_a_different_etag_means_refetch():
    o = revalidation_outcome(req(), stored(FRESH60), 304, [("ETag", '"v2"')], T0, T0, POLICY)
    assert o.action == REFETCH


def test_200_answer_to_revalidation_replaces_the_entry():
    assert revalidation_outcome(req(), stored(FRESH60), 200, [], T0, T0, POLICY).action == REPLACE


def test_5xx_serves_stale_within_stale_if_error():
    s = stored([("Cache-Control", "max-age=60, stale-if-error=100")])
    assert revalidation_outcome(req(), s, 503, [], T0 + 100, T0 + 100, POLICY).action == SERVE_STALE
    assert revalidation_outcome(req(), s, 503, [], T0 + 200, T0 + 200, POLICY).action == FORWARD_ERROR


def test_no_answer_serves_stale_only_when_the_policy_allows():
    s = stored(FRESH60)
    assert revalidation_outcome(req(), s, None, None, T0 + 100, T0 + 100, POLICY).action == FORWARD_ERROR
    lenient = Policy(serve_stale_on_error=True)
    assert revalidation_outcome(req(), s, None, None, T0 + 100, T0 + 100, lenient).action == SERVE_STALE


def test_must_revalidate_forbids_stale_on_error_even_when_the_policy_allows():
    s = stored([("Cache-Control", "max-age=60, must-revalidate, stale-if-error=999")])
    lenient = Policy(serve_stale_on_error=True)
    assert revalidation_outcome(req(), s, 502, [], T0 + 100, T0 + 100, lenient).action == FORWARD_ERROR


def test_request_stale_if_error_allows_serving_stale():
    s = stored(FRESH60)
    r = req(("Cache-Control", "stale-if-error=3600"))
    assert revalidation_outcome(r, s, 500, [], T0 + 100, T0 + 100, POLICY).action == SERVE_STALE


def test_validation_headers_prefer_etag():
    s = stored([("ETag", '"e"'), ("Last-Modified", http_date(T0))])
    assert validation_headers(s) == [("If-None-Match", '"e"')]


def test_merge_304_keeps_fields_the_304_does_not_carry():
    s = stored([("Content-Type", "image/png"), ("ETag", '"e"')])
    m = merge_304(s, [("ETag", '"e"'), ("Expires", http_date(T0 + 10))], T0 + 5, T0 + 6)
    assert get_one(m.headers, "content-type") == "image/png" and m.response_time == T0 + 6


def test_respond_after_revalidation_evaluates_client_conditionals():
    s = stored(FRESH60)
    assert respond(req(("If-None-Match", '"v1"')), s).status == 304


def test_age_header_on_served_hit():
    r = d(req(), stored(FRESH60 + [("Age", "7")]), now=T0 + 10)
    _, _, headers = head_for(r, T0 + 10)
    assert get_one(headers, "age") == "17"


def test_only_if_cached_with_request_no_cache_is_a_504():
    r = d(req(("Cache-Control", "only-if-cached, no-cache")), stored(FRESH60))
    assert r.action is Action.ONLY_IF_CACHED_MISS and r.status == 504


def test_stale_while_revalidate_is_honoured_with_s_maxage():
    s = stored([("Cache-Control", "s-maxage=60, stale-while-revalidate=30")])
    assert d(req(), s, now=T0 + 80).action is Action.STALE_WHILE_REVALIDATE


def test_serve_stale_on_error_policy_does_not_override_s_maxage():
    s = stored([("Cache-Control", "s-maxage=60")])
    lenient = Policy(serve_stale_on_error=True)
    assert revalidation_outcome(req(), s, 503, [], T0 + 100, T0 + 100, lenient).action == FORWARD_ERROR


def test_invalid_request_max_age_is_ignored():
    assert d(req(("Cache-Control", "max-age=soon")), stored(FRESH60)).action is Action.HIT


def test_expires_in_the_past_is_stale():
    s = stored([("Expires", http_date(T0 - 10)), ("ETag", '"x"')])
    assert d(req(), s, now=T0 + 1).action is Action.REVALIDATE


def test_last_modified_after_date_gives_no_heuristic_freshness():
    s = stored([("Last-Modified", http_date(T0 + 1000))])
    assert d(req(), s, now=T0 + 1).action is Action.REVALIDATE


def test_heuristically_fresh_response_is_a_hit_until_its_heuristic_lifetime():
    s = stored([("Last-Modified", http_date(T0 - 1000)), ("ETag", '"x"')])
    assert d(req(), s, now=T0 + 99).action is Action.HIT
    assert d(req(), s, now=T0 + 101).action is Action.REVALIDATE


def test_stored_204_is_served_without_content_length():
    s = stored([("Cache-Control", "max-age=60")], status=204, body_size=0)
    status, _, headers = head_for(d(req(), s), T0 + 1)
    assert status == 204 and get_one(headers, "content-length") is None


def test_head_response_with_matching_validators_freshens_the_stored_get():
    from cache.conditional import freshen_with_head

    s = stored(FRESH60 + [("Content-Length", "100")], body_size=100)
    h = [("ETag", '"v1"'), ("Content-Length", "100"), ("Cache-Control", "max-age=300"), ("Date", http_date(T0 + 100))]
    m = freshen_with_head(s, h, T0 + 100, T0 + 100)
    assert m is not None and decide(req(), m, T0 + 300, POLICY).action is Action.HIT
    assert freshen_with_head(s, [("ETag", '"v2"')], T0, T0) is None
    assert freshen_with_head(s, [("ETag", '"v1"'), ("Content-Length", "99")], T0, T0) is None
    assert freshen_with_head(s, [("Content-Length", "100")], T0, T0) is None
