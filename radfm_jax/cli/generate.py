"""`radfm-jax generate`: answers for scans and prompts from any checkpoint
(library: `radfm_jax.infer.prompt_files`, `radfm_jax.infer.settings.generate_config`)."""

from __future__ import annotations

import json
import sys

from radfm_jax.cli import flags
from radfm_jax.infer import QUANTIZE_MODES

EXAMPLE = """\
radfm-jax generate --checkpoint ckpt/ --tokenizer tokenizer.model \\
    --image a.nii.gz --image b.png --prompt "Compare <image> with <image>. Any change?"
radfm-jax generate --checkpoint runs/small --input prompts.jsonl --output answers.jsonl \\
    --batch-size 4 --config.generate.max_new_tokens=64 --config.generate.stop_ids=[1]
# each input line: {"id": "q1", "prompt": "... <image> ...", "images": ["scan.nii.gz", ...]}
# (an image may also be {"path": ..., "modality": "CT", "frame": N, "index": N}: frame picks a
#  volume of a 4D NIfTI, index an image of a 5D .npy stack, and fields of your own pass); each
# output line is its input line plus "prediction" and "new_tokens\""""

GENERATE_NOTE = ('The model comes from the checkpoint; only the generate section is read (an '
                 '--config.FIELD override outside it is refused). It '
                 "defaults to the checkpoint's training run's saved section, else the "
                 'GenerateConfig defaults (greedy, 200 new tokens, stop_ids [2, 1]; [1] stops '
                 "where the original does).")


def add_checkpoint_arguments(p, checkpoint_help: str = ''):
  """The flags `generate` and `eval` share: checkpoint, tokenizer, preprocessing, config.
  `checkpoint_help` (eval): --checkpoint is optional, and this says when it is needed."""
  p.add_argument('--checkpoint', required=not checkpoint_help,
                 help='converted checkpoint, training workdir or step folder' + checkpoint_help)
  p.add_argument('--step', type=int, default=None, help='training step (default: latest)')
  p.add_argument('--tokenizer', default=None,
                 help='SentencePiece tokenizer.model (default: found beside the checkpoint)')
  p.add_argument('--batch-size', type=int, default=1,
                 help='prompts per batch (batches are padded to it: one compiled program)')
  p.add_argument('--seed', type=flags.seed, default=0,
                 help='sampling seed (with generate.temperature > 0; refused with greedy decoding)')
  p.add_argument('--no-progress', action='store_true', help='no tqdm progress bar on stderr')
  p.add_argument('--intensity', default=None,
                 choices=('radfm', 'ct_window', 'ct_windows3', 'percentile'),
                 help="intensity policy (default: the training run's, else radfm)")
  flags.add_config_arguments(p, required=False, sections=('generate',), note=GENERATE_NOTE,
                             help='config whose generate section is used (default: see below)')


def add_parser(sub):
  p = flags.add_command(
      sub, 'generate', help='generate answers for scans and prompts',
      description='One prompt (--prompt with --image ...; the answer goes to stdout) or a JSONL '
      'file of prompts (--input; JSONL out). Parameters are restored sharded over every device '
      '(one fsdp mesh axis). Decoding follows the config generate section.', example=EXAMPLE)
  p.add_argument('--prompt', help='prompt with one <image> marker per --image')
  p.add_argument('--image', action='append', default=[],
                 help='scan path (repeatable), one image each: a 5D .npy stack of several images '
                 'is an error (pick one with "index" in an --input file)')
  p.add_argument('--modality', action='append', default=None,
                 help='modality per --image (e.g. CT; matters for CT-window intensity)')
  p.add_argument('--input', help='JSONL of {"id", "prompt", "images": [paths]} (an image may be '
                 '{"path", "modality", "frame", "index"}, as in an ingest manifest)')
  p.add_argument('--output', help='JSONL written in file mode (default: stdout)')
  p.add_argument('--quantize', choices=QUANTIZE_MODES, default=None,
                 help='Qwix post-training quantization (radfm_jax.infer.quantize): int8 weights '
                      '(on CPU multiplied as int8 by the panel kernel: the fastest there), or '
                      'w8a8: int8 weights and int8 activations')
  add_checkpoint_arguments(p)
  return p


def load(args):
  """(model, tokenizer, data config, GenerateConfig) from the shared flags."""
  import os

  from radfm_jax import api
  from radfm_jax.errors import InputError, not_a_file, reading
  from radfm_jax.infer.settings import generate_config
  if not os.path.exists(args.checkpoint):
    raise InputError(f'--checkpoint {args.checkpoint}: no such checkpoint directory')
  from radfm_jax.train import compile_cache
  compile_cache.enable()        # before the first compile ($RADFM_COMPILATION_CACHE=off: none)
  sampling = generate_config(args.checkpoint, args.config, args.overrides)   # fails fast
  if args.seed != 0 and sampling.temperature == 0:       # a seed greedy decoding never reads
    raise InputError(f'--seed {args.seed}: generate.temperature=0 decodes greedily and draws '
                     'nothing; expected --config.generate.temperature > 0 with it, or no --seed')
  if args.tokenizer and not os.path.isfile(args.tokenizer):
    raise InputError(f'--tokenizer {args.tokenizer}: {not_a_file(args.tokenizer)}; expected the '
                     'SentencePiece tokenizer.model file')
  # no such step, missing files, a wrong tokenizer; none given or found: it names --tokenizer
  with reading(f'--checkpoint {args.checkpoint}'):
    model, tokenizer, data_cfg = api.load_for_generation(
        args.checkpoint, args.tokenizer, step=args.step, intensity=args.intensity)
  if getattr(args, 'quantize', None):
    from radfm_jax.infer.quantize import quantize
    model = quantize(model, args.quantize)
  return model, tokenizer, data_cfg, sampling


def run(args) -> int:
  with flags.sigterm_as_interrupt():
    return _run(args)


def _run(args) -> int:
  if (args.prompt is None) == (args.input is None):
    print('radfm-jax generate: give either --prompt (with --image ...) or --input FILE',
          file=sys.stderr)
    return 2
  if args.batch_size < 1:
    from radfm_jax.errors import UserError
    raise UserError(f'--batch-size {args.batch_size}: expected >= 1')
  if args.input is not None and (args.image or args.modality):
    flag = '--image' if args.image else '--modality'
    print(f'radfm-jax generate: {flag} goes with --prompt; with --input each line names its own '
          'images (and their modality)', file=sys.stderr)
    return 2
  mods = args.modality or [''] * len(args.image)
  if len(mods) != len(args.image):
    print(f'radfm-jax generate: {len(mods)} --modality for {len(args.image)} --image',
          file=sys.stderr)
    return 2
  from radfm_jax.infer.prompt_files import check_paths, generate_items, make_item, read_prompts
  if args.prompt is not None:
    # a byte that is not UTF-8 comes in as a lone surrogate (and an --input file's "\ud800"
    # escape fails in its reader, store.iter_jsonl): refused here, not in the tokenizer
    from radfm_jax.errors import check_text
    check_text(args.prompt, '--prompt')
    for i, modality in enumerate(mods):
      check_text(modality, f'--modality #{i + 1}')
    items = [make_item('0', args.prompt, args.image, mods, '--prompt',
                       [f'--image #{i + 1}' for i in range(len(args.image))])]
  else:
    items = read_prompts(args.input)
  check_paths(items)             # before the model is loaded
  if args.output:               # before the model is loaded too
    _check_output(args.output, items, args.input, args.checkpoint, args.tokenizer)
  model, tokenizer, data_cfg, sampling = load(args)
  answers = generate_items(model, tokenizer, data_cfg, items, sampling, args.batch_size,
                           args.seed, progress=not args.no_progress)
  if not args.output:
    for it, text, row in answers:
      if args.input is None:
        print(text)
      else:
        print(_answer(it, text, row), flush=True)
    return 0
  _write_answers(args.output, answers, len(items), plain=args.input is None)
  return 0


def _answer(it, text, row) -> str:
  """The answer line: the prompt line's fields (its own ones too), then what generate adds."""
  return json.dumps({'id': it['id'], 'prompt': it['prompt'], 'images': it['images'],
                     **it.get('own', {}), 'prediction': text, 'new_tokens': len(row)})


def _check_output(output: str, items, prompts: str | None, checkpoint: str | None,
                  tokenizer: str | None):
  """--output's folder made and writable, --output not a folder nor one of the inputs (the
  --input prompts file, an image of `items`, the --tokenizer, a file of the --checkpoint
  folder), which the answers would replace: before any work."""
  import os

  from radfm_jax.errors import InputError, check_parent_folder, writing
  expected = 'expected a file path for the answers (JSONL)'
  if os.path.isdir(output) or output.endswith(('/', os.sep)):
    raise InputError(f'--output {output}: is a folder; {expected}')
  if os.path.isfile(output):                # an existing file: is it one of the inputs?
    def replaces(label: str, path: str):
      raise InputError(f'--output {output}: is {label} ({path}), which the answers would '
                       f'replace; {expected} that is not one of the inputs')
    real = checkpoint and os.path.isdir(checkpoint) and os.path.realpath(checkpoint)
    if real and os.path.commonpath([os.path.realpath(output), real]) == real:
      replaces(f'a file of --checkpoint {checkpoint}', output)
    inputs = [('the --input prompts file', prompts), ('the --tokenizer', tokenizer)]
    inputs += [(label, path) for it in items for label, path in zip(it['labels'], it['paths'])]
    for label, path in inputs:
      if path and os.path.isfile(path) and os.path.samefile(output, path):
        replaces(label, path)
  # a file, a broken symlink or an unwritable folder on the way
  check_parent_folder(output, f'--output {output}', expected)
  folder = os.path.dirname(os.path.abspath(output))
  with writing(folder):
    os.makedirs(folder, exist_ok=True)


def _write_answers(output: str, answers, total: int, plain: bool = False):
  """Writes the answers to OUTPUT.partial as they come (flushed: a long run keeps its progress)
  and renames it to OUTPUT when every one is in, so a file at OUTPUT is always complete (and a
  previous OUTPUT stays until then). An interrupt (Ctrl-C, SIGTERM) keeps OUTPUT.partial and says
  how many answers it holds. `plain`: the answer text (--prompt), else a JSON line (--input)."""
  import os

  from radfm_jax.errors import InputError, writing
  tmp = output + '.partial'
  done = 0
  try:
    with writing(tmp), open(tmp, 'w', encoding='utf-8') as out:
      for it, text, row in answers:
        out.write((text if plain else _answer(it, text, row)) + '\n')
        out.flush()
        done += 1
  except KeyboardInterrupt as e:
    kept = f'{done} of {total} answers kept in {tmp}; {output} not written'
    raise KeyboardInterrupt(f'{e}; {kept}' if str(e) else kept) from None
  except InputError as e:        # a bad input met mid-run: say what was kept, as an interrupt does
    kept = f'{done} of {total} answers kept in {tmp}; {output} not written'
    raise InputError(f'{e} ({kept})') from None
  with writing(output):
    os.replace(tmp, output)
