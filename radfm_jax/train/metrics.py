"""Training FLOPs (for MFU), device peak FLOP/s, metric writers (JSONL + TensorBoard), the loss
curve (matplotlib).

FLOPs are analytic (`radfm_jax.models.flops`: every matmul of the ViT, Perceiver, fc and LLaMA,
full attention included, 2 per multiply-add); a training step is 3x the forward (forward +
backward w.r.t. activations and weights). `with_remat=True` adds the extra forward that
rematerialised layer stacks recompute (hardware FLOPs rather than model FLOPs).
`compiled.cost_analysis()` cannot replace this: it counts a scanned layer body once.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from radfm_jax.config import ModelConfig
from radfm_jax.errors import whole_file, writing
from radfm_jax.models import flops


def train_step_flops(m: ModelConfig, batch: int, images: int, image_shape: Sequence[int],
                     length: int, with_remat: bool = False) -> float:
  """FLOPs of one training step over the global batch: 3x the forward
  (`radfm_jax.models.flops`), plus one more forward of the rematerialised stacks (ViT, Perceiver,
  decoder layers) when `with_remat` and the config remats."""
  count = flops.forward_flops(m, batch, images, tuple(image_shape), length)
  total = count.train_step
  if with_remat and m.remat_policy != 'none':
    total += count.vision + count.perceiver + count.decoder
  return total


def batch_flops(m: ModelConfig, batch: dict, with_remat: bool = False) -> float:
  """train_step_flops for a (global) batch dict with images [B, S, C, H, W, D], tokens [B, L]."""
  if 'images' not in batch:        # cached image tokens: the vision tower does not run
    return train_step_flops(m, batch['image_mask'].shape[0], 0, (1, 1, 1), batch['tokens'].shape[1], with_remat)
  b, s = batch['images'].shape[:2]
  return train_step_flops(m, b, s, batch['images'].shape[3:6], batch['tokens'].shape[1],
                          with_remat)


# Dense bf16 peak FLOP/s per device (chip / GPU), from the vendors' spec sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
}


def peak_flops_per_device(device=None, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device (None when unknown, e.g. CPU): `train.peak_tflops` wins."""
  if override_tflops > 0:
    return override_tflops * 1e12
  if device is None:
    import jax
    device = jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


def cut_torn_line(path: str) -> int:
  """`store.cut_torn_tail` of the JSONL file `path` (0 when there is none); a refused write is a
  WriteError naming it."""
  from radfm_jax.data.store import cut_torn_tail
  try:
    with writing(path), open(path, 'rb+') as f:
      return cut_torn_tail(f)
  except FileNotFoundError:
    return 0


def append_lines(path: str, lines):
  """Appends the text `lines` (each ending in a newline) to `path` in one write; a refused write
  (a full disk) is a WriteError naming the file."""
  with writing(path), open(path, 'a', encoding='utf-8') as f:
    f.write(''.join(lines))


class MetricWriter:
  """Appends `{'step', 'split', ...}` lines to workdir/metrics.jsonl and, when tensorboardX is
  installed and enabled, scalars to TensorBoard event files under workdir/tensorboard. Only
  process 0 writes. A torn last line left by a killed run is cut off first (`cut`: its bytes)."""

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    self.cut = 0
    if not enabled:
      return
    with writing(workdir):
      os.makedirs(workdir, exist_ok=True)
    self.cut = cut_torn_line(self.path)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        print('radfm-jax train: tensorboardX not installed; metrics go to metrics.jsonl only')

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: float(v) for k, v in values.items()})
    append_lines(self.path, [json.dumps(record) + '\n'])
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def flush(self):
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def plot_losses(losses: dict, path: str, title: str):
  """A PNG of {step: loss} (per-step values and their 0.9 EMA, log scale) at `path`; used for
  the training workdir's loss_curve.png and the demo's. Drawn on a bare `Figure` (no pyplot), so
  a notebook's matplotlib backend is left alone."""
  from matplotlib.figure import Figure
  steps = sorted(losses)
  values = [losses[s] for s in steps]
  smooth, ema = [], None
  for v in values:
    ema = v if ema is None else 0.9 * ema + 0.1 * v
    smooth.append(ema)
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  ax.plot(steps, values, alpha=0.35, label='train loss (logged steps)')
  ax.plot(steps, smooth, label='EMA 0.9')
  ax.set_xlabel('step')
  ax.set_ylabel('token-mean cross-entropy')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  # whole or not at all: a kill or a full disk never leaves a cut PNG at `path`
  with whole_file(path) as tmp:
    fig.savefig(tmp, dpi=100, format='png')


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  from radfm_jax.data.store import read_jsonl      # [] when absent; errors name file and line
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [r for r in rows if split is None or r['split'] == split]


__all__ = ['MetricWriter', 'PEAK_FLOPS', 'append_lines', 'batch_flops', 'cut_torn_line',
           'peak_flops_per_device', 'plot_losses', 'read_metrics', 'train_step_flops']
