"""The manifest schema: every bad line is one InputError naming file, line and field exactly; the
examples, field table and `position` renderings of docs/data.md are the code's own; ingest and the
JSONL readers report the real line."""

import json
import os
import re

import pytest

from radfm_jax.cli.main import build_parser, main
from radfm_jax.data import manifest, prompts
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import read_jsonl
from radfm_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'data.md')
OK = '{"id": "ok", "question": "Q?", "answer": "A.", "images": [{"path": "a.png"}]}'


def _img(**entry):
  return json.dumps({'id': 'x', 'question': 'Q?', 'images': [dict({'path': 'a.png'}, **entry)]})


# (lines of the file, form, expected message after "<path> ")
BAD = [
    ([OK, '{"id": "b", "question": "x",}'], 'input',
     "line 2: not valid JSON (Expecting property name enclosed in double quotes, column 29); "
     "expected one JSON object per line"),
    ([OK, '', '  ', '{"id": "b"'], 'input',
     "line 4: not valid JSON (Expecting ',' delimiter, column 11); expected one JSON object per "
     "line"),
    ([OK, '["a"]'], 'input', 'line 2: got a JSON array; expected one JSON object per line'),
    ([OK, json.dumps({'id': 'b', 'question': 'Q?', 'images': [
        {'path': 'a.png'}, {'path': 'b.png', 'position': {'questin': 3}}]})], 'input',
     'line 2 field images[1].position: got {"questin": 3}; expected {"question": N} or '
     '{"answer": N}, N an integer >= 0'),
    ([_img(position={'question': -1})], 'input',
     'line 1 field images[0].position: got {"question": -1}; expected {"question": N} or '
     '{"answer": N}, N an integer >= 0'),
    ([_img(position={'answer': True})], 'input',
     'line 1 field images[0].position: got {"answer": true}; expected {"question": N} or '
     '{"answer": N}, N an integer >= 0'),
    ([_img(position={'question': 1, 'answer': 2})], 'input',
     'line 1 field images[0].position: got {"question": 1, "answer": 2}; expected {"question": N} '
     'or {"answer": N}, N an integer >= 0'),
    ([_img(postion={'question': 1})], 'input',
     'line 1 field images[0].postion: unknown field (did you mean position?); expected one of '
     'path, id, modality, position, frame, index'),
    ([_img(shape=[1, 2, 2, 1])], 'input',
     'line 1 field images[0].shape: not read from an input manifest; expected one of path, id, '
     'modality, position, frame, index'),
    # text the tokenizer would read as image tokens (placeholders with no image behind them)
    ([json.dumps({'id': 'x', 'question': 'What is <image3>?'})], 'input',
     "line 1 field question: holds '<image3>', which the tokenizer reads as an image token; "
     'expected plain text (an image goes where its images[k].position says)'),
    ([OK, json.dumps({'id': 'y', 'question': 'Q?', 'answer': 'See </image> here.'})], 'input',
     "line 2 field answer: holds '</image>', which the tokenizer reads as an image token; "
     'expected plain text (an image goes where its images[k].position says)'),
    ([_img(frame=-1)], 'input',
     'line 1 field images[0].frame: got -1; expected integer >= 0 and < 2^31'),
    ([_img(index='2')], 'input',
     'line 1 field images[0].index: got "2"; expected integer >= 0 and < 2^31'),
    # a frame / index past any real count is the schema's error, not an overflow in the store
    ([_img(frame=10**30)], 'input', 'line 1 field images[0].frame: got '
     '1000000000000000000000000000000; expected integer >= 0 and < 2^31'),
    ([_img(index=2**31)], 'input',
     'line 1 field images[0].index: got 2147483648; expected integer >= 0 and < 2^31'),
    # json keeps the last of two equal keys: a repeated one is an error naming it, at any depth
    ([OK, '{"question": "x", "answer": "y", "answer": "z", "images": [{"path": "a.png"}]}'],
     'input', 'line 2 field answer: the key appears twice in one object; expected each key once '
     '(JSON would keep only the last value)'),
    (['{"question": "x", "images": [{"path": "a.png"}, {"path": "b.png", "path": "c.png"}]}'],
     'input', 'line 1 field images[1].path: the key appears twice in one object; expected each '
     'key once (JSON would keep only the last value)'),
    ([_img(path='')], 'input', 'line 1 field images[0].path: got ""; expected non-empty string'),
    ([json.dumps({'id': 'x', 'images': [{'modality': 'CT'}]})], 'input',
     'line 1 field images[0].path: missing; expected non-empty string (an input manifest names '
     'each scan by its path)'),
    ([json.dumps({'id': 'x', 'images': [{'id': 's', 'position': {'question': 0}}]})], 'store',
     'line 1 field images[0].shape: missing; expected list of 4 integers >= 1 (a store manifest '
     'names each scan by id and shape, as ingest writes them)'),
    ([json.dumps({'id': 'x', 'images': [{'id': 's', 'shape': [1, 2, 2, 1], 'frame': 0}]})],
     'store', 'line 1 field images[0].frame: not read from a store manifest; expected one of id, '
     'modality, position, shape'),
    ([json.dumps({'id': 'x', 'images': [{'id': 's', 'shape': [1, 0, 2, 1]}]})], 'store',
     'line 1 field images[0].shape: got [1, 0, 2, 1]; expected list of 4 integers >= 1'),
    ([json.dumps({'id': 'x', 'images': ['a.png']})], 'input',
     'line 1 field images[0]: got "a.png"; expected an object {"path": ...}'),
    ([json.dumps({'id': 'x', 'images': {'path': 'a.png'}})], 'input',
     'line 1 field images: got {"path": "a.png"}; expected list of image objects (below)'),
    ([OK, '{"id": "y", "qestion": "Q?"}'], 'input',
     'line 2 field qestion: unknown field (did you mean question?); expected a known field, or a '
     'field of your own whose name is not a near-miss of one'),
    (['{"Answer": "yes"}'], 'input',
     'line 1 field Answer: unknown field (did you mean answer?); expected a known field, or a '
     'field of your own whose name is not a near-miss of one'),
    (['{"image": []}'], 'input',
     'line 1 field image: unknown field (did you mean images?); expected a known field, or a '
     'field of your own whose name is not a near-miss of one'),
    (['{"question": "Q?", "path": "a.png"}'], 'input',
     'line 1 field path: a field of an image entry; expected it inside "images": '
     '[{"path": ...}]'),
    (['{"question": 3}'], 'input', 'line 1 field question: got 3; expected string'),
    (['{"split": "val-2"}'], 'input',
     'line 1 field split: got "val-2"; expected string of letters, digits, _ (not _ alone)'),
    (['{"split": "__"}'], 'input',                 # was: TFDS's own error at publish
     'line 1 field split: got "__"; expected string of letters, digits, _ (not _ alone)'),
    (['{"kind": "maybe"}'], 'input', 'line 1 field kind: got "maybe"; expected "closed" or "open"'),
    (['{"yes_no": "yes"}'], 'input', 'line 1 field yes_no: got "yes"; expected boolean'),
    (['{"options": ["a", 2]}'], 'input',
     'line 1 field options: got ["a", 2]; expected list of strings'),
    (['{"id": true}'], 'input', 'line 1 field id: got true; expected string or integer'),
    ([OK, '{"id": "b"}', '{"id": "ok"}'], 'input',
     'line 3 field id: "ok" is already used ({path} line 1); expected a unique id'),
    (['{"question": "a"}', '{"id": "0"}'], 'input',      # line 1's default id is "0"
     'line 2 field id: "0" is already used ({path} line 1); expected a unique id'),
    ([_img(id='s1'), json.dumps({'id': 'y', 'images': [{'path': 'b.png', 'id': 's1'}]})], 'input',
     'line 2 field images[0].id: "s1" already names "a.png" ({path} line 1); expected one id per '
     'scan (path, frame, index)'),
    (['{"task": "diagnosis_yes_no", "answer": "no"}'], 'input',
     'line 1 field finding: missing; expected string (the question is empty, so it comes from '
     'the templates of task diagnosis_yes_no, which use {finding})'),
    (['{"task": "modality", "yes_no": true}'], 'input',
     'line 1 field modality: missing; expected string (the question is empty, so it comes from '
     'the templates of task modality, which use {modality})'),
    (['{"task": "vqa", "answer": "no"}'], 'input',
     'line 1 field question: empty; expected the question text (task vqa has no template '
     'questions)'),
    # 'default' names the group of the samples without a dataset / task: a real one of that name
    # next to them would be merged with them (eval tables, data.mixture), so it is refused
    ([OK, '{"id": "b", "dataset": "slake"}', '{"id": "c", "dataset": "default"}'], 'input',
     'line 3 field dataset: "default" is also the name of the group of samples without a dataset '
     '(e.g. {path} line 1), so the two would be counted as one; expected another dataset name, or '
     'a dataset on every sample'),
    (['{"id": "a", "task": "default", "dataset": "x"}', '{"id": "b", "task": "", "dataset": "x"}'],
     'input', 'line 1 field task: "default" is also the name of the group of samples without a '
     'task (e.g. {path} line 2), so the two would be counted as one; expected another task name, '
     'or a task on every sample'),
]


@pytest.mark.parametrize('lines, form, expected', BAD, ids=[b[2][:40] for b in BAD])
def test_bad_line_is_one_error_naming_file_line_field(tmp_path, lines, form, expected):
  path = tmp_path / 'samples.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(InputError) as e:
    manifest.read_records(str(path), form=form)
  assert str(e.value) == f'{path} ' + expected.replace('{path}', str(path))
  assert '\n' not in str(e.value)


def test_not_utf8_and_missing_file(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_bytes(OK.encode() + b'\n{"question": "caf\xe9"}\n')
  with pytest.raises(InputError) as e:
    read_jsonl(str(path))
  assert str(e.value) == (f'{path} line 2: not UTF-8 text (invalid continuation byte, column 18); '
                          'expected a UTF-8 JSONL file')
  with pytest.raises(InputError, match=r'^manifest \S+nope.jsonl: no such file'):
    manifest.read_records(str(tmp_path / 'nope.jsonl'))


def test_valid_lines_keep_every_field_including_your_own(tmp_path):
  rows = [{'id': 7, 'question': 'Q?', 'answer': 'A', 'family': 'real', 'label': {'x': [1]},
           'images': [{'path': 'a.nii.gz', 'id': 'scan-a', 'frame': 0, 'modality': 'CT',
                       'position': {'answer': 2}}]},
          {'task': 'diagnosis_yes_no', 'finding': 'a nodule', 'answer': 'yes', 'split': 'eval_2'},
          {'task': 'report', 'findings': 'Normal.', 'images': [{'path': 'b.png'}, {'path': 'b.png'}]}]
  path = tmp_path / 'm.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  assert manifest.read_records(str(path), form='input') == rows
  assert manifest.read_records(str(path), form=None) == rows


def _doc() -> str:
  with open(DOC, encoding='utf-8') as f:
    return f.read()


def _blocks(lang: str) -> list[str]:
  return re.findall(rf'```{lang}\n(.*?)```', _doc(), re.S)


def test_every_json_example_of_the_doc_is_a_valid_manifest(tmp_path):
  blocks = _blocks('json')
  assert len(blocks) >= 6
  forms = set()
  for n, block in enumerate(blocks):
    path = tmp_path / f'example{n}.jsonl'
    path.write_text(block)
    records = manifest.read_records(str(path), form=None)
    assert len(records) == len(block.strip().splitlines())
    for r in records:
      form = 'store' if any('shape' in im for im in r.get('images', [])) else 'input'
      assert manifest.read_records(str(path), form=form) == records
      forms.add(form)
      prompts.format_sample(r)                        # the text renders (templates filled)
  assert forms == {'input', 'store'}
  kinds = {im['path'].rsplit('.', 1)[-1] if '.' in im['path'][-8:] else 'folder'
           for b in blocks for line in b.splitlines() if line.strip()
           for im in json.loads(line).get('images', []) if 'path' in im}
  assert {'png', 'gz', 'folder'} <= kinds                 # 2D, NIfTI, DICOM series


def test_doc_field_table_and_help_come_from_the_schema(capsys):
  doc = _doc()
  assert manifest.schema_markdown() in doc, (
      'docs/data.md: paste the output of python -c "from radfm_jax.data.manifest import '
      'schema_markdown; print(schema_markdown())" over the field table')
  with pytest.raises(SystemExit):
    build_parser().parse_args(['ingest', '--help'])
  help_text = capsys.readouterr().out
  assert manifest.schema_help() in help_text
  for field in manifest.SAMPLE_FIELDS + manifest.IMAGE_FIELDS:
    assert f'`{field.name}`' in doc and f'  {field.name} (' in help_text, field.name
  template_fields = {name for task in prompts.TASKS for t in [prompts.load_templates(task)]
                     for name in t['fields']}
  assert template_fields <= {f.name for f in manifest.SAMPLE_FIELDS}


def _abbreviated(text: str) -> str:
  return re.sub(r'<image>((?:<image\d+>)+)</image>',
                lambda m: '<image>' + re.findall(r'<image\d+>', m[1])[0] + '…'
                + re.findall(r'<image\d+>', m[1])[-1] + '</image>', text)


def test_doc_position_examples_are_what_the_code_renders():
  doc = _doc()
  rows = re.findall(r'^\| `(\{"question": \d+\})` \| `(.*)` \|$', doc, re.M)
  assert len(rows) == 4
  for position, shown in rows:
    question, _ = prompts.place_images('Is there a lesion?', '', [json.loads(position)])
    assert _abbreviated(question) == shown
  multi = next(json.loads(b) for b in _blocks('json') if '"mr-042"' in b)
  question, _, n = prompts.format_sample(multi)
  assert n == 2
  assert f'```text\n{_abbreviated(question)}\n```' in doc


def test_ingest_validates_before_reading_and_names_the_line(tmp_path, capsys):
  path = tmp_path / 'samples.jsonl'
  path.write_text(OK + '\n' + _img(position={'question': 'end'}) + '\n')
  store = tmp_path / 'store'
  with pytest.raises(InputError) as e:
    ingest(str(path), str(store))
  assert str(e.value).startswith(f'{path} line 2 field images[0].position: got {{"question": "end"}}')
  assert not store.exists()                            # nothing written
  rc = main(['ingest', '--manifest', str(path), '--out', str(store)])
  err = capsys.readouterr().err
  assert rc == 2 and err == f'radfm-jax ingest: {e.value}\n'
  with pytest.raises(InputError) as e:
    ingest([json.loads(OK), {'id': 'b', 'images': [{'path': 'a.png', 'frame': 1.5}]}], str(store))
  assert str(e.value) == ('manifest record 2 field images[0].frame: got 1.5; expected integer '
                          '>= 0 and < 2^31')


def test_store_jsonl_readers_report_file_and_line(tmp_path):
  from radfm_jax.data.store import VolumeStore
  from radfm_jax.train.metrics import read_metrics
  store = VolumeStore(str(tmp_path))
  with open(store.scans_path, 'w') as f:
    f.write('{"id": "a", "shape": [1, 2, 2, 1]}\n\n{"id": "b", "shape": [1, 2\n')
  with pytest.raises(InputError) as e:
    store.index()
  assert str(e.value).startswith(f'{store.scans_path} line 3: not a store index row (')
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\nnan\n')
  with pytest.raises(InputError, match=r'metrics.jsonl line 2: not valid JSON'):
    read_metrics(str(tmp_path))


def test_a_default_name_without_unnamed_samples_is_accepted(tmp_path):
  # only the meeting of the two is refused: every sample named 'default' is one group, as is
  # every sample without a dataset
  path = tmp_path / 'samples.jsonl'
  path.write_text('{"id": "a", "dataset": "default", "task": "default"}\n'
                  '{"id": "b", "dataset": "default", "task": "other"}\n')
  assert [r['id'] for r in manifest.read_records(str(path), form='input')] == ['a', 'b']
  with pytest.raises(InputError) as e:        # records passed in memory: 'manifest record N'
    manifest.validate_records([{'id': 'a'}, {'id': 'b', 'dataset': 'default'}])
  assert str(e.value) == ('manifest record 2 field dataset: "default" is also the name of the '
                          'group of samples without a dataset (e.g. manifest record 1), so the '
                          'two would be counted as one; expected another dataset name, or a '
                          'dataset on every sample')
