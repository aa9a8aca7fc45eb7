"""Checked casts on the way into a store or a checkpoint, or out of one (DESIGN section 10:
nothing narrowed).

    array = checked_cast(array, np.float16, where='model.bin key lm_head.weight')

A value that does not fit the target dtype is an `InputError` naming `where` and the value, never
an inf, a wrapped integer or a dropped imaginary part. Rounding to the target's precision (float32
-> bfloat16, a subnormal flushed to zero) is what a cast to a narrower float means and is allowed;
leaving its range is not. A value that was already inf / NaN stays what it was (not a narrowing).
"""

from __future__ import annotations

import numpy as np

from radfm_jax.errors import InputError

FLOAT_NAMES = ('float64', 'float32', 'float16', 'bfloat16')


def is_float(dtype) -> bool:
  """float16/32/64 and ml_dtypes' bfloat16 (whose numpy kind is 'V', not 'f')."""
  return np.dtype(dtype).name in FLOAT_NAMES


def _first(array: np.ndarray, bad: np.ndarray):
  """The first flagged value (for the message; callers may pass a slab, so no index is given)."""
  return array.reshape(-1)[int(np.flatnonzero(bad)[0])]


def checked_cast(array: np.ndarray, dtype, where: str) -> np.ndarray:
  """`array` as `dtype`; an `InputError` naming `where` when a value would not survive the cast:
  a finite value beyond a float target's range, an integer or float outside an integer target's
  range (or a float with a fraction), a non-zero imaginary part, a bool target given other than
  0 / 1. The same array is returned when the dtype already matches."""
  dtype = np.dtype(dtype)
  array = np.asarray(array)
  if array.dtype == dtype:
    return array
  if array.dtype.kind == 'c' and dtype.kind != 'c':
    bad = array.imag != 0
    if bad.any():
      v = _first(array, bad)
      raise InputError(f'{where}: complex value {v} has an imaginary part, which '
                       f'{dtype} cannot hold')
    array = array.real
  with np.errstate(over='ignore', invalid='ignore'):
    if is_float(dtype):
      out = array.astype(dtype)
      bad = ~np.isfinite(out)
      if bad.any():
        bad &= np.isfinite(array)
        if bad.any():
          import ml_dtypes
          v = _first(array, bad)
          raise InputError(f'{where}: value {v} ({array.dtype}) is beyond the range '
                           f'of {dtype} (largest {float(ml_dtypes.finfo(dtype).max):g})')
      return out
    if dtype.kind == 'b':
      bad = (array != 0) & (array != 1)
    elif dtype.kind in 'iu':
      info = np.iinfo(dtype)
      if array.dtype.kind in 'iub':
        bad = (array < info.min) | (array > info.max)
      else:
        bad = ~np.isfinite(array) | (array != np.round(array)) | (array < info.min) | (
            array > info.max)
    else:
      raise InputError(f'{where}: no checked cast from {array.dtype} to {dtype}')
    if bad.any():
      v = _first(array, bad)
      raise InputError(f'{where}: value {v} ({array.dtype}) does not fit {dtype}')
    return array.astype(dtype)
