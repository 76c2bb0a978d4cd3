"""Signing: every signature is checked by the independent `standardwebhooks` package."""

from __future__ import annotations

import base64
import re
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay.signing import (
    SignatureError,
    generate_secret,
    new_message_id,
    sign,
    sign_all,
    verify,
)

BODY = b'{"id":"gen_123","status":"COMPLETED","data":{"url":"https://cdn.example/v.mp4"}}'


def _headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_generate_secret_is_whsec_and_32_random_bytes() -> None:
    """A secret is whsec_ + base64 of 32 bytes, different every time."""
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert len({generate_secret() for _ in range(100)}) == 100


def test_signature_matches_the_published_test_vector() -> None:
    """The signature equals the Standard Webhooks reference example byte for byte."""
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_verifies_with_standardwebhooks() -> None:
    """An independent Standard Webhooks verifier accepts the signature."""
    secret, msg_id, now = generate_secret(), new_message_id(), int(time.time())
    headers = _headers(msg_id, now, sign(secret, msg_id, now, BODY))
    assert Webhook(secret).verify(BODY, headers)["status"] == "COMPLETED"


def test_tampered_body_fails_verification() -> None:
    """Changing one byte of the body makes the signature fail."""
    secret, msg_id, now = generate_secret(), new_message_id(), int(time.time())
    headers = _headers(msg_id, now, sign(secret, msg_id, now, BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"COMPLETED", b"COMPLETEE"), headers)


def test_tampered_id_or_timestamp_fails_verification() -> None:
    """The signature covers the message id and the timestamp too."""
    secret, msg_id, now = generate_secret(), new_message_id(), int(time.time())
    signature = sign(secret, msg_id, now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, _headers(new_message_id(), now, signature))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, _headers(msg_id, now - 1, signature))


def test_wrong_secret_fails_verification() -> None:
    """A receiver holding another secret rejects the signature."""
    msg_id, now = new_message_id(), int(time.time())
    headers = _headers(msg_id, now, sign(generate_secret(), msg_id, now, BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_several_secrets_give_space_separated_signatures_each_verifying() -> None:
    """During a rotation the header carries one signature per secret; either secret verifies."""
    old, new, other = generate_secret(), generate_secret(), generate_secret()
    msg_id, now = new_message_id(), int(time.time())
    value = sign_all([old, new], msg_id, now, BODY)
    assert value.split(" ") == [sign(old, msg_id, now, BODY), sign(new, msg_id, now, BODY)]
    headers = _headers(msg_id, now, value)
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(BODY, headers)


def test_sign_all_with_one_secret_equals_sign() -> None:
    """One secret gives exactly one signature."""
    secret = generate_secret()
    assert sign_all([secret], "msg_1", 1, BODY) == sign(secret, "msg_1", 1, BODY)


def test_sign_all_refuses_no_secrets_and_a_bare_string() -> None:
    """No secrets is an error, and so is a secret passed where a list is expected."""
    with pytest.raises(ValueError):
        sign_all([], "msg_1", 1, BODY)
    with pytest.raises(TypeError):
        sign_all(generate_secret(), "msg_1", 1, BODY)


def test_secret_without_prefix_or_padding_is_accepted() -> None:
    """Bare and unpadded base64 secrets sign like their whsec_ form, as other libraries do."""
    raw = base64.b64encode(b"k" * 31).decode()  # 31 bytes: base64 ends in "="
    assert raw.endswith("=")
    expected = sign("whsec_" + raw, "msg_1", 1, BODY)
    assert sign(raw, "msg_1", 1, BODY) == expected
    assert sign("whsec_" + raw.rstrip("="), "msg_1", 1, BODY) == expected


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not*base64!", ""])
def test_malformed_secret_is_a_value_error(secret: str) -> None:
    """An empty or non-base64 secret is refused rather than used."""
    with pytest.raises(ValueError):
        sign(secret, "msg_1", 1, BODY)


def test_message_id_shape() -> None:
    """A message id is msg_ + 26 Crockford base32 characters."""
    assert re.fullmatch(r"msg_[0-9A-HJKMNP-TV-Z]{26}", new_message_id())


def test_message_ids_are_unique() -> None:
    """Ids made in a tight loop never repeat."""
    assert len({new_message_id() for _ in range(20_000)}) == 20_000


def test_message_ids_sort_by_creation_time() -> None:
    """An id made a few milliseconds later sorts after an earlier one."""
    first = new_message_id()
    time.sleep(0.005)
    assert new_message_id() > first


def test_signing_is_fast_enough_for_thousands_per_second() -> None:
    """Ten thousand signatures with one secret take well under a second."""
    secret = generate_secret()
    started = time.perf_counter()
    for attempt in range(10_000):
        sign(secret, "msg_1", attempt, BODY)
    assert time.perf_counter() - started < 1.0


# --- Verifying what the upstream signs (push hints) ----------------------------------------

UPSTREAM_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + base64.b64encode(b"another secret of thirty-two bytes").decode()


def _signed_by_library(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    from datetime import UTC, datetime

    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    return _headers(msg_id, timestamp, signature)


def test_verify_accepts_what_the_reference_library_signs() -> None:
    """A message signed by standardwebhooks verifies and yields its webhook-id."""
    now = int(time.time())
    headers = _signed_by_library(UPSTREAM_SECRET, "msg_1", now, BODY)
    assert verify([UPSTREAM_SECRET], headers, BODY, now) == "msg_1"


def test_verify_accepts_any_configured_secret() -> None:
    """During a rotation either secret verifies."""
    now = int(time.time())
    headers = _signed_by_library(OTHER_SECRET, "msg_2", now, BODY)
    assert verify([UPSTREAM_SECRET, OTHER_SECRET], headers, BODY, now) == "msg_2"
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], headers, BODY, now)


def test_verify_accepts_one_matching_signature_among_several() -> None:
    """A header with the old and the new signature verifies with either secret."""
    now = int(time.time())
    header = sign_all([OTHER_SECRET, UPSTREAM_SECRET], "msg_3", now, BODY)
    assert verify([UPSTREAM_SECRET], _headers("msg_3", now, header), BODY, now) == "msg_3"


@pytest.mark.parametrize("skew_s", [-301, 301, 10_000])
def test_verify_refuses_a_timestamp_more_than_five_minutes_away(skew_s: int) -> None:
    """Stale and future timestamps are refused even with a valid signature."""
    now = int(time.time())
    headers = _signed_by_library(UPSTREAM_SECRET, "msg_4", now + skew_s, BODY)
    with pytest.raises(SignatureError, match="5 minutes"):
        verify([UPSTREAM_SECRET], headers, BODY, now)


def test_verify_refuses_a_changed_body_id_or_timestamp() -> None:
    """The signature covers the id, the timestamp and the body."""
    now = int(time.time())
    headers = _signed_by_library(UPSTREAM_SECRET, "msg_5", now, BODY)
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], headers, BODY + b" ", now)
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], {**headers, "webhook-id": "msg_6"}, BODY, now)
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], {**headers, "webhook-timestamp": str(now - 1)}, BODY, now)


@pytest.mark.parametrize(
    "changes",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": ""},
        {"webhook-signature": ""},
        {"webhook-timestamp": "12.5"},
        {"webhook-timestamp": "-5"},
        {"webhook-timestamp": "1e9"},
        {"webhook-timestamp": "٣"},
        {"webhook-timestamp": "9" * 40},
        {"webhook-signature": "v1"},
        {"webhook-signature": "v1,"},
        {"webhook-signature": "v1,not base64!"},
        {"webhook-signature": "v2,AAAA"},
        {"webhook-signature": ",,, ,"},
    ],
)
def test_verify_refuses_malformed_headers_without_raising_anything_else(
    changes: dict[str, str],
) -> None:
    """Every malformed header is a SignatureError, never another exception."""
    now = int(time.time())
    headers = {**_signed_by_library(UPSTREAM_SECRET, "msg_7", now, BODY), **changes}
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], headers, BODY, now)


def test_verify_handles_a_body_that_is_not_utf8() -> None:
    """Bytes that are not UTF-8 are verified as bytes (and refused if unsigned)."""
    now = int(time.time())
    body = b"\xff\xfe not utf-8"
    header = sign(UPSTREAM_SECRET, "msg_8", now, body)
    assert verify([UPSTREAM_SECRET], _headers("msg_8", now, header), body, now) == "msg_8"
    with pytest.raises(SignatureError):
        verify([UPSTREAM_SECRET], _headers("msg_8", now, header), body + b"x", now)
