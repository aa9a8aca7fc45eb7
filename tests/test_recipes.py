"""Recipes (radfm_jax/data/recipes): the original RadFM split files -> records -> the store.

`_radfm_folder` writes one tiny split file per original file name, in the original's format (CSV
columns / JSON keys as its dataset classes read them), with the images they name (8x8 PNG / JPEG
gradients, [S, 3, 8, 8, 4] case .npy stacks, a NIfTI volume). Each family's records are compared
with hand-written expectations: question, answer, image paths and positions (the original's
placement rule), task, dataset, split. Seed 0 fixes the prompt draws; the expected texts below
are the ones those draws give, checked against the prompt files.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from radfm_jax.data import recipes
from radfm_jax.data.recipes.build import prompt_file
from radfm_jax.data.store import VolumeStore
from radfm_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, seed=0, mode='L'):
  from PIL import Image
  a = (np.arange(64).reshape(8, 8) * 3 + seed).astype(np.uint8)
  img = Image.fromarray(a)
  img = img.convert(mode) if mode != 'L' else img
  img.save(path)
  return a


def _csv(path, header, *rows):
  import csv
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _radfm_folder(d):
  """Split files under their original names in `d`, images under d/img."""
  img = d / 'img'
  img.mkdir()
  for i, n in enumerate(['cxr1.png', 'cxr2.png', 'm1.png', 'm2.png', 'm3.png', 'vq.png']):
    _png(img / n, i)
  for n in ['PMC1_F1.jpg', 'PMC1_F2.jpg', 'PMC9_F3.jpg']:
    _png(img / n, 7, 'RGB')
  rng = np.random.RandomState(0)
  np.save(img / 'case1.npy', rng.rand(2, 3, 8, 8, 4).astype(np.float32))
  import nibabel as nib
  nib.save(nib.Nifti1Image(rng.rand(8, 8, 4).astype(np.float32), np.eye(4)), img / 'ct1.nii.gz')
  _csv(d / 'chestxray_balance_test.csv', ['image_path', 'disease', 'label'],
       ['cxr1.png', 'pneumonia', '1'], ['cxr2.png', 'effusion', '0'])
  _csv(d / 'mammo_test.csv', ['image_path', 'label'], ['m1.png', 'calcification'])
  _csv(d / 'mimic_caption_test.csv', ['image_path', 'label'], ['cxr1.png', 'No acute process.'])
  _csv(d / 'vqarad_test.csv', ['img_root_dir', 'Figure_path', 'Question', 'Answer'],
       ['', 'vq.png', 'Is there a fracture?', 'no'])
  _csv(d / 'MedPix_questions_train.csv', ['name', 'question', 'answer', 'explanation'],
       ['m1.png', 'What is the lesion?', 'Meningioma', 'Dural tail sign'],
       ['m2.png', 'Which side?', 'Left', ''])
  _csv(d / 'MedPix_single_train.csv', ['name', 'context', 'type'],
       *[['m1.png', 'CT - noncontrast', 'modality']] * 6, ['m2.png', 'Axial', 'plane'],
       ['m3.png', 'A round mass.', 'caption'])
  _csv(d / 'MedPix_multi_train.csv', ['name', 'context', 'type', 'history'],
       ['m1.png,m2.png', '• A 12 mm mass and a 3.5 cm cyst.', 'findings', '45 year old man.'],
       [','.join(['m1.png'] * 6 + ['m2.png'] * 6), 'Meningioma', 'ddx', ''])
  _csv(d / 'filtered_case_report_test.csv', ['PMC_id', 'img_ref', 'context', 'question', 'answer'],
       ['PMC1', "['F1', 'F2']", 'S1. S2. S3. S4. S5. S6.', 'Q: What is it?', 'A: A cyst.'])
  _csv(d / 'pmcoa_image_caption_train.csv', ['Figure_path', 'Caption'],
       ['PMC1_F1.jpg', 'CT of the chest.'])
  (d / 'papers').mkdir()
  (d / 'papers' / 'PMC9.json').write_text(json.dumps([
      {'text': 'Intro. ', 'img_ref': []}, {'text': 'See the CT.', 'img_ref': ['F3']},
      {'text': ' End.', 'img_ref': []}]))
  _csv(d / 'paper_train.csv', ['PMC_path'], ['../papers/PMC9.json'])
  _csv(d / 'radiology_vqa_test.csv', ['image_path', 'question', 'answer'],
       ['case1.npy', 'Where is the mass?', 'In the liver.'])
  _csv(d / 'radio_modality_test.csv', ['image_path', 'answer'], *[['ct1.nii.gz', 'CT']] * 4)
  (d / 'modality_set.json').write_text(json.dumps({'modality': ['CT', 'MRI', 'X-ray']}))
  article = {'pat': '60 years, male.', 'pre': 'Cough.', 'npy_path': 'case1.npy',
             'finding': 'A mass.', 'impression': 'Tumour.', 'title': 'Lung cancer',
             'articles': ['Lung cancer is common.'], 'radiographic_features': ['Spiculated.']}
  (d / 'radiology_article_npy_test.json').write_text(json.dumps([article] * 4))
  (d / 'articles_resave.json').write_text(json.dumps({'Lung cancer': 1, 'Sarcoidosis': 2}))
  return d, img


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return _radfm_folder(tmp_path_factory.mktemp('radfm'))


def _records(folder, name, file, split=None, seed=0):
  d, img = folder
  result = recipes.records(name, str(d / file), str(img), split, seed)
  assert result.rows >= 1
  return result


def _at(record):
  return [(os.path.basename(im['path']), im.get('index'), im['position'])
          for im in record['images']]


# ------------------------------------------------------------------------------------------------
# The table


def test_table_names_every_dataset_of_the_issue():
  assert set(recipes.RECIPES) == {
      'medpix_multi', 'medpix_single', 'medpix_qa', 'mimic_caption', 'chestxray_yes_no',
      'pcxr_yes_no', 'mammo_yes_no', 'spinexr_yes_no', 'chestxray_diagnosis', 'pcxr_diagnosis',
      'mammo_diagnosis', 'spinexr_diagnosis', 'pmc_vqa', 'vqa_rad', 'slake', 'case_report',
      'radio_vqa', 'radio_modality', 'radio_caption', 'radio_features', 'pmcoa', 'paper_inline'}
  r = recipes.RECIPES
  assert (r['pcxr_diagnosis'].train, r['pcxr_diagnosis'].test) == ('pcxr_train_new.csv',
                                                                   'pcxr_test.csv')
  assert [n for n, x in r.items() if x.dims == '3D'] == [
      'radio_vqa', 'radio_modality', 'radio_caption', 'radio_features']
  assert r['radio_caption'].columns == ('pat', 'pre', 'npy_path', 'finding', 'impression')
  for x in r.values():         # every prompt family is package data with its original count
    if x.prompts:
      assert prompt_file(x.prompts)['caption_prompt']
  assert [len(prompt_file(n)['caption_prompt']) for n in (
      'yes_no', 'cls', 'mammo', 'spinexr', 'report', 'caption', 'radiology_feature')] == [
      14, 11, 21, 11, 20, 15, 10]
  assert recipes.original_size('medpix_single', 11) == 3
  assert recipes.original_size('medpix_single', 11, 'test') == 11


def test_docs_describe_every_recipe():
  doc = open(os.path.join(REPO, 'docs', 'data.md')).read()
  section = doc.split("## Recipes: RadFM's own data", 1)[1].split('\n## ', 1)[0]
  headings = [line for line in section.splitlines() if line.startswith('### ')]
  named = {n.strip(' ,') for h in headings for n in h[4:].split(' (')[0].split(', ')}
  assert named == set(recipes.RECIPES)
  for r in recipes.RECIPES.values():     # its files appear in the section
    assert all(f'`{f}`' in section for f in (r.train, r.test) if f), r.name


# ------------------------------------------------------------------------------------------------
# Records, family by family


def test_yes_no_records(folder):
  res = _records(folder, 'chestxray_yes_no', 'chestxray_balance_test.csv')
  assert (res.split, res.rejects) == ('test', [])
  a, b = res.records
  assert a == {'id': 'chestxray_yes_no-test-0', 'dataset': 'chestxray_yes_no', 'split': 'test',
               'task': 'diagnosis_yes_no', 'question': 'Is the pneumonia visible in the image?',
               'answer': 'yes', 'kind': 'closed', 'finding': 'pneumonia',
               'images': [{'path': str(folder[1] / 'cxr1.png'), 'position': {'question': 38}}],
               'source': 'chestxray_balance_test.csv line 2'}
  # "disease" of the drawn template replaced by the finding; the image before the last character.
  assert b['answer'] == 'no' and 'effusion' in b['question']
  assert b['question'].replace('effusion', 'disease') in prompt_file('yes_no')['caption_prompt']
  assert b['images'][0]['position'] == {'question': len(b['question'])}


def test_diagnosis_and_report_records(folder):
  (m,) = _records(folder, 'mammo_diagnosis', 'mammo_test.csv').records
  assert (m['task'], m['answer'], m['dataset']) == ('diagnosis_open', 'calcification',
                                                    'mammo_diagnosis')
  assert m['question'] in prompt_file('mammo')['caption_prompt']
  assert _at(m) == [('m1.png', None, {'question': len(m['question'])})]
  (c,) = _records(folder, 'mimic_caption', 'mimic_caption_test.csv').records
  assert (c['task'], c['answer']) == ('report', 'No acute process.')
  assert c['question'] in prompt_file('report')['caption_prompt']


def test_vqa_records(folder):
  (v,) = _records(folder, 'vqa_rad', 'vqarad_test.csv').records
  assert (v['question'], v['answer'], v['task']) == ('Is there a fracture?', 'no', 'vqa')
  assert _at(v) == [('vq.png', None, {'question': 20})]          # seed 0: the end


def test_medpix_records(folder):
  qa = _records(folder, 'medpix_qa', 'MedPix_questions_train.csv').records
  assert [r['answer'] for r in qa] == ['Meningioma. Dural tail sign', 'Left']
  assert [r['split'] for r in qa] == ['train', 'train']            # the train file's name
  single = _records(folder, 'medpix_single', 'MedPix_single_train.csv').records
  modality = single[:6]
  assert {r['task'] for r in modality} == {'modality'}
  table = prompt_file('medpix_single')
  for r in modality:           # open: the modality; yes/no: about it (yes) or another one (no)
    if r['answer'] == 'CT - noncontrast':
      assert r['question'] in table['prompts']['modality'] and 'kind' not in r
    else:
      assert r['kind'] == 'closed' and r['yes_no'] is True
      assert (r['modality'] == 'CT - noncontrast') == (r['answer'] == 'yes')
      assert r['modality'] in r['question']
  assert {r['answer'] for r in modality} == {'CT - noncontrast', 'yes', 'no'}
  assert (single[6]['task'], single[7]['task']) == ('vqa', 'report')
  assert single[7]['question'] in table['prompts']['caption']
  findings, ddx = _records(folder, 'medpix_multi', 'MedPix_multi_train.csv').records
  assert findings['answer'] == 'A  mass and a  cyst.'              # bullet and sizes removed
  assert findings['task'] == 'report'
  assert findings['question'] == 'What are the key points in this case?'
  assert _at(findings) == [('m1.png', None, {'question': 37}), ('m2.png', None, {'question': 37})]
  # seed 1: the history goes before the prompt (p = 0.5), the images after all of it
  findings = _records(folder, 'medpix_multi', 'MedPix_multi_train.csv', seed=1).records[0]
  assert findings['question'] == '45 year old man. What are your observations about the case?'
  assert [im['position'] for im in findings['images']] == [{'question': 59}] * 2
  assert ddx['task'] == 'diagnosis_open' and len(ddx['images']) == 10    # at most 10 of 12
  assert {im['position']['question'] for im in ddx['images']} in ({0}, {len(ddx['question'])})


def test_case_report_pmcoa_and_paper_records(folder):
  (c,) = _records(folder, 'case_report', 'filtered_case_report_test.csv').records
  context = 'S1.  S4.  S5.  S6. '                      # first sentence + the last four
  assert c['question'] == context + '\n What is it?' and c['answer'] == ' A cyst.'
  assert [p['position']['question'] for p in c['images']] == [32, 32]      # len(question)
  seen = set()                 # each image: the end of the question or the end of the context
  for seed in range(8):
    (c,) = _records(folder, 'case_report', 'filtered_case_report_test.csv', seed=seed).records
    seen |= {p['position']['question'] for p in c['images']}
  assert seen == {len(context), 32}
  assert [os.path.basename(p['path']) for p in c['images']] == ['PMC1_F1.jpg', 'PMC1_F2.jpg']
  (o,) = _records(folder, 'pmcoa', 'pmcoa_image_caption_train.csv').records
  assert (o['answer'], o['task']) == ('CT of the chest.', 'report')
  assert o['question'] in prompt_file('caption')['caption_prompt']
  (p,) = _records(folder, 'paper_inline', 'paper_train.csv').records
  assert (p['question'], p['answer'], p['task']) == ('', 'Intro. See the CT. End.', 'interleaved')
  assert _at(p) == [('PMC9_F3.jpg', None, {'answer': 7})]        # where the figure is cited


def test_paper_window(tmp_path, folder):
  """A paper of 120 sentences, a figure cited by sentence 70: a window of 50 sentences starting
  at random or 10 before the citation (p = 0.5); the figure where it is cited."""
  img = folder[1]
  (tmp_path / 'PMC9.json').write_text(json.dumps(
      [{'text': f'S{i}. ', 'img_ref': ['F3'] if i == 70 else []} for i in range(120)]))
  _csv(tmp_path / 'paper_train.csv', ['PMC_path'], [str(tmp_path / 'PMC9.json')])
  starts = set()
  for seed in range(10):
    (p,) = recipes.records('paper_inline', str(tmp_path / 'paper_train.csv'), str(img),
                           seed=seed).records
    start = int(p['answer'].split('.')[0][1:])
    assert p['answer'] == ''.join(f'S{i}. ' for i in range(start, start + 50))
    starts.add(start)
    cited = start <= 70 < start + 50
    assert _at(p) == ([('PMC9_F3.jpg', None, {'answer': len(''.join(
        f'S{i}. ' for i in range(start, 70)))})] if cited else [])
  assert 60 in starts and len(starts) >= 3


def test_radiopaedia_3d_records(folder):
  (v,) = _records(folder, 'radio_vqa', 'radiology_vqa_test.csv').records
  assert (v['question'], v['answer']) == ('Where is the mass?', 'In the liver.')
  assert _at(v) == [('case1.npy', 0, {'question': 18}), ('case1.npy', 1, {'question': 18})]
  seen = set()                 # every image of the case draws its own end
  for seed in range(6):
    (v,) = _records(folder, 'radio_vqa', 'radiology_vqa_test.csv', seed=seed).records
    seen.add(tuple(im['position']['question'] for im in v['images']))
  assert seen == {(0, 0), (18, 0), (18, 18)}
  caps = _records(folder, 'radio_caption', 'radiology_article_npy_test.json').records
  assert caps[0]['answer'] == 'Finding: A mass.Impression: Tumour.'
  assert caps[0]['question'].startswith('60 years, male. Cough. ')
  assert caps[0]['question'][len('60 years, male. Cough. '):] in \
      prompt_file('caption')['caption_prompt']
  assert caps[0]['source'] == 'radiology_article_npy_test.json [0]'
  feats = _records(folder, 'radio_features', 'radiology_article_npy_test.json').records
  assert {r['task'] for r in feats} == {'rationale', 'diagnosis_yes_no'}
  for r in feats:
    if r['task'] == 'rationale':
      assert r['answer'] == ('Lung cancer is common.The Radiographic features can be summarized '
                             'as follows.Spiculated.')
    else:
      assert r['answer'] == ('yes' if r['finding'] == 'Lung cancer' else 'no')
      assert r['finding'] in r['question']
  mods = _records(folder, 'radio_modality', 'radio_modality_test.csv').records
  assert {r['task'] for r in mods} == {'modality'}
  for r in mods:       # the original's "no" names the true modality; here the one drawn instead
    if r['answer'] in ('yes', 'no'):
      assert (r['modality'] == 'CT') == (r['answer'] == 'yes') and r['modality'] in r['question']
    else:
      assert r['answer'] == 'CT' and r['question'] in prompt_file('modality')['caption_prompt']


def test_image_root_per_recipe(tmp_path, folder):
  d, img = folder
  qa = str(d / 'MedPix_questions_train.csv')
  (res,) = recipes.collect('medpix_qa', qa, {'': str(tmp_path), 'medpix_qa': str(img)},
                           log=open(os.devnull, 'w'))
  assert [im['path'] for r in res.records for im in r['images']] == [
      str(img / 'm1.png'), str(img / 'm2.png')]
  with pytest.raises(InputError, match=r'^recipe medpix_qa: no image root; expected --image-root '
                     r'DIR \(for every recipe\) or --image-root medpix_qa=DIR$'):
    recipes.collect('medpix_qa', qa, {'vqa_rad': str(img)}, log=open(os.devnull, 'w'))


def test_records_are_deterministic_by_seed(folder):
  name, file = 'medpix_single', 'MedPix_single_train.csv'
  assert _records(folder, name, file).records == _records(folder, name, file).records
  other = _records(folder, name, file, seed=1).records
  assert [r['question'] for r in other] != [r['question'] for r in _records(folder, name,
                                                                              file).records]


def test_every_family_ingests_and_becomes_model_inputs(tmp_path, folder):
  """All the fixture's files (both splits) through ingest_recipe('radfm') into a real store, then
  every stored sample through the one record -> model inputs function of training."""
  import conftest_data as cd
  from radfm_jax.data.batch import record_inputs
  d, img = folder
  results, report = recipes.ingest_recipe('radfm', str(d), str(img), str(tmp_path / 'store'),
                                          log=open(os.devnull, 'w'))
  assert (report.rejects, report.dropped_samples) == ([], 0)
  assert {r.name for r in results} == set(recipes.RECIPES) - {
      'pcxr_yes_no', 'mammo_yes_no', 'spinexr_yes_no', 'chestxray_diagnosis', 'pcxr_diagnosis',
      'spinexr_diagnosis', 'pmc_vqa', 'slake'}
  store = VolumeStore(str(tmp_path / 'store'))
  rows = store.manifest()
  assert len(rows) == sum(len(r.records) for r in results) == report.samples
  tok, cfg = cd.tokenizer(), cd.data_config()
  for row in rows:
    images = [store.read(im['id']) for im in row['images'][:cfg.max_images]]
    out = record_inputs(row, images, tok, cfg)
    blocks = int((out['tokens'] == tok.image_start_id).sum())
    assert blocks == len(images) >= 1, row['id']
    assert out['image_mask'].sum() == len(images), row['id']


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line naming file, line and column; rows counted as rejects


def test_bad_split_files(tmp_path, folder):
  img = str(folder[1])
  _csv(tmp_path / 'vqarad_test.csv', ['img_root_dir', 'Figure_path', 'Question'], ['', 'a', 'b'])
  with pytest.raises(InputError) as e:
    recipes.records('vqa_rad', str(tmp_path / 'vqarad_test.csv'), img)
  assert str(e.value) == (f'{tmp_path}/vqarad_test.csv line 1 field Answer: no such column; '
                          'expected the columns img_root_dir, Figure_path, Question, Answer '
                          '(found img_root_dir, Figure_path, Question)')
  (tmp_path / 'mine.csv').write_text('img_root_dir,Figure_path,Question,Answer\n')
  with pytest.raises(InputError, match=r'mine\.csv: not one of the original file names of recipe '
                     r'vqa_rad \(train: vqarad_train\.csv, test: vqarad_test\.csv\); expected one '
                     r'of them, or --split train\|test'):
    recipes.records('vqa_rad', str(tmp_path / 'mine.csv'), img)
  with pytest.raises(InputError) as e:
    recipes.records('vqa', str(tmp_path / 'vqarad_test.csv'), img)
  assert str(e.value) == (f"recipe 'vqa': unknown; expected one of {', '.join(recipes.RECIPES)} "
                          'or radfm (radfm-jax recipes list)')
  (tmp_path / 'radiology_article_npy_test.json').write_text('{"a": 1}')
  with pytest.raises(InputError, match='got a JSON object; expected a list of objects'):
    recipes.records('radio_caption', str(tmp_path / 'radiology_article_npy_test.json'), img)
  _csv(tmp_path / 'radio_modality_test.csv', ['image_path', 'answer'], ['ct1.nii.gz', 'CT'] )
  with pytest.raises(InputError, match=r'modality_set\.json: not found; expected the RadFM '
                     'modality list'):
    for seed in range(8):      # a "no" question needs the list
      recipes.records('radio_modality', str(tmp_path / 'radio_modality_test.csv'), img, seed=seed)
  (tmp_path / 'modality_set.json').write_text('{"modality": ["CT", null]}')
  with pytest.raises(InputError) as e:          # was: a "no" question about the modality "None"
    for seed in range(8):
      recipes.records('radio_modality', str(tmp_path / 'radio_modality_test.csv'), img, seed=seed)
  assert str(e.value) == (f'{tmp_path}/modality_set.json field modality[1]: got null; expected a '
                          'modality name (a non-empty string)')


def test_split_file_that_does_not_exist_is_said_so_whatever_its_name(tmp_path, folder):
  img = str(folder[1])
  for name in ('vqarad_test.csv', 'nope.csv'):     # was, for nope.csv: not one of the names
    with pytest.raises(InputError) as e:
      recipes.records('vqa_rad', str(tmp_path / name), img)
    assert str(e.value) == (f'{tmp_path}/{name}: split file not found; expected the original '
                            'RadFM file of this recipe (radfm-jax recipes list names them)')
  with pytest.raises(InputError, match=f'^{tmp_path}: a folder; expected the split file'):
    recipes.records('vqa_rad', str(tmp_path), img)


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path, folder):
  """Which of two Answer cells a row's answer comes from would be a guess (it was the last)."""
  path = tmp_path / 'vqarad_test.csv'
  path.write_text('img_root_dir,Figure_path,Question,Answer,Answer\n,vq.png,Q?,A1,A2\n')
  with pytest.raises(InputError) as e:
    recipes.records('vqa_rad', str(path), str(folder[1]))
  assert str(e.value) == (f'{path} line 1 field Answer: column named twice in the header; '
                          "expected each column once (which one a row's value comes from would "
                          'be a guess)')


def test_csv_quote_never_closed_names_its_line_and_quoted_newlines_still_read(tmp_path, folder):
  """An unclosed quote swallowed every row after it, uncounted (exit 0): now an error naming the
  line where the quoted field opens. A quoted field that holds line breaks is one cell, and the
  rows after it keep their line numbers."""
  from radfm_jax.cli.main import main
  img, path = str(folder[1]), tmp_path / 'vqarad_test.csv'
  header = 'img_root_dir,Figure_path,Question,Answer\n'
  expected = (f'{path} line 4: not valid CSV (a quoted field opens here and is never closed, so '
              'every line after it would be read as its text); expected a closing quote (a quote '
              'inside a quoted field is written "")')
  path.write_text(header + ',vq.png,"Line one\nline two?",yes\n'
                  ',vq.png,"Is there, a lesion?,yes\n,vq.png,Q,A\n')
  with pytest.raises(InputError) as e:
    recipes.records('vqa_rad', str(path), img)
  assert str(e.value) == expected
  assert main(['ingest', '--recipe', 'vqa_rad', '--source', str(path), '--image-root', img,
               '--out', str(tmp_path / 'store'), '--no-progress']) == 2
  assert not (tmp_path / 'store').exists()
  path.write_text(header + ',vq.png,"Is there, a lesion?,yes\n,vq.png,"Q",A\n')
  with pytest.raises(InputError, match=f'^{path} line 3: not valid CSV \\(\',\' expected after'):
    recipes.records('vqa_rad', str(path), img)   # closed by the next row's quote: strict stops
  path.write_text(header + ',vq.png,"Line one\r\nline ""two""?",yes\n\n,vq.png,Q2,A2\n')
  res = recipes.records('vqa_rad', str(path), img)
  assert [(r['question'], r['answer'], r['source']) for r in res.records] == [
      ('Line one\r\nline "two"?', 'yes', 'vqarad_test.csv line 2'),
      ('Q2', 'A2', 'vqarad_test.csv line 5')]
  assert res.rejects == []


def test_bad_rows_are_counted_rejects(tmp_path, folder):
  img = str(folder[1])
  path = tmp_path / 'chestxray_balance_train_new.csv'
  path.write_text('image_path,disease,label\n'
                  'cxr1.png,pneumonia,1\n'
                  'nothere.png,effusion,0\n'
                  'cxr2.png,effusion\n'
                  '\n'
                  'cxr2.png,effusion,maybe\n'
                  'cxr2.png,,1\n'
                  f'{tmp_path},effusion,1\n')
  res = recipes.records('chestxray_yes_no', str(path), img)
  assert (res.split, res.rows, len(res.records)) == ('train', 6, 1)
  assert [r['reason'] for r in res.rejects] == [
      f'{path} line 3 field image_path: image not found: {img}/nothere.png; expected the file '
      f'under --image-root {img} (or an absolute path)',
      f'{path} line 4: malformed row: 2 cells; expected 3, one per column of the header',
      f"{path} line 6 field label: got 'maybe'; expected 0 or 1",
      f'{path} line 7 field disease: empty; expected a value',
      f'{path} line 8 field image_path: {tmp_path} is a folder; expected an image file under '
      f'--image-root {img} (or an absolute path)']               # was: "image not found"
  assert [(r['line'], r['field']) for r in res.rejects] == [
      (3, 'image_path'), (4, None), (6, 'label'), (7, 'disease'), (8, 'image_path')]
  cases = tmp_path / 'filtered_case_report_train.csv'
  _csv(cases, ['PMC_id', 'img_ref', 'context', 'question', 'answer'],
       ['PMC1', 'F1', 'c', 'q', 'a'])
  (rej,) = recipes.records('case_report', str(cases), img).rejects
  assert rej['reason'] == (f"{cases} line 2 field img_ref: got 'F1'; expected a list of figure "
                           "ids such as ['F1', 'F2']")


# ------------------------------------------------------------------------------------------------
# The CLI, end to end into real stores


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_cli_list():
  r = _cli('recipes', 'list')
  assert r.returncode == 0, r.stderr
  for x in recipes.RECIPES.values():
    assert f'\n{x.name}  ({x.dims}; task {x.task})\n' in '\n' + r.stdout
    assert f'train: {x.train}   test: {x.test or "-"}' in r.stdout
  assert 'columns: name, context, type, [history]' in r.stdout


def test_cli_ingest_2d_and_3d_recipes(tmp_path, folder):
  d, img = folder
  store = str(tmp_path / 'store')
  r = _cli('ingest', '--recipe', 'chestxray_yes_no', '--source',
           str(d / 'chestxray_balance_test.csv'), '--image-root', str(img), '--out', store,
           '--no-progress')
  assert r.returncode == 0, r.stderr
  assert ('recipes: chestxray_yes_no test: 2 rows, 0 rows rejected, 0 samples dropped by ingest, '
          '2 samples ingested') in r.stderr
  r = _cli('ingest', '--recipe', 'radio_vqa', '--source', str(d / 'radiology_vqa_test.csv'),
           '--image-root', str(img), '--out', store, '--no-progress')
  assert r.returncode == 0, r.stderr
  s = VolumeStore(store)
  rows = {row['id']: row for row in s.manifest()}
  assert sorted(rows) == ['chestxray_yes_no-test-0', 'chestxray_yes_no-test-1',
                          'radio_vqa-test-0']
  cxr = rows['chestxray_yes_no-test-0']
  assert (cxr['dataset'], cxr['task'], cxr['answer']) == ('chestxray_yes_no', 'diagnosis_yes_no',
                                                          'yes')
  np.testing.assert_array_equal(s.read(cxr['images'][0]['id'])[0, :, :, 0],
                                np.arange(64).reshape(8, 8) * 3)
  vqa = rows['radio_vqa-test-0']
  assert [im['position'] for im in vqa['images']] == [{'question': 18}, {'question': 18}]
  case = np.load(img / 'case1.npy')
  for s_index, im in enumerate(vqa['images']):       # image s of the case = case[s]
    assert im['shape'] == [3, 8, 8, 4]
    np.testing.assert_array_equal(s.read(im['id']), case[s_index])


def test_cli_recipe_radfm_ingests_a_folder(tmp_path, folder):
  d, img = folder
  (d / 'notes.txt').write_text('not a split file')
  store = str(tmp_path / 'store')
  other = tmp_path / 'vqarad_images'                 # a root of its own for one recipe
  other.mkdir()
  _png(other / 'vq.png', 40)
  r = _cli('ingest', '--recipe', 'radfm', '--source', str(d), '--image-root', str(img),
           '--image-root', f'vqa_rad={other}', '--out', store, '--no-progress', '--split', 'test')
  assert r.returncode == 0, r.stderr
  found = [line for line in r.stderr.splitlines() if line.startswith('recipes: found under')]
  assert found == [f'recipes: found under {d}: mimic_caption_test.csv (mimic_caption), '
                   'chestxray_balance_test.csv (chestxray_yes_no), '
                   'mammo_test.csv (mammo_diagnosis), '
                   'filtered_case_report_test.csv (case_report), vqarad_test.csv (vqa_rad), '
                   'radiology_vqa_test.csv (radio_vqa), radio_modality_test.csv (radio_modality), '
                   'radiology_article_npy_test.json (radio_caption), '
                   'radiology_article_npy_test.json (radio_features)']
  assert 'pcxr_balance_test.csv (pcxr_yes_no)' in r.stderr        # listed as missing
  rows = VolumeStore(store).manifest()
  counts = {}
  for row in rows:
    counts[row['dataset']] = counts.get(row['dataset'], 0) + 1
    assert row['split'] == 'test'
  (vq,) = [row for row in rows if row['dataset'] == 'vqa_rad']
  np.testing.assert_array_equal(VolumeStore(store).read(vq['images'][0]['id'])[0, :, :, 0],
                                np.arange(64).reshape(8, 8) * 3 + 40)
  assert counts == {'chestxray_yes_no': 2, 'mammo_diagnosis': 1, 'mimic_caption': 1,
                    'case_report': 1, 'vqa_rad': 1, 'radio_vqa': 1, 'radio_modality': 4,
                    'radio_caption': 4, 'radio_features': 4}


def test_radfm_folder_with_a_file_twice(tmp_path):
  for sub in ('a', 'b'):
    (tmp_path / sub).mkdir()
    _csv(tmp_path / sub / 'vqarad_test.csv', ['img_root_dir', 'Figure_path', 'Question', 'Answer'])
  with pytest.raises(InputError) as e:
    recipes.find_files(str(tmp_path))
  assert str(e.value) == (f'{tmp_path}: vqarad_test.csv found more than once ({tmp_path}/a/'
                          f'vqarad_test.csv, {tmp_path}/b/vqarad_test.csv); expected one file per '
                          'original name (give the folder that holds the one you mean)')


@pytest.mark.parametrize('argv, message', [
    (['--recipe', 'vqa_rad', '--out', 's'], '--recipe needs --source FILE'),
    (['--recipe', 'vqa_rad', '--source', 'f.csv', '--root', 'r', '--out', 's'],
     'takes --image-root, not --root'),
    (['--manifest', 'm.jsonl', '--split', 'test', '--out', 's'],
     '--split goes with --recipe, not --manifest'),
    (['--manifest', 'm.jsonl', '--recipe', 'vqa_rad', '--out', 's'],
     'argument --recipe: not allowed with argument --manifest'),
    (['--recipe', 'radfm', '--source', '.', '--image-root', 'medpixx=a', '--out', 's'],
     '--image-root medpixx=a: medpixx is no recipe; expected NAME=DIR'),
    # Flags that were silently unused: a seed with a manifest, another recipe's image root.
    (['--manifest', 'm.jsonl', '--seed', '7', '--out', 's'],
     '--seed goes with --recipe, not --manifest'),
    (['--recipe', 'vqa_rad', '--source', 'f.csv', '--image-root', 'slake=img', '--out', 's'],
     '--image-root slake=img: names recipe slake, not the one ingested (--recipe vqa_rad); '
     'expected DIR, or vqa_rad=DIR'),
    # A second root for the same recipes: the last one silently won.
    (['--recipe', 'vqa_rad', '--source', 'f.csv', '--image-root', 'a', '--image-root', 'b',
      '--out', 's'],
     '--image-root b: a second root for every recipe (after --image-root a); expected one DIR '
     'per recipe (a recipe reads its images from one root)'),
    (['--recipe', 'radfm', '--source', '.', '--image-root', 'slake=a', '--image-root', 'slake=b',
      '--out', 's'],
     '--image-root slake=b: a second root for recipe slake (after --image-root slake=a)')])
def test_cli_recipe_flag_errors(argv, message, capsys):
  from radfm_jax.cli.main import main
  with pytest.raises(SystemExit) as e:
    main(['ingest', *argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_cli_reports_bad_inputs(tmp_path, folder):
  img = folder[1]
  _csv(tmp_path / 'mammo_test.csv', ['image_path', 'lable'], ['m1.png', 'x'])
  r = _cli('ingest', '--recipe', 'mammo_diagnosis', '--source', str(tmp_path / 'mammo_test.csv'),
           '--image-root', str(img), '--out', str(tmp_path / 's1'))
  assert r.returncode == 2
  assert r.stderr.strip() == (f'radfm-jax ingest: {tmp_path}/mammo_test.csv line 1 field label: '
                              'no such column; expected the columns image_path, label (found '
                              'image_path, lable)')
  _csv(tmp_path / 'mimic_caption_test.csv', ['image_path', 'label'], ['cxr1.png', 'ok'],
       ['gone.png', 'x'])
  store = tmp_path / 's2'
  r = _cli('ingest', '--recipe', 'mimic_caption', '--source',
           str(tmp_path / 'mimic_caption_test.csv'), '--image-root', str(img), '--out', str(store),
           '--no-progress', '--strict')
  assert r.returncode == 1
  line = (f'{tmp_path}/mimic_caption_test.csv line 3 field image_path: image not found: '
          f'{img}/gone.png; expected the file under --image-root {img} (or an absolute path)')
  assert f'recipes: rejected {line}\n' in r.stderr
  assert 'recipes: mimic_caption test: 2 rows, 1 rows rejected, 0 samples dropped by ingest, 1 ' \
      'samples ingested' in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f'radfm-jax ingest: 0 scans rejected, 0 samples dropped, 1 input rows refused (see '
      f'{store}/rejects.jsonl)')
  rejects = [json.loads(x) for x in open(store / 'rejects.jsonl')]
  assert [x['reason'] for x in rejects] == [line]
  assert [row['id'] for row in VolumeStore(str(store)).manifest()] == ['mimic_caption-test-0']
  # Every row refused: exit 1 without --strict too.
  _csv(tmp_path / 'mimic_caption_test.csv', ['image_path', 'label'], ['gone.png', 'x'])
  r = _cli('ingest', '--recipe', 'mimic_caption', '--source',
           str(tmp_path / 'mimic_caption_test.csv'), '--image-root', str(img), '--out',
           str(tmp_path / 's3'), '--no-progress')
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      'radfm-jax ingest: no sample of the input was kept (0 scans rejected, 0 samples dropped, '
      f'1 input rows refused; see {tmp_path}/s3/rejects.jsonl); expected at least one readable '
      'sample'), r.stderr


def test_recipe_json_key_twice_empty_names_and_nothing_to_ingest_are_one_line(tmp_path, folder,
                                                                              capsys):
  """A JSON split file naming a key twice kept the last value (the finding lost); a MedPix row
  whose name cell holds no file name made a sample of no image; a recipe whose --image-root does
  not exist, or whose split file has a header and no rows, wrote an empty store and exited 0."""
  from radfm_jax.cli.main import main
  img = str(folder[1])
  twice = tmp_path / 'radiology_article_npy_test.json'
  twice.write_text('[{"pat": "p", "pre": "q", "npy_path": "case1.npy", "finding": "A mass.", '
                   '"finding": "", "impression": "Tumour."}]')
  with pytest.raises(InputError) as e:
    recipes.records('radio_caption', str(twice), img)
  assert str(e.value) == (f'{twice} field [0].finding: the key appears twice in one object (JSON '
                          'keeps the last value, losing the first); expected each key once')
  multi = tmp_path / 'MedPix_multi_train.csv'
  _csv(multi, ['name', 'context', 'type'], [' , ', 'A mass.', 'findings'],
       ['m1.png', 'A mass.', 'findings'])
  res = recipes.records('medpix_multi', str(multi), img)
  assert [r['reason'] for r in res.rejects] == [
      f"{multi} line 2 field name: got ' , '; expected comma-separated image file names"]
  assert [len(r['images']) for r in res.records] == [1]
  out = tmp_path / 'store'
  source = str(folder[0] / 'mammo_test.csv')
  assert main(['ingest', '--recipe', 'mammo_diagnosis', '--source', source, '--image-root',
               str(tmp_path / 'nowhere'), '--out', str(out), '--no-progress']) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"radfm-jax ingest: --image-root {tmp_path / 'nowhere'}: no such folder; expected the "
      "folder the recipe's image paths start from (nothing was written)")
  header_only = tmp_path / 'mammo_test.csv'
  header_only.write_text('image_path,label\n')
  assert main(['ingest', '--recipe', 'mammo_diagnosis', '--source', str(header_only),
               '--image-root', img, '--out', str(out), '--no-progress']) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f'radfm-jax ingest: --source {header_only}: no rows in mammo_diagnosis test; expected the '
      'split files of the recipe with their samples (nothing was written)')
  assert not out.exists()


def test_split_file_not_utf8_names_its_line(tmp_path, folder):
  """The decoder counts bytes from the chunk it was given: the error named a byte position deep in
  the file. The line and column of the first byte that is not UTF-8 instead."""
  path = tmp_path / 'mammo_test.csv'
  path.write_bytes(b'image_path,label\nm1.png,calcification\nm2.png,caf\xe9\n')
  with pytest.raises(InputError) as e:
    recipes.records('mammo_diagnosis', str(path), str(folder[1]))
  assert str(e.value) == (f'{path} line 3: not UTF-8 text (byte 0xe9 at column 11: invalid '
                          'continuation byte); expected a UTF-8 CSV file')
