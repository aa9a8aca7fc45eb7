"""`radfm-jax eval`: samples from a raw manifest or a store, predictions file, summary values."""

import json
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import conftest_data as cd  # noqa: E402
from radfm_jax import api  # noqa: E402
from radfm_jax.cli.main import main  # noqa: E402
from radfm_jax.errors import InputError  # noqa: E402
from radfm_jax.eval import harness, metrics  # noqa: E402
from radfm_jax.infer import text  # noqa: E402

# One worker runs the whole module, so the module fixtures are built once (make test: loadgroup).
pytestmark = pytest.mark.xdist_group('eval_harness')

RECORDS = [
    {'id': 'a', 'task': 'vqa', 'question': 'Is there a nodule?', 'answer': 'Yes', 'split': 'eval',
     'images': [{'path': 'ct.nii.gz', 'position': {'question': 0}, 'modality': 'CT'}]},
    {'id': 'b', 'task': 'report', 'question': 'Describe the scan.',
     'answer': 'A nodule in the left lung.', 'split': 'eval',
     'images': [{'path': 'ct.nii.gz', 'position': {'answer': 3}}]},
    {'id': 'c', 'task': 'vqa', 'question': 'Which option? A) CT B) MRI', 'answer': 'B',
     'split': 'train', 'images': [{'path': 'x.png', 'position': {'question': 26}},
                {'path': 'ct.nii.gz', 'position': {'question': 0}}]},
    {'id': 'd', 'task': 'vqa', 'question': 'Any free fluid?', 'answer': 'free fluid in abdomen',
     'kind': 'open', 'images': []},
]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('evaldata')
  cd.write_nifti(root / 'ct.nii.gz', cd.ct_volume((20, 18, 10), seed=4))
  cd.write_png(root / 'x.png', (np.random.default_rng(5).random((24, 20)) * 255).astype(np.uint8))
  manifest = cd.write_manifest(root / 'manifest.jsonl', RECORDS)
  from radfm_jax.data.ingest import ingest
  ingest(manifest, str(root / 'store'), strict=True, log=open(os.devnull, 'w'))
  with open(root / 'tok.model', 'wb') as f:
    f.write(cd.spm_proto())
  (root / 'terms.txt').write_text('nodule\nlung\nfree fluid\n')
  return root


def test_load_samples_kinds_and_sources(data):
  raw = harness.load_samples(str(data / 'manifest.jsonl'))
  store = harness.load_samples(str(data / 'store'))
  via_manifest = harness.load_samples(str(data / 'store' / 'manifest.jsonl'))
  assert [s.kind for s in raw] == ['closed', 'open', 'closed', 'open']
  assert [s.task for s in raw] == ['vqa', 'report', 'vqa', 'vqa']
  assert [s.record['id'] for s in store] == ['a', 'b', 'c', 'd']
  assert type(via_manifest[0].source) is type(store[0].source)
  assert len(harness.load_samples(str(data / 'manifest.jsonl'), limit=2)) == 2
  assert [s.record['id'] for s in harness.load_samples(str(data / 'store'), split='train')] == [
      'c', 'd']                                           # a row without `split` is 'train'
  with pytest.raises(InputError, match=r"no samples in split 'test' \(splits here: "
                     r"\{'eval': 2, 'train': 2\}\); choose one with --split NAME"):
    harness.load_samples(str(data / 'manifest.jsonl'), split='test')
  # The same pixels either way; the image in the answer moves to the end of the question.
  a_raw, m_raw, e_raw, _ = harness.read_sample_images(raw[2])
  a_st, m_st, e_st, _ = harness.read_sample_images(store[2])
  for x, y in zip(a_raw, a_st):
    np.testing.assert_array_equal(x, y)
  assert len(a_raw) == 2
  q, ref, n = harness.format_question(raw[1], e_raw[:1], 2, 8)
  assert q == 'Describe the scan.<image><image0><image1></image>' and n == 1
  assert ref == 'A nodule in the left lung.'


def test_evaluate_values_with_known_predictions(data, monkeypatch, tmp_path):
  """Generation replaced by fixed answers: the summary equals the metrics of those answers."""
  answers = {'Is there a nodule?': 'yes, there is', 'Describe the scan.': 'nodule in the left lung',
             'Which option? A) CT B) MRI': 'A', 'Any free fluid?': 'free fluid in abdomen'}
  seen = []

  def fake_generate_batch(model, tok, prompts, images, modalities=None, **kw):
    seen.append(([len(x) for x in images], [harness._plain(p) for p in prompts]))
    return [answers[harness._plain(p).replace('<image>', '').strip()] for p in prompts]

  monkeypatch.setattr(text, 'generate_batch', fake_generate_batch)

  class Model:
    cfg = cd.tiny_model()

  from radfm_jax.eval.entities import TermListExtractor
  samples = harness.load_samples(str(data / 'store'))
  summary = harness.evaluate(Model(), cd.tokenizer(), samples, batch_size=2,
                             data_cfg=text.data_config_for(Model.cfg),
                             extractor=TermListExtractor(['nodule', 'lung', 'free fluid']),
                             out_dir=str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'predictions.jsonl')]
  assert [r['id'] for r in rows] == ['a', 'b', 'c', 'd']                  # input order kept
  assert rows[0] == {'id': 'a', 'question': '<image>Is there a nodule?', 'reference': 'Yes',
                     'prediction': 'yes, there is', 'kind': 'closed', 'task': 'vqa',
                     'dataset': 'default'}
  assert sorted(len(x) for batch, _ in seen for x in [batch]) == [2, 2]  # two batches of 2
  o = summary['overall']
  assert (o['n'], o['n_closed'], o['n_open']) == (4, 2, 2)
  assert o['closed_accuracy'] == 0.5                                   # yes right, A vs B wrong
  want = metrics.rouge(['nodule in the left lung', 'free fluid in abdomen'],
                       ['A nodule in the left lung.', 'free fluid in abdomen'])
  assert o['rougeL'] == pytest.approx(want['rougeL'])
  assert summary['per_task']['report']['token_f1'] == pytest.approx(1.0)   # articles dropped
  assert summary['per_task']['vqa']['closed_accuracy'] == 0.5
  ent = summary['entities']
  assert ent['computed'] and ent['precision'] == 1.0 and ent['recall'] == 1.0
  on_disk = json.load(open(tmp_path / 'summary.json'))
  assert on_disk['overall']['closed_accuracy'] == 0.5
  assert summary['no_reference'] == {'n': 0, 'ids': []}
  # A row without a reference scores 0 on every text metric: counted and named, not hidden.
  scored = harness.score(rows + [dict(rows[1], id='e', reference='  ')])
  assert scored['no_reference'] == {'n': 1, 'ids': ['e']}
  # ... even where nothing was predicted either (was: an empty prediction matched the empty
  # reference, token F1 1 and closed-correct, while the CLI said "scored 0"); "?" holds nothing
  # to match either
  for kind, metric in (('open', 'token_f1'), ('closed', 'closed_accuracy')):
    empty = [{'id': i, 'reference': ref, 'prediction': '', 'kind': kind, 'task': 'vqa'}
             for i, ref in (('f', ''), ('g', '?'))]
    scored = harness.score(empty)
    assert scored['no_reference'] == {'n': 2, 'ids': ['f', 'g']}
    assert scored['overall'][metric] == 0.0, (kind, scored['overall'])
  assert metrics.token_f1_single('', 'the') == 1.0     # a reference of articles only: as before
  assert on_disk['versions']['rouge-score'] and on_disk['versions']['sacrebleu']
  assert on_disk['versions']['jax'] and on_disk['versions']['radfm-jax']


def test_cli_end_to_end(data, tmp_path):
  """The default split is 'eval' (rows a, b): c ('train') and d (no split: 'train') are left out."""
  from radfm_jax.models.radfm import create_model
  api.save(create_model(cd.tiny_model(), seed=0), str(tmp_path / 'ckpt'))
  out = tmp_path / 'out'
  rc = main(['eval', '--checkpoint', str(tmp_path / 'ckpt'), '--data', str(data / 'store'),
             '--tokenizer', str(data / 'tok.model'), '--out', str(out), '--batch-size', '2',
             '--config.generate.max_new_tokens=3', '--entities', 'none',
             '--no-progress'])   # one batch: one compile
  assert rc == 0
  rows = [json.loads(line) for line in open(out / 'predictions.jsonl')]
  summary = json.load(open(out / 'summary.json'))
  assert [r['id'] for r in rows] == ['a', 'b']
  assert set(rows[0]) == {'id', 'question', 'reference', 'prediction', 'kind', 'task', 'dataset'}
  want = metrics.compute_metrics([r['prediction'] for r in rows], [r['reference'] for r in rows],
                                 [r['kind'] for r in rows], [r['task'] for r in rows])
  for key in ('closed_accuracy', 'bleu1', 'rougeL', 'token_f1'):
    assert summary['overall'][key] == want[key]
  assert summary['entities'] == {'computed': False,
                                 'reason': 'entity metrics not requested (--entities none)'}
  assert summary['sampling']['max_new_tokens'] == 3 and summary['n_samples'] == 2
  assert (summary['split'], summary['skipped'], summary['skipped_samples']) == ('eval', 0, [])
  assert summary['images_left_out'] == {'max_images': 100, 'samples': []}
  assert (summary['seed'], summary['checkpoint_step']) == (0, None)   # what reproduces the run
  assert summary['timing']['samples_per_s'] > 0


def test_images_past_the_models_max_images_are_said_and_listed(data, tmp_path, capsys):
  """A sample naming more images than the model takes was scored on the first max_images in
  silence (training says so, generate refuses): now one line and summary.json's list."""
  import dataclasses
  from radfm_jax.models.radfm import create_model
  api.save(create_model(dataclasses.replace(cd.tiny_model(), max_images=1), seed=0),
           str(tmp_path / 'ckpt'))
  out = tmp_path / 'out'
  rc = main(['eval', '--checkpoint', str(tmp_path / 'ckpt'), '--data', str(data / 'store'),
             '--tokenizer', str(data / 'tok.model'), '--out', str(out), '--split', 'train',
             '--config.generate.max_new_tokens=2', '--entities', 'none', '--no-progress'])
  assert rc == 0
  err = capsys.readouterr().err.splitlines()
  assert ("radfm-jax eval: 1 of 2 samples name more than the model's 1 images; the first 1 are "
          "used, the rest left out, as training does (sample 'c' names 2; listed in "
          f"{out / 'summary.json'})") in err, err
  summary = json.load(open(out / 'summary.json'))
  assert summary['images_left_out'] == {'max_images': 1,
                                        'samples': [{'sample_id': 'c', 'images': 2}]}
  assert [json.loads(x)['id'] for x in open(out / 'predictions.jsonl')] == ['c', 'd']


def test_rescore_in_place_keeps_what_only_the_generating_run_knew(tmp_path):
  """`eval --predictions OUT/predictions.jsonl --out OUT` replaced summary.json with the scores
  alone: the samples the generating run skipped (unreadable scans), its checkpoint and split were
  gone, and `skipped` read 0. They are carried over from the summary it replaces."""
  rows = [{'id': 'a', 'question': 'Q?', 'reference': 'Yes', 'prediction': 'yes', 'kind': 'closed',
           'task': 'vqa', 'dataset': 'default'}]
  (tmp_path / 'predictions.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  generated = {'n_samples': 1, 'skipped': 1, 'skipped_samples': [{'id': 'b', 'reason': 'gone'}],
               'checkpoint': '/runs/x', 'split': 'eval', 'overall': {}, 'metric_notes': {}}
  # the same file by its path and through a symlink to its folder (was: the second, not seen
  # as the same file, dropped what the generating run knew)
  os.symlink(tmp_path, tmp_path.parent / f'{tmp_path.name}_link')
  for predictions in (tmp_path / 'predictions.jsonl',
                      tmp_path.parent / f'{tmp_path.name}_link' / 'predictions.jsonl'):
    (tmp_path / 'summary.json').write_text(json.dumps(generated))
    summary = harness.rescore(str(predictions), out_dir=str(tmp_path))
    on_disk = json.load(open(tmp_path / 'summary.json'))
    for got in (summary, on_disk):
      assert (got['skipped'], got['skipped_samples'], got['checkpoint'], got['split']) == (
          1, [{'id': 'b', 'reason': 'gone'}], '/runs/x', 'eval')
      assert got['overall']['n'] == 1 and got['overall']['closed_accuracy'] == 1.0
  elsewhere = harness.rescore(str(tmp_path / 'predictions.jsonl'), out_dir=str(tmp_path / 'new'))
  assert 'skipped' not in elsewhere                     # another folder: nothing to carry over


def test_eval_never_writes_over_what_it_reads_nor_takes_flags_it_does_not_use(tmp_path, capsys):
  """`eval --data OUT/predictions.jsonl --out OUT` wrote its predictions over the manifest it
  read; `--predictions P --out OUT` where OUT held another eval's predictions.jsonl replaced
  that eval's summary.json with one describing P; `--predictions` took --seed, --tokenizer,
  --step, --intensity, --batch-size and generate overrides and did nothing with them."""
  rows = [{'id': 'a', 'question': 'Q?', 'reference': 'Yes', 'prediction': 'yes', 'kind': 'closed',
           'task': 'vqa', 'dataset': 'default'}]
  (tmp_path / 'p.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'predictions.jsonl').write_text('theirs\n')
  (tmp_path / 'other' / 'summary.json').write_text('{"checkpoint": "/runs/theirs"}')
  before = {f: (tmp_path / 'other' / f).read_text() for f in ('predictions.jsonl', 'summary.json')}
  with pytest.raises(InputError, match=re.escape(
      f'--out {tmp_path}/other: holds the predictions.jsonl of another eval; expected the folder '
      f'of {tmp_path}/p.jsonl or one without a predictions.jsonl')):
    harness.rescore(str(tmp_path / 'p.jsonl'), out_dir=str(tmp_path / 'other'))
  manifest = tmp_path / 'other' / 'predictions.jsonl'
  cases = [
      (['--predictions', str(tmp_path / 'p.jsonl'), '--seed', '5'],
       '--seed 5: a setting of generating predictions; expected none with --predictions (the '
       'file is scored as it is)'),
      (['--predictions', str(tmp_path / 'p.jsonl'), '--config.generate.top_k=3'],
       '--config.generate.top_k=3: a setting of generating predictions; expected none with '
       '--predictions (the file is scored as it is)'),
      (['--predictions', str(tmp_path / 'p.jsonl'), '--tokenizer', 'tok.model'],
       '--tokenizer tok.model: a setting of generating predictions; expected none with '
       '--predictions (the file is scored as it is)'),
      (['--predictions', str(tmp_path / 'other' / 'summary.json')],
       f'--predictions {tmp_path}/other/summary.json: is {tmp_path}/other/summary.json, which '
       'eval writes; expected --out another folder'),
      (['--checkpoint', str(tmp_path), '--data', str(manifest)],
       f'--data {manifest}: is {manifest}, which eval writes; expected --out another folder')]
  for argv, line in cases:
    assert main(['eval', '--out', str(tmp_path / 'other'), '--entities', 'none',
                 '--no-progress'] + argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f'radfm-jax eval: {line}']
  assert {f: (tmp_path / 'other' / f).read_text() for f in before} == before
  assert main(['eval', '--predictions', str(tmp_path / 'p.jsonl'), '--out', str(tmp_path / 'new'),
               '--entities', 'none']) == 0                          # a folder of its own: scored
  closing = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
  assert 'split' not in closing and closing['n'] == 1     # was "split": null
  assert json.load(open(tmp_path / 'new' / 'summary.json'))['overall']['closed_accuracy'] == 1.0


def test_a_question_too_long_is_refused_before_any_sample_is_generated(data, tmp_path):
  """The second sample's question does not fit the model's positions: one line naming it, and
  the first sample is not generated first (its answer would be thrown away with the run)."""
  from radfm_jax.config import GenerateConfig
  from radfm_jax.infer import generate
  from radfm_jax.models.radfm import create_model
  records = [{'id': 'short', 'question': 'Is it?', 'answer': 'Yes', 'images': []},
             {'id': 'long', 'question': 'word ' * 1100, 'answer': 'No', 'images': []}]
  samples = harness.load_samples(cd.write_manifest(tmp_path / 'm.jsonl', records))
  model = create_model(cd.tiny_model(), seed=0)
  calls = generate._compiled_decode.cache_info()
  with pytest.raises(InputError) as e:
    harness.evaluate(model, cd.tokenizer(), samples, sampling=GenerateConfig(max_new_tokens=2),
                     out_dir=str(tmp_path / 'out'), progress=False)
  assert str(e.value) == (
      "sample 'long': prompt of 3302 tokens (image blocks included) + generate.max_new_tokens=2 "
      "exceeds the model's 1024 positions (model.llama.max_position_embeddings): shorten the "
      "prompt or lower generate.max_new_tokens")
  after = generate._compiled_decode.cache_info()
  assert after.hits + after.misses == calls.hits + calls.misses      # nothing was generated
  assert not os.path.exists(tmp_path / 'out' / 'predictions.jsonl')


def test_a_record_without_an_id_gets_its_number_in_the_file_not_in_the_split(data, tmp_path):
  """The default id was the record's number within the split: here 1 for the third record, the
  given id of the second, and `eval --predictions` refused the eval's own predictions.jsonl for
  a repeated id. It is now the manifest's default (ingest's, kept unique by `read_records`): the
  record's number in the whole file, from 0."""
  from radfm_jax.models.radfm import create_model
  records = [{'question': 'Is it?', 'answer': 'Yes', 'split': 'train', 'images': []},
             {'id': '1', 'question': 'Is it?', 'answer': 'No', 'split': 'eval', 'images': []},
             {'question': 'Which?', 'answer': 'left', 'split': 'eval', 'images': []}]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', records)
  assert [s.sample_id for s in harness.load_samples(manifest, split='eval')] == ['1', '2']
  assert [s.sample_id for s in harness.load_samples(manifest, limit=1)] == ['0']
  api.save(create_model(cd.tiny_model(), seed=0), str(tmp_path / 'ckpt'))
  out = tmp_path / 'out'
  assert main(['eval', '--checkpoint', str(tmp_path / 'ckpt'), '--data', manifest,
               '--tokenizer', str(data / 'tok.model'), '--out', str(out), '--batch-size', '2',
               '--config.generate.max_new_tokens=2', '--entities', 'none', '--no-progress']) == 0
  rows = [json.loads(line) for line in open(out / 'predictions.jsonl')]
  assert [(r['id'], r['reference']) for r in rows] == [('1', 'No'), ('2', 'left')]
  first = json.load(open(out / 'summary.json'))
  assert main(['eval', '--predictions', str(out / 'predictions.jsonl'), '--out', str(out),
               '--entities', 'none']) == 0
  again = json.load(open(out / 'summary.json'))
  assert again['overall'] == first['overall'] and again['n_samples'] == 2


def test_an_interrupted_eval_resumes_to_the_predictions_of_an_uninterrupted_one(data, tmp_path,
                                                                                capsys):
  """`eval` keeps its progress in OUT/predictions.jsonl.partial, a batch per line. Here the 4th
  sample's scan is a FIFO: reading it blocks after the first batch (2 samples) is written, and a
  SIGTERM to the main thread interrupts the run there, as a scheduler's would. The same command
  again (after a kill's cut last line) resumes: the rows equal those of a run never interrupted,
  sampling seeds included, each sample once; other settings are refused in one line."""
  import shutil
  import signal
  import threading

  from radfm_jax.models.radfm import create_model
  api.save(create_model(cd.tiny_model(), seed=0), str(tmp_path / 'ckpt'))
  shutil.copy(data / 'x.png', tmp_path / 'x.png')
  os.mkfifo(tmp_path / 'late.png')   # a NIfTI reader refuses it at once: an empty file
  records = [{'id': f's{i}', 'task': 'vqa', 'question': f'Question {i}?', 'answer': 'yes',
              'split': 'eval', 'images': [{'path': 'late.png' if i == 3 else 'x.png',
                                           'position': {'question': 0}}]} for i in range(5)]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', records)

  def run(out, *extra):
    return main(['eval', '--checkpoint', str(tmp_path / 'ckpt'), '--data', manifest,
                 '--tokenizer', str(data / 'tok.model'), '--out', str(out), '--batch-size', '2',
                 '--seed', '3', '--config.generate.max_new_tokens=3',
                 '--config.generate.temperature=1.0', '--entities', 'none', '--no-progress',
                 *extra])

  out = tmp_path / 'out'
  partial = out / 'predictions.jsonl.partial'
  main_thread = threading.main_thread().ident

  def interrupt_after_the_first_batch():
    for _ in range(3000):
      if partial.exists() and partial.read_bytes().count(b'\n') >= 2:   # header + one batch
        break
      threading.Event().wait(0.01)
    signal.pthread_kill(main_thread, signal.SIGTERM)   # also when none came: fail, not hang

  watcher = threading.Thread(target=interrupt_after_the_first_batch, daemon=True)
  watcher.start()
  assert run(out) == 130
  watcher.join()
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'radfm-jax eval: interrupted (SIGTERM; 2 of 5 samples kept in {partial}; run the same '
      'command again to resume)')
  assert not (out / 'predictions.jsonl').exists()
  kept = partial.read_text().splitlines()
  assert len(kept) == 2 and [r[1]['id'] for r in json.loads(kept[1])['rows']] == ['s0', 's1']
  os.remove(tmp_path / 'late.png')
  shutil.copy(data / 'x.png', tmp_path / 'late.png')
  assert run(out, '--seed', '4') == 2
  assert capsys.readouterr().err.strip() == (
      f'radfm-jax eval: {partial}: the progress of an interrupted eval with another seed (was 3, '
      'now 4); expected the same samples, checkpoint and settings: rerun the eval as it was to '
      'resume it, or delete the file to start over')
  with open(partial, 'ab') as f:
    f.write(b'{"rows": [[2, {"id": "s2"')      # a batch a kill cut mid-write: not done
  assert run(out) == 0
  assert not partial.exists()
  assert run(tmp_path / 'whole') == 0           # never interrupted
  resumed = json.load(open(out / 'summary.json'))
  whole = json.load(open(tmp_path / 'whole' / 'summary.json'))
  assert (resumed['resumed'], whole['resumed'], resumed['n_samples']) == (2, 0, 5)
  got = (out / 'predictions.jsonl').read_text()
  assert got == (tmp_path / 'whole' / 'predictions.jsonl').read_text()
  assert [json.loads(line)['id'] for line in got.splitlines()] == ['s0', 's1', 's2', 's3', 's4']
  assert resumed['overall'] == whole['overall']


def test_case_stack_images_are_marked_from_a_raw_manifest_and_a_store(tmp_path):
  """eval prepares each image of a RadFM case .npy as a volume whatever its depth: the images
  read from a raw manifest and from a store say so (`stacked`), a PNG's do not."""
  from radfm_jax.data.ingest import ingest
  case = np.random.default_rng(4).integers(0, 255, (2, 3, 20, 18, 1)).astype(np.uint8)
  np.save(tmp_path / 'case.npy', case)
  cd.write_png(tmp_path / 'x.png', case[0, 0, :, :, 0])
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [
      {'id': 'c', 'question': 'What?', 'answer': 'A case.',
       'images': [{'path': 'case.npy'}, {'path': 'x.png'}]}])
  ingest(manifest, str(tmp_path / 'store'), log=open(os.devnull, 'w'))
  for source in (manifest, str(tmp_path / 'store')):
    sample, = harness.load_samples(source)
    arrays, _, _, stacked = harness.read_sample_images(sample)
    assert [a.shape for a in arrays] == [(3, 20, 18, 1)] * 2 + [(1, 20, 18, 1)]
    assert stacked == [True, True, False]
