"""Fuzzing the KVTC blob decoder and the page-record reader (property-based, over 10,000 cases): every
damaged, spliced, foreign or malformed input is refused with the project's error (``BlobError``, a
``KvsqueezeError``), none decodes to anything, none raises anything else or takes the process down.

Damage a store or a transfer can do (truncation, bit flips, overwritten or appended bytes, pieces of
two records spliced, random bytes) is caught by the framing and the checksum. Headers that are
well-framed and checksummed but describe nonsense (a forged record: absurd token counts, stream
lengths, positions, dtypes, ratios) are caught by the header's validation; a blob of another
calibration or model by its fingerprints."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.forward import dense_prefill
from kvsqueeze.methods.kvtc import calibrate as kvtc
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.methods.kvtc.store import pack_page, unpack_page

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=True)


def _calibration(model, seed: int, fingerprint: str | None = None) -> codec.Calibration:
    inv, sc = kvtc.rope_params(model)
    c = model.config
    b = kvtc.CalibrationBuilder(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                                inv, sc)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        b.add(dense_prefill(model, torch.randint(0, 97, (64,), generator=g))[0])
    return b.build(fingerprint or kvtc.model_fingerprint(model))


@pytest.fixture(scope="module")
def world():
    from conftest import tiny_llama

    model = tiny_llama(layers=2)
    cal = _calibration(model, 0)
    other = _calibration(model, 7)  # another calibration of the same model
    foreign = _calibration(model, 0, "0123456789abcdef")  # a calibration of another model
    g = torch.Generator().manual_seed(3)

    def kv(n):
        return ([torch.randn(2, n, 16, generator=g) for _ in range(2)],
                [torch.randn(2, n, 16, generator=g) for _ in range(2)])

    blobs = [codec.encode(cal, *kv(n), pos, r).data for n, pos, r in ((8, 0, 4.0), (12, 40, 8.0), (5, 7, 2.0))]
    records = [pack_page(cal, *kv(n), pos, 6.0, sinks=4) for n, pos in ((16, 0), (16, 16), (9, 3))]
    for b in blobs:  # the originals decode: the fuzz below damages a working input
        codec.decode(cal, b)
    for r in records:
        unpack_page(cal, r)
    return World((cal, other, foreign, blobs, records))


class World(tuple):
    """The fixture's inputs, with a short repr (hypothesis prints the arguments of a failing case)."""

    def __repr__(self) -> str:
        return "World(calibrations, blobs, records)"


def _reframe(blob: bytes, header: dict) -> bytes:
    """A blob with its header replaced (framing and checksum rebuilt: a forged, well-formed blob)."""
    (hlen,) = struct.unpack_from("<I", blob, 6)
    raw = json.dumps(header).encode()
    body = blob[:4] + blob[4:6] + struct.pack("<I", len(raw)) + raw + blob[10 + hlen:-4]
    return body + struct.pack("<I", zlib.crc32(body))


ABSURD = st.sampled_from([-1, 0, 2 ** 31, 2 ** 62, 10 ** 9, 1.5, "12", None, [], {}, float("nan")])
HEADER_FIELDS = st.sampled_from(["n_tokens", "position", "streams", "dtype", "ratio", "n_layers", "kv_heads",
                                 "head_dim"])


@st.composite
def damaged(draw, n_blobs: int):
    """One damaged input and how it was made."""
    how = draw(st.sampled_from(["truncate", "extend", "flip", "overwrite", "splice", "random", "forge"]))
    i = draw(st.integers(0, n_blobs - 1))
    return how, i, draw(st.randoms(use_true_random=False))


def _damage(how: str, data: bytes, other: bytes, rnd) -> bytes:
    n = len(data)
    if how == "truncate":
        return data[:rnd.randrange(n)]
    if how == "extend":
        return data + bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 65)))
    if how == "flip":
        out = bytearray(data)
        for _ in range(rnd.randrange(1, 17)):
            bit = rnd.randrange(n * 8)
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out) if bytes(out) != data else bytes(out[:-1])
    if how == "overwrite":
        a = rnd.randrange(n)
        b = min(n, a + rnd.randrange(1, 65))
        new = bytes(rnd.randrange(256) for _ in range(b - a))
        out = data[:a] + new + data[b:]
        return out if out != data else data[:-1]
    if how == "splice":
        cut = rnd.randrange(1, n)
        return data[:cut] + other[rnd.randrange(len(other)):]
    if how == "random":
        body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 600)))
        return (data[:4] + body) if rnd.random() < 0.5 else body
    raise AssertionError(how)


@settings(max_examples=7000, **SETTINGS)
@given(case=damaged(3), field=HEADER_FIELDS, value=ABSURD)
def test_damaged_forged_and_foreign_blobs_are_refused(world, case, field, value):
    cal, other, foreign, blobs, _ = world
    how, i, rnd = case
    data = blobs[i]
    if how == "forge":
        header = codec.read_header(data)
        new = value if field != "streams" or not isinstance(value, int) else [value] * len(header["streams"])
        # a plausible position forged into a checksummed header decodes (a checksum is no signature):
        # only values no encoder writes are asked to be refused
        assume(new != header[field] and not (field == "position" and isinstance(new, int)
                                             and not isinstance(new, bool) and 0 <= new <= codec.MAX_POSITION))
        header[field] = new
        bad = _reframe(data, header)
    else:
        bad = _damage(how, data, blobs[(i + 1) % len(blobs)], rnd)
    with pytest.raises(codec.BlobError):
        codec.decode(cal, bad)
    # and a healthy blob under another calibration or another model's
    with pytest.raises(codec.BlobError):
        codec.decode(other if rnd.random() < 0.5 else foreign, data)


@settings(max_examples=3500, **SETTINGS)
@given(case=damaged(3))
def test_damaged_page_records_are_refused(world, case):
    cal, other, foreign, _, records = world
    how, i, rnd = case
    if how == "forge":  # a record that frames another record's blob: the checksum catches it
        how = "splice"
    bad = _damage(how, records[i], records[(i + 1) % len(records)], rnd)
    with pytest.raises(codec.BlobError):
        unpack_page(cal, bad)
    with pytest.raises(codec.BlobError):
        unpack_page(other if rnd.random() < 0.5 else foreign, records[i])


def test_the_project_error_is_what_callers_catch():
    assert issubclass(codec.BlobError, KvsqueezeError)
