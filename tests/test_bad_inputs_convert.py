"""`radfm-jax convert from-torch` under bad input: a table of malformed checkpoints, each built by
hand (safetensors: header JSON + bytes; .bin: torch.save, then edited), each with its outcome:
exit 2 and one line on stderr naming the file and the key, or the right values read back.

Classes (issue 13): the safetensors reader trusts the header (offsets, overlaps, sizes, header
length, dtype set); dtypes the official checkpoint does not have (refused unless --cast); values
narrowed by a cast (float64 / float32 beyond the target's range); the torch .bin reader (shared
storage, records shorter than their storage, truncation, pickles that run code).
"""

import dataclasses
import json
import os
import struct
import sys
import zipfile
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip('torch')
sys.path.insert(0, os.path.dirname(__file__))

from convert_fixtures import official_state_dict  # noqa: E402
from radfm_jax import checkpoint  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402

NORM = 'lang_model.model.norm.weight'       # -> llama/norm/scale, copied as is
FC_BIAS = 'embedding_layer.fc.bias'         # -> fc/bias
LM_HEAD = 'lang_model.lm_head.weight'       # -> llama/lm_head/kernel (transposed)
EMBED = 'lang_model.model.embed_tokens.weight'
ST_NAMES = {np.dtype('float64'): 'F64', np.dtype('float32'): 'F32', np.dtype('float16'): 'F16',
            np.dtype('int64'): 'I64', np.dtype('bool'): 'BOOL'}


@pytest.fixture(scope='module')
def state(tiny_cfg):
  """The tiny official state dict as numpy (no alias, no dead branch: what safetensors holds)."""
  sd = official_state_dict(tiny_cfg, seed=5, keep_dead=False)
  return {k: v.numpy() for k, v in sd.items() if k != 'embedding_layer.weight'}


# ------------------------------------------------------------------------------------------------
# Builders: safetensors by hand


def write_safetensors(path, arrays: dict, edit=None, raw: bytes | None = None,
                      length: int | None = None, tail: bytes = b''):
  """Writes `arrays` ({key: ndarray, or (dtype name, shape, bytes)}) in order, tiling the data
  area; `edit(header)` may change the header afterwards; `raw` replaces the header bytes and
  `length` the header-length field; `tail` is appended."""
  header, blobs, offset = {}, [], 0
  for key, value in arrays.items():
    if isinstance(value, np.ndarray):
      value = (ST_NAMES[value.dtype], list(value.shape), value.tobytes())
    dtype, shape, data = value
    header[key] = {'dtype': dtype, 'shape': list(shape), 'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  if edit is not None:
    edit(header)
  blob = raw if raw is not None else json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob) if length is None else length))
    f.write(blob)
    f.write(b''.join(blobs) + tail)
  return str(path)


def _last(state, key, value=None):
  """The state dict with `key` moved to the end (its bytes last in the file), optionally replaced."""
  out = {k: v for k, v in state.items() if k != key}
  out[key] = state[key] if value is None else value
  return out


def st_overlap(tmp, state):
  """lm_head points at embed_tokens' bytes (same shape): it would silently become embed_tokens."""
  def edit(header):
    header[LM_HEAD]['data_offsets'] = list(header[EMBED]['data_offsets'])
  arrays = _last(state, LM_HEAD)
  arrays[LM_HEAD] = ('F32', list(state[LM_HEAD].shape), b'')
  return write_safetensors(tmp / 'model.safetensors', arrays, edit)


def st_end_short(tmp, state):
  """norm's end offset 4 bytes short of shape x dtype (the file is consistent otherwise)."""
  data = state[NORM].tobytes()[:-4]
  return write_safetensors(tmp / 'model.safetensors',
                           _last(state, NORM, ('F32', list(state[NORM].shape), data)))


def st_dtype_lie(tmp, state):
  """norm's float32 bytes declared BF16: the byte count no longer matches shape x dtype."""
  def edit(header):
    header[NORM]['dtype'] = 'BF16'
  return write_safetensors(tmp / 'model.safetensors', _last(state, NORM), edit)


def st_header_truncated(tmp, state):
  """The file ends inside the header (length field says more than is there)."""
  path = write_safetensors(tmp / 'model.safetensors', state)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:200])
  return path


def st_header_huge(tmp, state):
  """A header-length field of 2**60 (would ask for exabytes)."""
  return write_safetensors(tmp / 'model.safetensors', state, length=2 ** 60)


def st_header_not_json(tmp, state):
  return write_safetensors(tmp / 'model.safetensors', state, raw=b'{"a": nope}')


def st_data_truncated(tmp, state):
  path = write_safetensors(tmp / 'model.safetensors', state)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size - 100)
  return path


def st_trailing_bytes(tmp, state):
  return write_safetensors(tmp / 'model.safetensors', state, tail=b'\0' * 16)


def st_dtype_f8(tmp, state):
  """A dtype outside the reader's set (F8_E4M3: 1 byte per element, sizes consistent)."""
  n = state[NORM].size
  return write_safetensors(tmp / 'model.safetensors',
                           _last(state, NORM, ('F8_E4M3', list(state[NORM].shape), b'\0' * n)))


def st_too_small(tmp, state):
  path = tmp / 'model.safetensors'
  path.write_bytes(b'\x01\x02')
  return str(path)


def st_negative_shape(tmp, state):
  def edit(header):
    header[NORM]['shape'] = [-1 * state[NORM].shape[0]]
  return write_safetensors(tmp / 'model.safetensors', _last(state, NORM), edit)


def st_shards_repeat_key(tmp, state):
  """Two shards of one folder both hold fc.bias."""
  folder = tmp / 'shards'
  folder.mkdir()
  keys = list(state)
  write_safetensors(folder / 'model-00001.safetensors', {k: state[k] for k in keys[:10]})
  write_safetensors(folder / 'model-00002.safetensors',
                    {k: state[k] for k in keys[10:] + [keys[0]]})
  return str(folder), keys[0]


def st_int64(tmp, state):
  return write_safetensors(tmp / 'model.safetensors',
                           _last(state, FC_BIAS, np.arange(state[FC_BIAS].size, dtype=np.int64)))


def st_float64_overflow(tmp, state):
  value = state[NORM].astype(np.float64)
  value[3] = 1e300
  return write_safetensors(tmp / 'model.safetensors', _last(state, NORM, value))


def st_float64_in_range(tmp, state):
  return write_safetensors(tmp / 'model.safetensors',
                           _last(state, NORM, state[NORM].astype(np.float64) * 1e30))


def st_valid(tmp, state):
  return write_safetensors(tmp / 'model.safetensors', state)


# ------------------------------------------------------------------------------------------------
# Builders: torch .bin


def _torch_state(state, **replace):
  out = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  out.update(replace)
  return out


def bin_save(tmp, tensors):
  path = tmp / 'pytorch_model.bin'
  torch.save(tensors, path)
  return str(path)


def bin_int64(tmp, state):
  return bin_save(tmp, _torch_state(state, **{FC_BIAS: torch.arange(state[FC_BIAS].size)}))


def bin_nested(tmp, state):
  """The state dict one level down (`torch.save({'model': sd})`): every key missing, 'model'
  unexpected, in one line that lists the first keys and counts the rest."""
  return bin_save(tmp, {'model': _torch_state(state)})


def bin_list_value(tmp, state):
  """A list where a tensor belongs (was: AttributeError's traceback)."""
  return bin_save(tmp, _torch_state(state, **{NORM: [1.0, 2.0]})), NORM


def bin_int_key(tmp, state):
  """A key that is not a string (was: TypeError's traceback in the key map)."""
  tensors = _torch_state(state)
  tensors[5] = torch.zeros(2)
  return bin_save(tmp, tensors)


def bin_wrapper_with_a_tensor_beside(tmp, state):
  """{'state_dict': sd, ...}: unwrapped, dropping what is beside it; a tensor there was lost."""
  return bin_save(tmp, {'state_dict': _torch_state(state), 'epoch': 3,
                        LM_HEAD: torch.zeros(2)}), LM_HEAD


def st_key_twice(tmp, state):
  """A header naming one tensor twice (JSON keeps the last; was accepted)."""
  path = write_safetensors(tmp / 'model.safetensors', state)
  raw = open(path, 'rb').read()
  size = struct.unpack('<Q', raw[:8])[0]
  header = raw[8:8 + size].decode()
  entry = header[header.index(f'"{NORM}"'):]
  entry = entry[:entry.index('}') + 1]
  twice = header.replace(entry, entry + ',' + entry, 1)
  twice = twice.ljust(len(twice) + (-len(twice)) % 8)
  write_safetensors(tmp / 'twice.safetensors', state, raw=twice.encode())
  return str(tmp / 'twice.safetensors'), NORM


def bin_wrong_shape(tmp, state):
  """One tensor with a row too many: the given config names that key, not a config field."""
  patch = 'embedding_layer.vision_encoder.to_patch_embedding.2.weight'
  grown = np.concatenate([state[patch], state[patch][:1]])
  return bin_save(tmp, _torch_state(state, **{patch: torch.from_numpy(grown)})), patch


def bin_bool(tmp, state):
  mask = torch.arange(state[FC_BIAS].size) % 3 == 0
  return bin_save(tmp, _torch_state(state, **{FC_BIAS: mask}))


def bin_complex(tmp, state):
  value = torch.from_numpy(state[FC_BIAS]).to(torch.complex64) * (1 + 1j)
  return bin_save(tmp, _torch_state(state, **{FC_BIAS: value}))


def bin_complex_real(tmp, state):
  value = torch.from_numpy(state[FC_BIAS]).to(torch.complex64)
  return bin_save(tmp, _torch_state(state, **{FC_BIAS: value}))


def bin_float64_overflow(tmp, state):
  value = torch.from_numpy(state[LM_HEAD]).double()
  value[2, 5] = -1e39
  return bin_save(tmp, _torch_state(state, **{LM_HEAD: value}))


def bin_float16_target_overflow(tmp, state):
  """float32 source, --dtype float16 target: 1e5 does not fit float16 (max 65504)."""
  value = torch.from_numpy(state[NORM].copy())
  value[1] = 1e5
  return bin_save(tmp, _torch_state(state, **{NORM: value}))


def bin_shared_storage(tmp, state):
  """lm_head is the same tensor as embed_tokens (tied; the official model is not)."""
  tensors = _torch_state(state)
  tensors[LM_HEAD] = tensors[EMBED]
  return bin_save(tmp, tensors)


def bin_alias_shared(tmp, state):
  """The official layout: embedding_layer.weight shares embed_tokens' storage (never read)."""
  tensors = _torch_state(state)
  tensors['embedding_layer.weight'] = tensors[EMBED]
  return bin_save(tmp, tensors)


def bin_alias_copy(tmp, state):
  """embedding_layer.weight as its own copy of embed_tokens' values: the same tensor, read once."""
  tensors = _torch_state(state)
  tensors['embedding_layer.weight'] = tensors[EMBED].clone()
  return bin_save(tmp, tensors)


def bin_alias_differs(tmp, state):
  """embedding_layer.weight with other values than embed_tokens (was: never compared, its values
  dropped); the row named is the first that differs."""
  tensors = _torch_state(state)
  tensors['embedding_layer.weight'] = tensors[EMBED].clone()
  tensors['embedding_layer.weight'][3, 1] += 1.0
  return bin_save(tmp, tensors), 'embedding_layer.weight'


def bin_truncated(tmp, state):
  path = bin_save(tmp, _torch_state(state))
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) * 2 // 3])
  return path


def bin_short_record(tmp, state):
  """The zip record of norm's storage holds 8 bytes fewer than the pickle says: torch would read
  the next record's bytes as the last elements."""
  path = bin_save(tmp, _torch_state(state))
  keys = list(state)
  number = keys.index(NORM)     # storages are numbered in the order the pickle meets them
  short = str(tmp / 'short.bin')
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(short, 'w', zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = src.read(info.filename)
      if info.filename == f'pytorch_model/data/{number}':
        data = data[:-8]
      dst.writestr(info, data)
  os.replace(short, path)
  return path


class _Evil:
  marker = ''

  def __reduce__(self):
    return (os.system, (f'touch {_Evil.marker}',))


def bin_malicious(tmp, state):
  _Evil.marker = str(tmp / 'pwned')
  tensors = _torch_state(state)
  tensors['payload'] = _Evil()
  return bin_save(tmp, tensors)


def bin_not_a_checkpoint(tmp, state):
  path = tmp / 'pytorch_model.bin'
  path.write_bytes(b'this is not a checkpoint\n' * 10)
  return str(path)


def bin_missing(tmp, state):
  return str(tmp / 'nothing_here.bin')


def hf_config_not_json(tmp, state):
  """from-hf-llama: a valid shard beside a truncated config.json."""
  folder = tmp / 'hf'
  folder.mkdir()
  write_safetensors(folder / 'model.safetensors', {'model.norm.weight': state[NORM]})
  (folder / 'config.json').write_text('{"hidden_size": 64, "num_attention_')
  return str(folder / 'config.json')


def bin_bfloat16(tmp, state):
  return bin_save(tmp, {k: v.to(torch.bfloat16) for k, v in _torch_state(state).items()})


# ------------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Case:
  name: str
  build: Callable            # (tmp, state) -> path, or (path, key that must be named)
  key: str | tuple | None    # the key the message must name (a tuple: one of them; None: a
  #                            file-level fault, or the key the builder returns)
  says: str | tuple = ''     # phrase(s) the message must hold ('' with a check: a success)
  flags: tuple = ()
  check: Callable | None = None   # success: (leaf reader, state) -> None
  direction: str = 'from-torch'   # or 'from-hf-llama' (the path's folder is --hf)


def _norm_f64_scaled(leaf, state):
  np.testing.assert_array_equal(leaf('llama/norm/scale'),
                                (state[NORM].astype(np.float64) * 1e30).astype(np.float32))


def _fc_bias_int(leaf, state):
  np.testing.assert_array_equal(leaf('fc/bias'), np.arange(state[FC_BIAS].size, dtype=np.float32))


def _fc_bias_bool(leaf, state):
  np.testing.assert_array_equal(leaf('fc/bias'),
                                (np.arange(state[FC_BIAS].size) % 3 == 0).astype(np.float32))


def _fc_bias_real(leaf, state):
  np.testing.assert_array_equal(leaf('fc/bias'), state[FC_BIAS])


def _all_equal(leaf, state):
  np.testing.assert_array_equal(leaf('llama/lm_head/kernel'), state[LM_HEAD].T)
  np.testing.assert_array_equal(leaf('llama/norm/scale'), state[NORM])


def _bf16_values(leaf, state):
  import ml_dtypes
  want = state[LM_HEAD].T.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(leaf('llama/lm_head/kernel'), want)


CASES = [
    # safetensors: what the library checks (we add the file, and the key where it names none)
    Case('st_overlap', st_overlap, (LM_HEAD, EMBED), 'invalid offset for tensor'),
    Case('st_end_short', st_end_short, NORM, 'hold'),
    Case('st_dtype_lie', st_dtype_lie, NORM, 'BF16 needs'),
    Case('st_header_truncated', st_header_truncated, None, 'invalid header length'),
    Case('st_header_huge', st_header_huge, None, 'header too large'),
    Case('st_header_not_json', st_header_not_json, None, 'invalid JSON in header'),
    Case('st_data_truncated', st_data_truncated, None, 'file not fully covered'),
    Case('st_trailing_bytes', st_trailing_bytes, None, 'file not fully covered'),
    Case('st_too_small', st_too_small, None, 'header too small'),
    Case('st_negative_shape', st_negative_shape, None, 'invalid JSON in header'),
    # safetensors: ours
    Case('st_dtype_f8', st_dtype_f8, NORM, 'dtype F8_E4M3'),
    Case('st_shards_repeat_key', st_shards_repeat_key, '', 'is also in'),
    # dtypes and casts
    Case('st_int64_refused', st_int64, FC_BIAS, 'dtype int64'),
    Case('st_int64_cast', st_int64, None, flags=('--cast',), check=_fc_bias_int),
    Case('st_float64_overflow', st_float64_overflow, NORM, 'beyond the range of float32'),
    Case('st_float64_in_range', st_float64_in_range, None, check=_norm_f64_scaled),
    Case('st_valid', st_valid, None, check=_all_equal),
    Case('bin_int64_refused', bin_int64, FC_BIAS, 'dtype int64'),
    Case('bin_bool_refused', bin_bool, FC_BIAS, 'dtype bool'),
    Case('bin_bool_cast', bin_bool, None, flags=('--cast',), check=_fc_bias_bool),
    Case('bin_complex_refused', bin_complex, FC_BIAS, 'dtype complex64'),
    Case('bin_complex_cast_imaginary', bin_complex, FC_BIAS, 'imaginary part',
         flags=('--cast',)),
    Case('bin_complex_cast_real', bin_complex_real, None, flags=('--cast',), check=_fc_bias_real),
    Case('bin_float64_overflow', bin_float64_overflow, LM_HEAD, 'beyond the range of float32'),
    Case('bin_float16_target_overflow', bin_float16_target_overflow, NORM,
         'beyond the range of float16', flags=('--dtype', 'float16')),
    Case('bin_bfloat16_source', bin_bfloat16, None, check=_bf16_values),
    # the .bin reader
    Case('bin_shared_storage', bin_shared_storage, LM_HEAD, ('shares bytes with key', EMBED)),
    Case('bin_alias_shared', bin_alias_shared, None, check=_all_equal),
    Case('bin_alias_copy', bin_alias_copy, None, check=_all_equal),
    Case('bin_alias_differs', bin_alias_differs, None,
         ("row 3 differs from lang_model.model.embed_tokens.weight's", 'expected the same tensor')),
    Case('bin_short_record', bin_short_record, NORM, 'does not match the archive record'),
    Case('bin_truncated', bin_truncated, None, 'not a readable torch checkpoint'),
    Case('bin_not_a_checkpoint', bin_not_a_checkpoint, None, 'not a zip-format torch checkpoint'),
    Case('bin_missing', bin_missing, None, 'no such file'),
    Case('bin_nested', bin_nested, "unexpected keys (1): ['model']",
         ('missing keys (', 'more')),
    Case('bin_wrong_shape', bin_wrong_shape, None, 'wrong shapes (key, found, expected)'),
    Case('bin_list_value', bin_list_value, NORM, 'got a list; expected a tensor'),
    Case('bin_int_key', bin_int_key, None, 'key 5 is a int; expected the string keys'),
    Case('bin_wrapper_with_a_tensor_beside', bin_wrapper_with_a_tensor_beside, LM_HEAD,
         'holds a "state_dict" and, beside it, the tensor'),
    Case('st_key_twice', st_key_twice, NORM, 'the key appears twice in one object'),
    Case('bin_malicious', bin_malicious, None, 'refused to unpickle'),
    Case('hf_config_not_json', hf_config_not_json, None, 'not valid JSON',
         direction='from-hf-llama'),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
def test_bad_checkpoint(case, state, tmp_path, capsys):
  built = case.build(tmp_path, state)
  path, key = built if isinstance(built, tuple) else (built, case.key)
  out = tmp_path / 'ckpt'
  source = (['--checkpoint', path] if case.direction == 'from-torch' else
            ['--hf', os.path.dirname(path)])
  rc = main(['convert', case.direction, *source, '--out', str(out),
             '--config', 'configs/radfm.py:model=tiny', *case.flags])
  err = capsys.readouterr().err
  if case.check is not None:       # a success: the values read back
    assert rc == 0, err
    case.check(checkpoint.LeafReader(str(out)), state)
    return
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1, err                  # one line, no traceback
  line = lines[0]
  assert line.startswith('radfm-jax convert: ') and path in line, line
  if key:
    assert any(k in line for k in (key if isinstance(key, tuple) else (key,))), line
  assert all(p in line for p in (case.says if isinstance(case.says, tuple) else (case.says,))), line
  assert not out.exists() or not any(out.iterdir()), list(out.iterdir())   # nothing half-written
  if case.name == 'bin_malicious':
    assert not os.path.exists(_Evil.marker)                 # the payload never ran


# ------------------------------------------------------------------------------------------------
# The checked cast itself (radfm_jax/casting.py), every kind of narrowing


def _bf16():
  import ml_dtypes
  return ml_dtypes.bfloat16


CAST_CASES = [
    # (id, source array, target dtype, expected: the values read back, or the phrase of the error)
    ('f64_beyond_f32', np.array([1.0, -1e39]), np.float32, 'beyond the range of float32'),
    ('f32_beyond_f16', np.array([65504.0, 7e4], np.float32), np.float16,
     'beyond the range of float16'),
    ('f32_beyond_bf16', np.array([3.4e38], np.float32), _bf16, 'beyond the range of bfloat16'),
    ('i64_beyond_f16', np.array([70000], np.int64), np.float16, 'beyond the range of float16'),
    ('i64_beyond_i32', np.array([2 ** 40], np.int64), np.int32, 'does not fit int32'),
    ('u64_beyond_i64', np.array([2 ** 63], np.uint64), np.int64, 'does not fit int64'),
    ('f64_fraction_to_i32', np.array([1.5]), np.int32, 'does not fit int32'),
    ('complex_imaginary', np.array([1 + 2j], np.complex64), np.float32, 'imaginary part'),
    ('int_to_bool', np.array([0, 2]), np.bool_, 'does not fit bool'),
    ('f64_in_range', np.array([1e30, -2.5]), np.float32, np.array([1e30, -2.5], np.float32)),
    ('inf_nan_kept', np.array([np.inf, np.nan]), np.float16, np.array([np.inf, np.nan], np.float16)),
    ('complex_real', np.array([3 + 0j]), np.float32, np.array([3.0], np.float32)),
    ('bool_to_f32', np.array([True, False]), np.float32, np.array([1.0, 0.0], np.float32)),
    ('f32_rounds_to_bf16', np.array([1.001], np.float32), _bf16, np.array([1.0], np.float32)),
]


@pytest.mark.parametrize('source,target,expected', [c[1:] for c in CAST_CASES],
                         ids=[c[0] for c in CAST_CASES])
def test_checked_cast(source, target, expected):
  from radfm_jax.casting import checked_cast
  from radfm_jax.errors import InputError
  target = target() if target is _bf16 else target
  if isinstance(expected, str):
    with pytest.raises(InputError) as err:
      checked_cast(source, target, 'model.bin key k')
    assert str(err.value).startswith('model.bin key k: ') and expected in str(err.value)
  else:
    out = checked_cast(source, target, 'model.bin key k')
    assert out.dtype == np.dtype(target)
    np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))


def test_nested_state_dict_without_a_config(state, tmp_path, capsys):
  """Sizes inferred from the keys (no --config): a state dict that is not the official layout is
  one line naming the first key looked for and what the file holds, not a KeyError."""
  path = bin_nested(tmp_path, state)
  rc = main(['convert', 'from-torch', '--checkpoint', path, '--out', str(tmp_path / 'ckpt')])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert err[0] == (
      f"radfm-jax convert: {path} (it holds 1 keys, e.g. ['model']; expected the official RadFM "
      "state dict: keys 'embedding_layer.*' and 'lang_model.*' at the top level): checkpoint does "
      "not match the key map; missing keys (1): "
      "['embedding_layer.vision_encoder.to_patch_embedding.2.weight']")
  assert not (tmp_path / 'ckpt').exists()


def test_out_paths(state, tmp_path, capsys):
  """`--out` is a new path, or (with --overwrite) what the command writes: a parameter-only
  checkpoint folder for from-torch, a file for to-torch. A file, a training run or another folder
  is refused before anything is read, and nothing there changes; a failed export leaves no
  `.partial` file."""
  model = write_safetensors(tmp_path / 'model.safetensors', state)
  tiny = ['--config', 'configs/radfm.py:model=tiny']

  def convert(*argv):
    rc = main(['convert', *argv])
    return rc, capsys.readouterr().err.strip()

  ckpt = tmp_path / 'ckpt'
  assert convert('from-torch', '--checkpoint', model, '--out', str(ckpt), *tiny)[0] == 0
  config = (ckpt / 'config.json').read_bytes()
  assert convert('from-torch', '--checkpoint', model, '--out', str(ckpt), *tiny) == (
      2, f'radfm-jax convert: --out {ckpt}: a checkpoint exists there; expected a new folder (or '
      '--overwrite to replace it)')
  assert (ckpt / 'config.json').read_bytes() == config
  assert convert('from-torch', '--checkpoint', model, '--out', str(ckpt), *tiny,
                 '--overwrite')[0] == 0
  _all_equal(checkpoint.LeafReader(str(ckpt)), state)
  run = tmp_path / 'run'                        # a training run's folder, or any other
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'metrics.jsonl').write_text('{}\n')
  for out in (run, tmp_path / 'model.safetensors'):
    rc, err = convert('from-torch', '--checkpoint', model, '--out', str(out), *tiny, '--overwrite')
    assert rc == 2 and err.startswith(f'radfm-jax convert: --out {out}: '), err
  assert sorted(os.listdir(run)) == ['checkpoints', 'metrics.jsonl']
  # to-torch: a file, never a folder; an existing file only with --overwrite
  exported = tmp_path / 'exported.safetensors'
  exported.write_bytes(b'precious')
  assert convert('to-torch', '--checkpoint', str(ckpt), '--out', str(exported)) == (
      2, f'radfm-jax convert: --out {exported}: exists; expected a new file (or --overwrite to '
      'replace it)')
  assert exported.read_bytes() == b'precious'
  assert convert('to-torch', '--checkpoint', str(ckpt), '--out', str(run), '--overwrite') == (
      2, f'radfm-jax convert: --out {run}: is a folder; expected a file path (.bin or '
      '.safetensors)')
  under = exported / 'model.bin'                # below a file: refused before anything is read
  assert convert('to-torch', '--checkpoint', str(ckpt), '--out', str(under)) == (
      2, f'radfm-jax convert: --out {under}: {exported} is not a directory; expected a file path '
      '(.bin or .safetensors)')
  assert convert('to-torch', '--checkpoint', str(ckpt), '--out', str(exported),
                 '--overwrite')[0] == 0
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(load_file(str(exported))[NORM], state[NORM])
  # an export that fails half-way leaves neither the file nor its .partial
  from radfm_jax.convert import api
  bad = tmp_path / 'bad.bin'
  with pytest.raises(Exception):
    api._write_torch_bin(str(bad), {NORM: (state[NORM].shape, np.dtype('float32'))}, {},
                         iter([(FC_BIAS, state[FC_BIAS])]))
  assert not bad.exists() and not (tmp_path / 'bad.bin.partial').exists()
