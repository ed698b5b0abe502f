"""One cache transaction as named steps (cache.transaction), with no socket, store or clock: what a
request leads to, and what each kind of origin answer means, for clients and refreshes alike."""

from __future__ import annotations

from cache import conditional, transaction
from cache.transaction import Answer, Fetch, Pass, Relay, Serve, Store
from tests.cache_support import POLICY, T0, http_date, req, stored

FRESH = [("Cache-Control", "max-age=60"), ("ETag", '"v1"')]


def begin(request, s, now=T0 + 1):
    return transaction.begin(request, s, now, POLICY)


def test_nothing_stored_is_an_unconditional_fetch():
    step = begin(req(), None)
    assert step == Fetch(lead=True) and not step.conditional and step.outcome == transaction.MISS


def test_fresh_is_served_and_stale_is_revalidated_with_its_validator():
    s = stored(FRESH)
    assert isinstance(begin(req(), s), Serve)
    step = begin(req(("If-None-Match", '"mine"')), s, now=T0 + 120)
    assert isinstance(step, Fetch) and step.conditional
    # the client's own conditional is replaced by ours, so the answer is storable
    assert step.request_headers([("If-None-Match", '"mine"'), ("Accept", "*/*")]) == [
        ("Accept", "*/*"), ("If-None-Match", '"v1"')]


def test_stale_while_revalidate_serves_and_revalidates_in_the_background():
    s = stored([("Cache-Control", "max-age=60, stale-while-revalidate=30"), ("ETag", '"v1"')])
    step = begin(req(), s, now=T0 + 70)
    assert isinstance(step, Serve) and step.background


def test_only_if_cached_without_a_stored_response_is_504():
    step = begin(req(("Cache-Control", "only-if-cached")), None)
    assert isinstance(step, Answer) and step.status == 504 and "only-if-cached" in step.message


def test_a_stale_head_does_not_revalidate_the_stored_get():
    assert begin(req(method="HEAD"), stored(FRESH), now=T0 + 120) == Pass()


def test_a_write_precondition_passes_through():
    assert begin(req(("If-Match", '"v1"')), stored(FRESH)) == Pass()


def after(request, fetch, status, headers, reason="OK"):
    return transaction.after_fetch(request, fetch, status, headers, reason, T0 + 100, T0 + 100, POLICY)


def test_a_storable_answer_to_a_miss_is_stored_else_relayed():
    fields = [("Date", http_date(T0 + 100)), ("Cache-Control", "max-age=60"), ("Content-Length", "3")]
    step = after(req(), Fetch(), 200, fields)
    assert isinstance(step, Store) and step.stored.status == 200 and step.outcome == transaction.MISS
    assert after(req(), Fetch(), 200, [("Cache-Control", "no-store")]) == Relay(transaction.MISS)
    assert after(req(method="HEAD"), Fetch(), 200, fields) == Relay(transaction.MISS)


def test_a_matching_304_updates_and_serves_the_stored_response():
    s = stored(FRESH)
    step = after(req(), Fetch(s), 304, [("ETag", '"v1"'), ("Cache-Control", "max-age=600")])
    assert isinstance(step, Serve) and step.outcome == conditional.UPDATE
    assert step.update is not None and ("Cache-Control", "max-age=600") in step.update.headers


def test_a_304_that_makes_the_stored_response_unstorable_updates_nothing():
    s = stored(FRESH)
    for cc in ('private="unterminated', "no-store", "private", "max-age=600;"):
        step = after(req(), Fetch(s), 304, [("ETag", '"v1"'), ("Cache-Control", cc)])
        assert isinstance(step, Serve) and step.outcome == conditional.UPDATE and step.update is None, cc
        assert ("Cache-Control", cc) in step.decision.stored.headers  # this client gets the merged answer


def test_a_304_for_another_validator_refetches_unconditionally():
    step = after(req(), Fetch(stored(FRESH)), 304, [("ETag", '"other"')])
    assert step == Fetch(None, conditional.REFETCH, lead=True) and not step.conditional


def test_a_new_200_replaces_the_stored_response():
    fields = [("Date", http_date(T0 + 100)), ("Cache-Control", "max-age=60"), ("ETag", '"v2"')]
    step = after(req(), Fetch(stored(FRESH)), 200, fields)
    assert isinstance(step, Store) and step.outcome == conditional.REPLACE


def test_an_origin_failure_is_relayed_unless_stale_may_be_served():
    s = stored(FRESH)
    assert after(req(), Fetch(s), None, None) == Relay(conditional.FORWARD_ERROR)
    assert after(req(), Fetch(s), 503, []) == Relay(conditional.FORWARD_ERROR)
    lenient = stored([("Cache-Control", "max-age=60, stale-if-error=600"), ("ETag", '"v1"')])
    step = after(req(), Fetch(lenient), None, None)
    assert isinstance(step, Serve) and step.outcome == conditional.SERVE_STALE and step.update is None


def test_a_refresh_always_revalidates_what_is_stored():
    s = stored(FRESH)
    assert transaction.refresh(s) == Fetch(s)


def test_an_interim_response_is_never_stored_nor_merged_into_the_stored_response():
    fields = [("Cache-Control", "max-age=600"), ("ETag", '"v1"'), ("Content-Length", "3")]
    s = stored(FRESH)
    for status in (100, 102, 103, 199):
        assert after(req(), Fetch(), status, fields) == Relay(transaction.MISS)
        step = after(req(), Fetch(s), status, fields)
        assert isinstance(step, Relay) and not isinstance(step, (Serve, Store))


def test_only_a_miss_whose_answer_can_be_shared_leads_a_collapsed_fetch():
    leads = [req(), req(("Content-Length", "0")), req(("Authorization", "Basic eA==")),
             req(("Cache-Control", "max-age=0"))]
    for r in leads:
        assert begin(r, None).lead, r.headers
    waits_or_fetches_alone = [
        req(("Content-Length", "100")),  # a body its client may never finish
        req(("Transfer-Encoding", "chunked")),
        req(method="HEAD"),  # a HEAD's answer is not stored
        req(("Range", "bytes=0-9")),  # forwarded as is on a miss: a 206 is not stored
        req(("If-None-Match", '"v1"')),  # likewise a 304
        req(("If-Modified-Since", http_date(T0))),
        req(("Cache-Control", "no-store")),
    ]
    for r in waits_or_fetches_alone:
        step = begin(r, None)
        assert isinstance(step, Fetch) and not step.lead, (r.method, r.headers)


def test_the_plain_hit_shortcut_agrees_with_the_full_decision():
    """plain_hit_until (the hit path's shortcut) never says HIT 200 where decide() would not, and
    says it exactly when decide() does for every response without a Vary (a Vary always takes the
    full decision, which compares the request's fields)."""
    from cache.decision import Action, decide, is_plain, plain_hit_until

    lm = http_date(T0 - 10_000)
    cases = [
        [("Cache-Control", "max-age=60")],
        [("Cache-Control", "s-maxage=30, max-age=600")],
        [("Expires", http_date(T0 + 45))],
        [("Last-Modified", lm)],  # heuristic: a tenth of its age
        [("Cache-Control", "max-age=60"), ("Age", "50")],
        [("Cache-Control", "no-cache, max-age=60")],
        [("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")],
        [("Cache-Control", "max-age=60"), ("Vary", "*")],
        [("Cache-Control", "max-age=0")],
        [("Cache-Control", "max-age=60, must-revalidate")],
    ]
    plain = req()
    assert is_plain(plain) and not is_plain(req(("Range", "bytes=0-1"))) and not is_plain(req(method="HEAD"))
    for fields in cases:
        for status in (200, 404):
            s = stored(fields, status=status)
            until = plain_hit_until(s, POLICY)
            for dt in range(0, 1200, 7):
                d = decide(plain, s, T0 + dt, POLICY)
                full = d.action is Action.HIT and d.status == 200
                shortcut = T0 + dt < until
                assert full if shortcut else True, (fields, status, dt, until)
                if not any(k == "Vary" for k, _ in fields):
                    assert shortcut == full, (fields, status, dt, until)
