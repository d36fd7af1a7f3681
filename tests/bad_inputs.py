"""Invalid requests and the 4xx each one must get (never a 5xx): ONE table, sent twice.

- in-process, through the ASGI app (tests/api/test_api.py::test_bad_input_gets_its_4xx, fast lane);
- over real HTTP to a `python -m app` subprocess (tests/e2e/test_reliability.py::test_bad_input_gets_its_4xx, slow
  lane), where uvicorn's own HTTP parsing is in the path too.

Both servers have an admin key and `allow_explain` off. In a body, the string "{user}" stands for a user the
checkpoint knows; in a header value, "{key}" stands for the server's admin key (see `request_for`).
"""
from __future__ import annotations

import json

BIG = "x" * 1_100_000           # past the default 1,000,000-byte body limit

# (name, path, body, extra headers, expected status). A `bytes` body is sent as it is; anything else is sent
# JSON-encoded. Every request has `content-type: application/json` unless its headers say otherwise.
BAD_INPUTS = [
    # --- bodies that are not a JSON object
    ("malformed json, cut after a key", "/recommend", b'{"user_id": "1", "k": ', {}, 422),
    ("malformed json, cut after a comma", "/recommend", b'{"user_id": "1", ', {}, 422),
    ("trailing garbage", "/recommend", b'{"user_id": "1"} x', {}, 422),
    ("not json at all", "/recommend", b"\xff\xfe\x00garbage", {}, 422),
    ("not utf-8 in a string", "/recommend", b'{"user_id": "\xff\xfe"}', {}, 422),
    ("not utf-8 in feedback", "/feedback", b'{"events": [{"user_id": "\xe9", "item_id": "1"}]}', {}, 422),
    ("lone surrogate id", "/recommend", b'{"user_id": "\\ud800"}', {}, 422),
    ("nested 100k deep", "/recommend/batch", b"[" * 100_000 + b"]" * 100_000, {}, 422),
    ("text/plain body", "/recommend", b'{"user_id": "1"}', {"content-type": "text/plain"}, 422),
    ("json array body", "/recommend", ["user_id", "1"], {}, 422),
    ("empty body", "/recommend", b"", {}, 422),
    # --- user_id
    ("missing user_id", "/recommend", {"k": 5}, {}, 422),
    ("user_id null", "/recommend", {"user_id": None}, {}, 422),
    ("user_id float", "/recommend", {"user_id": 1.5}, {}, 422),
    ("user_id list", "/recommend", {"user_id": ["1"]}, {}, 422),
    ("user_id object", "/recommend", {"user_id": {"a": 1}}, {}, 422),
    ("user_id empty", "/recommend", {"user_id": ""}, {}, 422),
    ("user_id too long", "/recommend", {"user_id": "u" * 257}, {}, 422),
    ("5000-digit integer id", "/recommend", b'{"user_id": ' + b"9" * 5000 + b"}", {}, 422),
    ("257-digit integer id", "/recommend", {"user_id": 10 ** 256}, {}, 422),
    ("257-character negative integer id", "/recommend", {"user_id": -10 ** 255}, {}, 422),
    ("257-digit integer exclude id", "/recommend", {"user_id": "1", "exclude": [10 ** 256]}, {}, 422),
    ("257-digit integer feedback item", "/feedback", {"events": [{"user_id": "1", "item_id": 10 ** 256}]}, {}, 422),
    # --- k: an integer in 1..1000, and no lax coercion (a bool, a numeric string or 5.0 is not a count)
    ("k zero", "/recommend", {"user_id": "1", "k": 0}, {}, 422),
    ("k negative", "/recommend", {"user_id": "1", "k": -5}, {}, 422),
    ("k above 1000", "/recommend", {"user_id": "1", "k": 1001}, {}, 422),
    ("k huge", "/recommend", {"user_id": "1", "k": 10**12}, {}, 422),
    ("k infinite", "/recommend", b'{"user_id": "1", "k": 1e400}', {}, 422),
    ("k NaN", "/recommend", b'{"user_id": "1", "k": NaN}', {}, 422),
    ("k string", "/recommend", {"user_id": "1", "k": "ten"}, {}, 422),
    ("k numeric string", "/recommend", {"user_id": "1", "k": "5"}, {}, 422),
    ("k fractional", "/recommend", {"user_id": "1", "k": 2.5}, {}, 422),
    ("k integral float", "/recommend", {"user_id": "1", "k": 5.0}, {}, 422),
    ("k null", "/recommend", {"user_id": "1", "k": None}, {}, 422),
    ("k bool", "/recommend", {"user_id": "1", "k": True}, {}, 422),
    # --- flags and unknown fields
    ("exclude_seen not bool", "/recommend", {"user_id": "1", "exclude_seen": "maybe"}, {}, 422),
    ("exclude_seen 0", "/recommend", {"user_id": "1", "exclude_seen": 0}, {}, 422),
    ("explain 'true'", "/recommend", {"user_id": "1", "explain": "true"}, {}, 422),
    ("explain not a bool", "/recommend", {"user_id": "1", "explain": "please"}, {}, 422),
    ("unknown field", "/recommend", {"user_id": "1", "N": 10}, {}, 422),
    ("explain disabled", "/recommend", {"user_id": "{user}", "explain": True}, {}, 403),
    # --- candidates and exclude
    ("candidates not a list", "/recommend", {"user_id": "1", "candidates": "5"}, {}, 422),
    ("empty candidates", "/recommend", {"user_id": "1", "candidates": []}, {}, 422),
    ("duplicate candidates", "/recommend", {"user_id": "1", "candidates": ["5", "9", "5"]}, {}, 422),
    ("duplicate candidates int and str", "/recommend", {"user_id": "1", "candidates": ["5", 5]}, {}, 422),
    ("oversized candidates", "/recommend", {"user_id": "1", "candidates": [str(i) for i in range(10_001)]}, {},
     422),
    ("unknown candidates", "/recommend", {"user_id": "{user}", "candidates": ["no-such-item"]}, {}, 422),
    ("unknown exclude", "/recommend", {"user_id": "{user}", "exclude": ["no-such-item"]}, {}, 422),
    ("exclude of objects", "/recommend", {"user_id": "1", "exclude": [{"id": "5"}]}, {}, 422),
    ("oversized body", "/recommend", {"user_id": "1", "exclude": [BIG]}, {}, 413),
    # --- /recommend/batch
    ("batch empty", "/recommend/batch", {"requests": []}, {}, 422),
    ("batch too many", "/recommend/batch", {"requests": [{"user_id": "1"}] * 257}, {}, 422),
    ("batch one bad", "/recommend/batch", {"requests": [{"user_id": "1"}, {"user_id": "1", "k": 0}]}, {}, 422),
    ("batch extra field", "/recommend/batch", {"requests": [{"user_id": "1"}], "k": 3}, {}, 422),
    ("batch k adds up past CMN_MAX_TOTAL_K", "/recommend/batch", {"requests": [{"user_id": "1", "k": 1000}] * 11},
     {}, 422),
    ("batch 256 users x k 1000", "/recommend/batch",
     {"requests": [{"user_id": str(u), "k": 1000} for u in range(256)]}, {}, 422),
    # --- /feedback
    ("feedback no events", "/feedback", {}, {}, 422),
    ("feedback empty events", "/feedback", {"events": []}, {}, 422),
    ("feedback missing item", "/feedback", {"events": [{"user_id": "1"}]}, {}, 422),
    ("feedback missing user", "/feedback", {"events": [{"item_id": "1"}]}, {}, 422),
    ("feedback too many events", "/feedback", {"events": [{"user_id": "1", "item_id": "2"}] * 1001}, {}, 422),
    ("feedback negative timestamp", "/feedback", {"events": [{"user_id": "1", "item_id": "2", "timestamp": -1}]},
     {}, 422),
    ("feedback NaN timestamp", "/feedback", b'{"events": [{"user_id": "1", "item_id": "2", "timestamp": NaN}]}',
     {}, 422),
    ("feedback empty event_id", "/feedback", {"events": [{"user_id": "1", "item_id": "2", "event_id": ""}]}, {},
     422),
    ("feedback oversized", "/feedback", {"events": [{"user_id": "1", "item_id": BIG}]}, {}, 413),
    ("feedback event_id reused in one request", "/feedback",
     {"events": [{"user_id": "1", "item_id": "2", "event_id": "twice"},
                 {"user_id": "1", "item_id": "3", "event_id": "twice"}]}, {}, 409),
    # --- /admin/reload (the server has a key)
    ("reload without key", "/admin/reload", {}, {}, 401),
    ("reload wrong key", "/admin/reload", {"checkpoint": "/nonexistent"}, {"X-API-Key": "wrong"}, 401),
    ("reload empty key", "/admin/reload", {}, {"X-API-Key": ""}, 401),
    ("reload wrong bearer key", "/admin/reload", {}, {"Authorization": "Bearer wrong"}, 401),
    ("reload basic auth", "/admin/reload", {}, {"Authorization": "Basic d3Jvbmc6d3Jvbmc="}, 401),
    ("reload key as bearer, bogus path", "/admin/reload", {"checkpoint": "/nonexistent/model.ckpt"},
     {"Authorization": "Bearer {key}"}, 409),
    ("reload bogus path", "/admin/reload", {"checkpoint": "/nonexistent/model.ckpt"}, {"X-API-Key": "{key}"},
     409),
    ("reload a directory", "/admin/reload", {"checkpoint": "/tmp"}, {"X-API-Key": "{key}"}, 409),
    ("reload a device", "/admin/reload", {"checkpoint": "/dev/zero"}, {"X-API-Key": "{key}"}, 409),
    ("reload outside the checkpoint dir", "/admin/reload", {"checkpoint": "/etc/passwd"}, {"X-API-Key": "{key}"},
     409),
    ("reload dot-dot out of the checkpoint dir", "/admin/reload", {"checkpoint": "../../../../../../etc/hostname"},
     {"X-API-Key": "{key}"}, 409),
    ("reload unknown field", "/admin/reload", {"path": "/tmp"}, {"X-API-Key": "{key}"}, 422),
]
IDS = [case[0] for case in BAD_INPUTS]
assert len(set(IDS)) == len(IDS), "two cases share a name"

ECHO_LIMIT = 2_000   # the answer to a large input stays small: inputs are never echoed back


def request_for(body, headers: dict, user: str, key: str) -> tuple[bytes, dict]:
    """The request's raw body and headers, placeholders filled in."""
    if isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body).replace('"{user}"', json.dumps(user)).encode()
    return content, {"content-type": "application/json",
                     **{k: v.replace("{key}", key) for k, v in headers.items()}}


def assert_rejected(name: str, expected: int, content: bytes, status: int, content_type: str, answer: bytes):
    """The documented status, a JSON body with a non-empty `detail`, and no echo of a large input."""
    assert status == expected, f"{name}: {status} (expected {expected}) {answer[:500]!r}"
    assert content_type.startswith("application/json"), (name, content_type)
    assert json.loads(answer)["detail"], (name, answer[:500])
    if expected == 413 or len(content) > 10_000:
        assert len(answer) < ECHO_LIMIT, (name, len(answer))
