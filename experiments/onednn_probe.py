"""oneDNN in XLA:CPU and through jax.ffi: the compiled programs and the pieces.

Answers the question "does this jaxlib's XLA:CPU use oneDNN at all?"
from the optimised HLO of one 3x3 convolution's gradient under each oneDNN
option (custom-call targets, convolutions left, operand shapes), then times
each piece of one convolution (forward, input gradient, weight gradient) at
batch 128 and the three CIFAR ResNet stage shapes: XLA with the recommended
options, XLA's defaults, XLA's own oneDNN custom calls, and oneDNN's
primitives through `collab_jax.models.onednn_conv` (if `make onednn` built
it). Rounds interleaved; medians in ms. Writes bench_onednn.md and .json.

  python experiments/onednn_probe.py --out=experiments/results   # ~2 min
"""

import argparse
import collections
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from collab_jax import models
from collab_jax.models import onednn_conv

DN = ('NHWC', 'HWIO', 'NHWC')
PAD = ((1, 1), (1, 1))
SHAPES = ((16, 32), (32, 16), (64, 8))  # channels, height = width
ONEDNN = {'xla_cpu_use_onednn': True}
ONEDNN_CC = {**ONEDNN, 'xla_cpu_experimental_onednn_custom_call': True}


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN)


def pieces(conv):
  """{piece: f(x, w, dy)} for forward, input and weight gradient."""
  return {
      'forward': lambda x, w, dy: conv(x, w),
      'input gradient': lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](
          dy)[0],
      'weight gradient': lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](
          dy)[0],
  }


def _ffi_pieces():
  """The three custom calls of onednn_conv, one per piece."""
  call = onednn_conv._call  # pylint: disable=protected-access
  return {
      'forward': lambda x, w, dy: call('fwd', dy.shape, x, w, (1, 1), PAD),
      'input gradient': lambda x, w, dy: call('bwd_data', x.shape, dy, w,
                                              (1, 1), PAD),
      'weight gradient': lambda x, w, dy: call('bwd_w', w.shape, x, dy,
                                               (1, 1), PAD),
  }


def programs():
  """The optimised HLO of a convolution's gradient under each option."""
  x, w = jnp.zeros((128, 32, 32, 16)), jnp.zeros((3, 3, 16, 16))
  grad = jax.grad(lambda x, w: jnp.sum(_conv(x, w) ** 2), argnums=(0, 1))
  recommended = models.compiler_options('cpu')
  rows = []
  for name, extra in (
      ('recommended', {}), ('xla_cpu_use_onednn', ONEDNN),
      ('+ xla_cpu_experimental_onednn_custom_call', ONEDNN_CC),
      ('+ xla_cpu_experimental_onednn_fusion_type=CONVOLUTION',
       {**ONEDNN, 'xla_cpu_experimental_onednn_fusion_type':
                  'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'})):
    try:
      text = jax.jit(grad).lower(x, w).compile(
          compiler_options={**recommended, **extra}).as_text()
    except Exception as e:  # pylint: disable=broad-except
      rows.append({'options': name, 'error': str(e).splitlines()[0][:200]})
      continue
    calls = re.findall(r'= (\(?[^=]*?\)?) custom-call\(([^)]*)\), '
                       r'custom_call_target="([^"]+)"', text)
    entry = text[text.index('ENTRY'):]
    rows.append({
        'options': name,
        'convolutions': len(re.findall(r' convolution\(', text)),
        'custom_calls': dict(collections.Counter(t for _, _, t in calls)),
        'custom_call_outputs': [re.search(r'\w+\[[\d,]*\]', s).group()
                                for s, _, _ in calls],
        'onednn_kernel_shapes': re.findall(
            r'"filter":\{[^}]*"shape":\[([^\]]*)\]', text),
        'transposes_in_entry': len(re.findall(r'transpose', entry)),
    })
  return rows


def time_pieces(rounds, calls):
  """{(channels, piece, implementation): [median ms per round]}."""
  rng = np.random.default_rng(0)
  recommended = models.compiler_options('cpu')
  impls = {'XLA (recommended)': (pieces(_conv), recommended),
           'XLA defaults': (pieces(_conv), {}),
           'XLA oneDNN custom calls': (pieces(_conv),
                                       {**recommended, **ONEDNN_CC})}
  if onednn_conv.available():
    impls['oneDNN via jax.ffi'] = (_ffi_pieces(), recommended)
  compiled = {}
  for c, h in SHAPES:
    x, dy = (jnp.asarray(rng.normal(size=(128, h, h, c)), jnp.float32)
             for _ in range(2))
    w = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
    for impl, (fns, options) in impls.items():
      for piece, f in fns.items():
        compiled[(c, piece, impl)] = (jax.jit(f).lower(x, w, dy).compile(
            compiler_options=options), (x, w, dy))
  times = collections.defaultdict(list)
  for _ in range(rounds):
    for key, (f, args) in compiled.items():
      jax.block_until_ready(f(*args))
      t = []
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        t.append(time.perf_counter() - start)
      times[key].append(1e3 * statistics.median(t))
  return times, list(impls)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='experiments/results')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--calls', type=int, default=7)
  args = p.parse_args()
  if args.rounds < 1 or args.calls < 1:
    p.error('--rounds and --calls must be positive')
  start = time.time()
  load = os.getloadavg()[0]
  progs = programs()
  times, impls = time_pieces(args.rounds, args.calls)
  result = {
      'command': 'python experiments/onednn_probe.py ' + ' '.join(
          f'--{k}={v}' for k, v in vars(args).items()),
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
      'jax': jax.__version__, 'python': platform.python_version(),
      'onednn_ffi': onednn_conv.version(), 'load_start': load,
      'load_end': os.getloadavg()[0], 'total_s': time.time() - start,
      'programs': progs,
      'pieces_ms': [{'channels': c, 'size': h, 'piece': piece, 'impl': impl,
                     'round_ms': times[(c, piece, impl)],
                     'ms': statistics.median(times[(c, piece, impl)])}
                    for c, h in SHAPES for piece in pieces(_conv)
                    for impl in impls]}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'bench_onednn.json'), 'w') as f:
    json.dump(result, f, indent=1)
  L = ['# oneDNN in XLA:CPU and through jax.ffi', '',
       f'Generated by `{result["command"]}` on {result["date"]} '
       f'({result["total_s"]:.0f} s; jax {result["jax"]}, oneDNN via jax.ffi '
       f'{result["onednn_ffi"] or "not built"}; load {load:.2f} at start, '
       f'{result["load_end"]:.2f} at end). How to read it: '
       'experiments/README.md, "Benchmark".', '',
       '## The gradient of one 3x3 convolution (batch 128, 16 channels, '
       '32x32), optimised HLO', '',
       '| options (besides the recommended) | convolution ops | custom calls '
       '| custom-call outputs | kernel shape oneDNN is given | transposes in '
       'ENTRY |', '|---|---|---|---|---|---|']
  for r in progs:
    if 'error' in r:
      L.append(f'| {r["options"]} | not compiled: {r["error"]} |||||')
      continue
    L.append(f'| {r["options"]} | {r["convolutions"]} '
             f'| {r["custom_calls"] or "none"} '
             f'| {", ".join(r["custom_call_outputs"]) or "—"} '
             f'| {"; ".join(r["onednn_kernel_shapes"]) or "—"} '
             f'| {r["transposes_in_entry"]} |')
  L += ['', '## Each piece of one convolution, batch 128 (ms, median of '
        f'{args.rounds} interleaved rounds)', '',
        '| stage shape | piece | ' + ' | '.join(impls) + ' |',
        '|---|---|' + '---|' * len(impls)]
  for c, h in SHAPES:
    for piece in pieces(_conv):
      L.append(f'| {c} channels, {h}x{h} | {piece} | ' + ' | '.join(
          f'{statistics.median(times[(c, piece, i)]):.1f}' for i in impls)
               + ' |')
  with open(os.path.join(args.out, 'bench_onednn.md'), 'w') as f:
    f.write('\n'.join(L) + '\n')
  print('\n'.join(L))


if __name__ == '__main__':
  main()
