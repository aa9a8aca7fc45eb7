"""Golden values for the text metrics, each checked by hand."""

import math

import pytest

from radfm_jax.eval import metrics as M


@pytest.mark.parametrize("pred,ref,ok", [
    ("Yes", "yes", True),
    ("yes.", "Yes", True),
    ("  YES, there is a nodule", "yes", True),   # first word decides yes/no
    ("No", "yes", False),
    ("yesterday", "yes", False),                # whole first word, not a prefix
    ("B", "b", True),
    ("(b) pleural effusion", "B", True),
    ("The answer is C.", "c", True),
    ("c", "B", False),
    ("B. Effusion", "b. effusion", True),
    ("b", "B. effusion", True),                  # option letter against option text
    ("Pleural effusion!", "pleural effusion", True),
    ("effusion", "pleural effusion", False),
])
def test_closed_match(pred, ref, ok):
  assert M.closed_match(pred, ref) is ok


def test_closed_accuracy():
  assert M.closed_accuracy(["yes", "no", "A", "x"], ["yes", "yes", "a", "x"]) == 0.75
  assert math.isnan(M.closed_accuracy([], []))
  with pytest.raises(ValueError):
    M.closed_accuracy(["yes"], [])


def test_bleu_identical_and_disjoint():
  same = M.bleu(["there is a mass in the left lung"], ["there is a mass in the left lung"])
  assert same == {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
  # Case-insensitive by default.
  assert M.bleu(["No Acute Findings here"], ["no acute findings here"])["bleu4"] == 1.0
  assert M.bleu(["cat dog"], ["fish bird"])["bleu1"] == 0.0


def test_bleu1_by_hand():
  # pred 4 tokens, 3 match (clipped); ref 4 tokens -> BP = 1, BLEU-1 = 3/4.
  out = M.bleu(["a b c x"], ["a b c d"])
  assert out["bleu1"] == pytest.approx(0.75)
  # BLEU-2 = sqrt(p1 * p2) = sqrt(3/4 * 2/3).
  assert out["bleu2"] == pytest.approx(math.sqrt(0.75 * 2 / 3))
  # Brevity penalty: pred 2 tokens vs ref 4, p1 = 1 -> exp(1 - 4/2).
  assert M.bleu(["a b"], ["a b c d"])["bleu1"] == pytest.approx(math.exp(-1))


def test_rouge_by_hand():
  out = M.rouge(["the cat sat on the mat"], ["the cat is on the mat"])
  # unigrams: 5 of 6 shared each way; bigrams: 3 of 5; LCS "the cat on the mat" = 5 of 6.
  assert out["rouge1"] == pytest.approx(5 / 6)
  assert out["rouge2"] == pytest.approx(3 / 5)
  assert out["rougeL"] == pytest.approx(5 / 6)
  assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
  # LCS of "a b c d" vs "b d e": "b d" -> P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
  assert M.rouge_l(["a b c d"], ["b d e"]) == pytest.approx(4 / 7)
  # Mean over samples.
  assert M.rouge_l(["x y", "p q"], ["x y", "r s"]) == pytest.approx(0.5)


def test_token_f1_by_hand():
  assert M.token_f1(["The left lung."], ["left lung"]) == 1.0   # articles, case, punctuation
  # pred {mass, left, lung}, ref {mass, right, lung}: P = R = 2/3.
  assert M.token_f1(["mass left lung"], ["mass right lung"]) == pytest.approx(2 / 3)
  # no reference: 0, whatever was predicted (SQuAD's script gives two empty strings 1)
  assert M.token_f1([""], [""]) == 0.0 and M.token_f1([""], ["?"]) == 0.0
  assert M.token_f1(["x"], [""]) == 0.0
  assert M.token_f1([""], ["the"]) == 1.0              # articles only: both token lists empty


def test_compute_metrics_split_and_tasks():
  preds = ["Yes, it is.", "B. effusion", "the cat sat on the mat", "zzz"]
  refs = ["yes", "c", "the cat is on the mat", "zzz"]
  out = M.compute_metrics(preds, refs, ["closed", "closed", "open", "open"],
                          tasks=["vqa", "vqa", "caption", "caption"])
  assert (out["n"], out["n_closed"], out["n_open"]) == (4, 2, 2)
  assert out["closed_accuracy"] == 0.5
  assert out["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
  # Articles dropped: "cat sat on mat" vs "cat is on mat", P = R = 3/4.
  assert out["token_f1"] == pytest.approx((3 / 4 + 1) / 2)
  assert out["per_task"]["vqa"]["closed_accuracy"] == 0.5
  assert out["per_task"]["vqa"]["rougeL"] is None
  assert out["per_task"]["caption"]["closed_accuracy"] is None
  assert out["per_task"]["caption"]["rouge1"] == pytest.approx(out["rouge1"])


def test_compute_metrics_guesses_kinds_and_validates():
  out = M.compute_metrics(["no", "b"], ["No.", "A"])
  assert out["n_closed"] == 2 and out["closed_accuracy"] == 0.5
  with pytest.raises(ValueError, match="closed"):
    M.compute_metrics(["a"], ["a"], ["maybe"])


@pytest.mark.parametrize("pred,ref,ok", [
    ("“Yes,” there is a nodule", "yes", True),     # curly quotes around the first word
    ("Yes—there is a nodule", "yes", True),        # an em dash joins no words
    ("yes。", "yes", True),
    ("«No»", "no", True),
    ("Pleural effusion…", "pleural effusion", True),
])
def test_closed_match_unicode_punctuation(pred, ref, ok):
  assert M.closed_match(pred, ref) is ok


def test_unicode_punctuation_is_punctuation_for_token_f1():
  assert M.normalize("“Left” lung—clear。") == "left lung clear"
  assert M.token_f1(["“left lung”"], ["left lung"]) == 1.0
  # letters with accents and non-Latin scripts are kept
  assert M.normalize("Café, 肺部。") == "café 肺部"


@pytest.mark.parametrize("pred,ref,ok", [
    ("A large mass", "A fracture", False),        # "A" is the article, not option A
    ("A rib fracture", "A fracture", False),
    ("a fracture", "A fracture", True),
    ("A", "A. fracture", True),                   # a marked option letter still counts
    ("(a) fracture", "(A) fracture", True),
    ("C", "Option C fracture", True),
    ("B", "A fracture", False),
])
def test_closed_match_reference_starting_with_the_article(pred, ref, ok):
  assert M.closed_match(pred, ref) is ok


@pytest.mark.parametrize("preds,refs,message", [
    # was: scored as 3 samples, one per character
    ("abc", "abd", "predictions: got str 'abc'; expected a list of strings, one per sample"),
    # was: scored against the text 'None'
    (["a"], [None], 'references[0]: got NoneType None; expected a string ("" for none)'),
    ([1, "b"], ["a", "b"], 'predictions[0]: got int 1; expected a string ("" for none)'),
    (["a", "b"], ["a"], "2 predictions but 1 references; expected one reference per prediction"),
])
def test_compute_metrics_wrong_types(preds, refs, message):
  from radfm_jax.errors import InputError
  with pytest.raises(InputError) as e:
    M.compute_metrics(preds, refs)
  assert str(e.value) == message


def test_compute_metrics_takes_tuples_and_numpy_strings():
  import numpy as np
  out = M.compute_metrics(np.array(["yes", "no"]), ("yes", "yes"))
  assert out["n"] == 2 and out["closed_accuracy"] == 0.5
