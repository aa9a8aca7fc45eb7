"""Entity extractors and entity precision / recall, by hand."""

import importlib.util

import pytest

from radfm_jax.eval import entities as E


def test_term_list_longest_match_and_synonyms():
  ex = E.TermListExtractor({'pleural effusion': 'C0032227', 'effusion': 'C0013687',
                            'nodule': 'C0028259', 'nodules': 'C0028259'})
  assert ex.extract('Small PLEURAL\n effusion and two nodules.') == {'C0032227', 'C0028259'}
  assert ex.extract('Effusion only') == {'C0013687'}
  assert ex.extract('no findings; noduleX is not a word match') == set()


def test_term_list_from_file(tmp_path):
  path = tmp_path / 'terms.tsv'
  path.write_text('# comment\npneumonia\nlung nodule\tN1\n\nnodule\tN1\n')
  ex = E.TermListExtractor.from_file(str(path))
  assert ex.extract('A lung nodule, likely pneumonia.') == {'pneumonia', 'N1'}
  assert ex.name == f'term_list:{path}'
  with pytest.raises(ValueError, match='empty'):
    E.TermListExtractor([])


def test_entity_scores_by_hand():
  ex = E.TermListExtractor(['mass', 'effusion', 'nodule', 'edema'])
  preds = ['mass and effusion', 'nodule', 'nothing here', 'edema']
  refs = ['mass', 'nodule and edema', 'effusion', 'nothing']
  s = E.entity_scores(preds, refs, ex)
  # precision per sample with predicted entities: 1/2, 1/1, 0/1 (sample 4 edema not in ref) -> 1/2
  assert s['precision'] == pytest.approx((0.5 + 1 + 0) / 3)
  # recall per sample with reference entities: 1/1, 1/2, 0/1 -> 1/2
  assert s['recall'] == pytest.approx((1 + 0.5 + 0) / 3)
  assert s['f1'] == pytest.approx(0.5)
  # micro: hits 2, predicted 4, reference 4
  assert (s['micro_precision'], s['micro_recall']) == (0.5, 0.5)
  assert (s['n_with_pred_entities'], s['n_with_ref_entities']) == (3, 3)
  empty = E.entity_scores(['x'], ['y'], ex)
  assert empty['precision'] is None and empty['f1'] is None


def test_get_extractor_specs(tmp_path):
  assert E.get_extractor('none')[0] is None
  path = tmp_path / 't.txt'
  path.write_text('mass\n')
  ex, reason = E.get_extractor(f'terms:{path}')
  assert isinstance(ex, E.TermListExtractor) and reason == ''
  with pytest.raises(ValueError, match='expected'):
    E.get_extractor('bogus')


def test_bad_specs_and_term_files_name_the_flag_file_and_line(tmp_path):
  """An unknown --entities value and a term file that is missing, a folder, not UTF-8, holds an
  id without a term, gives a term two ids or holds no term: InputError, one line naming them."""
  from radfm_jax.errors import InputError
  specs = "'auto', 'scispacy[:MODEL]', 'terms:FILE' or 'none'"
  for spec in ('bogus', 'scispacyx'):
    with pytest.raises(InputError) as e:
      E.get_extractor(spec, source='--entities')
    assert str(e.value) == f'--entities {spec}: unknown extractor; expected {specs}'
  with pytest.raises(InputError, match=r'^--entities scispacy:: no model after the colon'):
    E.get_extractor('scispacy:', source='--entities')
  expected = f'expected {E.TERMS_FILE}'
  with pytest.raises(InputError) as e:
    E.get_extractor(f'terms:{tmp_path / "missing.txt"}', source='--entities')
  assert str(e.value) == f'--entities terms:{tmp_path / "missing.txt"}: no such file; {expected}'
  with pytest.raises(InputError) as e:
    E.get_extractor(f'terms:{tmp_path}', source='--entities')
  assert str(e.value) == f'--entities terms:{tmp_path}: a folder; {expected}'
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes(b'nodule\ncaf\xe9\n')
  with pytest.raises(InputError) as e:
    E.TermListExtractor.from_file(str(bad))
  assert str(e.value) == (f'{bad} line 2: not UTF-8 text (invalid continuation byte, column 4); '
                          f'{expected}')
  path = tmp_path / 't.txt'
  for text, message in (
      ('nodule\n\tC1\n', f'{path} line 2: no term before the tab; expected term<TAB>id'),
      ('nodule\tN1\nmass\nNodule\tN2\n', f"{path} line 3: term 'Nodule' already has id 'N1' "
       f"({path} line 1); expected one id per term"),
      ('# only a comment\n\n', f'{path}: no terms; {expected}')):
    path.write_text(text)
    with pytest.raises(InputError) as e:
      E.TermListExtractor.from_file(str(path))
    assert str(e.value) == message
  path.write_text('nodule\tN1\nNodule\tN1\r\n')        # the same id twice: no conflict
  assert E.TermListExtractor.from_file(str(path)).extract('a nodule') == {'N1'}


@pytest.mark.skipif(importlib.util.find_spec('scispacy') is not None, reason='scispaCy installed')
def test_scispacy_missing_is_explained():
  ex, reason = E.get_extractor('auto')
  assert ex is None and 'pip install scispacy' in reason and 'en_core_sci_lg' in reason
  with pytest.raises(E.ExtractorUnavailable, match='scispaCy is not installed'):
    E.get_extractor('scispacy')
