"""Fit check: compile the full train step ahead of time for a TPU topology, from a CPU host.

    radfm-jax aot --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128 [--batch-2d N]
                  [--batch-3d N] [--json out.json] [--config.model.remat_policy=...]
    report = fit_check(cfg, '2d', batch=8)       # Python, after set_tpu_env(cfg.mesh.topology)

Needs libtpu (`pip install "libtpu==0.0.42.*"`, the `tpu` extra); no TPU. The command sets
TPU_SKIP_MDS_QUERY=1, TPU_ACCELERATOR_TYPE (from the preset's topology) and
TPU_WORKER_HOSTNAMES=localhost and larger libtpu compiler-thread stacks (LIBTPU_INIT_ARGS; the
v6e 13B compile crashes without them) before JAX is imported, takes the devices of
`jax.experimental.topologies.get_topology_desc(platform='tpu', topology_name=mesh.topology)`,
builds the mesh over them, the abstract TrainState (`abstract_model` + optimizer shardings from
`sharding.optimizer_shardings`, nothing allocated), and lowers + compiles the same jitted,
donated train step that `radfm-jax train` runs.

Batches (global sizes; default one sample per chip): 2D = S images of
data.image_size_2d^2 x 4 slices (--images-2d, default 4), 3D = 1 image of
data.image_size_3d_single^2 x max(data.depth_buckets); text = max(data.text_lengths) tokens.
Reported per chip: argument / output / temp / alias bytes, the compiler's peak
(`memory_analysis().peak_memory_in_bytes`), analytic FLOPs per step (model FLOPs and with the
remat recompute) and fits / does-not-fit against mesh.hbm_gib. libtpu refusing to compile with
RESOURCE_EXHAUSTED is a does-not-fit (its message says how much was needed).
"""

from __future__ import annotations

from radfm_jax.tpu import (COMPILE_THREAD_STACK_BYTES, GIB, accelerator_type, batch_shapes,
                           chip_count, compile_report, memory_report, needed_bytes, set_tpu_env,
                           topology_devices)

def abstract_batch(images_shape, length, sharding):
  import jax
  import jax.numpy as jnp
  b, s = images_shape[:2]
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {'images': sds(images_shape, jnp.float32), 'image_mask': sds((b, s), jnp.bool_),
          'tokens': sds((b, length), jnp.int32), 'attention_mask': sds((b, length), jnp.int32),
          'labels': sds((b, length), jnp.int32), 'loss_weights': sds((b, length), jnp.float32)}


def fit_check(cfg, kind: str, batch: int | None = None, *, images_2d: int = 4,
              text_len: int | None = None, devices=None) -> dict:
  """Compiles the train step for one batch kind on the config's TPU topology; returns a report."""
  from radfm_jax import sharding
  from radfm_jax.data import batch as batch_lib
  from radfm_jax.train import loop
  from radfm_jax.train import metrics as metrics_lib
  from radfm_jax.train import step as step_lib

  if devices is None:
    if not cfg.mesh.topology:
      raise ValueError(f'mesh preset {cfg.mesh.preset!r} has no mesh.topology: pick a tpu_* preset')
    devices = topology_devices(cfg.mesh.topology)
  mesh = sharding.make_mesh(cfg.mesh, devices=devices)
  n = mesh.devices.size
  batch = batch or n
  rules = sharding.rules_for(cfg.mesh)
  shards = batch_lib.batch_shards(mesh, rules)
  if batch % shards:
    from radfm_jax.errors import InputError
    raise InputError(f'global batch {batch} does not split over the {shards} devices of the '
                     f'batch axes {batch_lib.batch_spec(rules)[0]}; expected a multiple of '
                     f'{shards} (--batch-2d / --batch-3d)')
  mesh, rules, graphdef, tx, abs_state, shardings = loop.build(cfg, mesh)
  images_shape, length = batch_shapes(cfg, kind, batch, images_2d, text_len)
  batch_abs = abstract_batch(images_shape, length, batch_lib.batch_sharding(mesh, rules))
  step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, cfg), shardings, mesh,
                                 rules, cfg.mesh.xla_options)
  model_flops = metrics_lib.train_step_flops(cfg.model, batch, images_shape[1], images_shape[3:],
                                             length)
  hw_flops = metrics_lib.train_step_flops(cfg.model, batch, images_shape[1], images_shape[3:],
                                          length, with_remat=True)
  report = {'topology': cfg.mesh.topology, 'devices': n, 'device_kind': devices[0].device_kind,
            'mesh': dict(mesh.shape), 'rules': cfg.mesh.rules, 'kind': kind,
            'global_batch': batch, 'per_chip_batch': batch / n, 'images_shape': list(images_shape),
            'text_len': length, 'remat_policy': cfg.model.remat_policy,
            'attention': cfg.model.attention,
            'compute_dtype': cfg.model.compute_dtype, 'param_dtype': cfg.model.param_dtype,
            'finetune': cfg.finetune.method, 'lora_rank': cfg.finetune.rank,
            'quant': cfg.finetune.quant if cfg.finetune.method == 'qlora' else None,
            'train_full': list(cfg.finetune.train_full), 'freeze': list(cfg.train.freeze),
            'hbm_gib': cfg.mesh.hbm_gib, 'flops_per_step': model_flops,
            'flops_per_step_with_remat': hw_flops, 'flops_per_chip': model_flops / n}
  report.update(compile_report(lambda: step.lower(abs_state, batch_abs).compile(),
                               cfg.mesh.hbm_gib))
  return report


def format_report(r: dict) -> str:
  g = lambda b: f'{(b or 0) / GIB:.2f} GiB'
  head = (f"{r['topology']} ({r['devices']} x {r['device_kind']}, mesh {r['mesh']}, "
          f"{r['rules']}) {r['kind']} batch {r['global_batch']} "
          f"({r['per_chip_batch']:g}/chip), images {r['images_shape'][1:]}, text {r['text_len']}, "
          f"remat {r['remat_policy']}, {r.get('attention', 'xla')} attention, "
          f"{r['compute_dtype']} compute, {r['param_dtype']} parameters, "
          f"{r.get('finetune', 'full')}{' ' + r['quant'] if r.get('quant') else ''}")
  flops = (f"  FLOPs/step {r['flops_per_step']:.3e} (with remat recompute "
           f"{r['flops_per_step_with_remat']:.3e}); per chip {r['flops_per_chip']:.3e}")
  if 'error' in r:
    need = f" (needed {g(r['needed_bytes'])})" if r.get('needed_bytes') else ''
    return (f"{head}\n{flops}\n  compile refused: RESOURCE_EXHAUSTED{need} -> DOES NOT FIT "
            f"in {r['hbm_gib']} GiB/chip")
  verdict = 'FITS' if r['fits'] else 'DOES NOT FIT'
  return (f"{head}\n{flops}\n  per chip: arguments {g(r['argument_bytes'])}, outputs "
          f"{g(r['output_bytes'])}, temp {g(r['temp_bytes'])}, aliased {g(r['alias_bytes'])}, "
          f"compiler peak {g(r['peak_bytes'])}\n  -> {verdict} in {r['hbm_gib']} GiB/chip "
          f"(compiled in {r['compile_s']:.1f} s)")


__all__ = ['COMPILE_THREAD_STACK_BYTES', 'GIB', 'abstract_batch', 'accelerator_type', 'batch_shapes',
           'chip_count', 'compile_report', 'fit_check', 'format_report', 'memory_report', 'needed_bytes',
           'set_tpu_env', 'topology_devices']
