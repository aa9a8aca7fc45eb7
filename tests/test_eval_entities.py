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


@pytest.mark.skipif(importlib.util.find_spec('scispacy') is not None, reason='scispaCy installed')
def test_scispacy_missing_is_explained():
  ex, reason = E.get_extractor('auto')
  assert ex is None and 'pip install scispacy' in reason and 'en_core_sci_lg' in reason
  with pytest.raises(E.ExtractorUnavailable, match='scispaCy is not installed'):
    E.get_extractor('scispacy')
