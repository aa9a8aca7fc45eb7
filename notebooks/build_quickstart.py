"""Writes notebooks/quickstart.ipynb: `python notebooks/build_quickstart.py [--execute]`.

The notebook is generated so it is always valid nbformat; edit the cells here, not in Jupyter.
The committed notebook carries the outputs of a real run (`--execute`, with RADFM_CHECKPOINT set
to a `radfm-jax demo` run), so GitHub shows a scan, a loss curve and the answers; the tests check
that its cells are these and execute it again.
Environment variables it reads: RADFM_CHECKPOINT (a checkpoint or training workdir; 'none' forces
the random tiny model), RADFM_TOKENIZER, RADFM_NOTEBOOK_OUT (where results.json and the figure go).
"""

import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

CELLS = [
    ('md', """# RadFM in JAX: quickstart

Load a checkpoint, look at a scan, ask questions about it, score the answers.

* **Checkpoint**: `$RADFM_CHECKPOINT`, else the demo's `demo_out/train` (run `radfm-jax demo`), else a
  random `tiny` model (the answers are then noise, but every step below runs the same way).
* `radfm_jax.load` reads any Orbax checkpoint: converted from the official PyTorch weights
  (`radfm-jax convert from-torch`) or written by `radfm-jax train`, sharded over the devices."""),
    ('code', """import json, os, tempfile
import numpy as np
import jax
import matplotlib
import matplotlib.pyplot as plt

from radfm_jax import api
from radfm_jax.config import model_config
from radfm_jax.data.tokenizer import Tokenizer, train_sentencepiece
from radfm_jax.eval import metrics
from radfm_jax.infer import text

OUT = os.environ.get('RADFM_NOTEBOOK_OUT') or tempfile.mkdtemp()
os.makedirs(OUT, exist_ok=True)
print(jax.devices())"""),
    ('md', """## 1. A model and its tokenizer

A tokenizer must match the checkpoint (same SentencePiece model: `<image>` is the id just past the
text vocabulary)."""),
    ('code', """def find_checkpoint():
  given = os.environ.get('RADFM_CHECKPOINT', '')
  if given.lower() == 'none':
    return None
  for path in (given, 'demo_out/train', 'demo_out/checkpoint', '../demo_out/train'):
    if path and os.path.isdir(path):
      return path
  return None

ckpt = find_checkpoint()
if ckpt is not None:
  # The checkpoint, its tokenizer (found beside it) and the preprocessing it was trained with.
  model, tok, data_cfg = api.load_for_generation(ckpt, os.environ.get('RADFM_TOKENIZER'))
  cfg = model.cfg
  source = 'checkpoint'
else:
  # No checkpoint: a random tiny model and a tokenizer trained here (vocab = the model's 512).
  from radfm_jax.models.radfm import create_model
  cfg = model_config('tiny')
  model = create_model(cfg, seed=0)
  corpus = ['What is the modality of this scan?', 'The image shows a nodule in the left lung.',
            'Is there evidence of pneumonia?', 'Yes', 'No', 'Findings: normal chest. Impression: none.',
            'Can you describe the abnormality seen in the brain MRI?', 'A large mass with oedema.',
            'CT of the abdomen shows free fluid and 3 cysts of 12 mm.'] * 40
  tok_path = os.path.join(OUT, 'tokenizer.model')
  train_sentencepiece(corpus, tok_path, vocab_size=cfg.llama.vocab_size)
  data_cfg = text.data_config_for(cfg)
  tok = Tokenizer(tok_path, max_images=cfg.max_images, num_latents=cfg.perceiver.num_latents)
  source = 'random'
print(source, cfg.size, 'vocab', cfg.llama.vocab_size, 'image buckets',
      data_cfg.image_size_2d, data_cfg.depth_buckets)"""),
    ('md', """## 2. How it trained

A training run keeps its metrics in `metrics.jsonl` (and TensorBoard events, and `loss_curve.png`);
`radfm_jax.train.metrics.read_metrics` reads them back."""),
    ('code', """from radfm_jax.train.metrics import read_metrics

rows = read_metrics(ckpt, 'train') if ckpt is not None else []
if rows:
  steps, losses = [r['step'] for r in rows], [r['loss'] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.plot(steps, losses)
  ax.set(xlabel='step', ylabel='training loss', yscale='log', title=f'{cfg.size}: {len(rows)} logged steps')
  fig.savefig(os.path.join(OUT, 'loss_curve.png'))
  plt.show()
  print(f'loss {losses[0]:.3f} (step {steps[0]}) -> {losses[-1]:.3f} (step {steps[-1]})')
else:
  print('no training run here: `radfm-jax demo` or `radfm-jax train` makes one')"""),
    ('md', """## 3. A scan

nibabel ships a small anatomical MRI (`anatomical.nii`). `read_scan` is the ingest reader (radfm_jax.data.readers): it
reorients to RAS and returns `[C, H, W, D]` plus attributes (spacing, modality, ...)."""),
    ('code', """import nibabel.testing
from radfm_jax.data.readers import read_scan

scan, attrs = read_scan(os.path.join(nibabel.testing.data_path, 'anatomical.nii'))[0]
print(scan.shape, scan.dtype, attrs['spacing'], attrs['orientation'])
vol = scan[0]
fig, axes = plt.subplots(1, 3, figsize=(9, 3))
for ax, (name, image) in zip(axes, [('sagittal', vol[vol.shape[0] // 2]),
                                    ('coronal', vol[:, vol.shape[1] // 2]),
                                    ('axial', vol[:, :, vol.shape[2] // 2])]):
  ax.imshow(np.rot90(image), cmap='gray')
  ax.set_title(name)
  ax.axis('off')
fig.savefig(os.path.join(OUT, 'slices.png'))
plt.show()"""),
    ('md', """## 4. Ask

Each `<image>` in the prompt is replaced by that image's 32 latent tokens; without a marker the
images go first. The scan is normalised and resized to a RadFM shape bucket by the data pipeline's
own code (`text.prepare_batch` shows the exact arrays)."""),
    ('code', """batch = text.prepare_batch(tok, ['What is the modality of this scan? <image>'], [[scan]], cfg,
                           data_cfg)
print('tokens', batch['tokens'].shape, 'images', batch['images'].shape,
      'range', float(batch['images'].min()), float(batch['images'].max()))

answer = api.generate(model, tok, 'What is the modality of this scan? <image>', [scan],
                      max_new_tokens=8, data_cfg=data_cfg)
print(repr(answer))"""),
    ('code', """questions = ['Is there evidence of pneumonia? <image>', 'Describe the abnormality seen <image>']
answers = api.generate_batch(model, tok, questions, [[scan], [scan]], max_new_tokens=8,
                             data_cfg=data_cfg)
for q, a in zip(questions, answers):
  print(q, '->', repr(a))"""),
    ('md', """## 5. Score

`radfm_jax.eval.metrics`: closed-ended accuracy (normalised exact match), BLEU-1..4, ROUGE-1/2/L and
token F1; `radfm-jax eval` runs this over a whole manifest and writes per-sample predictions."""),
    ('code', """references = ['No', 'A mass in the brain.']
scores = metrics.compute_metrics(answers, references, kinds=['closed', 'open'])
print(json.dumps(scores, indent=1))
results = {'source': source, 'answer': answer, 'answers': answers, 'metrics': scores,
           'image_batch_shape': list(batch['images'].shape), 'scan_shape': list(scan.shape),
           'pixel_range': [float(batch['images'].min()), float(batch['images'].max())]}
with open(os.path.join(OUT, 'results.json'), 'w') as f:
  json.dump(results, f)"""),
]


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
  nb.metadata['language_info'] = {'name': 'python'}
  for kind, source in CELLS:
    nb.cells.append(v4.new_markdown_cell(source) if kind == 'md' else v4.new_code_cell(source))
  for i, cell in enumerate(nb.cells):
    cell['id'] = f'quickstart-{i}'        # stable ids: rebuilding gives an identical file
  nbformat.validate(nb)
  return nb


def execute(path: str, cwd: str) -> None:
  """Runs the notebook at `path` top to bottom in this interpreter's kernel and saves its outputs."""
  import nbclient
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=1200, kernel_name='python3',
                          resources={'metadata': {'path': cwd}}).execute()
  nbformat.write(nb, path)


if __name__ == '__main__':
  import sys
  path = os.path.join(HERE, 'quickstart.ipynb')
  nbformat.write(build(), path)
  print('wrote', path)
  if '--execute' in sys.argv[1:]:      # both notebooks, with the outputs of this run
    for name in ('quickstart.ipynb', 'convert.ipynb'):
      execute(os.path.join(HERE, name), os.path.dirname(HERE))
      print('executed', name)
