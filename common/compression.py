"""Update encodings: raw float32, int8 with a scale per chunk, and top-k sparsification.

Pure functions, shared by the device (which encodes, keeping what compression lost as a
residual for its next update: error feedback) and the enclave (which decodes inside, before
the filters see the delta). Every encoding is cut into chunks that decode on their own, so
the enclave can fill its buffer as chunks arrive:

- ``f32``: chunk i holds elements [i·E, (i+1)·E) as little-endian float32 (E = chunk_bytes / 4).
- ``int8``: chunk i holds a float32 scale, then elements [i·E, (i+1)·E) as int8 (E = chunk_bytes − 4);
  value = q × scale, scale = max |x| / 127 over the chunk.
- ``topk``: the k = ⌈fraction · n⌉ largest-magnitude elements, sorted by index; chunk c holds
  up to chunk_bytes / 8 of them: their u32 indices, then their float32 values.

A single-chunk update covers the whole vector (``chunk_elems`` 0 in its header).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: ``fl.compression`` setting → the encoding named in update headers.
ENCODING_OF_SETTING = {"none": "f32", "int8": "int8", "topk": "topk"}
INT8_MAX = 127


@dataclass(frozen=True)
class Encoded:
    encoding: str
    #: Elements each chunk covers (f32 and int8; the last covers the rest); 0 for topk.
    chunk_elems: int
    chunks: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def _dense_elems(encoding: str, chunk_bytes: int) -> int:
    return chunk_bytes // 4 if encoding == "f32" else chunk_bytes - 4


def _int8_chunk(x: np.ndarray) -> bytes:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0 and math.isfinite(peak):
        scale = np.float32(peak / INT8_MAX)
        q = np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:  # all zero; or NaN/inf, kept in the scale so the enclave refuses it (non_finite)
        scale = np.float32(peak)
        q = np.zeros(x.shape, dtype=np.int8)
    return np.array([scale], dtype="<f4").tobytes() + q.tobytes()


def encode(delta: np.ndarray, encoding: str, chunk_bytes: int, topk_fraction: float = 0.1) -> Encoded:
    """``delta`` (1-D float32) in ``encoding``, cut into chunks of at most ``chunk_bytes``."""
    x = np.ascontiguousarray(delta, dtype="<f4").reshape(-1)
    n = x.shape[0]
    if encoding in ("f32", "int8"):
        per = _dense_elems(encoding, chunk_bytes)
        if per < 1:
            raise ValueError(f"chunk_bytes {chunk_bytes} too small for {encoding}")
        if encoding == "f32":
            chunks = [x[i:i + per].tobytes() for i in range(0, max(n, 1), per)]
        else:
            chunks = [_int8_chunk(x[i:i + per]) for i in range(0, max(n, 1), per)]
        return Encoded(encoding, per if len(chunks) > 1 else 0, chunks)
    if encoding == "topk":
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        k = min(n, max(1, math.ceil(topk_fraction * n)))
        idx = np.sort(np.argpartition(np.abs(x), n - k)[n - k:]).astype("<u4")
        vals = x[idx]
        per = chunk_bytes // 8
        chunks = [idx[i:i + per].tobytes() + vals[i:i + per].tobytes() for i in range(0, k, per)]
        return Encoded(encoding, 0, chunks)
    raise ValueError(f"unknown encoding {encoding!r}")


def expected_chunks(encoding: str, chunk_elems: int, n: int) -> int | None:
    """How many chunks a dense encoding of ``n`` elements has (None for topk: data-dependent)."""
    if encoding == "topk":
        return None
    return 1 if chunk_elems == 0 else math.ceil(n / chunk_elems)


def decode_chunk_into(out: np.ndarray, encoding: str, chunk_elems: int, index: int, count: int,
                      data: bytes | memoryview) -> None:
    """Write chunk ``index`` of ``count`` into ``out`` (float32, zeroed for topk).

    Raises ValueError saying what does not fit: wrong length for its place, an index out of
    range, indices not strictly increasing.
    """
    n = out.shape[0]
    view = memoryview(data).cast("B")
    if encoding in ("f32", "int8"):
        per = n if chunk_elems == 0 else chunk_elems
        if chunk_elems == 0 and count != 1:
            raise ValueError("chunk_elems 0 is only for a single-chunk update")
        if expected_chunks(encoding, chunk_elems, n) != count:
            raise ValueError(f"{count} chunks cannot cover {n} elements of {per}")
        start = index * per
        length = min(per, n - start)
        if encoding == "f32":
            if view.nbytes != 4 * length:
                raise ValueError(f"chunk {index}: {view.nbytes} bytes for {length} float32 elements")
            out[start:start + length] = np.frombuffer(view, dtype="<f4")
        else:
            if view.nbytes != 4 + length:
                raise ValueError(f"chunk {index}: {view.nbytes} bytes for {length} int8 elements and a scale")
            scale = np.frombuffer(view[:4], dtype="<f4")[0]
            out[start:start + length] = np.frombuffer(view[4:], dtype=np.int8).astype(np.float32) * scale
        return
    if encoding == "topk":
        if view.nbytes == 0 or view.nbytes % 8:
            raise ValueError(f"chunk {index}: {view.nbytes} bytes is not a whole number of (index, value) pairs")
        m = view.nbytes // 8
        idx = np.frombuffer(view[:4 * m], dtype="<u4")
        if int(idx[-1]) >= n:
            raise ValueError(f"chunk {index}: index {int(idx[-1])} outside {n} parameters")
        if m > 1 and not bool(np.all(np.diff(idx.astype(np.int64)) > 0)):
            raise ValueError(f"chunk {index}: indices are not strictly increasing")
        out[idx] = np.frombuffer(view[4 * m:], dtype="<f4")
        return
    raise ValueError(f"unknown encoding {encoding!r}")


def decode(enc: Encoded, n: int) -> np.ndarray:
    """The dense float32 vector ``enc`` stands for (what the enclave will see)."""
    out = np.zeros(n, dtype=np.float32)
    for i, chunk in enumerate(enc.chunks):
        decode_chunk_into(out, enc.encoding, enc.chunk_elems, i, len(enc.chunks), chunk)
    return out


def encode_with_feedback(delta: np.ndarray, residual: np.ndarray | None, encoding: str, chunk_bytes: int,
                         topk_fraction: float = 0.1) -> tuple[Encoded, np.ndarray | None]:
    """Encode ``delta`` plus what earlier encodings dropped; return the new residual.

    Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression loses now
    is added to the next update, so nothing is lost for good and top-k still converges.
    float32 loses nothing and keeps no residual.
    """
    if encoding == "f32":
        return encode(delta, encoding, chunk_bytes), None
    corrected = np.asarray(delta, dtype=np.float32)
    if residual is not None and residual.shape == corrected.shape:
        corrected = corrected + residual
    enc = encode(corrected, encoding, chunk_bytes, topk_fraction)
    return enc, (corrected - decode(enc, corrected.shape[0])).astype(np.float32)
