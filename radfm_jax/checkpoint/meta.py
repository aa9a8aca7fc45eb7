"""`config.json`, the file every checkpoint writer puts beside what it writes.

    DIR/config.json                  {"layout": "params", "layout_version": 1, "model": {...}}
    WORKDIR/checkpoints/config.json  {"layout": "train_state", "layout_version": 1,
                                      "model": {...}, "data": {...}, "train": {...}, ...}

`layout` says how the parameters are stored (see `read.locate`): "params" (`params.save`,
`radfm-jax convert`: DIR/params/ is one Orbax tree of the parameter dict) or "train_state"
(`train_state.Checkpointer`: numbered steps beside the file, each `<step>/state/` a TrainState).
Readers look for the file in the given folder, then in its parents (a step folder finds its run's).

Legacy (written before the layout field existed): a config.json with no `layout` is read as
"params" if a `params/` folder sits beside it, as "train_state" if a `checkpoints/` folder does
(the previous release's training workdir kept its config.json there), and is an error otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

from radfm_jax.config import DataConfig, ModelConfig, model_config_from_dict
from radfm_jax.errors import InputError, writing

CONFIG_FILE = 'config.json'
PARAMS, TRAIN_STATE = 'params', 'train_state'
LAYOUTS = (PARAMS, TRAIN_STATE)
LAYOUT_VERSION = 1
# What a path given as a checkpoint must be, in the errors for one that is not.
EXPECTED_CHECKPOINT = ('expected a checkpoint folder written by radfm_jax.save, radfm-jax train or '
                       'radfm-jax convert')


def read_json(path: str) -> dict:
  """The JSON object in `path` (a config.json): `parse_json` of its bytes."""
  with open(path, 'rb') as f:
    return parse_json(f.read(), path)


def parse_json(raw: bytes, path: str) -> dict:
  """The JSON object in `raw`, read from `path`; bytes that are not one (a file cut short by a
  full disk, edited by hand) are an InputError naming the file, whoever reads it."""
  try:
    data = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError
    raise InputError(f'{path}: not valid JSON ({e}); expected the run record radfm-jax writes '
                     'beside a checkpoint') from e
  if not isinstance(data, dict):
    raise InputError(f'{path}: a JSON {type(data).__name__}, expected an object (the run record '
                     'radfm-jax writes beside a checkpoint)')
  return data


def layout_record(layout: str) -> dict:
  """The fields a writer adds to its config.json."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout {layout!r}: expected one of {LAYOUTS}')
  return {'layout': layout, 'layout_version': LAYOUT_VERSION}


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def write_config(directory: str, layout: str, body: Mapping) -> str:
  """Writes DIR/config.json = body + the layout record (atomically: a reader never sees half a
  file); returns its path. `directory` may be a URL (gs://...): written through etils.epath."""
  from etils import epath
  folder = epath.Path(directory)
  with writing(os.fspath(folder)):
    folder.mkdir(parents=True, exist_ok=True)
  text = json.dumps({**body, **layout_record(layout)}, indent=1, sort_keys=True, default=str)
  path, tmp = folder / CONFIG_FILE, folder / (CONFIG_FILE + '.tmp')
  with writing(os.fspath(path)):        # a full or read-only disk: one line naming the file
    tmp.write_text(text)
    tmp.replace(path)
  return os.fspath(path)


# What `params.IncrementalWriter` and `write_config` leave in a parameter-only checkpoint's folder
# while they write: the tree (and Orbax's temporary of it) before it is renamed to params/, the
# config.json before it is renamed into place.
_WRITING = ('params.partial', CONFIG_FILE + '.tmp')


def unfinished_write(folder: str) -> str | None:
  """What a parameter-only checkpoint write (convert, merge) that did not finish left in `folder`,
  which has no config.json (the commit, written last): 'partial' when only its temporary files are
  there (nothing complete: a rerun writes over them), 'uncommitted' when params/ is there too (the
  tree renamed in, the record not yet written: no config names it); None for anything else (a
  config.json, an empty folder, any other file)."""
  names = os.listdir(folder)
  if not names or CONFIG_FILE in names:
    return None
  if all(n.startswith(_WRITING) for n in names):
    return 'partial'
  if all(n.startswith(_WRITING) or n == PARAMS for n in names):
    return 'uncommitted'
  return None


def check_output_folder(out: str, shown: str, overwrite: bool) -> None:
  """InputError (`shown`: how the user named `out`, e.g. '--out DIR') unless `out` can take a
  new parameter-only checkpoint: a new path (no file among its parents), an empty folder, what a
  killed write left (`unfinished_write`: its temporary files; its params/ only when
  `overwrite`), or, when `overwrite`, a parameter-only checkpoint to replace. Never a file, a
  training run or any other folder: the new parameters would be mixed with what is there, or
  its own config.json written over."""
  from radfm_jax.errors import check_parent_folder
  # e.g. a run's checkpoints/7: its next resume would move it aside as a damaged step
  check_outside_checkpoint(os.path.dirname(os.path.abspath(out)), shown,
                           'expected a new checkpoint folder outside any other checkpoint')
  if not os.path.exists(out):
    check_parent_folder(out, shown, 'expected a new checkpoint folder')
    return
  if not os.path.isdir(out):
    raise InputError(f'{shown}: is a file; expected a new checkpoint folder')
  unfinished = unfinished_write(out)
  if unfinished == 'partial':          # a killed run's temporary files only: written over
    return
  if unfinished == 'uncommitted' and not overwrite:
    raise InputError(f'{shown}: holds params/ but no {CONFIG_FILE}: a conversion or merge '
                     'that did not finish; expected a new folder (or --overwrite to replace it)')
  if unfinished == 'uncommitted':
    return
  empty = not os.listdir(out)
  if not empty and _own_layout(out) != PARAMS:
    raise InputError(f'{shown}: a folder that is not a parameter-only checkpoint; expected a '
                     'new checkpoint folder')
  if not overwrite and not empty:
    raise InputError(f'{shown}: a checkpoint exists there; expected a new folder (or '
                     '--overwrite to replace it)')


def check_outside_checkpoint(folder: str, shown: str, expected: str) -> None:
  """InputError '`shown`: inside the checkpoint C; `expected`' when a command would write into
  `folder` (existing or not) and it is among a checkpoint's own files: the checkpoint's folder
  itself, or a folder inside its params/ or step folders (`_climb`). A resumed run takes a step
  folder it did not write for a damaged one; a reader of the checkpoint meets files it never
  wrote. A training workdir's other folders, or a folder someone made inside a checkpoint, are
  not its own."""
  holder = next((p for p in _climb(os.path.abspath(folder)) if _own_layout(p) is not None), None)
  if holder is not None:
    raise InputError(f'{shown}: inside the checkpoint {holder}; {expected}')


def _own_layout(folder: str) -> str | None:
  """The layout the config.json in `folder` itself names (not a parent's); None when it has none
  or it is not a checkpoint record (whatever it is, it is not ours to write over)."""
  if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
    return None
  try:
    return read_record(folder)[2]
  except InputError:
    return None


def checkpoint_folder(directory: str) -> str:
  """A training workdir -> its `checkpoints/` folder (whose config.json is the run's config
  record, with the layout; runs of earlier releases also kept a log copy in the workdir); any other
  folder as it is."""
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, 'checkpoints')) and not os.path.isdir(
      os.path.join(directory, 'params')):
    return os.path.join(directory, 'checkpoints')
  return directory


# The folders a checkpoint holds, which `_folders_up` climbs out of to the checkpoint's record:
# a run's step folders (digits) and their Orbax items, a parameter-only checkpoint's params/.
_INNER_FOLDERS = ('checkpoints', PARAMS, 'state', 'data', 'config')


def _climb(probe: str):
  """`probe`, then each parent while the folder left is one a checkpoint holds (`_INNER_FOLDERS`,
  a step number): `run/checkpoints/800/state` climbs to `run/checkpoints`, but `ckpt/finetuned`
  (another folder someone made inside a checkpoint, or a killed save's) stops there."""
  while True:
    yield probe
    parent = os.path.dirname(probe)
    name = os.path.basename(probe)
    if parent == probe or not (name.isdigit() or name in _INNER_FOLDERS):
      return
    probe = parent


def _folders_up(directory: str):
  """The checkpoint folder of `directory` (`checkpoint_folder`), then the checkpoint it lies
  inside (`_climb`)."""
  return _climb(checkpoint_folder(directory))


def find_config(directory: str) -> str | None:
  """The config.json of the checkpoint at `directory`: in its `checkpoint_folder`, or in the
  checkpoint that folder lies inside (a step folder, its items, `params/`: `_folders_up`); None
  when there is none."""
  paths = (os.path.join(folder, CONFIG_FILE) for folder in _folders_up(directory))
  return next((path for path in paths if os.path.isfile(path)), None)


def read_record(directory: str) -> tuple[str, dict, str]:
  """(config.json path, its contents, layout) for the checkpoint at `directory`. A path that is
  not a checkpoint (missing, a file, no config.json, no layout) or one of another layout or
  release is an InputError naming it, the same line from `radfm_jax.load` and the commands."""
  if not isinstance(directory, (str, os.PathLike)):     # None; an int would be taken as a fd
    raise InputError(f'checkpoint: got {type(directory).__name__} {directory!r}; '
                     f'{EXPECTED_CHECKPOINT} (its path)')
  if not os.path.isdir(directory):
    what = 'a file' if os.path.exists(directory) else 'no such folder' + (
        f'; ~ is not expanded: os.path.expanduser({os.fspath(directory)!r})'
        if os.fspath(directory).startswith('~') else '')
    raise InputError(f'{directory}: not a checkpoint ({what}); {EXPECTED_CHECKPOINT}')
  path = find_config(directory)
  if path is None:
    folder = checkpoint_folder(directory)
    unfinished = unfinished_write(folder)
    raise InputError(f'{directory}: not a checkpoint ({os.path.join(folder, CONFIG_FILE)}: not '
                     'found' + (', only what a save that did not finish left there'
                                if unfinished else '') +
                     f'); {EXPECTED_CHECKPOINT} (a {CONFIG_FILE} with "layout": one of '
                     f'{list(LAYOUTS)})')
  data = read_json(path)
  layout = data.get('layout')
  if layout is None:
    layout = _legacy_layout(os.path.dirname(path))
    if layout is None:
      raise InputError(f'{directory}: not a checkpoint ({path}: no "layout" field, and neither '
                       f'params/ nor checkpoints/ beside it); {EXPECTED_CHECKPOINT} ("layout": '
                       f'one of {list(LAYOUTS)})')
    return path, data, layout
  if layout not in LAYOUTS:
    raise InputError(f'{path}: "layout" is {layout!r}, expected one of {list(LAYOUTS)}')
  version = data.get('layout_version')
  if version != LAYOUT_VERSION:
    raise InputError(f'{path}: "layout_version" is {version!r}, expected {LAYOUT_VERSION} '
                     '(written by another radfm-jax release)')
  return path, data, layout


def checked_record(directory: str) -> tuple[str, dict, str]:
  """`read_record`, any other error of reading it as one InputError naming `directory`: for a
  command to check that it was given a checkpoint at all before reading its sections (which
  default when missing)."""
  try:
    return read_record(directory)
  except InputError:
    raise
  except (FileNotFoundError, ValueError) as e:
    raise InputError(f'{directory}: not a checkpoint ({e})') from e


def _legacy_layout(folder: str) -> str | None:
  """The previous release's layouts, told apart by the folders beside the config.json."""
  if os.path.isdir(os.path.join(folder, 'params')):
    return PARAMS
  if os.path.isdir(os.path.join(folder, 'checkpoints')):
    return TRAIN_STATE
  return None


def model_config_of(path: str, data: Mapping) -> ModelConfig:
  """The ModelConfig in a config.json's `model` section (`path` names the file in errors)."""
  if not isinstance(data.get('model'), Mapping):
    raise ValueError(f'{path}: no "model" section (expected the ModelConfig the checkpoint was '
                     'written with)')
  return model_config_from_dict(data['model'])


def read_model_config(directory: str) -> ModelConfig:
  """The ModelConfig of the checkpoint at `directory` (any layout)."""
  path, data, _ = read_record(directory)
  return model_config_of(path, data)


def read_section(directory: str, name: str, schema) -> dict:
  """The fields of dataclass `schema` in the `name` section of the run config (config.json) of
  the checkpoint at `directory`; {} when there is no such file or section (a parameter-only
  checkpoint records only its model). Fields the schema no longer has are left out."""
  path = find_config(directory)
  if path is None:
    return {}
  section = read_json(path).get(name)
  if not isinstance(section, dict):
    return {}
  fields = {f.name for f in dataclasses.fields(schema)}

  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
  return {k: tuples(v) for k, v in section.items() if k in fields}


def read_data_config(directory: str) -> DataConfig | None:
  """The DataConfig of the run that wrote a checkpoint (image sizes, depth buckets, intensity
  policy), or None for a parameter-only checkpoint (which records none). A path that is not a
  checkpoint is `read_record`'s InputError (not taken for a checkpoint that records none)."""
  read_record(directory)
  section = read_section(directory, 'data', DataConfig)
  return DataConfig(**section) if section else None


def find_tokenizer(directory: str) -> str | None:
  """The tokenizer of the checkpoint at `directory` (a path that is not one: `read_record`'s
  InputError), the first of: the run's own copy (`tokenizer.model` beside its config.json, or in
  the workdir above `checkpoints/`: what it trained with, wherever the run was moved since); the
  file its config's `data.tokenizer` names (an absolute path: a run moved away from its copy's
  old place would otherwise take whatever now lies there); a `tokenizer.model` in a folder above
  (the demo keeps it beside `train/`). None when there is none."""
  path, data, _ = read_record(directory)
  root = os.path.dirname(os.path.abspath(path))
  own = [root] + ([os.path.dirname(root)] if os.path.basename(root) == 'checkpoints' else [])
  for folder in own:
    candidate = os.path.join(folder, 'tokenizer.model')
    if os.path.isfile(candidate):
      return candidate
  section = data.get('data')
  given = section.get('tokenizer') if isinstance(section, Mapping) else None
  if isinstance(given, str) and given and os.path.isfile(given):
    return given
  folder = own[-1]
  while os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
    candidate = os.path.join(folder, 'tokenizer.model')
    if os.path.isfile(candidate):
      return candidate
  return None
