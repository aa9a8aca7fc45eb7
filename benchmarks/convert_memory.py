"""Peak host memory of `radfm-jax convert from-torch` on a synthetic multi-GB official checkpoint.

    .venv/bin/python benchmarks/convert_memory.py [--layers 10] [--format both] [--workdir /tmp/x]

Builds a checkpoint with the official key names (official ViT and perceiver sizes, a LLaMA of
hidden 2048 / mlp 5504 / vocab 32000 and `--layers` layers, plus `inv_freq` buffers and a few
dead-branch keys), writes it as `.bin` (torch.save, in a subprocess: it needs the whole dict) and/or
`.safetensors` (streamed), then converts each in a fresh subprocess that reports its own peak RSS
(VmHWM of /proc/self/status). Also measured: the RSS of the imports alone, and the reverse
conversion back into the same format (`convert to-torch`, streamed for both). Goal: peak RSS /
checkpoint size <= 0.25.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bench_config(layers: int):
  from radfm_jax.config import LlamaConfig, ModelConfig
  return ModelConfig(size='convert_bench', llama=LlamaConfig(
      vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=layers, num_heads=16))


def official_shapes(cfg):
  """{official key: shape} for cfg: every kept key, plus inv_freq buffers and some dead keys."""
  from radfm_jax.convert import api, engine, keymap
  shapes = {p: s for p, (s, _) in api.abstract_shapes(cfg).items()}
  table = keymap.radfm_table()
  out = dict(keymap.expected_keys(table, shapes, engine.stacked_layers(table, shapes)))
  out.pop('embedding_layer.weight')   # added as a shared tensor (.bin) or left out (safetensors)
  for i in range(cfg.llama.num_layers):
    out[f'lang_model.model.layers.{i}.self_attn.rotary_emb.inv_freq'] = (cfg.llama.head_dim // 2,)
  out.update({'embedding_layer.bert_model.pooler.dense.weight': (768, 768),
              'embedding_layer.transformer_decoder.norm.weight': (768,),
              'embedding_layer.cls_head.weight': (1, 96)})
  return out


def _gen(kind: str, path: str, layers: int):
  import numpy as np
  cfg = bench_config(layers)
  shapes = official_shapes(cfg)
  rng = np.random.default_rng(0)

  def tensor(shape):
    return rng.standard_normal(shape, dtype=np.float32)

  if kind == 'safetensors':
    from radfm_jax.convert.api import _write_safetensors
    header = {k: (s, np.dtype('float32')) for k, s in shapes.items()}
    _write_safetensors(path, header, ((k, tensor(s)) for k, s in shapes.items()))
  else:
    import torch
    state = {k: torch.from_numpy(tensor(s)) for k, s in shapes.items()}
    state['embedding_layer.weight'] = state['lang_model.model.embed_tokens.weight']
    torch.save(state, path)


def _peak_mib() -> float:
  """This process's peak resident set. VmHWM belongs to the address space, which exec replaces;
  getrusage's ru_maxrss is carried across exec on Linux and would report the parent's peak when
  that was higher."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _child(argv):
  """Runs in a fresh process; prints one JSON line with its peak RSS."""
  what = argv[0]
  start = time.time()
  if what == 'imports':
    import jax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tensorstore  # noqa: F401
    import torch  # noqa: F401

    from radfm_jax.convert import api  # noqa: F401
  elif what == 'gen':
    _gen(argv[1], argv[2], int(argv[3]))
  elif what in ('from-torch', 'to-torch'):
    from radfm_jax.cli.main import main as cli_main
    extra = ['--llama-heads', '16'] if what == 'from-torch' else []
    cli_main(['convert', what, '--checkpoint', argv[1], '--out', argv[2], *extra])
  print(json.dumps({'peak_mib': _peak_mib(), 'seconds': time.time() - start}))


def run_child(*argv) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.abspath(__file__), '_child', *argv], env=env,
                       check=True, capture_output=True, text=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _verify(src: str, ckpt: str):
  """Spot-checks the conversion: one layer of the gate kernel and the lm_head."""
  import numpy as np

  from radfm_jax.checkpoint import LeafReader
  from radfm_jax.convert import engine
  leaf = LeafReader(ckpt)
  cfg = leaf.cfg
  reader = engine.open_reader(src)
  gate = leaf('llama/layers/gate/kernel')
  last = cfg.llama.num_layers - 1
  np.testing.assert_array_equal(gate[last], reader.get(f'lang_model.model.layers.{last}.mlp.gate_proj.weight').T)
  np.testing.assert_array_equal(leaf('llama/lm_head/kernel'), reader.get('lang_model.lm_head.weight').T)


def main():
  if len(sys.argv) > 1 and sys.argv[1] == '_child':
    return _child(sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=10)
  parser.add_argument('--format', choices=('bin', 'safetensors', 'both'), default='both')
  parser.add_argument('--workdir', default='/tmp/radfm_convert_bench')
  parser.add_argument('--keep', action='store_true', help='keep the generated files')
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  base = run_child('imports')
  cfg = bench_config(args.layers)
  print(f'config: {json.dumps(dataclasses.asdict(cfg.llama))}')
  print(f'imports alone: peak RSS {base["peak_mib"]:.0f} MiB')
  kinds = ('bin', 'safetensors') if args.format == 'both' else (args.format,)
  results = {}
  for kind in kinds:
    src = os.path.join(args.workdir, f'model.{kind}')
    ckpt = os.path.join(args.workdir, f'ckpt_{kind}')
    gen = run_child('gen', kind, src, str(args.layers))
    size = _size(src) / 2**20
    conv = run_child('from-torch', src, ckpt)
    _verify(src, ckpt)
    back_path = os.path.join(args.workdir, f'back.{kind}')
    back = run_child('to-torch', ckpt, back_path)
    results[kind] = dict(checkpoint_mib=size, peak_mib=conv['peak_mib'], seconds=conv['seconds'],
                         ratio=conv['peak_mib'] / size,
                         ratio_above_imports=(conv['peak_mib'] - base['peak_mib']) / size,
                         orbax_mib=_size(ckpt) / 2**20, to_torch_peak_mib=back['peak_mib'],
                         to_torch_seconds=back['seconds'], generate_seconds=gen['seconds'])
    r = results[kind]
    print(f'{kind:12s} checkpoint {size:7.0f} MiB | from-torch peak RSS {r["peak_mib"]:6.0f} MiB '
          f'({r["seconds"]:.0f}s) ratio {r["ratio"]:.3f} (above imports {r["ratio_above_imports"]:.3f}) '
          f'| orbax {r["orbax_mib"]:.0f} MiB | to-torch ({kind}) peak '
          f'{r["to_torch_peak_mib"]:.0f} MiB '
          f'({r["to_torch_seconds"]:.0f}s)')
    if not args.keep:
      for p in (src, ckpt, back_path):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
            os.path.exists(p) and os.remove(p))
  print(json.dumps({'imports_peak_mib': base['peak_mib'], **results}, indent=1))
  worst = max(r['ratio'] for r in results.values())
  print(f'goal peak/size <= 0.25: {"met" if worst <= 0.25 else "NOT met"} (worst {worst:.3f})')


if __name__ == '__main__':
  main()
