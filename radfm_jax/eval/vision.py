"""Does the vision path carry the image? Diagnostics of a RadFM model on a fixed set of probe scans.

    probe = probe_set(store, records, cfg.data)          # one image per record, with its labels
    report = vision_report(model, probe)                 # spreads, attention, separability

What a healthy vision path looks like, and what the failure looks like (issue 16): the 32 image
tokens of a scan differ from latent to latent (`within`, the identity of each latent) *and* from
scan to scan (`across`). A collapsed path gives every scan the same 32 tokens: `across` ~0 while
`within` stays ~1, the decoder can only learn the most common answer.

  * spread (`token_spread`): tokens T [scans, latents, embed] as spliced into the decoder;
    `across` = sqrt(mean over (latent, feature) of the variance over scans), `within` =
    sqrt(mean over (scan, feature) of the variance over latents), `ratio` = across / within.
    Identical scans give across = 0 exactly.
  * separability (`nearest_neighbour_accuracy`): leave-one-out 1-nearest-neighbour accuracy of the
    flattened tokens against a label (modality, body part, lesion): whether the information is in
    the tokens at all, whatever the decoder does with it; compare with the label's majority share.
  * Perceiver attention (`perceiver_attention`), per layer: `media_mass`, the share of each latent's
    attention that goes to image patches (the rest goes to the latents themselves, which are the
    same for every scan), and `patch_entropy`, the entropy of that attention over the patches
    divided by log(patches) (1 = uniform: the latent averages the whole image).
  * per-tower gradient and update norms: the L2 norm of a parameter-shaped tree per
    top-level module (radfm_jax.train.step.tower_norms; the train step logs `grad_norm/<module>`
    and `update_ratio/<module>` every step).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



@dataclasses.dataclass
class ProbeSet:
  """images [S, 1, 3, H, W, D] (one image slot per probe, all one shape); labels: name -> S
  answers (None where a probe has no such label); ids: the record ids."""
  images: np.ndarray
  labels: dict
  ids: list


def probe_set(store, records: Sequence[dict], data_cfg, label_keys=None) -> ProbeSet:
  """The first image of each record in `records`, prepared as the pipeline does (intensity policy,
  shape bucket), with the record's `label` fields (default: all of them) as labels. Records of
  one family share one shape in the demo; mixing shapes is a ValueError."""
  from radfm_jax.data.batch import image_shape
  from radfm_jax.data.transforms import prepare_images
  images, ids, labels = [], [], {}
  for i, rec in enumerate(records):
    entry = rec['images'][0]
    arr = store.read(entry['id'])
    shape = image_shape([arr.shape[3]], data_cfg)
    images.append(prepare_images([arr], [str(entry.get('modality') or '')], shape, data_cfg,
                                 stacked=[store.case_image(entry['id'])]))
    ids.append(rec['id'])
    for key, value in (rec.get('label') or {}).items():
      if label_keys is None or key in label_keys:
        labels.setdefault(key, [None] * len(records))[i] = value
  for key in labels:
    labels[key] += [None] * (len(records) - len(labels[key]))
  shapes = {x.shape for x in images}
  if len(shapes) > 1:
    raise ValueError(f'probe records have images of several shapes {sorted(shapes)}: give one '
                     'family at a time')
  return ProbeSet(np.stack(images), labels, ids)


def token_spread(tokens) -> dict:
  """tokens [scans, latents, embed] -> {'across', 'within', 'ratio'} (module docstring)."""
  t = np.asarray(tokens, np.float64)
  across = float(np.sqrt(t.var(axis=0).mean()))
  within = float(np.sqrt(t.var(axis=1).mean()))
  return {'across': across, 'within': within, 'ratio': across / within if within > 0 else 0.0}


def nearest_neighbour_accuracy(features, labels: Sequence) -> dict:
  """Leave-one-out 1-NN accuracy (Euclidean) of `features` [S, ...] against `labels` (None =
  skip that row), with the majority share of the labels as its baseline."""
  keep = [i for i, y in enumerate(labels) if y is not None]
  x = np.asarray(features, np.float64).reshape(len(labels), -1)[keep]
  y = [labels[i] for i in keep]
  if len(y) < 2:
    return {'n': len(y), 'accuracy': float('nan'), 'majority': float('nan')}
  sq = (x * x).sum(1)
  dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
  np.fill_diagonal(dist, np.inf)
  nearest = dist.argmin(1)
  acc = float(np.mean([y[j] == y[i] for i, j in enumerate(nearest)]))
  majority = max(y.count(v) for v in set(y)) / len(y)
  return {'n': len(y), 'accuracy': acc, 'majority': majority}


def _split_layers(stack):
  """A stacked-layers module -> one module per layer (the model's own layer code)."""
  graphdef, state = nnx.split(stack)
  n = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def perceiver_attention(perceiver, media) -> list[dict]:
  """Per Perceiver layer: {'media_mass', 'patch_entropy'} averaged over scans, heads and latents.

  media: the ViT output [scans, patches, vis_dim]. The latents are advanced through each layer
  with the layer's own __call__, and its attention probabilities recomputed from its q / k."""
  dtype = perceiver.compute_dtype
  media = jnp.asarray(media, dtype)
  n_media = media.shape[1]
  latents = jnp.broadcast_to(perceiver.latents[...].astype(dtype),
                             (media.shape[0],) + perceiver.latents.shape)
  out = []
  for layer in _split_layers(perceiver.layers):
    xm = layer.norm_media(media, dtype)
    lt = layer.norm_latents(latents, dtype)
    q = layer.q(lt, dtype)
    k = layer.k(jnp.concatenate([xm, lt], axis=1), dtype)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(scores, axis=-1)
    mass = probs[..., :n_media].sum(-1)
    over_patches = probs[..., :n_media] / jnp.maximum(mass[..., None], 1e-30)
    entropy = -(over_patches * jnp.log(jnp.maximum(over_patches, 1e-30))).sum(-1)
    out.append({'media_mass': float(mass.mean()),
                'patch_entropy': float(entropy.mean() / np.log(n_media)) if n_media > 1 else 1.0})
    latents = layer(latents, media, dtype=dtype, attention_impl='xla')
  return out


@nnx.jit
def _encode(model, images):
  """images [n, 1, 3, H, W, D] -> (image tokens [n, latents, embed], ViT output [n, patches, dim])."""
  return model.encode_images(images), model.vision(images[:, 0])


def vision_report(model, probe: ProbeSet, batch_rows: int = 16) -> dict:
  """Spread of the image tokens, 1-NN separability per label, Perceiver attention (module doc)."""
  tokens, media = [], []
  for start in range(0, len(probe.images), batch_rows):
    chunk = probe.images[start:start + batch_rows]
    if len(chunk) < batch_rows:       # one compiled shape: pad with copies of the last probe
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_rows - len(chunk), 0)])
    t, v = _encode(model, jnp.asarray(chunk))
    t, v = t[:len(probe.images) - start], v[:len(probe.images) - start]
    tokens.append(np.asarray(t))
    media.append(np.asarray(v))
  tokens = np.concatenate(tokens)           # [S, latents, embed] (one image slot)
  media = np.concatenate(media)
  return {'n': len(probe.ids), 'spread': token_spread(tokens),
          'separability': {key: nearest_neighbour_accuracy(tokens, values)
                           for key, values in sorted(probe.labels.items())},
          'perceiver_attention': perceiver_attention(model.perceiver, media)}


__all__ = ['ProbeSet', 'nearest_neighbour_accuracy', 'perceiver_attention', 'probe_set',
           'token_spread', 'vision_report']
