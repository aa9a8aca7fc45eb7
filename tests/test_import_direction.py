"""The import direction of radfm_jax/, by static analysis (ast; nothing is imported):

  * models/ imports nothing from data/ train/ infer/ convert/ eval/ cli/;
  * nothing outside cli/ imports cli/, and only cli/ defines arguments or reads sys.argv;
  * no import cycles between modules.

Module-level and function-level (deferred) imports both count: a cycle through a deferred import
still ties the two modules together.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'radfm_jax')
LAYERS_ABOVE_MODELS = ('data', 'train', 'infer', 'convert', 'eval', 'cli')
# The layers of docs/architecture.md, bottom first: a top-level module or package of radfm_jax
# may import only from layers below its own.
LAYERS = (('errors',), ('presets', 'casting', 'hostmem'), ('config',), ('experiments', 'sharding', 'tpu'),
          ('models', 'data'),
          ('checkpoint',), ('train', 'infer', 'convert'), ('eval', 'api', 'launch'), ('demo',),
          ('cli',))


def _modules() -> dict[str, str]:
  """{'radfm_jax.data.store': path, 'radfm_jax.data': path of its __init__.py, ...}"""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3]
        parts = rel.split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        out['.'.join(parts)] = os.path.join(folder, name)
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The longest radfm_jax module that `name` (a dotted import target) names or lies in."""
  parts = name.split('.')
  while parts:
    candidate = '.'.join(parts)
    if candidate in MODULES:
      return candidate
    parts.pop()
  return None


def _imports(module: str) -> list[tuple[str, int]]:
  """[(imported radfm_jax module, line)] of every import statement in `module`, at any depth."""
  path = MODULES[module]
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  out = []
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base
                 for a in node.names]
    for target in targets:
      if target.split('.')[0] == 'radfm_jax':
        resolved = _resolve(target)
        if resolved and resolved != module:
          out.append((resolved, node.lineno))
  return list(dict.fromkeys(out))      # `from x import a, b`: one edge per line


GRAPH = {m: _imports(m) for m in MODULES}


def _where(module: str) -> str:
  return os.path.relpath(MODULES[module], os.path.dirname(ROOT))


def _in(module: str, package: str) -> bool:
  return module == f'radfm_jax.{package}' or module.startswith(f'radfm_jax.{package}.')


def test_the_graph_sees_deferred_imports():
  """The analysis itself: a function-level import is an edge (cli/train.py imports the loop
  inside `run`), `from pkg import module` is an edge to the module, `import pkg` to the package."""
  edges = {m for m, _ in GRAPH['radfm_jax.cli.train']}
  assert {'radfm_jax.train.loop', 'radfm_jax.cli.flags', 'radfm_jax.launch'} <= edges
  assert 'radfm_jax' in {m for m, _ in GRAPH['radfm_jax.cli.main']}


def test_models_import_no_higher_layer():
  bad = [f'{_where(m)}:{line} imports {target}' for m in MODULES if _in(m, 'models')
         for target, line in GRAPH[m] if any(_in(target, p) for p in LAYERS_ABOVE_MODELS)]
  assert not bad, 'models/ must not import data/ train/ infer/ convert/ eval/ cli/:\n' + \
      '\n'.join(bad)


def _layer(module: str) -> int | None:
  parts = module.split('.')
  top = parts[1] if len(parts) > 1 else None
  return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_every_import_points_down_the_layers():
  tops = {m.split('.')[1] for m in MODULES if m.count('.') >= 1}
  unplaced = sorted(tops - {name for names in LAYERS for name in names} - {'__main__'})
  assert not unplaced, f'radfm_jax/{unplaced}: not placed in a layer (LAYERS, docs/architecture.md)'
  bad = [f'{_where(m)}:{line} imports {target} (layer {_layer(target)} >= {_layer(m)})'
         for m in MODULES if _layer(m) is not None
         for target, line in GRAPH[m]
         if _layer(target) is not None and _layer(target) >= _layer(m)
         and target.split('.')[1] != m.split('.')[1]]
  assert not bad, 'imports that point up or sideways between layers:\n' + '\n'.join(bad)


def test_only_cli_imports_cli_and_parses_arguments():
  bad = [f'{_where(m)}:{line} imports {target}' for m in MODULES if not _in(m, 'cli')
         for target, line in GRAPH[m] if _in(target, 'cli')]
  for m in MODULES:
    if _in(m, 'cli'):
      continue
    for node in ast.walk(ast.parse(open(MODULES[m]).read())):
      if isinstance(node, ast.Attribute) and node.attr in ('argv', 'add_argument',
                                                            'add_subparsers', 'parse_args'):
        bad.append(f'{_where(m)}:{node.lineno} uses .{node.attr} (command-line parsing '
                   'belongs in radfm_jax/cli/)')
      if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
          a.name == 'argparse' for a in node.names) or (
          isinstance(node, ast.ImportFrom) and node.module == 'argparse'):
        bad.append(f'{_where(m)}:{node.lineno} imports argparse')
  assert not bad, '\n'.join(bad)


def _cycles() -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w, _ in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(GRAPH):
    if v not in index:
      visit(v)
  return sorted(out)


def test_no_import_cycles():
  lines = []
  for component in _cycles():
    lines.append('cycle between ' + ', '.join(component) + ':')
    members = set(component)
    for m in component:
      for target, line in GRAPH[m]:
        if target in members:
          lines.append(f'  {_where(m)}:{line} imports {target}')
  assert not lines, 'import cycles (module- or function-level imports):\n' + '\n'.join(lines)


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
