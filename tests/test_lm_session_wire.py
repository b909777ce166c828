"""Session wire messages (round trips, refusals with the request id) and the speculative
acceptance math (greedy rules; the rejection scheme reproduces the target's distribution)."""

from __future__ import annotations

import pytest
import torch

from splitinfer.errors import HTTP_STATUS, ErrorCode
from splitinfer.models.speculative import greedy_verify, next_token, probabilities, sampled_verify, verify
from splitinfer.wire.codec import pack
from splitinfer.wire.protocol import ErrorMessage, PendingRequest, ProtocolError
from splitinfer.wire.session import (
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    SessionResult,
    SessionStep,
    decode_session_reply,
    encode_session,
    read_message,
)


def test_session_lost_is_410() -> None:
    assert ErrorCode("session_lost") is ErrorCode.SESSION_LOST and HTTP_STATUS[ErrorCode.SESSION_LOST] == 410


def test_requests_and_replies_round_trip() -> None:
    opened = read_message(encode_session(SessionOpen("a", "bytelm", cut=2, temperature=0.7, seed=9, weights="ab")))
    assert opened == SessionOpen("a", "bytelm", 2, 0.7, 9, "ab")
    step = read_message(encode_session(SessionStep("b", "s", 5, tokens=[1, 2, 3], verify=2, q=torch.rand(2, 256))))
    assert isinstance(step, SessionStep) and step.tokens == [1, 2, 3] and step.verify == 2 and step.n_new == 3
    assert step.q is not None and step.q.shape == (2, 256)
    h = torch.randn(1, 4, 32)
    got = read_message(encode_session(SessionStep("c", "s", 0, hidden=h)))
    assert isinstance(got, SessionStep) and torch.equal(got.hidden, h) and got.tokens is None  # type: ignore[arg-type]
    got = read_message(encode_session(SessionStep("c", "s", 0, hidden=h, compression="fp16+zstd")))
    assert isinstance(got, SessionStep) and torch.allclose(got.hidden, h, atol=1e-2)  # type: ignore[arg-type]
    assert read_message(encode_session(SessionClose("d", "s"))) == SessionClose("d", "s")
    for reply in (SessionOpened("a", "s", "bytelm", 0, 6, 512, 256, "h"), SessionResult("b", "s", [4, 5], 9, 1, 2.5),
                  SessionClosed("d", "s"), ErrorMessage("e", ErrorCode.SESSION_LOST, "gone")):  # fmt: skip
        assert decode_session_reply(encode_session(reply)) == reply
    # the worker's reader still hands infer_requests on, undecoded
    body = pack({"v": 1, "type": "infer_request", "id": "i", "model_id": "m", "model_hash": "", "cut_id": "1",
                 "deadline_ms": None, "compression": "none", "tensors": []})  # fmt: skip
    assert isinstance(read_message(body), PendingRequest)


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"type": "session_nope"}, ErrorCode.BAD_MESSAGE),
        ({"v": 9}, ErrorCode.UNSUPPORTED_VERSION),
        ({"session": 5}, ErrorCode.BAD_MESSAGE),
        ({"position": "0"}, ErrorCode.BAD_MESSAGE),
        ({"position": True}, ErrorCode.BAD_MESSAGE),
        ({"tokens": None}, ErrorCode.BAD_MESSAGE),
        ({"tokens": [1.5]}, ErrorCode.BAD_MESSAGE),
        ({"tokens": [1] * 5000}, ErrorCode.TOO_LARGE),
        ({"verify": 65, "tokens": [1] * 70}, ErrorCode.TOO_LARGE),
        ({"verify": -1}, ErrorCode.BAD_MESSAGE),
        ({"q": {"name": "q"}, "verify": 0}, ErrorCode.BAD_MESSAGE),
        ({"hidden": [1, 2]}, ErrorCode.BAD_MESSAGE),
    ],
)
def test_bad_steps_are_refused_with_the_request_id(fields: dict, code: ErrorCode) -> None:
    d: dict[str, object] = {"v": 1, "type": "session_step", "id": "req-7", "session": "s", "position": 0, "tokens": [1]}
    d.update(fields)
    with pytest.raises(ProtocolError) as info:
        read_message(pack(d))
    assert info.value.code == code and info.value.request_id == "req-7"


def test_garbage_is_a_protocol_error() -> None:
    for body in (b"", b"\xc1", pack([1, 2]), pack({"v": 1})):
        with pytest.raises(ProtocolError):
            read_message(body)


# --------------------------------------------------------------------------- speculative math


def test_greedy_verify_accepts_the_agreeing_prefix() -> None:
    logits = torch.full((4, 8), -1.0)
    for row, best in enumerate([3, 5, 1, 6]):
        logits[row, best] = 2.0
    assert greedy_verify(logits, [3, 5, 1]) == (3, 6)  # all accepted: the bonus
    assert greedy_verify(logits, [3, 4, 1]) == (1, 5)  # the correction
    assert greedy_verify(logits, [0, 5, 1]) == (0, 3)
    assert greedy_verify(logits[:1], []) == (0, 3)
    tie = torch.zeros(2, 8)
    assert greedy_verify(tie, [0]) == (1, 0)  # ties go to the lowest id
    assert next_token(tie[0]) == 0
    assert verify(logits, [3, 5, 1], 0.0) == (3, 6)
    with pytest.raises(ValueError):
        greedy_verify(logits, [1])


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("with_q", [True, False])
def test_rejection_sampling_reproduces_the_target(with_q: bool) -> None:
    """First and second emitted tokens follow p[0] and p[1], whatever the draft."""
    v, trials = 6, 12000
    gen = torch.Generator().manual_seed(1)
    p = probabilities(torch.randn(3, v, generator=gen) * 1.5, 1.0)
    q = probabilities(torch.randn(2, v, generator=gen) * 1.5, 1.0)
    first, second = torch.zeros(v), torch.zeros(v)
    for _ in range(trials):
        if with_q:
            draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
            n, tok = sampled_verify(p, draft, q, gen)
        else:
            draft = [int(q[0].argmax()), int(q[1].argmax())]
            n, tok = sampled_verify(p, draft, None, gen)
        emitted = draft[:n] + [tok]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    critical = 25.7  # chi-square, 5 degrees of freedom, p = 1e-4
    assert _chi2(first, p[0]) < critical
    assert _chi2(second, p[1]) < critical


def test_sampling_replays_with_the_generator() -> None:
    logits = torch.randn(5, 256)
    draws = [verify(logits, [1, 2, 3, 4], 0.8, None, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert next_token(logits[0], 1.0, torch.Generator().manual_seed(4)) == next_token(logits[0], 1.0, torch.Generator().manual_seed(4))


def test_a_small_message_cannot_declare_a_huge_hidden_state() -> None:
    from splitinfer.wire.codec import encode_tensors

    entry = encode_tensors({"hidden": torch.zeros(1, 4096, 2048)}, "zstd")[0]  # 32 MiB of zeros, a few KB sent
    body = pack({"v": 1, "type": "session_step", "id": "bomb", "session": "s", "position": 0, "hidden": entry})
    assert len(body) < 64 * 1024
    with pytest.raises(ProtocolError) as info:
        read_message(body)
    assert info.value.code == ErrorCode.TOO_LARGE and info.value.request_id == "bomb"
