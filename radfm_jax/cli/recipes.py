"""`radfm-jax recipes list`: the original RadFM's datasets that `ingest --recipe` reads (library:
`radfm_jax.data.recipes`)."""

from __future__ import annotations

import textwrap

from radfm_jax.cli import flags

EXAMPLE = """\
radfm-jax recipes list
radfm-jax ingest --recipe vqa_rad --source data_csv/vqarad_test.csv --image-root images/ \\
    --out store/
radfm-jax ingest --recipe radfm --source data_csv/ --image-root images/ --out store/"""


def add_parser(sub):
  p = flags.add_command(
      sub, 'recipes', help='the original RadFM datasets that ingest --recipe reads',
      description='Recipes turn the original RadFM split files (the RadFM_data_csv download: one '
      'CSV or JSON per dataset and split) into manifest records with the original prompts, '
      'answers and image placement, tagged with their dataset and task; `radfm-jax ingest '
      '--recipe NAME` ingests them. See `radfm-jax recipes list`.', example=EXAMPLE)
  actions = p.add_subparsers(dest='action', required=True, metavar='ACTION')
  lst = actions.add_parser(
      'list', help='every recipe: files, columns, task, 2D/3D',
      description='radfm-jax recipes list: every recipe with the original split file names '
      '(train, test), the columns or JSON keys it reads, its task and whether it is 2D or 3D.',
      formatter_class=flags.Formatter, epilog='example:\n  radfm-jax recipes list')
  lst.set_defaults(_parser=lst, _takes_config=False)
  return p


def run(args) -> int:
  from radfm_jax.data.recipes import ALL, RECIPES
  for r in RECIPES.values():
    columns = ', '.join(r.columns) + ''.join(f', [{c}]' for c in r.optional)
    lines = [f'{r.name}  ({r.dims}; task {r.task})',
             f'train: {r.train or "-"}   test: {r.test or "-"}   (the original\'s {r.original})',
             f'columns: {columns}']
    if r.side_files:
      lines.append(f'beside it: {", ".join(r.side_files)}')
    if r.downsample > 1:
      lines.append(f'the original reads 1 row in {r.downsample} per training epoch')
    print(lines[0])
    for line in lines[1:]:
      print(textwrap.fill(line, 98, initial_indent='    ', subsequent_indent='      '))
  print(textwrap.fill(f'{ALL}: every recipe above, from a folder holding the files under these '
                      'names (--source FOLDER). [column]: optional.', 98))
  return 0
