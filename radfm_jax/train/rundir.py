"""The training workdir as a self-contained run: its one config record, its tokenizer, and the
check that a resumed run is the run that workdir holds.

    WORKDIR/checkpoints/config.json   the run's resolved config + {"layout": "train_state", ...}:
                                      the one config file of a run (`radfm-jax generate / eval
                                      --checkpoint WORKDIR` read it); paths in it are absolute
    WORKDIR/tokenizer.model           a copy of the tokenizer the run trained with

so `generate --checkpoint WORKDIR` works from any directory, and after the run folder is moved
(`checkpoint.find_tokenizer` falls back to the tokenizer.model beside the checkpoints).

Resuming: the config in a workdir that already holds checkpoints must equal the requested one
except in `RESUMABLE` fields, which may change between a run and its resume (length, logging,
checkpoint cadence, paths (`finetune.init_from` is read only by a fresh start), the mesh: a
checkpoint restores onto any mesh; reading cached image tokens: each change is said, and the
record takes it, `resumable_changes`); any other difference fails before
Orbax is touched, naming every field that differs. What the run read beyond its config is
recorded too (the record's `run` section, `run_inputs`: the tokenizer's sha256, the train
split's sample count and a sha256 of its rows and scans), and a resume on other data or another
tokenizer is refused the same way (a moved copy of the store passes). Without config.json the
newest step's own saved config is compared.

One run at a time: `lock_workdir` holds WORKDIR/checkpoints/.lock for the whole run, and under it
`remove_unfinished` clears the temporary step folders a killed or failed save left, and the old
steps whose removal a kill cut short.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil

from radfm_jax.checkpoint import meta
from radfm_jax.checkpoint.train_state import purge_deleted
from radfm_jax.config import SYNTHETIC_STORE, Config, ConfigError
from radfm_jax.data.store import file_lock
from radfm_jax.errors import UserError, writing

TOKENIZER_FILE = 'tokenizer.model'
LOCK_FILE = '.lock'             # in WORKDIR/checkpoints/: the workdir lists only the run's files
# A step folder Orbax is still writing: renamed to `<step>` when complete (local filesystems).
_UNFINISHED = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')
# Dotted fields (or whole sections, ending in '.') a resumed run may change.
RESUMABLE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_steps',
             'train.checkpoint_every', 'train.keep_checkpoints', 'train.async_checkpoint',
             'train.peak_tflops', 'train.tensorboard', 'finetune.init_from', 'data.store',
             'data.manifest', 'data.tokenizer', 'data.num_workers', 'data.image_cache', 'mesh.',
             'generate.', 'model.dense_backward')
# (model.dense_backward: the same gradients to float rounding, a choice of the hardware as the mesh
# is; a CPU run from before the `cpu` preset set it resumes.)
# (data.image_cache: the same batches, the frozen tower's image tokens read from the store's cache
# instead of computed; the usual flow saves step 0 uncached, runs cache-images, then resumes.)
# The record's own fields (meta.layout_record), not config fields.
_RECORD = ('layout', 'layout_version')
# The record's section of what the run read beyond its config (`run_inputs`): checked on resume
# by `check_same_run`, not as config fields.
RUN_SECTION = 'run'


def _path(path) -> str:
  return os.fspath(path)


def _is_url(path: str) -> bool:
  return '://' in path


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def flat_fields(tree: dict, prefix: str = '') -> dict:
  """{'train': {'steps': 3}} -> {'train.steps': 3}: the dotted field names a refused resume (of
  a run, or of an eval's progress) names."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_fields(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _resumable(field: str) -> bool:
  return any(field == r or (r.endswith('.') and field.startswith(r)) for r in RESUMABLE)


def has_checkpoints(ckpt_dir: str) -> bool:
  """Whether `ckpt_dir` holds a finished step folder (named by its step number)."""
  folder = _epath(ckpt_dir)
  return folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())


def saved_config(ckpt_dir: str) -> dict | None:
  """The config record of the run in `ckpt_dir`: its config.json, else (deleted) the config the
  newest step saved with its state; None when there is neither."""
  path = _epath(ckpt_dir) / meta.CONFIG_FILE
  if not path.exists():
    steps = sorted((int(p.name) for p in _epath(ckpt_dir).iterdir()
                    if p.name.isdigit() and p.is_dir()), reverse=True) if has_checkpoints(
                        ckpt_dir) else []
    for step in steps:
      saved = _epath(ckpt_dir) / str(step) / 'config' / 'metadata'   # Orbax's JsonSave item
      if saved.exists():
        return meta.parse_json(saved.read_bytes(), str(saved))
    return None
  return meta.parse_json(path.read_bytes(), str(path))   # a gs:// workdir too


def run_inputs(cfg: Config) -> dict:
  """What a run reads beyond its config, to compare on resume (the `run` section of its record):
  the tokenizer's sha256, and for a store the train split's sample count and a sha256 of its
  manifest rows and of each scan they name (id, shape, dtype and the sha256 of its source file,
  from the store's index): a store moved or copied keeps it; a sample or a scan replaced changes
  it. Synthetic data: {}."""
  import hashlib
  import json

  from radfm_jax.data.manifest import read_manifest
  from radfm_jax.data.store import VolumeStore
  store = cfg.data.store
  if store in ('', SYNTHETIC_STORE):
    return {}
  out = {}
  if cfg.data.tokenizer and _epath(cfg.data.tokenizer).is_file():
    out['tokenizer_sha256'] = hashlib.sha256(_epath(cfg.data.tokenizer).read_bytes()).hexdigest()
  volumes = VolumeStore(store)
  rows = [r for r in read_manifest(cfg.data.manifest or volumes.manifest_path)
          if r.get('split', 'train') == 'train']
  index = volumes.index()
  digest = hashlib.sha256()
  for row in rows:
    digest.update(json.dumps(row, sort_keys=True).encode() + b'\n')
    for image in row.get('images', []):
      entry = index.get(image.get('id'), {})
      digest.update(json.dumps([image.get('id'), entry.get('shape'), entry.get('dtype'),
                                entry.get('attributes', {}).get('source_sha256')]).encode())
  out['train_samples'] = len(rows)
  out['train_sha256'] = digest.hexdigest()
  return out


def config_differences(saved: dict, wanted: dict) -> list[tuple[str, object, object]]:
  """[(field, saved value, wanted value)] for every field that differs and may not change on
  resume. A field only one side has (a field added or removed by a radfm-jax release) is
  skipped."""
  a, b = flat_fields(saved), flat_fields(wanted)
  out = []
  for field in sorted(set(a) & set(b)):
    if field in _RECORD or field.startswith(RUN_SECTION + '.') or _resumable(field):
      continue
    if _normal(a[field]) != _normal(b[field]):
      out.append((field, a[field], b[field]))
  return out


def resumable_changes(saved: dict, wanted: dict) -> list[tuple[str, object, object]]:
  """[(field, saved value, wanted value)] for every `RESUMABLE` field a resume changes: allowed,
  and said, so a resume's new generate section or cadence is never taken in silence."""
  a, b = flat_fields(saved), flat_fields(wanted)
  return [(f, a[f], b[f]) for f in sorted(set(a) & set(b))
          if _resumable(f) and _normal(a[f]) != _normal(b[f])]


def _normal(value):
  """Tuples and lists compare equal (JSON keeps lists)."""
  if isinstance(value, (list, tuple)):
    return [_normal(v) for v in value]
  return value


def check_same_run(cfg_dict: dict, ckpt_dir: str, workdir: str):
  """ConfigError naming each differing field when `ckpt_dir` holds checkpoints of a run whose
  config differs from `cfg_dict` outside `RESUMABLE`."""
  if not has_checkpoints(ckpt_dir):
    return
  saved = saved_config(ckpt_dir)
  if saved is None:
    return
  then, now = saved.get(RUN_SECTION) or {}, cfg_dict.get(RUN_SECTION) or {}
  old_store = (saved.get('data') or {}).get('store', '')
  new_store = cfg_dict['data']['store']
  if (old_store == SYNTHETIC_STORE) != (new_store == SYNTHETIC_STORE) and old_store:
    # the checkpoints hold the other kind of data position: no step would restore
    trained = ('synthetic batches' if old_store == SYNTHETIC_STORE
               else f'the store {old_store}')
    raise ConfigError(f'config field data.store={new_store!r}: workdir {workdir} holds a run '
                      f'trained on {trained}; use another --workdir (a run does not switch '
                      'between synthetic batches and a store)')
  if then.get('train_sha256') and now.get('train_sha256') and then['train_sha256'] != now[
      'train_sha256']:
    raise ConfigError(
        f'workdir {workdir} holds a run trained on other data: the train split of '
        f'data.store={cfg_dict["data"]["store"]!r} (data.manifest='
        f'{cfg_dict["data"]["manifest"] or "its manifest.jsonl"!r}) now has '
        f'{now["train_samples"]} samples, sha256 {now["train_sha256"][:12]}, where the run read '
        f'{then["train_samples"]}, sha256 {then["train_sha256"][:12]} (a sample or a scan '
        'changed, added or removed); use another --workdir, or the data it trained on (a moved '
        'copy of the store is fine)')
  if then.get('tokenizer_sha256') and now.get('tokenizer_sha256') and then[
      'tokenizer_sha256'] != now['tokenizer_sha256']:
    raise ConfigError(f'config field data.tokenizer={cfg_dict["data"]["tokenizer"]!r}: differs '
                      f'from the tokenizer workdir {workdir} trained with (sha256 '
                      f'{then["tokenizer_sha256"][:12]}); use another --workdir or that tokenizer')
  diffs = config_differences(saved, cfg_dict)
  if diffs:
    listed = '; '.join(f'{f}={old!r}, you asked for {new!r}' for f, old, new in diffs)
    free = ', '.join(r + '*' if r.endswith('.') else r for r in RESUMABLE)
    raise ConfigError(f'workdir {workdir} holds a run with {listed}; use another --workdir or '
                      f'the same config (may change on resume: {free})')


class WorkdirLocked(UserError):
  """Another `radfm-jax train` runs in the workdir."""


@contextlib.contextmanager
def lock_workdir(ckpt_dir: str, workdir: str, enabled: bool = True):
  """Holds the run's lock (`fcntl.flock` on CKPT_DIR/.lock) for the block. Two runs in one workdir
  would save the same step numbers into one temporary folder (Orbax removes an unfinished one it
  meets, and the other run's save then fails half-written) and interleave their metrics rows, so a
  second run fails at once with WorkdirLocked naming the holder. The file is removed when the
  block ends (a killed run's stays, and is taken over), so a finished run's folder holds only its
  checkpoints. `enabled`: process 0 (the other hosts of a run share its folder); a URL workdir
  (gs://) is not locked."""
  if not enabled or _is_url(ckpt_dir):
    yield
    return
  path = os.path.join(ckpt_dir, LOCK_FILE)

  def held(holder: str):
    raise WorkdirLocked(f'workdir {workdir}: another radfm-jax train is running in it ({holder}; '
                        f'lock {path}); expected one run per workdir: wait for that run to end '
                        'or use another --workdir')

  with file_lock(path, held, remove=True):
    yield


def remove_unfinished(ckpt_dir: str) -> list[tuple[str, str]]:
  """Removes the step folders a save did not finish (`<step>.orbax-checkpoint-tmp*`: a kill or a
  refused write during the save; never read, since Orbax renames a step into place only when it
  is complete) and the old steps a kill left in `.deleting/` (`train_state.purge_deleted`), and
  returns [(path, what it was)], for the run to say. Call it under `lock_workdir`. A URL folder
  is left to Orbax."""
  if _is_url(ckpt_dir) or not os.path.isdir(ckpt_dir):
    return []
  removed = []
  for name in sorted(os.listdir(ckpt_dir)):
    m = _UNFINISHED.match(name)
    path = os.path.join(ckpt_dir, name)
    if m and os.path.isdir(path):
      with writing(path):
        shutil.rmtree(path)
      removed.append((path, f'the unfinished save of step {m[1]} (cut short by a kill or a '
                      'refused write; never read)'))
  return removed + [(path, 'an old step past train.keep_checkpoints whose removal a kill cut '
                     'short (never read)') for path in purge_deleted(ckpt_dir)]


def keep_tokenizer(cfg: Config, workdir: str, write: bool = True) -> str | None:
  """Copies the run's tokenizer (`data.tokenizer`) to WORKDIR/tokenizer.model (process 0 calls
  it) and returns the copy's path; a workdir that already holds a different tokenizer is a
  ConfigError. None when the run has no tokenizer (synthetic data). `write=False`: the checks
  and the path only (a run copies it once its state is restored or initialised, so a run that
  fails before leaves no copy to be compared with)."""
  given = cfg.data.tokenizer
  if not given:
    return None
  if not _epath(given).is_file():
    raise ConfigError(f'config field data.tokenizer={given!r}: no such file (expected the '
                      'SentencePiece tokenizer.model the data is tokenized with)')
  target = _epath(workdir) / TOKENIZER_FILE
  data = _epath(given).read_bytes()
  if target.exists():
    if target.read_bytes() != data:
      raise ConfigError(f'config field data.tokenizer={given!r}: differs from the tokenizer this '
                        f'run trained with ({_path(target)}); use another --workdir or that '
                        'tokenizer')
    return _path(target)
  if not write:
    return _path(target)
  tmp = target.parent / (TOKENIZER_FILE + '.tmp')
  with writing(_path(target)):          # a full disk: one line naming the copy
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(target)
  return _path(target)


def record(cfg: Config, tokenizer_copy: str | None, inputs: dict | None = None) -> dict:
  """The config to save with the run: `cfg.to_dict()` with absolute data paths and the tokenizer
  copy in the workdir as `data.tokenizer`, and `inputs` (`run_inputs`) as its `run` section."""
  out = cfg.to_dict()
  if inputs:
    out[RUN_SECTION] = dict(inputs)
  data = dict(out['data'])
  for name in ('store', 'manifest'):
    value = data.get(name) or ''
    if value and value != SYNTHETIC_STORE and not _is_url(value):
      data[name] = os.path.abspath(value)
  if tokenizer_copy:
    data['tokenizer'] = tokenizer_copy
  out['data'] = data
  init_from = out.get('finetune', {}).get('init_from') or ''
  if init_from and not _is_url(init_from):        # read only by a fresh start, never on resume
    out['finetune'] = dict(out['finetune'], init_from=os.path.abspath(init_from))
  return out


def write_record(ckpt_dir: str, config: dict):
  """WORKDIR/checkpoints/config.json (the layout record + the config), written at the start of a
  run so the folder names its config before the first checkpoint lands."""
  meta.write_config(ckpt_dir, meta.TRAIN_STATE, config)


__all__ = ['LOCK_FILE', 'RESUMABLE', 'RUN_SECTION', 'TOKENIZER_FILE', 'WorkdirLocked',
           'check_same_run', 'config_differences', 'flat_fields', 'has_checkpoints',
           'keep_tokenizer', 'lock_workdir', 'record', 'remove_unfinished', 'resumable_changes', 'run_inputs',
           'saved_config', 'write_record']
