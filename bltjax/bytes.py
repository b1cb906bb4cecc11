"""The byte vocabulary, compatible with the BLT reference.

PAD/BOE = 0, BOS = 1, EOS = 2, byte b -> b + 4, so VOCAB_SIZE = 260. MASK = 3 (the
reference's BPE-delimiter id, which bltjax never emits) is used only as a diffusion
input; its logit is -inf in diffusion predictions.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
MASK_ID = 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET


def as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def encode(text: str | bytes, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
  """Text (UTF-8) or raw bytes -> token ids `[len]` int32."""
  ids = np.frombuffer(as_bytes(text), dtype=np.uint8).astype(np.int32) + OFFSET
  parts = [[BOS_ID]] if add_bos else []
  parts.append(ids)
  if add_eos:
    parts.append([EOS_ID])
  return np.concatenate([np.asarray(p, np.int32) for p in parts])


def decode_bytes(ids: Iterable[int]) -> bytes:
  """Token ids -> raw bytes; special ids (< OFFSET) are dropped."""
  ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(np.int64)
  ids = ids[(ids >= OFFSET) & (ids < VOCAB_SIZE)]
  return (ids - OFFSET).astype(np.uint8).tobytes()


def decode(ids: Iterable[int]) -> str:
  """Token ids -> text; invalid UTF-8 becomes U+FFFD."""
  return decode_bytes(ids).decode("utf-8", errors="replace")


def encode_batch(
    texts: Sequence[str | bytes], *, length: int | None = None, add_bos: bool = True,
    add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids `[batch, length]` right-padded with PAD, lengths `[batch]`).

  Raises ValueError when a text does not fit in `length`.
  """
  rows = [encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
  lengths = np.array([len(r) for r in rows], np.int32)
  width = int(lengths.max(initial=1)) if length is None else length
  if lengths.max(initial=0) > width:
    raise ValueError(
        f"a text of {int(lengths.max())} tokens does not fit in length {width}; "
        "pass a larger length or shorter texts")
  ids = np.full((len(rows), width), PAD_ID, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, lengths
