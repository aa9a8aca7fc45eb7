"""Text metrics for radiology VQA / report generation.

All functions take parallel lists of strings (one prediction and one reference per sample) and
return scores in [0, 1] (BLEU is rescaled from sacrebleu's 0..100 so every metric shares a
scale). The original RadFM repository computes none of these (docs/original.md section 12); the
choices below are the common ones in the medical VQA literature and are documented so numbers
can be compared:

* closed accuracy: normalised exact match; yes/no answers compare the first word, option
  answers ("A", "B. pneumonia", "(c)") compare the option letter.
* BLEU-n: corpus-level cumulative BLEU (sacrebleu, 13a tokenizer, lowercased, exp smoothing).
* ROUGE-1/2/L: mean per-sample F-measure (rouge-score, no stemming).
* token F1: SQuAD-style bag-of-tokens F1 after normalisation, averaged over samples.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Sequence

from radfm_jax.errors import InputError

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = {"yes", "no"}
# Option answers: "A", "a)", "(B)", "C. effusion", "option d", "answer: E".
_OPTION = re.compile(r"^\s*(?:the\s+)?(?:answer|option)?\s*(?:is)?\s*[:\-]?\s*\(?([a-e])\b(?:[\).:]|\s|$)",
                     re.IGNORECASE)
# A reference's letter counts only when marked as an option ("B.", "(b)", "c)", "D:", "answer:
# a"): an unmarked leading "A" is the article ("A fracture" is option text, not option A, and
# must not match every prediction that starts with "A").
_MARKED_OPTION = re.compile(r"^\s*(?:(?:the\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*\(?[a-e]\b"
                            r"|\(?[a-e]\s*[\).:]|\([a-e]\b)", re.IGNORECASE)


def _is_punct(char: str) -> bool:
  # ASCII punctuation (string.punctuation, symbols such as "+" included) and every Unicode
  # punctuation character: a model writes curly quotes, dashes and CJK stops too ("“Yes,”",
  # "yes。"), which must not glue onto the word beside them.
  return char in _ASCII_PUNCT or unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
  """Lowercase, replace punctuation (ASCII and Unicode) with spaces, collapse whitespace."""
  return " ".join("".join(" " if _is_punct(c) else c for c in str(text).lower()).split())


def has_reference(reference: str) -> bool:
  """Whether a reference answer holds anything to match (a letter or digit: "" or "?" does not).
  A sample without one scores 0 on every metric, whatever was predicted: an empty prediction
  would otherwise match it exactly."""
  return bool(normalize(reference))


def _option_letter(text: str) -> str | None:
  m = _OPTION.match(str(text))
  return m.group(1).lower() if m else None


def is_closed(reference: str) -> bool:
  """True when a reference looks closed-ended: yes/no or a single option letter."""
  norm = normalize(reference)
  return norm in _YES_NO or (len(norm) == 1 and norm in "abcde")


def closed_match(prediction: str, reference: str) -> bool:
  """Normalised exact match used for closed-ended questions.

  yes/no references compare against the first word of the prediction ("Yes, there is ..." is
  a yes); single-letter references compare the prediction's leading option letter, as do
  references led by a marked option letter ("B. effusion", not "A fracture"); anything
  else (e.g. the option text itself) needs the normalised strings to be equal.
  """
  ref = normalize(reference)
  pred = normalize(prediction)
  if not ref:                       # nothing to match (`has_reference`)
    return False
  if ref in _YES_NO:
    return (pred.split() or [""])[0] == ref
  if len(ref) == 1 and ref in "abcde":
    return _option_letter(prediction) == ref
  letter = _option_letter(reference) if _MARKED_OPTION.match(str(reference)) else None
  if letter is not None and _option_letter(prediction) == letter:
    return True  # "B. effusion" vs "B" / "b) effusion"
  return pred == ref


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
  """InputError (a ValueError) unless both are lists of strings of one length: a string would be
  scored as one sample per character, and None or a number as its text ('None')."""
  for name, values in (("predictions", predictions), ("references", references)):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
      raise InputError(f"{name}: got {type(values).__name__} {repr(values)[:40]}; expected a "
                       "list of strings, one per sample")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
      raise InputError(f"{name}[{bad}]: got {type(values[bad]).__name__} "
                       f"{repr(values[bad])[:40]}; expected a string (\"\" for none)")
  if len(predictions) != len(references):
    raise InputError(f"{len(predictions)} predictions but {len(references)} references; "
                     "expected one reference per prediction")


def closed_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of samples where `closed_match` holds. Empty input -> nan."""
  _check(predictions, references)
  if not predictions:
    return float("nan")
  return sum(closed_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str],
         lowercase: bool = True) -> dict[str, float]:
  """Corpus BLEU-1..4 in [0, 1]: {'bleu1': .., 'bleu2': .., 'bleu3': .., 'bleu4': ..}.

  BLEU-n is the cumulative score with uniform weights over 1..n-grams and the brevity penalty.
  """
  from sacrebleu.metrics import BLEU
  _check(predictions, references)
  if not predictions:
    return {f"bleu{n}": float("nan") for n in range(1, 5)}
  preds = [str(p) for p in predictions]
  refs = [[str(r) for r in references]]
  out = {}
  for n in range(1, 5):
    scorer = BLEU(max_ngram_order=n, lowercase=lowercase)
    # min(): sacrebleu returns 100.00000000000004 for identical text.
    out[f"bleu{n}"] = min(1.0, scorer.corpus_score(preds, refs).score / 100.0)
  return out


_ROUGE_SCORERS: dict = {}


def _rouge_scorer(use_stemmer: bool):
  # Building a scorer loads the tokenizer (and the stemmer); reuse it across calls.
  if use_stemmer not in _ROUGE_SCORERS:
    from rouge_score import rouge_scorer
    _ROUGE_SCORERS[use_stemmer] = rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
  return _ROUGE_SCORERS[use_stemmer]


def rouge(predictions: Sequence[str], references: Sequence[str],
          use_stemmer: bool = False) -> dict[str, float]:
  """Mean per-sample ROUGE F-measures: {'rouge1': .., 'rouge2': .., 'rougeL': ..}."""
  _check(predictions, references)
  keys = ("rouge1", "rouge2", "rougeL")
  if not predictions:
    return {k: float("nan") for k in keys}
  scorer = _rouge_scorer(use_stemmer)
  sums = dict.fromkeys(keys, 0.0)
  for p, r in zip(predictions, references):
    scores = scorer.score(str(r), str(p))  # rouge-score takes (target, prediction)
    for k in keys:
      sums[k] += scores[k].fmeasure
  return {k: v / len(predictions) for k, v in sums.items()}


def rouge_l(predictions: Sequence[str], references: Sequence[str],
            use_stemmer: bool = False) -> float:
  """Mean per-sample ROUGE-L F-measure."""
  return rouge(predictions, references, use_stemmer)["rougeL"]


def _f1_tokens(text: str) -> list[str]:
  return _ARTICLES.sub(" ", normalize(text)).split()


def token_f1_single(prediction: str, reference: str) -> float:
  """SQuAD-style F1 of the token multisets (articles dropped); 0 without a reference
  (`has_reference`), else two empty token lists (a reference of articles only) -> 1."""
  if not has_reference(reference):
    return 0.0
  p, r = _f1_tokens(prediction), _f1_tokens(reference)
  if not p or not r:
    return float(p == r)
  common = sum((collections.Counter(p) & collections.Counter(r)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean per-sample token F1. Empty input -> nan."""
  _check(predictions, references)
  if not predictions:
    return float("nan")
  return sum(token_f1_single(p, r) for p, r in zip(predictions, references)) / len(predictions)


def _group_metrics(predictions, references, kinds) -> dict:
  closed = [i for i, k in enumerate(kinds) if k == "closed"]
  open_ = [i for i, k in enumerate(kinds) if k != "closed"]
  out: dict = {"n": len(predictions), "n_closed": len(closed), "n_open": len(open_)}
  out["closed_accuracy"] = (closed_accuracy([predictions[i] for i in closed],
                                            [references[i] for i in closed]) if closed else None)
  if open_:
    p = [predictions[i] for i in open_]
    r = [references[i] for i in open_]
    out.update(bleu(p, r))
    out.update(rouge(p, r))
    out["token_f1"] = token_f1(p, r)
  else:
    out.update({k: None for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2",
                                  "rougeL", "token_f1")})
  return out


def compute_metrics(predictions: Sequence[str], references: Sequence[str],
                    kinds: Sequence[str] | None = None,
                    tasks: Sequence[str] | None = None) -> dict:
  """All metrics in one flat dict.

  kinds: 'closed' or 'open' per sample (None: guessed with `is_closed` on the reference).
  Closed samples feed `closed_accuracy`; open samples feed BLEU-1..4, ROUGE-1/2/L and token F1
  (overlap metrics on one-word answers say nothing). A metric with no samples is None.
  Keys: n, n_closed, n_open, closed_accuracy, bleu1..bleu4, rouge1, rouge2, rougeL, token_f1,
  and, when tasks is given, per_task: {task: same flat dict}.
  """
  _check(predictions, references)
  predictions = [str(p) for p in predictions]
  references = [str(r) for r in references]
  if kinds is None:
    kinds = ["closed" if is_closed(r) else "open" for r in references]
  if len(kinds) != len(predictions):
    raise ValueError(f"{len(kinds)} kinds for {len(predictions)} samples")
  bad = sorted({k for k in kinds if k not in ("closed", "open")})
  if bad:
    raise ValueError(f"kinds must be 'closed' or 'open', got {bad}")
  out = _group_metrics(predictions, references, list(kinds))
  if tasks is not None:
    if len(tasks) != len(predictions):
      raise ValueError(f"{len(tasks)} tasks for {len(predictions)} samples")
    per_task = {}
    for task in sorted(set(tasks)):
      idx = [i for i, t in enumerate(tasks) if t == task]
      per_task[task] = _group_metrics([predictions[i] for i in idx], [references[i] for i in idx],
                                      [kinds[i] for i in idx])
    out["per_task"] = per_task
  return out
