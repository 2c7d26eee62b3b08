"""loupe.service pure parts: tensors, the batcher, bind/TLS rules, targets, stub regeneration."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.service.batcher import Batcher
from loupe.service.gen_protos import PACKAGE_DIR, generate
from loupe.service.server import ServeConfig, choose, is_loopback, parse_bind, parse_targets
from loupe.service.tensors import DTYPES, from_tensor, to_tensor

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_round_trip_is_bit_exact(dtype):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=3 * 5 * 2 * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = raw.view(dtype).reshape(3, 5, 2)  # every bit pattern, NaNs included
    message = to_tensor(array)
    wire = type(message).FromString(message.SerializeToString())
    back = from_tensor(wire)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_big_endian_input_travels_as_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    message = to_tensor(array)
    assert message.data == np.arange(6, dtype="<f4").tobytes()
    assert np.array_equal(from_tensor(message), array)


def test_tensor_whose_bytes_disagree_is_refused():
    message = to_tensor(np.zeros((2, 3), np.float32))
    message.shape[:] = [2, 4]
    with pytest.raises(LoupeError, match="needs 32 bytes, got 24"):
        from_tensor(message, "observations")
    message.dtype = "complex64"
    with pytest.raises(LoupeError, match="unknown dtype"):
        from_tensor(message)


def test_regenerated_stubs_equal_the_committed_ones(tmp_path):
    written = generate(tmp_path)
    assert len(written) == 3 * len(list(PACKAGE_DIR.glob("*.proto")))
    for path in written:
        committed = PACKAGE_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{path.name}: run `make protos`"


def test_bind_rules(tmp_path):
    assert parse_bind("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_bind("[::1]:50051") == ("::1", 50051)
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
    for bad in ("nope", "127.0.0.1:", "127.0.0.1:70000"):
        with pytest.raises(LoupeError, match="HOST:PORT"):
            parse_bind(bad)
    token = tmp_path / "token"
    token.write_text("x" * 32)
    with pytest.raises(LoupeError, match="without TLS and a token"):
        ServeConfig(bind="0.0.0.0:1", state_dir=str(tmp_path), token_file=str(token))
    with pytest.raises(LoupeError, match="both --tls-cert and --tls-key"):
        ServeConfig(state_dir=str(tmp_path), tls_cert="c.pem")
    ok = ServeConfig(
        bind="0.0.0.0:1",
        state_dir=str(tmp_path),
        token_file=str(token),
        tls_cert="c.pem",
        tls_key="k.pem",
    )
    assert ok.token() == "x" * 32
    token.write_text("short")
    with pytest.raises(LoupeError, match="at least 16"):
        ok.token()


def test_targets_and_action_choice():
    assert parse_targets([]) == "all"
    assert parse_targets(["value", "group:jump=1, 2"]) == ["value", ("jump", ["1", "2"])]
    with pytest.raises(LoupeError, match="group:NAME"):
        parse_targets(["group:jump"])
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], np.float32)
    assert choose(logits, greedy=True, seed=0).tolist() == [1, 0]
    a, b = choose(logits, False, seed=7), choose(logits, False, seed=7)
    assert np.array_equal(a, b)
    draws = np.stack([choose(logits, False, seed=s) for s in range(2000)])  # (S, N)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert np.allclose(np.bincount(draws[:, 0], minlength=3) / 2000, p, atol=0.04)


def _double(payloads):
    return [[2 * x for x in p] for p in payloads]


def test_batcher_groups_concurrent_requests_and_keeps_each_callers_slice():
    async def main():
        batcher = Batcher(_double, max_batch=8, max_wait_ms=50)
        replies = await asyncio.gather(*[batcher.submit([i, i], rows=2) for i in range(8)])
        await batcher.close()
        return batcher.stats, replies

    stats, replies = asyncio.run(main())
    assert [r for r, _ in replies] == [[2 * i, 2 * i] for i in range(8)]
    assert stats.requests == 8 and stats.batches == 2  # 16 rows in batches of at most 8
    assert stats.sizes == {8: 2} and stats.full == 2


def test_batcher_flushes_a_partial_batch_at_max_wait():
    async def main():
        batcher = Batcher(_double, max_batch=64, max_wait_ms=40)
        start = time.perf_counter()
        (reply, rows) = await batcher.submit([1, 2, 3], rows=3)
        waited = time.perf_counter() - start
        await batcher.close()
        return batcher.stats, reply, rows, waited

    stats, reply, rows, waited = asyncio.run(main())
    assert reply == [2, 4, 6] and rows == 3
    assert stats.timed_out == 1 and stats.full == 0
    assert stats.last_wait_s >= 0.04 and waited >= 0.04


def test_batcher_passes_errors_to_the_callers_and_goes_on():
    calls = []

    def sometimes(payloads):
        calls.append(len(payloads))
        if len(calls) == 1:
            raise ValueError("boom")
        return payloads

    async def main():
        batcher = Batcher(sometimes, max_batch=4, max_wait_ms=1)
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit("a", rows=1)
        ok = await batcher.submit("b", rows=1)
        with pytest.raises(LoupeError, match="1..4 rows"):
            await batcher.submit("c", rows=5)
        await batcher.close()
        return ok

    assert asyncio.run(main()) == ("b", 1)
