"""PyTorch peer reference for the training-step benchmark (CPU).

What a PyTorch user would write for collaborative learning (Song & Chai 2018,
Sec. 3) on a CIFAR ResNet-32, timed on the same step as ours, so the JAX
numbers have an independent yardstick on the same machine:

* network: CIFAR ResNet-32 as in `collab_jax/models/cifar_resnet.py`: 3 stages
  (16/32/64 channels, 5 basic blocks each; stem conv3x3 + BN + ReLU in stage 0;
  global average pool + Linear in stage 2), option-A shortcuts (subsample
  `::2`, zero-pad channels), no conv bias, BN momentum 0.1 / eps 1e-5 (torch's
  convention, equal to our flax momentum 0.9). 464,154 parameters for 10
  classes.
* head tree: `splits = ((stage_index, branches), ...)` as in
  `collab_jax/heads.py` (split *before* stage `stage_index`; heads = product of
  branch counts). Branches are a Python loop over separate modules, and every
  split point passes the shared activation through `_BackpropRescale`
  (identity forward, gradient times `1/branches` backward; paper eq. 5-6).
* loss: `sum_h beta * CE(y, z_h) + (1 - beta) * T^2 * CE(q_h, softmax(z_h/T))`
  with `q_h = softmax(mean_{j != h} z_j / T)` detached; beta = 0.5, T = 2;
  plain CE for one head. Batch means, as in `collab_jax/losses.py`.
* step: SGD(lr 0.1, momentum 0.9, nesterov False, weight_decay 1e-4, torch's
  coupled decay), `zero_grad(set_to_none=True)`, forward, backward, step, on a
  fixed random batch of 128 x 3 x 32 x 32 floats and random labels.

torch is imported lazily: this module imports without torch, and `measure`
raises a clear error if it is missing. The benchmark runs it as a script in
its own Python 3.11 venv (`make bench` builds `.venv-torch` with the CPU wheel
`torch==2.13.0`), never imported into the JAX process; it prints JSON.

Usage:
  .venv-torch/bin/python experiments/torch_reference.py \
      --graphs single,h4_hierarchical --threads 1,2 --steps 10 --json -
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Dict, Sequence, Tuple

Splits = Tuple[Tuple[int, int], ...]

NUM_STAGES = 3


def _load_paper():
  """collab_jax/paper.py by its path: importing the package would import jax."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'collab_jax', 'paper.py')
  spec = importlib.util.spec_from_file_location('collab_jax_paper', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_PAPER = _load_paper()
GRAPHS: Dict[str, Splits] = {g: _PAPER.splits(g, NUM_STAGES) for g in _PAPER.TOPOLOGIES}
FORMATS = ('channels_last', 'nchw')


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _torch():
  try:
    import torch
  except ImportError:
    raise ImportError(
        'experiments/torch_reference.py needs PyTorch; on CPU install the '
        "benchmark's build with `pip install torch==2.13.0`.") from None
  return torch


def num_heads(splits) -> int:
  return math.prod(b for _, b in splits)


def validate_splits(splits, num_stages: int = NUM_STAGES) -> Splits:
  """Same rules as `collab_jax.heads.validate_splits` (strictly increasing
  stage indices in `[0, num_stages)`, at least 2 branches per split)."""
  pairs = tuple((int(s), int(b)) for s, b in splits)
  previous = -1
  for s, b in pairs:
    if not 0 <= s < num_stages:
      raise ValueError(f'splits={splits!r}: split index {s} not in '
                       f'[0, {num_stages - 1}].')
    if b < 2:
      raise ValueError(f'splits={splits!r}: a split needs >= 2 branches.')
    if s <= previous:
      raise ValueError(f'splits={splits!r}: indices must strictly increase.')
    previous = s
  return pairs


@functools.lru_cache(maxsize=None)
def _impl():
  """Defines the torch modules on first use (so importing needs no torch)."""
  torch = _torch()
  nn = torch.nn
  F = torch.nn.functional

  class BackpropRescale(torch.autograd.Function):
    """Identity forward; the incoming gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x, scale):
      ctx.scale = scale
      return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
      return grad * ctx.scale, None

  def conv3x3(cin, cout, stride=1):
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    # He et al. 2015, fan-out (as collab_jax.models.layers.conv_init).
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
    return conv

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

  class BasicBlock(nn.Module):

    def __init__(self, cin, cout, stride=1):
      super().__init__()
      self.conv1 = conv3x3(cin, cout, stride)
      self.bn1 = bn(cout)
      self.conv2 = conv3x3(cout, cout)
      self.bn2 = bn(cout)
      self.stride = stride
      self.pad = cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.stride != 1 or self.pad:  # option A: subsample, zero-pad channels
        x = x[:, :, ::self.stride, ::self.stride]
        x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
      return F.relu(x + y)

  class Stage(nn.Module):
    """Optional stem, `num_blocks` basic blocks, optional pool + classifier."""

    def __init__(self, cin, cout, num_blocks, stride=1, stem=False,
                 num_classes=None):
      super().__init__()
      self.stem = nn.Sequential(conv3x3(cin, cout), bn(cout),
                                nn.ReLU()) if stem else None
      c = cout if stem else cin
      blocks = []
      for i in range(num_blocks):
        blocks.append(BasicBlock(c, cout, stride if i == 0 else 1))
        c = cout
      self.blocks = nn.Sequential(*blocks)
      self.classifier = (nn.Linear(cout, num_classes)
                         if num_classes is not None else None)

    def forward(self, x):
      if self.stem is not None:
        x = self.stem(x)
      x = self.blocks(x)
      if self.classifier is not None:
        x = self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
      return x

  def resnet_stages(depth=32, num_classes=10, width=16):
    """Stage factories (zero-argument callables) of a CIFAR ResNet."""
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth {depth} is not 6n + 2.')
    n = (depth - 2) // 6
    return (
        lambda: Stage(3, width, n, stem=True),
        lambda: Stage(width, 2 * width, n, stride=2),
        lambda: Stage(2 * width, 4 * width, n, stride=2,
                      num_classes=num_classes),
    )

  class HeadTree(nn.Module):
    """Stages with a tree of heads; returns logits `[H, B, C]`.

    `trunk` holds the stages before the first split; `level_{i}` is a
    ModuleList with one `Sequential` of the stages between split `i` and the
    next per branch (row-major: branch `parent * b + j`), each with its own
    parameters and BatchNorm statistics.
    """

    def __init__(self, stage_factories, splits=()):
      super().__init__()
      splits = validate_splits(splits, len(stage_factories))
      self.splits = splits
      bounds = [s for s, _ in splits] + [len(stage_factories)]
      self.trunk = nn.Sequential(*[f() for f in stage_factories[:bounds[0]]])
      self.levels = nn.ModuleList()
      paths = 1
      for level, (start, b) in enumerate(splits, 1):
        paths *= b
        self.levels.append(nn.ModuleList(
            nn.Sequential(*[f() for f in stage_factories[start:bounds[level]]])
            for _ in range(paths)))

    @property
    def num_heads(self):
      return num_heads(self.splits)

    def forward(self, x):
      xs = [self.trunk(x)]
      for (_, b), branches in zip(self.splits, self.levels):
        outs = []
        for parent, xp in enumerate(xs):
          xp = BackpropRescale.apply(xp, 1.0 / b)
          for j in range(b):
            outs.append(branches[parent * b + j](xp))
        xs = outs
      return torch.stack(xs)

  def collaborative_loss(logits, labels, beta=0.5, temperature=2.0):
    """Sum over heads of the paper's head loss (eq. 2-4); batch means."""
    heads = logits.shape[0]
    hard = torch.stack([F.cross_entropy(z, labels) for z in logits])
    if heads == 1:
      return hard.sum()
    with torch.no_grad():
      others = (logits.sum(0, keepdim=True) - logits) / (heads - 1)
      q = F.softmax(others / temperature, dim=-1)
    logp = F.log_softmax(logits / temperature, dim=-1)
    soft = -(q * logp).sum(-1).mean(-1)  # [H]
    return (beta * hard
            + (1.0 - beta) * temperature ** 2 * soft).sum()

  return dict(torch=torch, BackpropRescale=BackpropRescale, Stage=Stage,
              resnet_stages=resnet_stages, HeadTree=HeadTree,
              collaborative_loss=collaborative_loss)


def build_model(splits=(), depth=32, num_classes=10):
  impl = _impl()
  return impl['HeadTree'](impl['resnet_stages'](depth, num_classes), splits)


def count_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


def collaborative_loss(logits, labels, beta=0.5, temperature=2.0):
  return _impl()['collaborative_loss'](logits, labels, beta, temperature)


def measure(splits, *, batch=128, channels_last=True, steps=8, warmup=3,
            num_classes=10, depth=32, seed=0, lr=0.1, momentum=0.9,
            weight_decay=1e-4, num_threads=None, profile_steps=0) -> dict:
  """Times full training steps of the head tree `splits` on CPU.

  Returns a dict with the median step time (`step_s`, seconds),
  `images_per_s` (= batch / step_s), the number of timed `steps`, the torch
  version and thread count, and the configuration. `num_threads` defaults
  to `os.cpu_count()` (passed to `torch.set_num_threads`). With
  `profile_steps`, also `profile`: where those steps' time goes by op class
  (`profile_by_class`).
  """
  torch = _torch()
  splits = validate_splits(splits)
  threads = num_threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = build_model(splits, depth, num_classes)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt).train()
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                        nesterov=False, weight_decay=weight_decay)
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(batch, 3, 32, 32, generator=gen).contiguous(
      memory_format=fmt)
  labels = torch.randint(0, num_classes, (batch,), generator=gen)

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(images)
    with torch.profiler.record_function('collab_loss'):
      loss = collaborative_loss(logits, labels)
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step()
  times = []
  cpu_start = _cpu_s()
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  cpu_s = _cpu_s() - cpu_start
  step_s = statistics.median(times)
  extra = {}
  if profile_steps:
    extra['profile'] = profile_by_class(step, profile_steps)
  return {**extra,
      'splits': [list(s) for s in splits],
      'heads': num_heads(splits),
      'batch': batch,
      'memory_format': 'channels_last' if channels_last else 'nchw',
      'step_s': step_s,
      'step_s_min': min(times),
      'step_times_s': times,
      # Process CPU time per step: the work, whatever the other load.
      'cpu_s_per_step': cpu_s / steps,
      'images_per_s': batch / step_s,
      'steps': steps,
      'warmup': warmup,
      'final_loss': loss.item(),
      'params': count_params(model),
      'torch_version': torch.__version__,
      'num_threads': torch.get_num_threads(),
      'mkldnn': bool(torch.backends.mkldnn.is_available()
                     and torch.backends.mkldnn.enabled),
  }


# Op classes of bench.py's profile table (experiments/op_profile.py has ours).
# Backward ops are named by their autograd node; forward ops by the aten op
# or the record_function around them.
_LOSS_NODES = ('LogSoftmax', 'NllLoss', 'Softmax', 'Stack', 'Sum', 'Mul',
               'Div', 'Mean', 'Neg')


def _torch_class(names):
  """The class of an op from its own and its ancestors' names (innermost first)."""
  joined = ' '.join(names)
  if 'Optimizer.' in joined or 'AccumulateGrad' in joined:
    return 'optimizer'
  if 'ConvolutionBackward' in joined:
    return 'conv backward'
  if 'BatchNorm' in joined or 'batch_norm' in joined:
    return 'BatchNorm'
  if 'collab_loss' in joined or any(
      f'{n}Backward' in joined for n in _LOSS_NODES):
    return 'loss'
  if 'convolution' in joined or 'conv2d' in joined:
    return 'conv forward'
  if any(k in names[0] for k in ('aten::copy_', 'aten::clone',
                                 'aten::contiguous')):
    return 'layout transposes/copies'
  return 'elementwise (network)'


def _onednn_conv_ms(step, steps):
  """oneDNN's own execution times (ms per step) of convolution backward data
  and backward weights primitives, from its verbose lines on stdout."""
  import tempfile
  torch = _torch()
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile(mode='w+') as f:
    os.dup2(f.fileno(), 1)
    try:
      with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        for _ in range(steps):
          step()
    finally:
      sys.stdout.flush()
      os.dup2(saved, 1)
      os.close(saved)
    f.seek(0)
    out = {'backward_data': 0.0, 'backward_weights': 0.0}
    for line in f:
      fields = line.strip().split(',')
      if 'exec' in fields and 'convolution' in fields:
        for kind in out:
          if kind in fields:
            out[kind] += float(fields[-1]) / steps
  return out


def profile_by_class(step, steps):
  """Seconds per step by op class: each op's self CPU time (wall time on the
  thread that called it; oneDNN's threads work inside it).

  torch.profiler sees one ConvolutionBackward op per convolution; it is
  split into input and weight gradient in the ratio of oneDNN's own
  execution times of the two primitives (a separate pass with oneDNN's
  verbose mode, which slows what it prints).
  """
  torch = _torch()
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      step()
    wall = time.perf_counter() - start
  classes = {}
  for e in prof.events():
    names, parent = [e.name], e.cpu_parent
    while parent is not None:
      names.append(parent.name)
      parent = parent.cpu_parent
    cls = _torch_class(names)
    classes[cls] = classes.get(cls, 0.0) + e.self_cpu_time_total / 1e6 / steps
  backward = classes.pop('conv backward', 0.0)
  onednn = _onednn_conv_ms(step, steps)
  total = sum(onednn.values())
  share = onednn['backward_data'] / total if total else 0.5
  classes['conv input gradient'] = backward * share
  classes['conv weight gradient'] = backward * (1 - share)
  return {'wall_s_per_step': wall / steps, 'classes': classes,
          'onednn_ms_per_step': onednn, 'steps': steps}


def _cpu_s():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--graphs', default='single,h4_hierarchical',
                 help=f'comma-separated names from {sorted(GRAPHS)}')
  p.add_argument('--formats', default='channels_last,nchw',
                 help=f'comma-separated memory formats from {FORMATS}')
  p.add_argument('--threads', default=str(os.cpu_count() or 1),
                 help='comma-separated torch.set_num_threads values')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--depth', type=int, default=32,
                 help='CIFAR ResNet depth (6n + 2; 8 for smoke tests)')
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--profile', type=int, default=0,
                 help='also profile this many steps by op class')
  p.add_argument('--json', default=None,
                 help='write the results here as JSON ("-": stdout, with the '
                 'table on stderr)')
  args = p.parse_args(argv)
  args.threads = [int(t) for t in args.threads.split(',') if t]
  args.graphs = [g for g in args.graphs.split(',') if g]
  args.formats = [f for f in args.formats.split(',') if f]
  for g in args.graphs:
    if g not in GRAPHS:
      p.error(f'unknown graph {g!r}; choose from {sorted(GRAPHS)}')
  for f in args.formats:
    if f not in FORMATS:
      p.error(f'unknown format {f!r}; choose from {FORMATS}')
  return args


def main(argv=None):
  """Every (format, threads, graph), graphs adjacent; prints a table and JSON."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  table = sys.stderr if args.json == '-' else sys.stdout
  results = []
  print(f'{"graph":<16} {"format":<14} {"threads":>7} {"heads":>5} '
        f'{"params":>9} {"step ms":>9} {"img/s":>8}', file=table)
  for fmt in args.formats:
    for threads in args.threads:
      for graph in args.graphs:
        r = measure(GRAPHS[graph], batch=args.batch, depth=args.depth,
                    channels_last=fmt == 'channels_last', steps=args.steps,
                    warmup=args.warmup, num_threads=threads,
                    profile_steps=args.profile)
        r['graph'] = graph
        r['load_1min'] = os.getloadavg()[0]
        results.append(r)
        print(f'{graph:<16} {fmt:<14} {threads:>7} {r["heads"]:>5} '
              f'{r["params"]:>9,} {1e3 * r["step_s"]:>9.1f} '
              f'{r["images_per_s"]:>8.1f}', file=table, flush=True)
  if results:
    print(f'torch {results[0]["torch_version"]}, batch {args.batch}, median '
          f'of {args.steps} steps after {args.warmup} warm-up', file=table)
  out = {'results': results, 'python': platform.python_version(),
         'torch': results[0]['torch_version'] if results else None}
  if args.json == '-':
    print(json.dumps(out))
  elif args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return results


if __name__ == '__main__':
  main()
