"""`radfm-jax demo`: build the demo data, train, evaluate, generate
(library: `radfm_jax.demo.run_demo`)."""

from __future__ import annotations

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax demo                        # the full demo into demo_out/ (about 15 minutes on 2 cores)
radfm-jax demo --quick --out /tmp/q   # tiny model, tiny data, 20 steps: a one-minute smoke run"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'demo', help='build the demo data, train `small`, evaluate, generate',
      description='Builds the embedded demo dataset, ingests it, trains a tokenizer and the '
      'model on this machine, evaluates the held-out split from the checkpoint on disk and '
      'prints a report; outputs (summary.json, loss_curve.png, predictions.jsonl, train/) go to '
      '--out.', example=EXAMPLE)
  p.add_argument('--out', default='demo_out', help='output folder')
  p.add_argument('--steps', type=flags.positive_int, default=None,
                 help='optimizer steps (default: train.steps)')
  p.add_argument('--time-budget', type=flags.non_negative_seconds, default=900.0,
                 help='stop training after this many seconds (0 = no limit)')
  p.add_argument('--quick', action='store_true',
                 help='tiny model, tiny dataset, 20 steps: a one-minute smoke run')
  p.add_argument('--seed', type=flags.seed, default=0, help='data and model seed')
  p.add_argument('--rebuild', action='store_true', help='rebuild the dataset even if present')
  p.add_argument('--resume', action='store_true',
                 help='continue from the checkpoint in OUT/train (default: train afresh)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  flags.add_config_arguments(p, required=False,
                             help='experiment config (default: configs/demo.py; '
                                  'configs/demo.py:model=tiny with --quick)')
  return p


def run(args) -> int:
  from radfm_jax.demo import host_allocator, report_text, run_demo
  flags.restart_with_allocator(args, host_allocator(args.config, args.overrides, args.quick))
  from radfm_jax.train import compile_cache
  compile_cache.enable()        # before the first compile ($RADFM_COMPILATION_CACHE=off: none)
  summary = run_demo(args.out, config=args.config, overrides=args.overrides, steps=args.steps,
                     time_budget=args.time_budget, quick=args.quick, seed=args.seed,
                     rebuild=args.rebuild, resume=args.resume, progress=not args.no_progress)
  print(report_text(summary, args.out), flush=True)
  return 0
