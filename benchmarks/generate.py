"""Generation speed at the `bench` config: 64-token prompt + one 3x256x256x16 image, 200 new
tokens, greedy, at batch 1 and batch 8 (new tokens/s, prefill included, compile excluded).

For scale, the original's decoder is timed in the same run (`--original`, on when torch and
transformers are installed: `pip install -e ".[test]"`): the original RadFM generates with HF
transformers' `LlamaForCausalLM.generate(inputs_embeds=...)`, greedy, batch 1 (it passes no
attention mask, so it cannot batch; docs/original.md). The script builds that model at the same
sizes with the same weights (our decoder written out through the checkpoint key map), feeds it the
same spliced prompt embeddings (our vision tower's tokens; the original's own vision encoding is
not timed, which favours it) and times its decode as ours, in torch's eager attention as the
original's transformers 4.28 ran it, on this machine's threads. Goals: >= 2x its tokens/s at batch
1, >= 10x its batch-1 tokens/s in aggregate at batch 8. Its greedy ids are compared with ours.

Also printed: the weight-streaming floor of one decode step (decoder weight bytes read per token
over this machine's measured matrix-vector bandwidth) and the tokens/s ceiling it implies at
batch 1: a single-token step must read every decoder weight once. The bandwidth is measured at the
start and again before every timed call; each batch's steps are set against the floor at the best
bandwidth measured between its own calls, so a host whose memory traffic drifts during the run
(other tenants) moves the floor and the steps together.

    .venv/bin/python benchmarks/generate.py [--size bench] [--new 200] [--layer-loop scan]
        [--cache-chunk 64] [--profile] [--quantize int8|w8a8] [--no-original] [--rounds 5]

--quantize int8 (or w8a8) runs the same batches a second time with Qwix int8 weights (w8a8: and
int8 activations; radfm_jax/infer/quantize.py, as `radfm-jax generate --quantize ...`), so fp32
and int8 are compared in one run, each against its own floor (the int8 weights' bytes; int8
weights without the panel kernel are dequantized into the decode view: the fp32 bytes).

--rounds N (default 5) also times batch 1 and batch 8 back to back N times and prints the
median of the per-round batch-8 / batch-1 step ratios: the host's memory speed drifts between
the separately timed batches above, and the ratio is only fair where both met the same host. It
also prints the ratio of each batch's lower-quartile step over those rounds (each batch where the
host was fast for it) beside the ratio the bytes alone would give (the weights once, plus the KV
cache of 8 rows against 1's).

--profile adds where one decode step's time goes: XLA:CPU traces of a 1-token and a
`--profile-tokens`-token call, parsed per HLO op (benchmarks/xla_profile.py), summed per category,
their difference over the extra steps.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import xla_profile  # noqa: E402
from common import GemvBandwidth, machine, time_fn  # noqa: E402
from radfm_jax.config import GenerateConfig, model_config  # noqa: E402
from radfm_jax.infer import cpu_decode, panel_kernel  # noqa: E402
from radfm_jax.infer import generate as generate_lib  # noqa: E402
from radfm_jax.infer.generate import generate_ids, left_pad  # noqa: E402
from radfm_jax.infer.quantize import MODES, quantize  # noqa: E402
from radfm_jax.models.layers import int8_rows_product  # noqa: E402
from radfm_jax.models.radfm import create_model  # noqa: E402


def prompts(cfg, batch, length=64, seed=0):
  rng = np.random.default_rng(seed)
  vocab = cfg.llama.vocab_size
  out = []
  for _ in range(batch):
    block = [vocab] + [vocab + 2 + j for j in range(32)] + [vocab + 1]
    text = rng.integers(3, vocab, length - len(block) - 1).tolist()
    out.append([1] + block + text)
  return out


def bench_images(cfg, batch):
  """[batch, 1, 3, 256, 256, 16] (smaller configs: their vision tower's own size)."""
  side = min(256, cfg.vision.image_size)
  shape = (batch, 1, 3, side, side, min(16, cfg.vision.frames))
  return np.random.default_rng(1).random(shape, np.float32)


def step_products_ms(cfg, rows: int, weights: str = 'fp32', lanes: int = 0) -> float:
  """Time of one decode step's matrix products alone: every decoder matrix ([out, in], as
  cpu_decode.DecodeView holds them) times `rows` rows, the way OutFirstDense runs them at that
  row count (`weights` 'w8a8': as it runs them for quantize='w8a8', rows quantized on the fly;
  'int8': int8 panels and scales, quantize='int8' with the panel kernel; `lanes`: packed for the
  panel kernel, generate.cpu_product='panels')."""
  int8 = weights == 'w8a8'
  llama = cfg.llama
  e, m = llama.hidden_size, llama.intermediate_size
  shapes = [(e, e)] * 4 + [(m, e)] * 2 + [(e, m)]
  key = jax.random.key(0)
  mats = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
          for i, shape in enumerate(shapes * llama.num_layers + [(llama.vocab_size, e)])]
  outs = [w.shape[0] for w in mats]
  scales = [None] * len(mats)
  if int8 or (weights == 'int8' and lanes):
    import qwix
    mats = [qwix.quantize(w, 'int8', channelwise_axes=(0,)) for w in mats]
    if not int8:
      scales = [w.scale.reshape(-1) for w in mats]
      mats = [panel_kernel.pack(w.qvalue, lanes) for w in mats]
  elif lanes:
    mats = [panel_kernel.pack(w, lanes) for w in mats]

  @jax.jit
  def products(mats, scales, x):
    if int8:
      return [int8_rows_product(x[:, :w.qvalue.shape[1]], w, kernel_first=True) for w in mats]
    if lanes:
      return [panel_kernel.product(w, x[:, :w.shape[1]], out, scale)
              for w, out, scale in zip(mats, outs, scales)]
    return [cpu_decode.out_first_product(w, x[:, :w.shape[1]]) for w in mats]

  x = jnp.ones((rows, max(e, m)), jnp.float32)
  return time_fn(products, mats, scales, x) * 1e3


def timed(model, tokens, mask, images, measure, samples, **kw):
  """Best of three calls after a compiling one (seconds), and the last call's new tokens: on this
  shared 2-core machine single runs vary by up to ~8%. Before each call the matrix-vector
  bandwidth is measured again (`measure`, a `GemvBandwidth`) and appended to `samples`."""
  generate_ids(model, tokens, mask, images, **kw)
  best = float('inf')
  for _ in range(3):
    samples.append(measure(repeats=2))
    start = time.perf_counter()
    out = generate_ids(model, tokens, mask, images, **kw)
    best = min(best, time.perf_counter() - start)
  assert out.tokens.shape == (tokens.shape[0], kw['max_new_tokens'])
  return best, out.tokens


def run(model, cfg, batch, new_tokens, layer_loop, cache_chunk, cpu_product, measure):
  """(new tokens/s, seconds of the full call, seconds of a 1-token call, the best matrix-vector
  bandwidth measured between those calls, the full call's new tokens [batch, new_tokens])."""
  tokens, mask = left_pad(prompts(cfg, batch), multiple=64)
  images = bench_images(cfg, batch)
  # No early stop: exactly `new_tokens` per row.
  kw = dict(stop_ids=(), layer_loop=layer_loop, cache_chunk=cache_chunk, cpu_product=cpu_product)
  samples = []
  seconds, new = timed(model, tokens, mask, images, measure, samples, max_new_tokens=new_tokens,
                       **kw)
  # One new token: the fixed cost of a call (images to device, image encoding, prefill).
  fixed, _ = timed(model, tokens, mask, images, measure, samples, max_new_tokens=1, **kw)
  return batch * new_tokens / seconds, seconds, fixed, max(samples), new


def interleaved_steps(model, cfg, new_tokens, layer_loop, cache_chunk, cpu_product, rounds):
  """Per-step ms at batch 1 and batch 8 timed back to back, `rounds` times: each round times a
  1-token and a `new_tokens` call per batch, the step being their difference over the extra
  steps. The host's memory speed drifts over seconds (a noisy VM: the batch-1 step moved 4.5 ->
  7 ms between rounds), so the batch-8 / batch-1 ratio is taken per round, where both batches
  met the same host, and its median reported. Returns ({batch: [ms per round]}, ratios)."""
  kw = dict(stop_ids=(), layer_loop=layer_loop, cache_chunk=cache_chunk, cpu_product=cpu_product)
  calls = {}
  for batch in (1, 8):
    tokens, mask = left_pad(prompts(cfg, batch), multiple=64)
    calls[batch] = (tokens, mask, bench_images(cfg, batch))
  steps = {1: [], 8: []}
  for _ in range(rounds):
    for batch in (1, 8):
      seconds = {}
      for new in (1, new_tokens):
        start = time.perf_counter()
        generate_ids(model, *calls[batch], max_new_tokens=new, **kw)
        seconds[new] = time.perf_counter() - start
      steps[batch].append((seconds[new_tokens] - seconds[1]) / (new_tokens - 1) * 1e3)
  return steps, [b8 / b1 for b1, b8 in zip(steps[1], steps[8])]


def original_decoder(model):
  """The original's decoder for `model` (a RadFM): HF transformers' `LlamaForCausalLM` of the same
  sizes, eager attention, fp32, holding `model.llama`'s weights (written out through the
  checkpoint key map, as `radfm-jax convert to-torch` writes them)."""
  import torch
  import transformers
  from radfm_jax.convert import engine, keymap
  llama = model.cfg.llama
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=llama.vocab_size, hidden_size=llama.hidden_size,
      intermediate_size=llama.intermediate_size, num_hidden_layers=llama.num_layers,
      num_attention_heads=llama.num_heads, num_key_value_heads=llama.num_heads,
      rms_norm_eps=llama.rms_norm_eps, rope_theta=llama.rope_theta,
      max_position_embeddings=llama.max_position_embeddings, tie_word_embeddings=False,
      attn_implementation='eager', bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()
  weights = engine.state_dict_of(model.llama, keymap.llama_table(ours='', torch=''))
  missing, unexpected = hf.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=False)
  assert not unexpected and not [k for k in missing if 'rotary' not in k], (missing, unexpected)
  return hf


def original_generate(hf, embeds, new_tokens, **kw):
  """Greedy ids of the original's `generate(inputs_embeds=...)` (no early stop), as HF's output
  (`kw`: more `generate` arguments, e.g. output_logits)."""
  import torch
  with torch.no_grad():
    return hf.generate(inputs_embeds=torch.from_numpy(np.array(embeds)),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kw)


def original_run(model, cfg, new_tokens):
  """The original's decoder on this machine (module docstring): (new tokens/s of a `new_tokens`
  call, seconds of that call, of a 1-token call, its greedy ids [new_tokens], a description)."""
  import torch
  import transformers
  hf = original_decoder(model)
  tokens = np.asarray(prompts(cfg, 1))
  embeds = model.embed_inputs(jnp.asarray(tokens, jnp.int32),      # eager: once, not timed
                              jnp.asarray(bench_images(cfg, 1)))
  times = {}
  for new in (new_tokens, 1):
    original_generate(hf, embeds, new)
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      ids = original_generate(hf, embeds, new)
      best = min(best, time.perf_counter() - start)
    times[new] = (best, ids)
  seconds, ids = times[new_tokens]
  about = (f'HF transformers {transformers.__version__} LlamaForCausalLM, torch '
           f'{torch.__version__}, eager attention, fp32, {torch.get_num_threads()} threads')
  return new_tokens / seconds, seconds, times[1][0], ids[0, -new_tokens:].numpy(), about


def profile_step(model, cfg, batch, new_tokens, layer_loop, cache_chunk, cpu_product, dump_dir,
                 repeats=3):
  """Per-category seconds of one decode step: (the `new_tokens` call - the 1-token call) /
  (new_tokens - 1), each call traced `repeats` times and each category's fastest call kept (the
  fixed cost, image encoder and prefill, is most of a short call, and its noise would swamp the
  steps'); each op categorised from its own module's HLO dump. Also returns both calls'
  per-category totals and the wall time per step."""
  tokens, mask = left_pad(prompts(cfg, batch), multiple=64)
  images = bench_images(cfg, batch)
  kw = dict(stop_ids=(), layer_loop=layer_loop, cache_chunk=cache_chunk, cpu_product=cpu_product)
  totals, walls = [], []
  for new in (1, new_tokens):
    generate_ids(model, tokens, mask, images, max_new_tokens=new, **kw)     # compile
    best, wall = None, float('inf')
    for _ in range(repeats):
      with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
          start = time.perf_counter()
          generate_ids(model, tokens, mask, images, max_new_tokens=new, **kw)
          wall = min(wall, time.perf_counter() - start)
        cats = xla_profile.by_category(xla_profile.self_times(trace, 'decode_loop'),
                                       xla_profile.hlo_from_dump(dump_dir))
      best = cats if best is None else {k: min(best[k], v) for k, v in cats.items()}
    totals.append(best)
    walls.append(wall)
  steps = new_tokens - 1
  per_step = {k: (totals[1][k] - totals[0][k]) / steps for k in totals[0]}
  return per_step, (walls[1] - walls[0]) / steps, totals


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='bench')
  parser.add_argument('--new', type=int, default=200)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--layer-loop', default='auto', choices=('auto', 'scan', 'unrolled'))
  parser.add_argument('--cache-chunk', type=int, default=GenerateConfig.cache_chunk,
                      help='generate.cache_chunk (0: one cache of the full length)')
  parser.add_argument('--profile', action='store_true',
                      help='also print where one decode step goes (XLA:CPU trace per HLO op)')
  parser.add_argument('--profile-tokens', type=int, default=65)
  parser.add_argument('--rounds', type=int, default=5,
                      help='rounds of batch 1 and batch 8 timed back to back for the median '
                      'batch-8 / batch-1 step ratio (0: not measured)')
  parser.add_argument('--no-original', dest='original', action='store_false',
                      help="do not time the original's decoder (HF transformers, torch)")
  parser.add_argument('--cpu-product', default='auto',
                      help="generate.cpu_product: auto, panels or xla, or several with commas "
                      "(each timed in turn, e.g. 'panels,xla')")
  parser.add_argument('--quantize', choices=MODES, default=None,
                      help='also time the same batches quantized (after the fp32 ones)')
  args = parser.parse_args()
  dump = tempfile.TemporaryDirectory() if args.profile else None
  if dump:
    # The optimised HLO of the decode program names each traced op's opcodes; XLA reads the
    # flags when the backend starts (below, at the first device use).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + xla_profile.dump_flags(dump.name, '.*decode_loop.*'))
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.1f}')
  cfg = model_config(args.size, compute_dtype=args.dtype, remat_policy='none')
  model = create_model(cfg, seed=0)
  print(f'config {args.size}, compute {args.dtype}, layer loop {args.layer_loop}, {args.new} new '
        f'tokens, greedy, {jax.devices()[0].platform} x{jax.device_count()}')
  llama = cfg.llama
  per_layer = 4 * llama.hidden_size ** 2 + 3 * llama.hidden_size * llama.intermediate_size
  weights = llama.num_layers * per_layer + llama.hidden_size * llama.vocab_size
  measure = GemvBandwidth()
  bandwidth = measure()
  # The bytes a decode step must read: every decoder weight once, fp32 (4 bytes) or int8 (1 byte
  # and one fp32 scale per output channel).
  step_bytes = {'fp32': 4 * weights, 'int8': weights + 4 * (
      llama.num_layers * (4 * llama.hidden_size + 3 * llama.intermediate_size)
      + llama.vocab_size)}
  for mode, weight_bytes in step_bytes.items():
    floor = weight_bytes / bandwidth * 1e3
    print(f'decoder weights read per step {weight_bytes / 2**20:.0f} MiB ({mode}); matrix-vector '
          f'bandwidth at the start {bandwidth / 1e9:.1f} GB/s -> floor {floor:.1f} ms/step, '
          f'ceiling {1e3 / floor:.0f} tokens/s at batch 1 (re-measured between the timed calls)')
    if not args.quantize:
      break
  # A batch-8 step also reads the KV cache: [batch, heads, slots, head_dim] k and v per layer,
  # fp32. XLA's attention reads every allocated slot (the cache grows by --cache-chunk); the
  # panel kernel's attention only those written so far.
  prompt_len = 64
  # --cache-chunk 0: one cache of prompt + new slots from the start.
  chunk = args.cache_chunk or prompt_len + args.new
  slots = np.mean([-(-(prompt_len + t + 1) // chunk) * chunk for t in range(args.new)])
  written = np.mean([prompt_len + t for t in range(args.new)])
  kv_read = {}   # batch 8's KV-cache bytes per step, by whether the panel kernel attends
  for who, what, n, key in (("XLA's attention", 'allocated', slots, False),
                            ("the panel kernel's", 'written', written, True)):
    kv_bytes = kv_read[key] = 8 * 2 * llama.num_layers * llama.hidden_size * n * 4
    print(f'batch 8 also reads the KV cache ({who}): {kv_bytes / 2**20:.0f} MiB per step at '
          f'the mean {n:.0f} {what} slots ({kv_bytes / bandwidth * 1e3:.1f} ms at that '
          f'bandwidth; batch 1: {kv_bytes / 8 / bandwidth * 1e3:.1f} ms)')
  original = None
  if args.original:
    if not all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
      print('the original is not timed: it needs torch and transformers (pip install -e ".[test]")')
    else:
      rate, seconds, fixed, original_ids, about = original_run(model, cfg, args.new)
      original = (rate, original_ids)
      print(f'the original decoder ({about}), batch 1: {rate:.1f} new tokens/s ({seconds:.2f} s '
            f'incl. its prefill); fixed cost {fixed * 1e3:.0f} ms, then '
            f'{(seconds - fixed) / (args.new - 1) * 1e3:.1f} ms per step')
  models = []
  for product in args.cpu_product.split(','):
    lanes = generate_lib.panel_lanes(model, product)
    label = f"{args.dtype}, cpu_product {product}" + (
        f' (panels of {lanes})' if lanes else " (XLA's products)" if product == 'auto' else '')
    models.append((label, model, product, lanes, 'fp32'))
  if args.quantize:
    # w8a8's products stay Qwix's int8 ones whatever cpu_product says; int8 weights alone take
    # the first --cpu-product's products: int8 panels with the panel kernel, else dequantized
    # into the decode view (fp32 bytes per step).
    product, lanes = models[0][2:4]
    models.append((f'{args.quantize} weights', quantize(model, args.quantize), product,
                   0 if args.quantize == 'w8a8' else lanes, args.quantize))
  for label, m, product, lanes, weights in models:
    steps, floors = {}, {}
    int8 = weights == 'w8a8'
    weight_bytes = step_bytes['int8' if int8 or (weights == 'int8' and lanes) else 'fp32']
    for batch in (1, 8):
      rate, seconds, fixed, between, new = run(m, cfg, batch, args.new, args.layer_loop,
                                               args.cache_chunk, product, measure)
      step_ms = (seconds - fixed) / (args.new - 1) * 1e3
      products = step_products_ms(cfg, batch, weights, lanes)
      steps[batch], floors[batch] = step_ms, weight_bytes / between * 1e3
      versus = (f'{rate / original[0]:5.1f}x the original at batch 1 (goal >= '
                f'{2 if batch == 1 else 10}x); ' if original else '')
      print(f'{label}, batch {batch}: {rate:8.1f} new tokens/s ({seconds:.2f} s incl. prefill)  '
            f'{versus}fixed cost '
            f'{fixed * 1e3:.0f} ms (a 1-token call), then {step_ms:.1f} ms per step '
            f'({step_ms / floors[batch]:.2f}x the floor of {floors[batch]:.1f} ms at the '
            f'{between / 1e9:.1f} GB/s measured between these calls), of which the matrix '
            f'products alone take {products:.1f} ms; load average {os.getloadavg()[0]:.1f}')
      if original and batch == 1:
        same = np.asarray(new[0]) == original[1]
        agree = len(same) if same.all() else int(np.argmin(same))
        print(f"{label}, batch 1: greedy ids equal to the original's for the first {agree} of "
              f"{args.new} (the model's random weights make near ties)")
      if dump:
        cats, wall, totals = profile_step(m, cfg, batch, args.profile_tokens, args.layer_loop,
                                          args.cache_chunk, product, dump.name)
        print(xla_profile.report(cats, wall, f'decode step at batch {batch}'))
        print('  (whole calls, ms: ' + ', '.join(
            f'{k} {totals[0][k] * 1e3:.0f} -> {totals[1][k] * 1e3:.0f}' for k in totals[0]
            if totals[1][k]) + f' for 1 -> {args.profile_tokens} new tokens; a negative step '
            'figure is noise)')
    apart = f'{label}: batch-8 step / batch-1 step {steps[8] / steps[1]:.2f}x'
    if args.rounds:      # the goal is read off the back-to-back rounds below
      apart += (' (the batches timed apart, seconds between them: what the host\'s speed did '
                'meanwhile is in it)')
    else:
      apart += ' (goal <= 1.4)'
    print(f'{apart}; batch-1 step / floor {steps[1] / floors[1]:.2f}x (goal <= 1.3)')
    if args.rounds:
      per_round, ratios = interleaved_steps(m, cfg, args.new, args.layer_loop, args.cache_chunk,
                                            product, args.rounds)
      print(f'{label}, batch 1 and 8 back to back, {args.rounds} rounds: batch-8 / batch-1 step '
            f'median {np.median(ratios):.2f}x (goal <= 1.4; rounds: '
            + ', '.join(f'{b8:.1f}/{b1:.1f} ms' for b1, b8 in zip(per_round[1], per_round[8]))
            + f'; ratios {min(ratios):.2f}-{max(ratios):.2f})')
      # Each batch at its own faster rounds: where the host was fast, whichever round that was.
      # (Choosing the rounds whose batch-1 step was fast biases the ratio upwards: a batch-8
      # call in the same round may have met a slower host.)
      low = {batch: np.percentile(per_round[batch], 25) for batch in (1, 8)}
      kv_bytes = kv_read[lanes > 0]
      print(f'{label}, the same rounds, each batch at its lower quartile: batch 8 {low[8]:.1f} ms '
            f'/ batch 1 {low[1]:.1f} ms = {low[8] / low[1]:.2f}x; the bytes alone would make it '
            f'{(weight_bytes + kv_bytes) / (weight_bytes + kv_bytes / 8):.2f}x (the weights once '
            f'and the KV cache of 8 rows against 1)')


if __name__ == '__main__':
  main()
