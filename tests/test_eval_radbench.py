"""`radfm-jax eval --recipe radbench`: known predictions on fixture test splits scored per dataset
and per task against hand-computed values, and the command end to end on a tiny checkpoint."""

import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.eval import harness, radbench
from radfm_jax.eval.entities import TermListExtractor

pytestmark = pytest.mark.xdist_group('eval_radbench')

NODULE_REF = 'there is a small nodule in the left lung'        # 9 tokens
NODULE_PRED = 'there is a small nodule in the right lung'      # 8/9 1-grams ... 4/6 4-grams
REPORT_REF = 'the heart size is normal and the lungs are clear'
REPORT_PRED = 'the heart size is normal'                       # all n-grams right, half as long
# (id, dataset, task, kind or None, split, question, answer, prediction)
FIXTURE = [
    ('v1', 'vqa_rad', 'vqa', None, 'test', 'Is there a nodule?', 'Yes', 'Yes, there is.'),
    ('v2', 'vqa_rad', 'vqa', None, 'test', 'Is it normal?', 'No', 'yes'),
    ('v3', 'vqa_rad', 'vqa', 'open', 'test', 'What is seen?', NODULE_REF, NODULE_PRED),
    ('v4', 'vqa_rad', 'vqa', None, 'train', 'Train only?', 'Yes', 'no'),
    ('s1', 'slake', 'vqa', None, 'test', 'Which? A) CT B) MRI', 'B', 'b) MRI'),
    ('s2', 'slake', 'vqa', 'open', 'test', 'Where?', 'free fluid in the abdomen',
     'free fluid in the abdomen'),
    ('m1', 'radiopaedia_modality', 'modality', None, 'test', 'Modality?', 'CT', 'ct.'),
    ('m2', 'radiopaedia_modality', 'modality', None, 'test', 'Modality?', 'MRI', 'CT'),
    ('c1', 'chestxray_yes_no', 'diagnosis_yes_no', None, 'test', 'Effusion?', 'No.', 'no'),
    ('r1', 'mimic_cxr', 'report', 'open', 'test', 'Describe.', REPORT_REF, REPORT_PRED),
    ('f1', 'radiology_features', 'rationale', 'open', 'test', 'Why?',
     'pneumonia with pleural effusion and consolidation', 'pneumonia with pleural effusion'),
    ('f2', 'radiology_features', 'rationale', 'open', 'test', 'Why?', 'consolidation',
     'normal lungs'),
]
TERMS = ['pneumonia', 'pleural effusion', 'consolidation', 'nodule']


def _bleu(matches, totals, hyp_len, ref_len):
  """Corpus BLEU-1..4 from pooled n-gram matches / totals (no zero counts: no smoothing)."""
  bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  out, logs = {}, 0.0
  for n in range(1, 5):
    logs += math.log(matches[n - 1] / totals[n - 1])
    out[f'bleu{n}'] = bp * math.exp(logs / n)
  return out


# Hand-computed. Open samples (1-/2-/3-/4-gram matches over totals, hypothesis / reference length):
# v3 8/9 6/8 5/7 4/6 (9/9); s2 5/5 4/4 3/3 2/2 (5/5); r1 5/5 4/4 3/3 2/2 (5/10);
# f1 4/4 3/3 2/2 1/1 (4/6); f2 0/2 0/1 0/0 0/0 (2/1). ROUGE-L F: v3 8/9 (LCS 8), s2 1, r1 2/3
# (P 1, R 1/2), f1 0.8 (P 1, R 2/3), f2 0. Token F1 (articles dropped): v3 6/7, s2 1, r1 2/3,
# f1 0.8, f2 0. Closed: v1 right (first word yes), v2 wrong, s1 right (letter b), m1 right
# ('ct.' = 'ct'), m2 wrong, c1 right. Entities of f1: {pneumonia, pleural effusion} against
# {+ consolidation}: P 1, R 2/3; f2: none predicted, R 0 -> macro P 1, R 1/3; micro P 2/2, R 2/4.
OPEN = {
    'vqa_rad': dict(_bleu([8, 6, 5, 4], [9, 8, 7, 6], 9, 9), rougeL=8 / 9, token_f1=6 / 7),
    'slake': dict(_bleu([5, 4, 3, 2], [5, 4, 3, 2], 5, 5), rougeL=1.0, token_f1=1.0),
    'mimic_cxr': dict(_bleu([5, 4, 3, 2], [5, 4, 3, 2], 5, 10), rougeL=2 / 3, token_f1=2 / 3),
    'radiology_features': dict(_bleu([4, 3, 2, 1], [6, 4, 2, 1], 6, 7), rougeL=0.4,
                               token_f1=0.4),
}
NO_OPEN = dict.fromkeys(('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rougeL', 'token_f1'))
WANT_DATASET = {
    'chestxray_yes_no': dict(n=1, n_closed=1, n_open=0, closed_accuracy=1.0, **NO_OPEN),
    'mimic_cxr': dict(n=1, n_closed=0, n_open=1, closed_accuracy=None, **OPEN['mimic_cxr']),
    'radiology_features': dict(n=2, n_closed=0, n_open=2, closed_accuracy=None,
                               **OPEN['radiology_features']),
    'radiopaedia_modality': dict(n=2, n_closed=2, n_open=0, closed_accuracy=0.5, **NO_OPEN),
    'slake': dict(n=2, n_closed=1, n_open=1, closed_accuracy=1.0, **OPEN['slake']),
    'vqa_rad': dict(n=3, n_closed=2, n_open=1, closed_accuracy=0.5, **OPEN['vqa_rad']),
}
WANT_TASK = {
    'diagnosis_yes_no': WANT_DATASET['chestxray_yes_no'],
    'modality': WANT_DATASET['radiopaedia_modality'],
    'rationale': WANT_DATASET['radiology_features'],
    'report': WANT_DATASET['mimic_cxr'],
    'vqa': dict(n=5, n_closed=3, n_open=2, closed_accuracy=2 / 3,
                **_bleu([13, 10, 8, 6], [14, 12, 10, 8], 14, 14), rougeL=(8 / 9 + 1) / 2,
                token_f1=(6 / 7 + 1) / 2),
}
WANT_ALL = dict(n=11, n_closed=6, n_open=5, closed_accuracy=4 / 6,
                **_bleu([22, 17, 13, 9], [25, 20, 15, 11], 25, 31),
                rougeL=(8 / 9 + 1 + 2 / 3 + 0.8 + 0) / 5, token_f1=(6 / 7 + 1 + 2 / 3 + 0.8) / 5)
ENTITIES = dict(precision=1.0, recall=1 / 3, micro_precision=1.0, micro_recall=0.5,
                n_with_pred_entities=1, n_with_ref_entities=2)


def _records():
  out = []
  for id_, dataset, task, kind, split, q, a, _ in FIXTURE:
    rec = {'id': id_, 'dataset': dataset, 'task': task, 'split': split, 'question': q,
           'answer': a}
    if kind:
      rec['kind'] = kind
    out.append(rec)
  return out


def _check(got: dict, want: dict):
  for key, value in want.items():
    assert got[key] == (value if value is None else pytest.approx(value, rel=1e-9)), key


@pytest.fixture(scope='module')
def scored(tmp_path_factory):
  """Known predictions of the fixture's test split, as `radfm-jax eval` would write them."""
  root = tmp_path_factory.mktemp('radbench')
  manifest = cd.write_manifest(root / 'samples.jsonl', _records())
  samples = harness.load_samples(str(manifest), split=radbench.SPLIT)
  pred = {f[0]: f[-1] for f in FIXTURE}
  return [harness.prediction_row(s, s.record['question'], s.record['answer'],
                                 pred[s.record['id']]) for s in samples]


def test_known_predictions_score_the_hand_computed_values(scored):
  assert [r['id'] for r in scored] == [f[0] for f in FIXTURE if f[4] == 'test']   # no v4
  assert [r['kind'] for r in scored] == ['closed', 'closed', 'open', 'closed', 'open', 'closed',
                                         'closed', 'closed', 'open', 'open', 'open']
  summary = radbench.score(scored, TermListExtractor(TERMS))
  assert summary['recipe'] == 'radbench'
  assert list(summary['per_dataset']) == sorted(WANT_DATASET)
  assert list(summary['per_task']) == sorted(WANT_TASK)
  for name, want in WANT_DATASET.items():
    _check(summary['per_dataset'][name], want)
  for name, want in WANT_TASK.items():
    _check(summary['per_task'][name], want)
  _check(summary['overall'], WANT_ALL)
  # UMLS-style entity scores on the rationale samples only
  ent = summary['entities']
  assert ent['computed'] and ent['tasks'] == ['rationale'] and ent['extractor'] == 'term_list'
  _check(ent, ENTITIES)
  _check(summary['per_task']['rationale']['entities'], ENTITIES)
  _check(summary['per_dataset']['radiology_features']['entities'], ENTITIES)
  assert all(summary['per_task'][t]['entities'] is None for t in WANT_TASK if t != 'rationale')
  assert summary['per_dataset']['vqa_rad']['entities'] is None    # 'nodule' matches, not scored


def test_without_an_extractor_the_rest_is_still_scored(scored):
  reason = 'scispaCy is not installed'
  summary = radbench.score(scored, None, reason)
  assert summary['entities'] == {'computed': False, 'reason': reason}
  for name, want in WANT_DATASET.items():
    _check(summary['per_dataset'][name], want)
  _check(summary['overall'], WANT_ALL)
  text = radbench.markdown(summary)
  lines = text.splitlines()
  assert lines[:4] == [
      '### RadBench by dataset', '',
      '| dataset | n | closed acc | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | token F1 | '
      'UMLS P | UMLS R |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  assert '| radiopaedia_modality | 2 | 0.5000 | - | - | - | - | - | - | - | - |' in lines
  assert f'| mimic_cxr | 1 | - | {math.exp(-1):.4f} |' in text
  assert lines[-1] == f'UMLS P / R not computed: {reason}'
  with_terms = radbench.markdown(radbench.score(scored, TermListExtractor(TERMS)))
  assert (f'| rationale | 2 | - | {WANT_TASK["rationale"]["bleu1"]:.4f} | '
          f'{WANT_TASK["rationale"]["bleu2"]:.4f} | {WANT_TASK["rationale"]["bleu3"]:.4f} | '
          f'{WANT_TASK["rationale"]["bleu4"]:.4f} | 0.4000 | 0.4000 | 1.0000 | 0.3333 |'
          ) in with_terms.splitlines()


def test_markdown_keeps_a_group_named_all_and_escapes_names():
  """A dataset or task literally named `all` was overwritten by the summary line (one `all` line
  left, holding the overall numbers), and a `|` in a name split its cell. The summary line is
  now the bold `**all**`, after every group's own line; names are escaped for Markdown."""
  def row(i, dataset, task, answer):
    return {'id': str(i), 'reference': answer, 'prediction': 'yes', 'kind': 'closed',
            'task': task, 'dataset': dataset}

  def line(name, n, accuracy):
    return f'| {name} | {n} | {accuracy} |' + ' - |' * 8

  rows = [row(0, 'all', 'all', 'Yes'), row(1, 'all', 'a|b', 'No'),
          row(2, 'x|y', '**all**', 'Yes'), row(3, 'c\\d*e<br>', 'two\nlines', 'CT')]
  text = radbench.markdown(radbench.score(rows, None, 'none'))
  by_dataset, by_task = (part.split('\n\n')[1].splitlines()[2:]
                         for part in text.split('### RadBench by ')[1:])
  assert by_dataset == [line('all', 2, '0.5000'), line('c\\\\d\\*e\\<br>', 1, '0.0000'),
                        line('x\\|y', 1, '1.0000'), line('**all**', 4, '0.5000')]
  assert by_task == [line('\\*\\*all\\*\\*', 1, '1.0000'), line('all', 1, '1.0000'),
                     line('a\\|b', 1, '0.0000'), line('two<br>lines', 1, '0.0000'),
                     line('**all**', 4, '0.5000')]


def test_cli_scores_a_predictions_file_again(scored, tmp_path, capsys):
  """`eval --recipe radbench --predictions FILE`: no model, the same hand-computed numbers, the
  tables on stdout; --checkpoint beside it is refused."""
  from radfm_jax.cli.main import main
  path = tmp_path / 'predictions.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in scored))
  (tmp_path / 'terms.txt').write_text('\n'.join(TERMS) + '\n')
  out = tmp_path / 'again'
  rc = main(['eval', '--recipe', 'radbench', '--predictions', str(path), '--out', str(out),
             '--entities', f'terms:{tmp_path / "terms.txt"}'])
  assert rc == 0
  summary = json.load(open(out / 'summary.json'))
  assert (summary['recipe'], summary['n_samples']) == ('radbench', 11)
  assert summary['predictions'] == str(path)
  for name, want in WANT_DATASET.items():
    _check(summary['per_dataset'][name], want)
  for name, want in WANT_TASK.items():
    _check(summary['per_task'][name], want)
  _check(summary['overall'], WANT_ALL)
  _check(summary['entities'], ENTITIES)
  assert capsys.readouterr().out.strip() == radbench.markdown(summary)
  rc = main(['eval', '--predictions', str(path), '--out', str(out), '--checkpoint', 'ckpt'])
  assert rc == 2
  assert capsys.readouterr().err.strip() == (
      'radfm-jax eval: --predictions scores a predictions file again: expected no --checkpoint '
      'and no --data (those generate new predictions)')
  assert main(['eval', '--data', 'store', '--out', str(out)]) == 2
  assert capsys.readouterr().err.strip() == (
      'radfm-jax eval: --checkpoint is missing: expected --checkpoint CKPT --data STORE (to '
      'generate), or --predictions FILE (to score an earlier eval again)')


def test_read_predictions_names_a_bad_line(tmp_path):
  path = tmp_path / 'predictions.jsonl'
  path.write_text('{"reference": "a", "prediction": "b", "kind": "open", "task": "vqa"}\n'
                  '{"reference": "a", "prediction": 3, "kind": "open", "task": "vqa"}\n')
  from radfm_jax.errors import InputError
  with pytest.raises(InputError) as e:
    harness.read_predictions(str(path))
  assert str(e.value) == (f'{path} line 2 field prediction: got 3; expected string (the '
                          'generated answer)')


def test_read_predictions_checks_every_field(tmp_path):
  """Each field of a row (kind's value, every type, a misspelled name, a missing one), a repeated
  id and an empty file: InputError naming the file, line and field, instead of a ValueError from
  deep in scoring or a row silently scored under the wrong group."""
  from radfm_jax.errors import InputError
  good = {'id': 'a', 'question': 'q', 'prediction': 'yes', 'reference': 'yes', 'kind': 'closed',
          'task': '', 'dataset': 'd'}
  path = tmp_path / 'predictions.jsonl'
  rows = 'expected the rows `radfm-jax eval` writes to OUT/predictions.jsonl'
  for change, message in (
      ({'kind': 'clsed'}, 'line 2 field kind: got "clsed"; expected "closed" or "open"'),
      ({'id': ['a']}, 'line 2 field id: got ["a"]; expected string or integer'),
      ({'question': None}, 'line 2 field question: got null; expected string'),
      ({'reference': 1}, 'line 2 field reference: got 1; expected string (the reference answer)'),
      ({'task': False}, 'line 2 field task: got false; expected string ("" for none)'),
      ({'dataset': 7}, 'line 2 field dataset: got 7; expected string'),
      ({'kind': None}, 'line 2 field kind: got null; expected "closed" or "open"'),
      ({'datset': 'd'}, f'line 2 field datset: unknown field (did you mean dataset?); {rows}'),
      ({'id': 'a'}, f'line 2 field id: "a" is already used ({path} line 1); expected one row '
       'per sample'),
      # line 1 has no task: its group is 'default', which a task of that name would join
      ({'id': 'b', 'task': 'default'}, 'line 2 field task: "default" is also the name of the group '
       f'of samples without a task (e.g. {path} line 1), so the two would be counted as one; '
       'expected another task name, or a task on every sample')):
    path.write_text(json.dumps(good) + '\n' + json.dumps(dict(good, **change)) + '\n')
    with pytest.raises(InputError) as e:
      harness.read_predictions(str(path))
    assert str(e.value) == f'{path} {message}', change
  path.write_text(json.dumps({k: v for k, v in good.items() if k != 'kind'}) + '\n')
  with pytest.raises(InputError) as e:
    harness.read_predictions(str(path))
  assert str(e.value) == (f'{path} line 1 field kind: missing; expected "closed" or "open", as '
                          'in the rows `radfm-jax eval` writes to OUT/predictions.jsonl')
  path.write_text('\n')
  with pytest.raises(InputError) as e:
    harness.read_predictions(str(path))
  assert str(e.value) == f'{path}: no rows; {rows}, one per sample'
  # a repeated key: JSON would keep the last value (the shared reader, store.iter_jsonl, refuses)
  path.write_text(json.dumps(good)[:-1] + ', "kind": "open"}\n')
  twice = re.escape(f'{path} line 1 field kind: the key appears twice')
  with pytest.raises(InputError, match=f'^{twice}'):
    harness.read_predictions(str(path))
  path.write_text(json.dumps(good) + '\n' + json.dumps(dict(good, id=2)) + '\n')
  assert [r['id'] for r in harness.read_predictions(str(path))] == ['a', 2]  # ids as ingest's


def test_default_groups_stay_apart_from_a_task_or_dataset_named_default(tmp_path):
  """Rows without a task / dataset are scored as group 'default'; a task or dataset of that
  very name next to them would be merged into the same table row: refused, naming the rows."""
  from radfm_jax.errors import InputError
  row = {'id': 'a', 'reference': 'yes', 'prediction': 'yes', 'kind': 'closed', 'task': ''}
  rows = [row, dict(row, id='b', task='vqa', dataset='slake', prediction='no')]
  summary = harness.score(rows)
  assert {k: v['n'] for k, v in summary['per_task'].items()} == {'default': 1, 'vqa': 1}
  assert {k: v['n'] for k, v in summary['per_dataset'].items()} == {'default': 1, 'slake': 1}
  assert summary['per_task']['default']['closed_accuracy'] == 1.0
  with pytest.raises(InputError) as e:
    harness.score(rows + [dict(row, id='c', task='default')])
  assert str(e.value) == ('prediction row 3 field task: "default" is also the name of the group '
                          'of samples without a task (e.g. prediction row 1), so the two would be '
                          'counted as one; expected another task name, or a task on every sample')
  path = tmp_path / 'predictions.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in [dict(row, dataset='default', task='x'),
                                                          dict(row, id='b', task='x')]))
  with pytest.raises(InputError) as e:
    harness.read_predictions(str(path))
  assert str(e.value) == (f'{path} line 1 field dataset: "default" is also the name of the group '
                          f'of samples without a dataset (e.g. {path} line 2), so the two would be '
                          'counted as one; expected another dataset name, or a dataset on every '
                          'sample')


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
  """`radfm-jax eval` on a bad --entities value or term file, a predictions row of an unknown
  kind, an --out that cannot be a folder, and --limit / --split with --predictions: exit 2 and
  one line naming the flag, file, line or field (before: tracebacks, exit 1)."""
  from radfm_jax.cli.main import main
  from radfm_jax.eval.entities import TERMS_FILE
  good = {'id': 'a', 'prediction': 'yes', 'reference': 'yes', 'kind': 'closed', 'task': '',
          'dataset': 'd'}
  preds = tmp_path / 'predictions.jsonl'
  preds.write_text(json.dumps(good) + '\n')
  (tmp_path / 'a_file').write_text('x')
  (tmp_path / 'taken' / 'summary.json').mkdir(parents=True)
  out = str(tmp_path / 'out')

  def fails(argv, line):
    assert main(['eval'] + argv) == 2
    err = capsys.readouterr().err
    assert err == f'radfm-jax eval: {line}\n', err

  base = ['--predictions', str(preds), '--out', out]
  fails(base + ['--entities', 'bogus'], "--entities bogus: unknown extractor; expected 'auto', "
        "'scispacy[:MODEL]', 'terms:FILE' or 'none'")
  fails(base + ['--entities', 'terms:/missing.txt'],
        f'--entities terms:/missing.txt: no such file; expected {TERMS_FILE}')
  fails(base + ['--entities', f'terms:{tmp_path}'],
        f'--entities terms:{tmp_path}: a folder; expected {TERMS_FILE}')
  preds.write_text(json.dumps(good) + '\n' + json.dumps(dict(good, id='b', kind='clsed')) + '\n')
  fails(base + ['--entities', 'none'],
        f'{preds} line 2 field kind: got "clsed"; expected "closed" or "open"')
  preds.write_text(json.dumps(good) + '\n')
  for name in ('a_file', 'a_file/sub'):
    fails(['--predictions', str(preds), '--out', str(tmp_path / name), '--entities', 'none'],
          f'--out {tmp_path / name}: '
          + ('exists and is not a directory' if name == 'a_file' else
             f'{tmp_path / "a_file"} is not a directory')
          + '; expected a folder (new or existing) for summary.json')
  fails(['--predictions', str(preds), '--out', str(tmp_path / 'taken'), '--entities', 'none'],
        f'--out {tmp_path / "taken"}: {tmp_path / "taken" / "summary.json"} is a folder; '
        'expected it to be a file (eval writes its summary.json there) or absent')
  # generating: --out is checked before the checkpoint is even looked for
  fails(['--checkpoint', str(tmp_path / 'no_ckpt'), '--data', str(tmp_path / 'no_store'),
         '--out', str(tmp_path / 'a_file'), '--entities', 'none'],
        f'--out {tmp_path / "a_file"}: exists and is not a directory; expected a folder (new or '
        'existing) for predictions.jsonl and summary.json')
  fails(base + ['--limit', '3'], '--limit picks the samples to generate: expected no --split '
        'and no --limit with --predictions (every row of the file is scored)')
  assert main(['eval'] + base + ['--entities', 'none']) == 0        # the same file, good flags
  assert json.load(open(os.path.join(out, 'summary.json')))['n_samples'] == 1


def test_cli_radbench_end_to_end(tmp_path, capsys):
  """A tiny random checkpoint on a store with two datasets' test splits: summary.json holds the
  recipe's tables, and they equal scoring its predictions.jsonl again; the tables are printed."""
  from radfm_jax import api
  from radfm_jax.cli.main import main
  from radfm_jax.data.ingest import ingest
  from radfm_jax.models.radfm import create_model
  rng = np.random.default_rng(0)
  records = []
  for i in range(4):
    cd.write_png(tmp_path / f'x{i}.png', rng.integers(0, 255, (24, 20), dtype=np.uint8))
    dataset, task = (('vqa_rad', 'vqa') if i < 2 else ('radiology_features', 'rationale'))
    records.append({'id': f'x{i}', 'dataset': dataset, 'task': task, 'split': 'test',
                    'question': 'Is there a nodule?' if i < 2 else 'Why?',
                    'answer': 'Yes' if i < 2 else 'pneumonia with consolidation',
                    'images': [{'path': f'x{i}.png'}]})
  records.append(dict(records[0], id='t0', split='train'))
  manifest = cd.write_manifest(tmp_path / 'samples.jsonl', records)
  with open(os.devnull, 'w') as log:
    ingest(manifest, str(tmp_path / 'store'), log=log)
  (tmp_path / 'tok.model').write_bytes(cd.spm_proto())
  api.save(create_model(cd.tiny_model(), seed=0), str(tmp_path / 'ckpt'))
  out = tmp_path / 'out'
  rc = main(['eval', '--recipe', 'radbench', '--checkpoint', str(tmp_path / 'ckpt'),
             '--data', str(tmp_path / 'store'), '--tokenizer', str(tmp_path / 'tok.model'),
             '--out', str(out), '--batch-size', '4', '--config.generate.max_new_tokens=3',
             '--no-progress'])
  assert rc == 0
  captured = capsys.readouterr()
  summary = json.load(open(out / 'summary.json'))
  rows = harness.read_predictions(str(out / 'predictions.jsonl'))
  assert [r['id'] for r in rows] == ['x0', 'x1', 'x2', 'x3']          # the test split only
  assert [r['dataset'] for r in rows] == ['vqa_rad'] * 2 + ['radiology_features'] * 2
  assert (summary['recipe'], summary['split'], summary['n_samples']) == ('radbench', 'test', 4)
  assert set(summary['per_dataset']) == {'vqa_rad', 'radiology_features'}
  assert set(summary['per_task']) == {'vqa', 'rationale'}
  assert summary['per_dataset']['vqa_rad']['n_closed'] == 2
  assert summary['per_dataset']['radiology_features']['n_open'] == 2
  again = radbench.score(rows, None, summary['entities'].get('reason', ''))
  for key in ('overall', 'per_dataset', 'per_task'):
    assert summary[key] == again[key], key
  if importlib.util.find_spec('scispacy') is None:                    # the default --entities auto
    assert summary['entities']['computed'] is False
    line = ('radfm-jax eval: UMLS entity precision / recall (rationale diagnosis) not computed, '
            'the other metrics are: scispaCy is not installed')
    assert [x for x in captured.err.splitlines() if x.startswith(line)]
  else:
    assert summary['entities']['computed'] is True
  assert captured.out.strip() == radbench.markdown(summary)
