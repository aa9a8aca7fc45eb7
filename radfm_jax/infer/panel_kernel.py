"""The decode's products as a C++ kernel (`generate.cpu_product`): weights packed into panels,
a one-token step's attention with the KV cache, and greedy's argmax.

    lanes = panel_kernel.load()                        # builds on first use, registers the targets
    packed = panel_kernel.pack(kernel, lanes)          # [out, in] -> [ceil(out / lanes), in, lanes]
    y = panel_kernel.product(packed, rows, out)        # rows [n, in] -> [n, out], float32
    y = panel_kernel.product(pack(q, lanes), rows, out, scale)   # int8 q [out, in], scale [out]
    o = panel_kernel.cache_attention(q, k, v, keys, values, cached, own, written, scale)
    token = panel_kernel.first_argmax(logits)          # [..., m] -> int32 [...], as jnp.argmax

`panel_product.cc` (beside this file) multiplies rows by a weight packed once into panels of
`lanes` outputs (two vectors: 32 with AVX-512, 16 with AVX2), streaming each weight once per
product; XLA:CPU's own GEMMs re-pack the weight at every product, which makes a batched decode step
cost ~2x a single-row one (the reasons and figures: the .cc file's head comment and
docs/performance.md). It is a plain C++17 file built with the host's compiler for the host's CPU
(`-O3 -march=native`) and called through the XLA FFI with XLA's intra-op thread pool. Rows and
outputs are float32; the weights float32, or int8 with one float32 scale per output
(`quantize='int8'`, weight-only: each product streams a quarter of the bytes, the int8 values
widened to float32 as they are loaded, the sums scaled at the end). The cache attention
(`cache_attention`, which the CPU decode view hands to `layers.cached_attention` at every batch
size: with the softmax inside, batch 1 is no slower than with XLA's) computes a step's scores,
softmax and weighted values in one call per layer, splits the (row, head) pairs over the threads
from 2 MiB of keys and values on (XLA:CPU runs its two products with the cache on one thread), and
reads only the `written` slots of a cache allocated in chunks ahead of them, less each row's masked
slots before its first attended one (a left-padded prompt's padding: their probabilities are
exactly 0, the sums the same). `first_argmax` is greedy decoding's argmax over the vocabulary in
vector code (the CPU panel decode's `generate.choose_token`).

The build is cached: $RADFM_KERNEL_CACHE, else $XDG_CACHE_HOME/radfm-jax/kernels, else
~/.cache/radfm-jax/kernels, one shared library per (source, compiler, flags, jaxlib, CPU model
and flags), written to a temporary name and renamed, so a killed or concurrent build never
leaves a half-written library under the name that is loaded. Its name ends with the SHA-256 of
its bytes, checked before it is loaded: a cached library cut short or overwritten (which dlopen
could crash on) is removed and built again. The compiler is $CXX, else the first of c++, g++,
clang++ on PATH.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from radfm_jax.errors import UserError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'panel_product.cc')
TARGET = 'radfm_panel_product'
TARGET_INT8 = 'radfm_panel_product_int8'
TARGET_ATTENTION = 'radfm_cache_attention'
TARGET_ARGMAX = 'radfm_first_argmax'
CACHE_ENV = 'RADFM_KERNEL_CACHE'
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fvisibility=hidden', '-w')
_LOCK = threading.Lock()
_LANES: list[int] = []            # the loaded kernel's panel width, once registered
_FAILED: dict[tuple, str] = {}     # (compiler, cache folder) -> why the kernel did not load


class KernelUnavailable(UserError):
  """The panel kernel cannot be built or loaded here (no C++ compiler, the build failed, the
  cache folder is not writable); the message says which (`generate.cpu_product='xla'` needs
  no kernel)."""


def compiler() -> list[str] | None:
  """The C++ compiler command: $CXX (split as a shell would), else c++ / g++ / clang++ on PATH;
  None when there is none."""
  given = os.environ.get('CXX', '').strip()
  if given:
    try:
      command = shlex.split(given)
    except ValueError as err:         # an unclosed quote
      raise KernelUnavailable(f'$CXX {given!r}: {err}; expected a compiler command as a shell '
                              "would split it, e.g. g++ or 'ccache g++'") from None
    return command if command and shutil.which(command[0]) else None
  for name in ('c++', 'g++', 'clang++'):
    if shutil.which(name):
      return [name]
  return None


def cache_directory() -> str:
  """Where built libraries are kept (see the module doc)."""
  given = os.environ.get(CACHE_ENV, '').strip()
  if given:
    return os.path.abspath(os.path.expanduser(given))
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'radfm-jax', 'kernels')


def _cpu_identity() -> str:
  """The CPU model and feature flags (-march=native builds for them): a cache shared by
  different machines (a home folder on a cluster) keeps one library per kind of CPU."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, val = line.partition(':')
        key = key.strip()
        if key in ('model name', 'flags', 'Features', 'CPU part') and key not in fields:
          fields[key] = val.strip()
  except OSError:
    pass
  return platform.machine() + '|' + '|'.join(f'{k}={v}' for k, v in sorted(fields.items()))


def _version(command: list[str]) -> str:
  try:
    done = subprocess.run(command + ['--version'], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired) as err:
    raise KernelUnavailable(f'the C++ compiler {command[0]!r} does not run ({err})') from None
  return done.stdout.strip()


def library_path() -> str:
  """The built library for this host, built now when the cache has none."""
  command = compiler()
  if command is None:
    given = os.environ.get('CXX', '').strip()
    if given:
      raise KernelUnavailable(f'$CXX {given!r} is not a command on PATH; expected a C++ '
                              'compiler (unset CXX to use c++, g++ or clang++ on PATH)')
    raise KernelUnavailable('no C++ compiler found ($CXX, c++, g++, clang++ on PATH)')
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256('\0'.join([
      source.hex(), ' '.join(command), _version(command), ' '.join(FLAGS), jax.ffi.include_dir(),
      jax.__version__, _cpu_identity()]).encode()).hexdigest()[:16]
  directory = cache_directory()
  found = _cached(directory, key)
  if found is not None:
    return found
  try:
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix='.panel_product-', suffix='.so.partial', dir=directory)
    os.close(fd)
  except OSError as err:
    raise KernelUnavailable(f'cannot write the kernel cache {directory} ({err.strerror}; '
                            f'${CACHE_ENV} names another folder)') from None
  try:
    done = subprocess.run(command + list(FLAGS) + ['-I', jax.ffi.include_dir(), SOURCE, '-o',
                                                   partial], capture_output=True, text=True)
    if done.returncode != 0:
      lines = [ln for ln in done.stderr.splitlines() if 'error' in ln] or done.stderr.splitlines()
      raise KernelUnavailable(f'building {SOURCE} with {command[0]} failed: '
                              f'{(lines or ["no output"])[0].strip()}')
    if os.path.getsize(partial) == 0:
      raise KernelUnavailable(f'building {SOURCE} with {command[0]} wrote no library; expected '
                              'a C++ compiler ($CXX)')
    path = os.path.join(directory, f'panel_product-{key}-{_digest(partial)}.so')
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def _digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _cached(directory: str, key: str) -> str | None:
  """The cached library of `key` whose bytes match the digest in its name; one that does not
  (cut short, overwritten) is removed, to be built again."""
  prefix = f'panel_product-{key}-'
  try:
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith('.so'))
  except OSError:
    return None
  for name in names:
    path = os.path.join(directory, name)
    try:
      if _digest(path) == name[len(prefix):-len('.so')]:
        return path
      os.remove(path)
    except OSError:
      pass
  return None


def load() -> int:
  """Builds (once per host, cached) and registers the kernel; returns its panel width."""
  with _LOCK:
    if not _LANES:
      path = library_path()
      try:
        lib = ctypes.cdll.LoadLibrary(path)
        capsules = {TARGET: jax.ffi.pycapsule(lib.RadfmPanelProduct),
                    TARGET_INT8: jax.ffi.pycapsule(lib.RadfmPanelProductInt8),
                    TARGET_ATTENTION: jax.ffi.pycapsule(lib.RadfmCacheAttention),
                    TARGET_ARGMAX: jax.ffi.pycapsule(lib.RadfmFirstArgmax)}
        lanes = int(lib.radfm_panel_lanes())
      except (OSError, AttributeError) as err:   # not a library; not the kernel's
        raise KernelUnavailable(f'cannot load the built kernel {path} ({err}); remove it to '
                                'build it again') from None
      for target, capsule in capsules.items():
        jax.ffi.register_ffi_target(target, capsule, platform='cpu')
      _LANES.append(lanes)
    return _LANES[0]


def unavailable_reason() -> str | None:
  """None when the kernel loads here, else the one-line reason (for `cpu_product='auto'`, which
  then uses XLA's products). A failed build is not retried for the same compiler and cache."""
  if _LANES:
    return None
  try:
    key = (tuple(compiler() or ()), cache_directory())
  except KernelUnavailable as err:      # $CXX unreadable
    return str(err)
  if key not in _FAILED:
    try:
      load()
      return None
    except KernelUnavailable as err:
      _FAILED[key] = str(err)
  return _FAILED[key]


def pack(kernel: jax.Array, lanes: int) -> jax.Array:
  """kernel [out, in] (float32, or int8 values) -> panels [ceil(out / lanes), in, lanes] of its
  dtype: panel p holds outputs p * lanes ... p * lanes + lanes - 1 (zeros past `out`), feature by
  feature."""
  out, n_in = kernel.shape
  panels = -(-out // lanes)
  kernel = jnp.pad(kernel, ((0, panels * lanes - out), (0, 0)))
  return kernel.reshape(panels, lanes, n_in).transpose(0, 2, 1)


def product(packed: jax.Array, rows: jax.Array, out: int,
            scale: jax.Array | None = None) -> jax.Array:
  """rows [n, in] x the packed weight of `out` outputs -> [n, out], float32 (what
  `rows @ kernel.T` computes, summed in another order). int8 panels take `scale` [out] (float32):
  output o is (rows @ q[o]) * scale[o], the weight-only int8 product `rows @ (q * scale).T`."""
  result = jax.ShapeDtypeStruct((rows.shape[0], out), jnp.float32)
  if rows.dtype != jnp.float32:
    raise ValueError(f'panel_kernel.product: float32 rows only, got {rows.dtype}')
  if packed.dtype == jnp.int8:
    if scale is None or scale.dtype != jnp.float32 or scale.shape != (out,):
      raise ValueError(f'panel_kernel.product: int8 panels need float32 scales [{out}], got '
                       f'{None if scale is None else (scale.dtype, scale.shape)}')
    return jax.ffi.ffi_call(TARGET_INT8, result)(rows, packed, scale)
  if packed.dtype != jnp.float32 or scale is not None:
    raise ValueError(f'panel_kernel.product: float32 panels (no scale) or int8 panels with '
                     f'scales, got {packed.dtype} panels and scale {scale is not None}')
  return jax.ffi.ffi_call(TARGET, result)(rows, packed)


def cache_fits(head_dim: int, lanes: int) -> bool:
  """Whether the kernel's cache attention takes this head size: a multiple of its vectors
  (`lanes`, the panel width, is two of them), <= 256."""
  return lanes > 0 and head_dim % (lanes // 2) == 0 and 0 < head_dim <= 256


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array,
                    values: jax.Array, cached: jax.Array, own: jax.Array, written: jax.Array,
                    scale: float) -> jax.Array:
  """One new token's attention with one layer's KV cache and its own key / value, split over
  XLA's threads: q, k, v [batch, heads, head_dim]; keys, values [batch, heads, slots, head_dim]
  of which the first `written` (int32 scalar) are read, but for a row's masked slots before its
  first attended one (unless it attends to nothing); cached: bool [batch, slots] (slot
  attended; the unwritten ones must be False), own: bool [batch] (own key attended) -> [batch,
  heads, head_dim] float32: `layers.cached_attention` for one token (scores times `scale`,
  masked ones at float32's minimum, one softmax over every allocated slot and the token's own
  key)."""
  for name, x in (('q', q), ('k', k), ('v', v), ('keys', keys), ('values', values)):
    if x.dtype != jnp.float32:
      raise ValueError(f'panel_kernel.cache_attention: float32 only, got {x.dtype} {name}')
  if jnp.shape(written) != () or jnp.result_type(written) != jnp.int32:
    raise ValueError('panel_kernel.cache_attention: `written` must be an int32 scalar, got '
                     f'{jnp.result_type(written)} {jnp.shape(written)}')
  result = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(TARGET_ATTENTION, result)(
      q, k, v, keys, values, cached.astype(bool), own.astype(bool), written,
      scale=np.float32(scale))


def first_argmax(x: jax.Array) -> jax.Array:
  """float32 [..., m] -> int32 [...]: the index of the first maximum along the last axis (of
  the first NaN where there is one), as `jnp.argmax` and `layers.first_argmax`, in vector code
  (greedy decoding's argmax over the vocabulary; XLA:CPU's took ~7x longer, docs/
  performance.md)."""
  if x.dtype != jnp.float32 or x.ndim < 1 or x.shape[-1] == 0:
    raise ValueError(f'panel_kernel.first_argmax: float32 [..., m > 0], got {x.dtype} {x.shape}')
  rows = x.reshape(-1, x.shape[-1])
  out = jax.ffi.ffi_call(TARGET_ARGMAX, jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32))(rows)
  return out.reshape(x.shape[:-1])


__all__ = ['CACHE_ENV', 'KernelUnavailable', 'SOURCE', 'TARGET',
           'TARGET_ARGMAX', 'TARGET_ATTENTION', 'TARGET_INT8', 'cache_attention', 'cache_directory',
           'cache_fits', 'compiler', 'first_argmax', 'library_path', 'load', 'pack', 'product',
           'unavailable_reason']
