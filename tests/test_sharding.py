"""Mesh builder, logical rules, and sharded loss/gradients equal to the single-device values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from radfm_jax import sharding
from radfm_jax.config import ConfigError, MeshConfig, model_config
from radfm_jax.data import batch as batch_lib
from radfm_jax.models.radfm import create_model

AXES = lambda d, f, t: (('data', d), ('fsdp', f), ('tensor', t))


def test_mesh_fill_and_axis_types():
  mesh = sharding.make_mesh(MeshConfig(ici=AXES(2, -1, 1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ConfigError, match='mesh.ici'):
    sharding.make_mesh(MeshConfig(ici=AXES(3, -1, 1)))
  with pytest.raises(ConfigError, match='product is 8'):
    sharding.make_mesh(MeshConfig(ici=AXES(2, 2, 1)))


def test_hybrid_mesh_puts_dcn_outermost():
  # 2 "slices" of 4 devices: data across slices, fsdp inside.
  mesh = sharding.make_mesh(MeshConfig(ici=AXES(1, 4, 1), dcn=AXES(2, 1, 1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids[0].ravel().tolist() == [0, 1, 2, 3] and ids[1].ravel().tolist() == [4, 5, 6, 7]


def test_logical_to_spec_names_unknown_axes():
  rules = sharding.LOGICAL_RULES['fsdp_tp']
  assert sharding.logical_to_spec(('layers', 'embed', 'mlp'), rules) == P(None, 'fsdp', 'tensor')
  with pytest.raises(KeyError, match='no sharding rule'):
    sharding.logical_to_spec(('bogus',), rules)


def _batch(cfg, batch=8, images=2, length=96, seed=0):
  rng = np.random.default_rng(seed)
  vocab = cfg.llama.vocab_size
  tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  tokens[:, 1] = vocab
  tokens[:, 2:34] = vocab + 2 + np.arange(32)
  tokens[:, 34] = vocab + 1
  tokens[::2, 40:72] = vocab + 2 + 32 + np.arange(32)   # even samples use a second image
  mask = np.ones((batch, length), np.int32)
  mask[:, -7:] = 0
  labels = np.where(mask == 1, tokens, -100)
  labels = np.where(tokens >= vocab, -100, labels)
  image_mask = np.ones((batch, images), bool)
  image_mask[1::2, 1] = False
  return dict(tokens=tokens, attention_mask=mask, labels=labels.astype(np.int32),
              images=rng.random((batch, images, 3, 64, 64, 8), np.float32), image_mask=image_mask)


def _loss(state, graphdef, batch):
  model = nnx.merge(graphdef, state)
  logits = model(batch['tokens'], batch['images'], batch['attention_mask'], batch['image_mask'])
  labels = batch['labels'][:, 1:]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  valid = labels != -100
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid) / jnp.sum(valid)


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model, nnx.Param)
  return jax.jit(jax.value_and_grad(_loss), static_argnums=1)(state, graphdef, batch)


@pytest.fixture(scope='module')
def reference():
  cfg = model_config('tiny', remat_policy='nothing_saveable')
  batch = _batch(cfg)
  model = create_model(cfg, seed=0)
  loss, grads = _loss_and_grads(model, batch)
  return cfg, batch, nnx.to_pure_dict(nnx.state(model, nnx.Param)), loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize('shape,preset', [((8, 1, 1), 'fsdp'), ((2, 4, 1), 'fsdp'),
                                          ((2, 2, 2), 'fsdp_tp')])
def test_sharded_loss_and_grads_equal_single_device(reference, shape, preset):
  cfg, batch, ref_params, ref_loss, ref_grads = reference
  mesh = sharding.make_mesh(MeshConfig(ici=AXES(*shape), rules=preset))
  rules = sharding.LOGICAL_RULES[preset]
  model = create_model(cfg, seed=0, mesh=mesh, rules=rules)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref_params)

  # Parameters are sharded over every mesh axis of size > 1 that their rules name (a (8,1,1)
  # mesh is pure data parallelism: parameters whole, the batch split 8 ways).
  gate = model.llama.layers.gate.kernel[...]
  _, fsdp, tensor = shape
  want = P(None, 'fsdp' if fsdp > 1 else None, 'tensor' if preset == 'fsdp_tp' else None)
  assert gate.sharding.is_equivalent_to(NamedSharding(mesh, want), gate.ndim)
  assert gate.addressable_shards[0].data.shape == (
      gate.shape[0], gate.shape[1] // fsdp, gate.shape[2] // (tensor if preset == 'fsdp_tp' else 1))

  batch_sh = batch_lib.batch_sharding(mesh, rules)            # act_batch: data x fsdp
  sharded_batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
  assert sharded_batch['images'].addressable_shards[0].data.shape[0] == 8 // (shape[0] * fsdp)
  with sharding.use_mesh(mesh, rules):
    loss, grads = _loss_and_grads(model, sharded_batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  flat_ref = jax.tree.leaves(ref_grads)
  flat = jax.tree.leaves(nnx.to_pure_dict(grads))
  assert len(flat) == len(flat_ref)
  for got, want_g in zip(flat, flat_ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_g), rtol=1e-5,
                               atol=1e-6 * float(np.abs(want_g).max() + 1e-30))
