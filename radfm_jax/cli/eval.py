"""`radfm-jax eval`: score a checkpoint on a manifest (library: `radfm_jax.eval.harness`)."""

from __future__ import annotations

import json
import os
import sys

from radfm_jax.cli import flags
from radfm_jax.cli.generate import add_checkpoint_arguments, load
from radfm_jax.eval import radbench    # its names only (no JAX): --help stays light

EXAMPLE = """\
radfm-jax eval --checkpoint runs/small --data store/ --out eval_out/ --batch-size 4 \\
    --limit 100 --entities none --config.generate.max_new_tokens=64
radfm-jax eval --checkpoint runs/small --data samples.jsonl --split heldout --out eval_out/
radfm-jax eval --recipe radbench --checkpoint runs/small --data store/ --out radbench_out/"""

SPLIT_ALL = 'all'
DEFAULT_SPLIT = 'eval'    # the split training's periodic eval reads (train/loop.py make_data)


def add_parser(sub):
  p = flags.add_command(
      sub, 'eval', help='score a checkpoint on a manifest',
      description='Generates an answer for every sample of a VolumeStore or manifest JSONL and '
      'writes OUT/predictions.jsonl and OUT/summary.json (closed-ended accuracy, BLEU, ROUGE, '
      'token F1, entity precision / recall when an extractor is available; overall and per '
      'task). Decoding follows the config generate section. Only one split is scored (--split). '
      'A sample whose scan cannot be read is skipped and counted (summary.json "skipped", '
      '"skipped_samples"), as in training; with data.drop_unreadable=False in the training run '
      'it is an error; exit code 1 when every sample is skipped. --recipe radbench: the test '
      'split, each sample scored by its task (closed: accuracy; open: BLEU-1..4, ROUGE-L, token '
      'F1; rationale: UMLS entity precision / recall), tables per dataset and per task in '
      'summary.json and as Markdown on stdout (docs/eval.md). Progress is kept in '
      'OUT/predictions.jsonl.partial as it goes: after an interrupt, the same command again '
      'resumes where it stopped.', example=EXAMPLE)
  p.add_argument('--recipe', choices=(radbench.NAME,), default=None,
                 help=f'{radbench.NAME}: RadFM\'s benchmark over the recipes\' test splits '
                      f'(default split {radbench.SPLIT})')
  p.add_argument('--data', default=None,
                 help='VolumeStore directory or manifest JSONL (required unless --predictions)')
  p.add_argument('--predictions', default=None,
                 help='score this predictions.jsonl of an earlier eval again instead of '
                      'generating (no --checkpoint, --data): another --entities, --recipe')
  p.add_argument('--split', default=None,
                 help="the manifest rows whose `split` field is this (a row without one is "
                      f"'train'); the default is the split training evaluates on; "
                      f"'{SPLIT_ALL}' scores every row (default: {DEFAULT_SPLIT}; "
                      f"{radbench.SPLIT} with --recipe {radbench.NAME})")
  p.add_argument('--out', required=True, help='folder for predictions.jsonl, summary.json')
  p.add_argument('--overwrite', action='store_true',
                 help="replace a finished eval's predictions.jsonl and summary.json in --out "
                      '(rescoring with --predictions replaces the summary.json beside them)')
  p.add_argument('--limit', type=int, default=None, help='first N samples only (default: all)')
  p.add_argument('--entities', default='auto',
                 help='entity extractor: auto (scispaCy if installed) | scispacy[:MODEL] | '
                      'terms:FILE | none')
  add_checkpoint_arguments(p, checkpoint_help=' (required unless --predictions)')
  return p


def run(args) -> int:
  # SIGTERM: one line and 130, as Ctrl-C; the samples done so far stay in
  # OUT/predictions.jsonl.partial, and the same command again resumes from there.
  with flags.sigterm_as_interrupt():
    return _run(args)


def _run(args) -> int:
  from radfm_jax.eval import entities, harness
  from radfm_jax.errors import UserError
  if args.batch_size < 1:
    raise UserError(f'--batch-size {args.batch_size}: expected >= 1')
  if args.limit is not None and args.limit < 1:
    raise UserError(f'--limit {args.limit}: expected a number of samples >= 1 (or no --limit)')
  if args.predictions and (args.checkpoint or args.data):
    raise UserError('--predictions scores a predictions file again: expected no --checkpoint '
                    'and no --data (those generate new predictions)')
  if not args.predictions and not (args.checkpoint and args.data):
    raise UserError(f'--{"checkpoint" if not args.checkpoint else "data"} is missing: expected '
                    '--checkpoint CKPT --data STORE (to generate), or --predictions FILE (to '
                    'score an earlier eval again)')
  if args.predictions and (args.split or args.limit):
    raise UserError(f'--{"split" if args.split else "limit"} picks the samples to generate: '
                    'expected no --split and no --limit with --predictions (every row of the '
                    'file is scored)')
  if args.predictions:
    # the flags of generating: with a file scored as it is, they would do nothing
    given = [flag for flag, set_ in (
        (f'--step {args.step}', args.step is not None),
        (f'--tokenizer {args.tokenizer}', args.tokenizer is not None),
        (f'--intensity {args.intensity}', args.intensity is not None),
        (f'--seed {args.seed}', args.seed != 0),
        (f'--batch-size {args.batch_size}', args.batch_size != 1),
        (f'--config {args.config}', bool(args.config)),
        (f'--config.{args.overrides[0]}' if args.overrides else '', bool(args.overrides))) if set_]
    if given:
      raise UserError(f'{given[0]}: a setting of generating predictions; expected none with '
                      '--predictions (the file is scored as it is)')
  # before any work: a bad --out (a file or a broken symlink on the way, a read-only disk, one
  # of the files it reads) would otherwise fail after every sample is generated
  harness.check_out_dir(args.out, '--out',
                        ('summary.json',) if args.predictions else harness.OUTPUTS,
                        reads=(('--data', args.data), ('--predictions', args.predictions)))
  if not args.predictions:
    harness.check_replaces(args.out, args.overwrite)
  elif args.overwrite:
    raise UserError('--overwrite: rescoring replaces only the summary.json beside its '
                    '--predictions, without it; expected no --overwrite with --predictions')
  try:
    extractor, reason = entities.get_extractor(args.entities, source='--entities')
  except entities.ExtractorUnavailable as e:
    print(f'radfm-jax eval: {e}', file=sys.stderr)
    return 2
  bench = args.recipe == radbench.NAME

  def say_unavailable():
    # after the inputs are read: a bad --data / --predictions is then its one line alone
    if extractor is None and args.entities != 'none':
      what = ('UMLS entity precision / recall (rationale diagnosis) not computed, the other '
              'metrics are' if bench else 'UMLS entity metrics not computed')
      print(f'radfm-jax eval: {what}: {reason}', file=sys.stderr)
  scorer = radbench.score if bench else None
  if args.predictions:
    summary = harness.rescore(args.predictions, extractor=extractor, extractor_reason=reason,
                              scorer=scorer, out_dir=args.out)
    say_unavailable()
    return _report(args, summary, bench)
  args.split = args.split or (radbench.SPLIT if bench else DEFAULT_SPLIT)
  split = None if args.split == SPLIT_ALL else args.split
  samples = harness.load_samples(args.data, args.limit, split)
  if not samples:
    print(f'radfm-jax eval: no samples in {args.data}', file=sys.stderr)
    return 2
  model, tokenizer, data_cfg, sampling = load(args)
  say_unavailable()
  summary = harness.evaluate(model, tokenizer, samples, sampling=sampling, data_cfg=data_cfg,
                             batch_size=args.batch_size, seed=args.seed, extractor=extractor,
                             extractor_reason=reason, out_dir=args.out,
                             progress=not args.no_progress,
                             scorer=scorer,
                             info={'checkpoint': os.path.abspath(args.checkpoint),
                                   'data': os.path.abspath(args.data), 'split': args.split},
                             key=_checkpoint_key(args))
  if summary['skipped']:
    print(f'radfm-jax eval: skipped {summary["skipped"]} of {len(samples)} samples with an '
          f'unreadable scan (listed in {os.path.join(args.out, "summary.json")})',
          file=sys.stderr)
  past = summary['images_left_out']
  if past['samples']:
    most = max(past['samples'], key=lambda x: x['images'])
    print(f'radfm-jax eval: {len(past["samples"])} of {len(samples)} samples name more than the '
          f'model\'s {past["max_images"]} images; the first {past["max_images"]} are used, the '
          f'rest left out, as training does (sample {most["sample_id"]!r} names '
          f'{most["images"]}; listed in {os.path.join(args.out, "summary.json")})',
          file=sys.stderr)
  if summary['skipped'] == len(samples):
    return 1
  return _report(args, summary, bench)


def _checkpoint_key(args) -> dict:
  """Which parameters were loaded, for resuming an interrupted eval (`harness.Progress`): the
  step (the latest may have moved on) and when its tree was written (a checkpoint written again
  at the same path)."""
  from radfm_jax.checkpoint.read import locate
  loc = locate(args.checkpoint, args.step)
  return {'checkpoint_step': loc.step,
          'checkpoint_written_ns': os.stat(os.path.join(loc.tree, '_METADATA')).st_mtime_ns}


def _report(args, summary: dict, bench: bool) -> int:
  """The closing lines: the main numbers as JSON (stderr), the RadBench tables (stdout)."""
  o = summary['overall']
  missing = summary.get('no_reference', {}).get('n', 0)
  if missing:
    print(f'radfm-jax eval: {missing} of {o["n"]} samples have no reference answer (scored 0; '
          f'listed in summary.json as no_reference)', file=sys.stderr)
  # the split the predictions were generated on (a rescore in place keeps the generating run's;
  # one elsewhere does not know it, and says nothing of it)
  split = summary.get('split', args.split)
  print(json.dumps({**({'split': split} if split is not None else {}),
                    'skipped': summary.get('skipped', 0),
                    **{k: o[k] for k in ('n', 'closed_accuracy', 'bleu4', 'rougeL',
                                         'token_f1')}}), file=sys.stderr)
  if bench:
    print(radbench.markdown(summary))
  return 0
