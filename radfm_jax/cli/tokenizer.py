"""`radfm-jax tokenizer train`: a SentencePiece tokenizer.model for the RadFM id layout (library:
`radfm_jax.data.tokenizer.train_sentencepiece`, `corpus_lines`)."""

from __future__ import annotations

import os

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax tokenizer train --manifest samples.jsonl --out tokenizer.model --vocab-size 2048
radfm-jax tokenizer train --text reports.txt --out tokenizer.model"""


def add_parser(sub):
  from radfm_jax.config import LlamaConfig
  p = flags.add_command(
      sub, 'tokenizer', help='train a SentencePiece tokenizer.model (RadFM id layout)',
      description='Makes the tokenizer.model that training (data.tokenizer), generate and eval '
      'read. See `radfm-jax tokenizer train --help`; to use the original LLaMA tokenizer.model '
      'instead, see docs/data.md.', example=EXAMPLE)
  actions = p.add_subparsers(dest='action', required=True, metavar='ACTION')
  t = flags.add_command(
      actions, 'train', help='train a tokenizer on the texts of a manifest or a text file',
      description='radfm-jax tokenizer train: trains a SentencePiece BPE model with LLaMA\'s '
      'conventions (<unk> 0, <s> 1, </s> 2, byte fallback, digits split, no normalisation) on '
      'every question and answer of a manifest as the model sees them (template questions '
      'rendered, no image blocks) plus the task templates, or on the lines of a text file. The '
      'image tokens are not pieces of the model: for V pieces, <image> = V, </image> = V+1, '
      '<imageK> = V+2+K, so train with model.llama.vocab_size = V.', example=EXAMPLE)
  source = t.add_mutually_exclusive_group(required=True)
  source.add_argument('--manifest', help='samples JSONL (an ingest input or a store '
                      'manifest); this or --text')
  source.add_argument('--text', help='UTF-8 text file, one sentence or paragraph per '
                      'line; this or --manifest')
  t.add_argument('--out', required=True, help='the tokenizer.model file to write')
  t.add_argument('--vocab-size', type=int, default=LlamaConfig.vocab_size,
                 help='pieces V; must equal model.llama.vocab_size of the model you train')
  t.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
  return p


def _lines(args) -> list[str]:
  from radfm_jax.errors import InputError
  if args.manifest:
    from radfm_jax.data.manifest import read_records
    from radfm_jax.data.tokenizer import corpus_lines
    records = read_records(args.manifest, form=None)
    if not records:          # the task templates alone would make a tokenizer, silently
      raise InputError(f'--manifest {args.manifest}: no samples (no JSON line in the file); '
                       'expected a JSONL manifest, one sample per line')
    return corpus_lines(records)
  from radfm_jax.data.tokenizer import text_lines
  lines = [line for _, line in text_lines(
      args.text, 'expected a UTF-8 text file, one sentence per line', name=f'--text {args.text}')
      if line.strip()]
  if not lines:
    raise InputError(f'--text {args.text}: no text; expected one sentence per line')
  return lines


def _check_out(out: str):
  """--out must be a file path whose nearest existing folder is a folder: checked before
  training, which would otherwise fail only when it writes the model."""
  from radfm_jax.errors import InputError, check_parent_folder
  expected = 'expected the path of the tokenizer.model file to write'
  if os.path.isdir(out) or out.endswith(('/', os.sep)):
    raise InputError(f'--out {out}: a folder; {expected}')
  check_parent_folder(out, f'--out {out}', expected)


def run(args) -> int:
  from radfm_jax.data.tokenizer import Tokenizer, train_sentencepiece
  from radfm_jax.errors import InputError
  if not 1 <= args.vocab_size < 2**31:
    raise InputError(f'--vocab-size {args.vocab_size}: expected a positive 32-bit integer')
  _check_out(args.out)
  for flag in ('manifest', 'text'):
    source = getattr(args, flag)
    if source and os.path.exists(args.out) and os.path.exists(source) and os.path.samefile(
        source, args.out):          # --overwrite would write the model over the text it reads
      raise InputError(f'--out {args.out}: is the --{flag} file the tokenizer is trained on; '
                       'expected another path for the tokenizer.model')
  if os.path.exists(args.out) and not args.overwrite:
    raise InputError(f'--out {args.out}: exists; expected a new file (or --overwrite to replace '
                     'it; a run trained with it needs the same file)')
  train_sentencepiece(_lines(args), args.out, vocab_size=args.vocab_size)
  tok = Tokenizer(args.out, source='--out')
  v = tok.vocab_size
  print(f'{args.out}: {v} pieces (<unk>/pad 0, <s> 1, </s> 2), <image> {v}, </image> {v + 1}, '
        f'<imageK> {v + 2}+K; train with --config.data.tokenizer={os.path.abspath(args.out)} '
        f'--config.model.llama.vocab_size={v}')
  return 0
