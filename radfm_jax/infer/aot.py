"""Serving fit check: compile prefill + decode ahead of time for a TPU topology, from a CPU host.

    radfm-jax aot --generate --config configs/radfm.py:model=radfm_13b,mesh=tpu_v5e_1 \\
        --quantize int8 --config.model.param_dtype=bfloat16
    report = generate_fit_check(cfg, quantize='int8')    # after train.aot.set_tpu_env(topology)

Lowers the same jitted program `radfm-jax generate` runs (`generate._compiled_decode`: the
prefill that fills the KV cache, then the `lax.while_loop` of single-token steps, the scanned
layer loop used on accelerators) on the abstract model: the parameters as ShapeDtypeStructs with
their shardings (`abstract_model`, or `infer.quantize.abstract_quantized` with int8 kernels;
nothing is allocated). The context is `context` tokens: a prompt of `context - max_new` tokens
(with the images' 32-token blocks inside it) and `max_new` generated ones. Reports the compiler's
per-chip bytes (`tpu.compile_report`) against `mesh.hbm_gib`.
"""

from __future__ import annotations

import dataclasses

from radfm_jax.tpu import batch_shapes, compile_report, topology_devices


def abstract_generate_model(cfg, mesh, rules, quantize: str | None = None):
  """(graphdef, abstract state with NamedShardings) of the model generation runs."""
  import jax

  from radfm_jax import sharding
  from radfm_jax.models.radfm import abstract_model
  if not quantize:
    return abstract_model(cfg.model, mesh, rules)
  from radfm_jax.infer.quantize import abstract_quantized
  graphdef, state = abstract_quantized(cfg.model, quantize)
  with sharding.use_mesh(mesh, rules):
    shardings = sharding.state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state, shardings)
  return graphdef, state


def generate_fit_check(cfg, *, quantize: str | None = None, batch: int = 1, kind: str = '2d',
                       images_2d: int = 1, context: int = 2048, max_new: int = 256,
                       devices=None) -> dict:
  """Compiles prefill + decode for `batch` prompts of one `kind` sample on the config's TPU
  topology; returns the report (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from radfm_jax import sharding
  from radfm_jax.data import batch as batch_lib
  from radfm_jax.infer import generate as gen

  devices = devices if devices is not None else topology_devices(cfg.mesh.topology)
  mesh = sharding.make_mesh(cfg.mesh, devices=devices)
  rules = sharding.rules_for(cfg.mesh)
  graphdef, state = abstract_generate_model(cfg, mesh, rules, quantize)
  images_shape, _ = batch_shapes(cfg, kind, batch, images_2d)
  # What `generate` stacks such a prompt's images to (generate.image_shape: 'original' puts a 3D
  # scan at data.image_size_2d in-plane, the training bucket's 256 under 'train').
  depth = 1 if kind == '2d' else max(cfg.data.depth_buckets)
  images_shape = images_shape[:3] + batch_lib.generation_shape(
      [depth] * images_shape[1], cfg.data, cfg.generate.image_shape)
  prompt = context - max_new
  sampling = dataclasses.replace(cfg.generate, max_new_tokens=max_new, layer_loop='scan',
                                 stop_ids=tuple(cfg.generate.stop_ids))
  shards = batch_lib.batch_shards(mesh, rules)
  row = batch_lib.batch_sharding(mesh, rules) if batch % shards == 0 else NamedSharding(
      mesh, PartitionSpec())
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=row)   # noqa: E731
  args = (state, None, sds((batch, prompt), jnp.int32), sds((batch, prompt), jnp.int32),
          sds(images_shape, jnp.float32), sds(images_shape[:2], jnp.bool_),
          jax.eval_shape(lambda: jax.random.key(0)))
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  report = {'topology': cfg.mesh.topology, 'devices': mesh.devices.size,
            'device_kind': devices[0].device_kind, 'mesh': dict(mesh.shape),
            'program': 'generate', 'model': cfg.model.size, 'quantize': quantize or 'none',
            'param_dtype': cfg.model.param_dtype, 'compute_dtype': cfg.model.compute_dtype,
            'batch': batch, 'images_shape': list(images_shape),
            'image_shape': cfg.generate.image_shape, 'prompt_len': prompt,
            'max_new_tokens': max_new, 'context': context, 'cache_chunk': sampling.cache_chunk,
            'param_bytes_total': int(param_bytes), 'hbm_gib': cfg.mesh.hbm_gib}
  fn = gen._compiled_decode(graphdef, None, sampling, False)
  with sharding.use_mesh(mesh, rules):
    report.update(compile_report(lambda: fn.lower(*args).compile(), cfg.mesh.hbm_gib))
  return report


def format_generate_report(r: dict) -> str:
  g = lambda b: f'{(b or 0) / 2 ** 30:.2f} GiB'     # noqa: E731
  head = (f"{r['topology']} ({r['devices']} x {r['device_kind']}) generate {r['model']} "
          f"weights {r['quantize'] if r['quantize'] != 'none' else r['param_dtype']}, batch "
          f"{r['batch']}, images {r['images_shape'][1:]}, prompt {r['prompt_len']} + "
          f"{r['max_new_tokens']} new = {r['context']} tokens; parameters {g(r['param_bytes_total'])}")
  if 'error' in r:
    need = f" (needed {g(r['needed_bytes'])})" if r.get('needed_bytes') else ''
    return (f"{head}\n  compile refused: RESOURCE_EXHAUSTED{need} -> DOES NOT FIT in "
            f"{r['hbm_gib']} GiB/chip")
  return (f"{head}\n  per chip: arguments {g(r['argument_bytes'])}, outputs "
          f"{g(r['output_bytes'])}, temp {g(r['temp_bytes'])}, compiler peak "
          f"{g(r['peak_bytes'])}\n  -> {'FITS' if r['fits'] else 'DOES NOT FIT'} in "
          f"{r['hbm_gib']} GiB/chip (compiled in {r['compile_s']:.1f} s)")


__all__ = ['abstract_generate_model', 'format_generate_report', 'generate_fit_check']
