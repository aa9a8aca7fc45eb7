"""Medical entity extraction for the paper's UMLS precision / recall.

    extractor, reason = get_extractor('auto')       # scispaCy if installed, else (None, why not)
    scores = entity_scores(predictions, references, extractor)

Backends:
  * `ScispacyExtractor`: scispaCy NER (`en_core_sci_lg` by default) and, when scispaCy's UMLS
    linker can be loaded, entities are compared by their best UMLS concept id (CUI); otherwise by
    their lowercased text. Needs `pip install scispacy` plus the model package (a separate download
    from the scispaCy releases; not on PyPI), and the linker's knowledge base (~1 GB, fetched on
    first use).
  * `TermListExtractor`: a user-supplied vocabulary (one term per line, optionally `term<TAB>id`);
    whole-word, case-insensitive matches, longest terms first. No dependencies; it keeps the scoring
    path testable and serves local term lists.

Scores (`entity_scores`): per sample, precision = |P & R| / |P| and recall = |P & R| / |R| over the
sets of entities of prediction (P) and reference (R); the macro mean is over samples where the
denominator is non-empty. Micro (pooled) precision / recall are reported too.
"""

from __future__ import annotations

import abc
import re
from typing import Iterable, Sequence

from radfm_jax.errors import InputError, where

SCISPACY_MODEL = 'en_core_sci_lg'
TERMS_FILE = ('a UTF-8 text file of terms, one per line (term<TAB>id for synonyms, # for '
              'comments)')
SPECS = "'auto', 'scispacy[:MODEL]', 'terms:FILE' or 'none'"


class ExtractorUnavailable(RuntimeError):
  """The backend's packages or model are not installed; the message says what to install."""


class EntityExtractor(abc.ABC):
  """Text -> set of entity keys (CUIs or normalised terms)."""

  name: str = 'entities'

  @abc.abstractmethod
  def extract(self, text: str) -> set[str]:
    ...

  def extract_many(self, texts: Iterable[str]) -> list[set[str]]:
    return [self.extract(t) for t in texts]


class TermListExtractor(EntityExtractor):
  """Matches a fixed vocabulary: `TermListExtractor(['pleural effusion', 'nodule'])` or a mapping
  term -> concept id (synonyms sharing an id count as the same entity)."""

  def __init__(self, terms: Iterable[str] | dict[str, str], name: str = 'term_list'):
    mapping = dict(terms) if isinstance(terms, dict) else {t: t for t in terms}
    self.ids = {' '.join(t.lower().split()): str(i).strip() or t.lower()
                for t, i in mapping.items() if t.strip()}
    if not self.ids:
      raise ValueError('TermListExtractor: empty term list')
    ordered = sorted(self.ids, key=len, reverse=True)   # longest first: 'pleural effusion' > 'effusion'
    self.pattern = re.compile(r'\b(' + '|'.join(re.escape(t).replace(r'\ ', r'\s+')
                                                for t in ordered) + r')\b', re.IGNORECASE)
    self.name = name

  @classmethod
  def from_file(cls, path: str, name: str | None = None) -> 'TermListExtractor':
    """One term per line, `term<TAB>id` for synonyms; blank lines and '#' comments skipped.
    A missing or unreadable file, a line with no term and a file with none are InputErrors
    naming `name` (how the user gave the file, e.g. '--entities terms:FILE'; default the path)
    and the line."""
    from radfm_jax.data.tokenizer import text_lines   # here: no SentencePiece on import
    name = name or str(path)
    mapping, lines = {}, {}
    for n, line in text_lines(path, f'expected {TERMS_FILE}', name=name):
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      term, _, cid = line.partition('\t')
      term, cid = term.strip(), cid.strip() or term.strip().lower()
      if not term:                     # '<TAB>id': an id without its term would match nothing
        raise InputError(f'{where(name, n)}: no term before the tab; expected term<TAB>id')
      key = ' '.join(term.lower().split())        # how the extractor matches it
      if key in lines and mapping[lines[key][1]] != cid:   # the later id would replace the first
        raise InputError(f'{where(name, n)}: term {term!r} already has id '
                         f'{mapping[lines[key][1]]!r} ({where(name, lines[key][0])}); expected '
                         'one id per term')
      lines.setdefault(key, (n, term))
      mapping[term] = cid
    if not mapping:
      raise InputError(f'{name}: no terms; expected {TERMS_FILE}')
    return cls(mapping, name=f'term_list:{path}')

  def extract(self, text: str) -> set[str]:
    return {self.ids[' '.join(m.group(1).lower().split())] for m in self.pattern.finditer(text)}


class ScispacyExtractor(EntityExtractor):
  """scispaCy NER (+ UMLS linker when available)."""

  def __init__(self, model: str = SCISPACY_MODEL, link_umls: bool = True):
    try:
      import spacy
      import scispacy  # noqa: F401
    except ImportError as e:
      raise ExtractorUnavailable(
          f'scispaCy is not installed ({e}); install it with `pip install scispacy` and the '
          f'model `{model}` from https://allenai.github.io/scispacy/ to compute UMLS metrics') from e
    try:
      self.nlp = spacy.load(model)
    except OSError as e:
      raise ExtractorUnavailable(
          f'the scispaCy model `{model}` is not installed ({e}); install its package from '
          'https://allenai.github.io/scispacy/ (e.g. pip install <the en_core_sci_lg .tar.gz URL>)'
      ) from e
    self.linked = False
    if link_umls:
      try:
        from scispacy.linking import EntityLinker  # noqa: F401  (registers the pipe)
        self.nlp.add_pipe('scispacy_linker', config={'resolve_abbreviations': True,
                                                     'linker_name': 'umls'})
        self.linked = True
      except Exception:  # noqa: BLE001  (no knowledge base offline: fall back to entity text)
        self.linked = False
    self.name = f'scispacy:{model}' + (':umls' if self.linked else ':text')

  def extract(self, text: str) -> set[str]:
    out = set()
    for ent in self.nlp(text).ents:
      kb = getattr(ent._, 'kb_ents', None) if self.linked else None
      out.add(kb[0][0] if kb else ' '.join(ent.text.lower().split()))
    return out


def get_extractor(spec: str | None, source: str = 'entity extractor'
                  ) -> tuple[EntityExtractor | None, str]:
  """'auto' | 'scispacy[:model]' | 'terms:FILE' | 'none' -> (extractor or None, reason if None).

  'auto' tries scispaCy and returns (None, why) when it is missing; an explicit 'scispacy' raises
  ExtractorUnavailable instead, so a requested metric never silently disappears. An unknown spec
  or a bad term file is an InputError naming `source` (the CLI: '--entities') and the spec.
  """
  spec = (spec or 'none').strip()
  if spec == 'none':
    return None, 'entity metrics not requested (--entities none)'
  if spec.startswith('terms:'):
    return TermListExtractor.from_file(spec[len('terms:'):], name=f'{source} {spec}'), ''
  if spec in ('auto', 'scispacy') or spec.startswith('scispacy:'):
    model = spec.split(':', 1)[1].strip() if ':' in spec else SCISPACY_MODEL
    if not model:
      raise InputError(f'{source} {spec}: no model after the colon; expected scispacy:MODEL '
                       f'(e.g. scispacy:{SCISPACY_MODEL}) or scispacy')
    try:
      return ScispacyExtractor(model), ''
    except ExtractorUnavailable as e:
      if spec == 'auto':
        return None, str(e)
      raise
  raise InputError(f'{source} {spec}: unknown extractor; expected {SPECS}')


def entity_scores(predictions: Sequence[str], references: Sequence[str],
                  extractor: EntityExtractor) -> dict:
  """Macro and micro entity precision / recall / F1 (see module doc); NaN-free: None if undefined."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} references')
  return set_scores(extractor.extract_many(predictions), extractor.extract_many(references),
                    extractor.name)


def set_scores(pred_sets: Sequence[set], ref_sets: Sequence[set], name: str) -> dict:
  """`entity_scores` of entity sets already extracted (one prediction and one reference set per
  sample), so several groupings of the same samples extract each text once."""
  precisions, recalls = [], []
  hit = n_pred = n_ref = 0
  for p, r in zip(pred_sets, ref_sets):
    common = len(p & r)
    hit, n_pred, n_ref = hit + common, n_pred + len(p), n_ref + len(r)
    if p:
      precisions.append(common / len(p))
    if r:
      recalls.append(common / len(r))

  def mean(xs):
    return sum(xs) / len(xs) if xs else None

  def f1(p, r):
    return None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)

  precision, recall = mean(precisions), mean(recalls)
  micro_p = hit / n_pred if n_pred else None
  micro_r = hit / n_ref if n_ref else None
  return {'extractor': name, 'precision': precision, 'recall': recall,
          'f1': f1(precision, recall), 'micro_precision': micro_p, 'micro_recall': micro_r,
          'micro_f1': f1(micro_p, micro_r), 'n_with_pred_entities': len(precisions),
          'n_with_ref_entities': len(recalls)}
