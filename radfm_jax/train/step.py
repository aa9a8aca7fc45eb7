"""Loss, metrics and the jitted train / eval steps (functional: split -> value_and_grad -> merge).

    state = init_train_state(params, tx, optim.trainable_spec(cfg))   # or restore a checkpoint
    step = make_train_step(graphdef, tx, cfg)                        # pure (state, batch) -> ...
    jitted = jit_train_step(step, state_shardings, mesh, rules,      # donates the state
                            cfg.mesh.xla_options)              # the hardware's XLA options
    state, metrics = jitted(state, batch)

Loss (docs/original.md section 8): labels are *not* pre-shifted; the logits at t predict label t+1
(logits[:, :-1] vs labels[:, 1:]), labels == -100 are ignored.
  * `mean` (default): token-mean cross entropy over every valid label in the whole batch, exactly
    HF's `output.loss`, the value the original returns and trains on.
  * `weighted`: sum(ce * w) / sum(w) with w = loss_weights[:, 1:] on valid labels: the formula of
    the original's computed-but-dropped `loss_reg`, not its values. The original weights entity
    spans (scispacy UMLS entities of the answer) 3; our batches' loss_weights are 1 on every
    valid label (data/tokenizer.py), so today `weighted` equals `mean`. Both divide by
    max(denominator, 1) when a batch holds only empty rows.
Metrics: loss, token accuracy (argmax == label over valid labels), sequence accuracy (the
original's "accuracy": fraction of samples whose argmax is right at *every* valid label; rows with
no valid label - the pipeline's empty padding rows - are not counted), grad norm (global L2 of
the trainable gradients before clipping), learning rate, valid-token count, and per top-level
module (`vision`, `perceiver`, `fc`, `figure_tokens`, `llama`, those that train) `grad_norm/<module>`
(its share of that gradient) and `update_ratio/<module>` (L2 norm of the step's parameter update
over the module's parameter norm: how fast each tower moves; a tower whose ratio sits far below the
others' is barely training - see radfm_jax/eval/vision.py for the vision path's health).

Gradient accumulation is a `lax.scan` over `train.grad_accum` microbatches inside the step (not
`optax.MultiSteps`): every microbatch contributes grad(sum of its token losses) and the sum is
divided once by the *whole batch's* token count (known from the labels before any forward), so the
accumulated gradient equals the big-batch gradient of the token-mean loss even when microbatches
hold different numbers of valid tokens; MultiSteps would average per-microbatch means instead.
Microbatch i takes rows i, i+n, i+2n, ... so a batch sharded contiguously over the batch axes
stays sharded the same way in every microbatch (no data movement).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from radfm_jax import sharding
from radfm_jax.config import Config, ConfigError
from radfm_jax.data.batch import IGNORE, batch_sharding
from radfm_jax.data.batch import keys as batch_keys
from radfm_jax.models import lora
from radfm_jax.train import optim


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step counter, all parameters, the optimizer state."""
  step: jax.Array          # int32 scalar
  params: nnx.State        # trainable + frozen parameters
  opt_state: Any           # optax state of the trainable parameters


def init_train_state(params: nnx.State, tx: optax.GradientTransformation,
                     freeze=()) -> TrainState:
  trainable, _ = optim.split_trainable(params, freeze)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))


# ------------------------------------------------------------------------------------------------
# Loss and metrics


def loss_terms(logits: jax.Array, labels: jax.Array, loss_weights: jax.Array | None = None,
               kind: str = 'mean') -> dict[str, jax.Array]:
  """Sums (not means) over a batch, so microbatches add up: `numerator` (sum of CE, or of w*CE),
  `correct`, `valid`, `seq_correct`, `seq_count`. logits [B, L, V] float; labels int [B, L]."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, logz - picked, 0.0)
  if kind == 'weighted':
    weights = jnp.where(valid, loss_weights[:, 1:].astype(jnp.float32), 0.0)
    numerator = jnp.sum(ce * weights)
  else:
    numerator = jnp.sum(ce)
  hit = (jnp.argmax(logits, axis=-1) == targets) & valid
  has_label = valid.any(axis=1)
  seq_ok = jnp.all(hit | ~valid, axis=1) & has_label
  return {'numerator': numerator, 'correct': hit.sum().astype(jnp.float32),
          'valid': valid.sum().astype(jnp.float32),
          'seq_correct': seq_ok.sum().astype(jnp.float32),
          'seq_count': has_label.sum().astype(jnp.float32)}


def loss_denominator(labels: jax.Array, loss_weights: jax.Array | None, kind: str) -> jax.Array:
  """The batch-wide divisor of the loss: valid-label count (`mean`) or weight sum (`weighted`)."""
  valid = labels[:, 1:] != IGNORE
  if kind == 'weighted':
    den = jnp.sum(jnp.where(valid, loss_weights[:, 1:].astype(jnp.float32), 0.0))
  else:
    den = valid.sum().astype(jnp.float32)
  return jnp.where(den > 0, den, 1.0)


def cross_entropy_loss(logits, labels, loss_weights=None, kind: str = 'mean') -> jax.Array:
  """The scalar training loss for one batch (see the module docstring)."""
  terms = loss_terms(logits, labels, loss_weights, kind)
  return terms['numerator'] / loss_denominator(labels, loss_weights, kind)


def tower_norms(tree) -> dict[str, jax.Array]:
  """L2 norm per top-level module ('vision', 'perceiver', 'fc', 'figure_tokens', 'llama') of a
  parameter-shaped tree: parameters, gradients or updates."""
  sums: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = lora.path_names(path)[0]
    sums[name] = sums.get(name, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {name: jnp.sqrt(v) for name, v in sums.items()}


def summarize(terms: dict, denominator) -> dict[str, jax.Array]:
  return {'loss': terms['numerator'] / denominator,
          'token_accuracy': terms['correct'] / jnp.maximum(terms['valid'], 1.0),
          'sequence_accuracy': terms['seq_correct'] / jnp.maximum(terms['seq_count'], 1.0),
          'tokens': terms['valid']}


# ------------------------------------------------------------------------------------------------
# Steps


def split_microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...]; microbatch i holds rows i, i+n, ... (keeps contiguous sharding)."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into train.grad_accum={n} '
                       'microbatches')
    y = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(y, (None, 'act_batch') + (None,) * (x.ndim - 1))
  return {k: split(v) for k, v in batch.items()}


def _forward(graphdef, params, batch, rng, adapter_dropout: bool = False):
  model = nnx.merge(graphdef, params)
  if adapter_dropout and rng is not None:     # Qwix draws the LoRA dropout masks from these
    lora.set_qwix_rngs(model, model.cfg, jax.random.fold_in(rng, 1), stream='dropout')
  return model(batch['tokens'], batch.get('images'), attention_mask=batch['attention_mask'],
               image_mask=batch['image_mask'], rng=rng, image_tokens=batch.get('image_tokens'))


def make_grad_fn(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
  """`(trainable, frozen, batch, rng) -> (grads, terms, denominator)`: the gradient of the batch's
  loss w.r.t. the trainable parameters, accumulated over `train.grad_accum` microbatches."""
  kind, n_micro = cfg.train.loss, cfg.train.grad_accum
  adapter_dropout = cfg.finetune.method != 'full' and cfg.finetune.dropout > 0

  def grad_fn(trainable, frozen, batch, rng):
    batch = {k: batch[k] for k in batch_keys(cfg.data.image_cache)}
    denominator = loss_denominator(batch['labels'], batch['loss_weights'], kind)

    def micro_loss(trainable, frozen, micro, key):
      # Rebuilding the frozen State (tree.map) makes its Variables at the current trace level,
      # which NNX requires inside the model's nnx.scan; stop_gradient documents that no gradient
      # flows into them (they are not differentiated anyway).
      frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
      logits = _forward(graphdef, optim.merge_params(trainable, frozen), micro, key,
                        adapter_dropout)
      terms = loss_terms(logits, micro['labels'], micro['loss_weights'], kind)
      return terms['numerator'] / denominator, terms

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)
    if n_micro == 1:
      (_, terms), grads = value_and_grad(trainable, frozen, batch, rng)
      return grads, terms, denominator
    micro = split_microbatches(batch, n_micro)
    keys = jax.random.split(rng, n_micro) if rng is not None else None

    def body(carry, xs):
      grads_acc, terms_acc = carry
      mb, key = xs
      (_, terms), grads = value_and_grad(trainable, frozen, mb, key)
      return (jax.tree.map(jnp.add, grads_acc, grads),
              jax.tree.map(jnp.add, terms_acc, terms)), None

    zeros_g = jax.tree.map(jnp.zeros_like, trainable)
    zeros_t = {k: jnp.zeros((), jnp.float32) for k in
               ('numerator', 'correct', 'valid', 'seq_correct', 'seq_count')}
    (grads, terms), _ = jax.lax.scan(body, (zeros_g, zeros_t), (micro, keys))
    return grads, terms, denominator

  return grad_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config,
                    schedule: optax.Schedule | None = None) -> Callable:
  """Pure `(state, batch) -> (state, metrics)`; dropout keys derive from (cfg.seed, step)."""
  freeze = optim.trainable_spec(cfg)
  schedule = schedule or optim.make_schedule(cfg.train)
  base_key = jax.random.key(cfg.seed)
  use_dropout = cfg.model.vision.dropout > 0 or (cfg.finetune.method != 'full'
                                                 and cfg.finetune.dropout > 0)
  grad_fn = make_grad_fn(graphdef, cfg)

  def step_fn(state: TrainState, batch: dict):
    trainable, frozen = optim.split_trainable(state.params, freeze)
    rng = jax.random.fold_in(base_key, state.step) if use_dropout else None
    grads, terms, denominator = grad_fn(trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    metrics = summarize(terms, denominator)
    param_norms = tower_norms(trainable)
    update_norms = tower_norms(updates)
    grad_norms = tower_norms(grads)
    # the global norm from the towers' (one pass over the gradients, not two)
    metrics['grad_norm'] = jnp.sqrt(sum(jnp.square(n) for n in grad_norms.values()))
    for name, norm in grad_norms.items():
      metrics[f'grad_norm/{name}'] = norm
      metrics[f'update_ratio/{name}'] = update_norms[name] / jnp.maximum(param_norms[name], 1e-12)
    # A batch with no supervised token (every row left empty: its samples' scans were unreadable,
    # data.drop_unreadable) has no gradient, but the optimizer would still move the weights
    # (Adam's moments, weight decay) and its step would be saved as the run's state: the update
    # is skipped instead (the step still counts, as the data position does).
    learned = terms['valid'] > 0

    def keep(new, old):
      return jax.tree.map(lambda n, o: jnp.where(learned, n, o), new, old)

    trainable = keep(optax.apply_updates(trainable, updates), trainable)
    opt_state = keep(opt_state, state.opt_state)
    metrics['updated'] = learned.astype(jnp.float32)
    metrics['learning_rate'] = schedule(state.step)
    metrics['params_finite'] = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)])).astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=optim.merge_params(trainable, frozen),
                           opt_state=opt_state)
    return new_state, metrics

  return step_fn


def make_eval_step(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
  """Pure `(params, batch) -> metrics` without dropout."""
  kind = cfg.train.loss

  def eval_fn(params, batch):
    logits = _forward(graphdef, params, batch, None)
    terms = loss_terms(logits, batch['labels'], batch['loss_weights'], kind)
    return summarize(terms, loss_denominator(batch['labels'], batch['loss_weights'], kind))

  return eval_fn


# ------------------------------------------------------------------------------------------------
# Shardings and jit


def train_state_shardings(state: TrainState, mesh, rules, tx, freeze=()) -> TrainState:
  """Shardings of a (concrete or abstract) TrainState: params from their logical names, moments
  from their params (`sharding.optimizer_shardings`), the step replicated."""
  param_sh = sharding.state_shardings(state.params, mesh, rules)
  trainable, _ = optim.split_trainable(state.params, freeze)
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  opt_sh = sharding.optimizer_shardings(tx, trainable, trainable_sh, mesh)
  return TrainState(step=NamedSharding(mesh, PartitionSpec()), params=param_sh, opt_state=opt_sh)


def abstract_train_state(graphdef_and_state, tx, mesh, rules, freeze=()) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the whole TrainState, allocating nothing."""
  _, abs_params = graphdef_and_state
  trainable, _ = optim.split_trainable(abs_params, freeze)
  abs_opt = jax.eval_shape(tx.init, trainable)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                        opt_state=abs_opt)
  shardings = train_state_shardings(abstract, mesh, rules, tx, freeze)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


@dataclasses.dataclass
class MeshStep:
  """A jitted step that is always traced / run inside the mesh + logical-rules context."""
  fn: Callable
  mesh: jax.sharding.Mesh
  rules: Any

  def __call__(self, *args):
    with sharding.use_mesh(self.mesh, self.rules), _named_option_errors():
      return self.fn(*args)

  def lower(self, *args):
    with sharding.use_mesh(self.mesh, self.rules):
      return _Lowered(self.fn.lower(*args))


@dataclasses.dataclass
class _Lowered:
  """`jax.stages.Lowered` whose `compile()` names a bad `mesh.xla_options` entry in one line."""
  lowered: Any

  def compile(self, *args, **kwargs):
    with _named_option_errors():
      return self.lowered.compile(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.lowered, name)


@contextlib.contextmanager
def _named_option_errors():
  """Turns XLA's refusal of a compiler option ('No such compile option: ...', 'While setting
  option ..., ... is not a valid ... value') into a ConfigError naming `mesh.xla_options`: only
  the backend that compiles knows its options, so this is where a bad one shows."""
  try:
    yield
  except jax.errors.JaxRuntimeError as error:
    text = str(error)
    if 'compile option' not in text and 'While setting option' not in text:
      raise
    message = text.split('\n')[0].removeprefix('INVALID_ARGUMENT: ')
    raise ConfigError(f'config field mesh.xla_options: XLA refused it ({message}); expected '
                      'options the compiling backend knows') from None


def _jit(fn, xla_options, **kwargs):
  return jax.jit(fn, compiler_options=dict(xla_options) or None, **kwargs)


def jit_train_step(step_fn, state_sh: TrainState, mesh, rules, xla_options=()) -> MeshStep:
  """`xla_options`: the hardware's (name, value) compiler options (`mesh.xla_options`)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  fn = _jit(step_fn, xla_options, in_shardings=(state_sh, batch_sharding(mesh, rules)),
            out_shardings=(state_sh, replicated), donate_argnums=(0,))
  return MeshStep(fn, mesh, rules)


def jit_eval_step(eval_fn, param_sh, mesh, rules, xla_options=()) -> MeshStep:
  replicated = NamedSharding(mesh, PartitionSpec())
  fn = _jit(eval_fn, xla_options, in_shardings=(param_sh, batch_sharding(mesh, rules)),
            out_shardings=replicated)
  return MeshStep(fn, mesh, rules)


__all__ = ['TrainState', 'abstract_train_state', 'cross_entropy_loss', 'init_train_state',
           'jit_eval_step', 'jit_train_step', 'loss_denominator', 'loss_terms', 'make_eval_step',
           'make_grad_fn', 'make_train_step', 'split_microbatches', 'summarize',
           'tower_norms', 'train_state_shardings']
