"""Where a compiled XLA:CPU step spends its time, by kind of operation.

`bench.py`'s profile section traces a few steps with `jax.profiler` and sums
the duration of every executed HLO op (the trace's events carry the HLO
instruction names) into classes: convolution forward, input gradient and
weight gradient; the layout transposes and copies XLA:CPU adds around
convolutions; BatchNorm; the rest of the network's elementwise work; the loss;
the optimizer; the on-device augmentation. The class of an op comes from the
compiled program: convolutions by their operands and outputs, everything else
by the Python source its HLO metadata points at (flax's normalization.py,
optax, collab_jax/augment.py, ...). The PyTorch peer's side of the same table
is `torch_reference.py --profile`.

Op durations are wall time on the thread that ran the op; XLA:CPU may run two
independent ops at once, so the classes can add up to more than the step.
"""

import bisect
import collections
import glob
import os
import re
import time

import jax

CLASSES = ('conv forward', 'conv input gradient', 'conv weight gradient',
           'layout transposes/copies', 'BatchNorm', 'elementwise (network)',
           'loss', 'optimizer', 'augmentation', 'other')
# Ops that only hold others (their nested ops have events of their own) or
# move nothing.
_CONTAINERS = {'call', 'while', 'conditional', 'tuple', 'get-tuple-element',
               'parameter', 'constant', 'bitcast', 'opt-barrier',
               'after-all', 'partition-id'}
_ONEDNN_TARGETS = {'collab_onednn_conv_fwd': 'conv forward',
                   'collab_onednn_conv_bwd_data': 'conv input gradient',
                   'collab_onednn_conv_bwd_w': 'conv weight gradient'}
# Source files (in the stack of an op's metadata) to class, first match wins.
_SOURCE_CLASSES = (('augment.py', 'augmentation'),
                   ('flax/linen/normalization.py', 'BatchNorm'),
                   ('optax/losses', 'loss'), ('collab_jax/losses.py', 'loss'),
                   ('optax/', 'optimizer'),
                   ('collab_jax/heads.py', 'elementwise (network)'),
                   ('collab_jax/models/', 'elementwise (network)'))

_INSTR = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$')
_HEADER = re.compile(r'^(?:ENTRY )?%([\w.\-]+) ')


def _tables(text):
  """The stack frame tables of a compiled HLO text: {frame id: [file, ...]}."""
  sections = collections.defaultdict(dict)
  current = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = line
      continue
    if current is None:
      continue
    m = re.match(r'(\d+) (.*)$', line)
    if not m:
      current = None
      continue
    sections[current][int(m.group(1))] = m.group(2)
  files = {k: v.strip('"') for k, v in sections['FileNames'].items()}
  location_file = {}
  for k, v in sections['FileLocations'].items():
    m = re.search(r'file_name_id=(\d+)', v)
    location_file[k] = files.get(int(m.group(1)), '') if m else ''
  frames = {}
  for k, v in sections['StackFrames'].items():
    loc = re.search(r'file_location_id=(\d+)', v)
    parent = re.search(r'parent_frame_id=(\d+)', v)
    frames[k] = (location_file.get(int(loc.group(1)), '') if loc else '',
                 int(parent.group(1)) if parent else 0)
  stacks = {}
  for k in frames:
    stack, seen, f = [], set(), k
    while f in frames and f not in seen:
      seen.add(f)
      stack.append(frames[f][0])
      f = frames[f][1]
    stacks[k] = stack
  return stacks


def _parse(text):
  """{computation: [instruction dict]} of a compiled HLO module's text."""
  computations, current = collections.defaultdict(list), None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and line.rstrip().endswith('{'):
      current = header.group(1)
      continue
    m = _INSTR.match(line)
    if m is None or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    frame = re.search(r'stack_frame_id=(\d+)', rest)
    computations[current].append({
        'name': name, 'shape': shape, 'opcode': opcode,
        'op_name': (re.search(r'op_name="([^"]*)"', rest) or [None, ''])[1],
        'frame': int(frame.group(1)) if frame else None,
        'calls': re.findall(r'calls=%([\w.\-]+)', rest),
        'target': (re.search(r'custom_call_target="([^"]*)"', rest)
                   or [None, ''])[1]})
  return computations


def _conv_class(instr, batch):
  """Forward, input or weight gradient, from the op's name and output."""
  dims = re.findall(r'\[([\d,]*)\]', instr['shape'])
  first = int(dims[0].split(',')[0]) if dims and dims[0] else -1
  backward = 'transpose(' in instr['op_name'] or not instr['op_name']
  if first != batch:  # the output is a kernel, not a batch of images
    return 'conv weight gradient'
  return 'conv input gradient' if backward else 'conv forward'


def op_classes(text, batch):
  """{HLO instruction name: class} for a compiled program's text.

  `batch` tells weight gradients (outputs without the batch dimension) from
  forward and input-gradient convolutions.
  """
  stacks = _tables(text)
  computations = _parse(text)

  def source_class(instr):
    for path in stacks.get(instr['frame'], ()):
      for key, cls in _SOURCE_CLASSES:
        if key in path:
          return cls
    return None

  def inner(instr, seen=()):
    """The instruction and those of the computations it fuses."""
    out = [instr]
    for c in instr['calls']:
      if c not in seen:
        for i in computations.get(c, ()):
          out += inner(i, seen + (c,))
    return out

  classes = {}
  for instrs in computations.values():
    for instr in instrs:
      if instr['opcode'] in _CONTAINERS:
        classes[instr['name']] = None  # its nested ops are counted
        continue
      parts = inner(instr) if instr['opcode'] == 'fusion' else [instr]
      convs = [i for i in parts if i['opcode'] == 'convolution' or
               i['target'] == '__onednn$convolution']
      if instr['target'] in _ONEDNN_TARGETS:
        cls = _ONEDNN_TARGETS[instr['target']]
      elif convs:
        cls = _conv_class(convs[-1], batch)
      elif ('transpose' in instr['name'] or
            instr['opcode'] in ('copy', 'transpose')):
        cls = 'layout transposes/copies'
      else:
        votes = collections.Counter(
            c for c in map(source_class, parts) if c is not None)
        cls = votes.most_common(1)[0][0] if votes else 'other'
      classes[instr['name']] = cls
  return classes


def _minus(interval, covers):
  """Parts of `interval` (a, b) outside the sorted, disjoint `covers`."""
  a, b = interval
  out = []
  for c, d in covers:
    if d <= a or c >= b:
      continue
    if c > a:
      out.append((a, c))
    a = max(a, d)
  if a < b:
    out.append((a, b))
  return out


def _union(intervals):
  out = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], b))
    else:
      out.append((a, b))
  return out


def attribute(lines, is_conv):
  """Wall time per op name from trace lines.

  `lines`: per thread, (named ops [(name, start, end)], pool task regions
  [(start, end)]). XLA:CPU runs a convolution's Eigen kernels, and the other
  partitions of a parallel loop, as pool tasks without an op name. A task's
  unnamed time goes to the named op running on another thread at that moment
  (a parallel loop's partition), or else to the convolution (`is_conv(name)`)
  last started before it. Each instant of the step is split equally between
  the threads busy in it, so the values add up to the time any op ran.

  Returns ({name: seconds}, {k: seconds with k threads busy}).
  """
  segments = []  # (start, end, thread, name)
  for t, (named, regions) in enumerate(lines):
    segments += [(a, b, t, n) for n, a, b in named]
    covers = _union([(a, b) for _, a, b in named])
    for region in regions:
      segments += [(a, b, t, None) for a, b in _minus(region, covers)]
  named_all = sorted((a, b, t, n) for a, b, t, n in segments if n)
  starts = [a for a, _, _, _ in named_all]
  longest = max((b - a for a, b, _, _ in named_all), default=0)
  conv_starts = [(a, n) for a, _, _, n in named_all if is_conv(n)]
  conv_times = [a for a, _ in conv_starts]
  resolved = []
  for a, b, t, n in segments:
    if n is not None:
      resolved.append((a, b, t, n))
      continue
    pieces = [(a, b)]
    first = bisect.bisect_left(starts, a - longest)
    for c, d, u, m in named_all[first:]:  # named ops of other threads in [a, b)
      if c >= b:
        break
      if u == t or d <= a:
        continue
      lo, hi = max(a, c), min(b, d)
      resolved.append((lo, hi, t, m))
      pieces = [p for piece in pieces for p in _minus(piece, [(lo, hi)])]
    for lo, hi in pieces:
      i = bisect.bisect_right(conv_times, lo)
      resolved.append((lo, hi, t, conv_starts[i - 1][1] if i else '(pool task)'))
  points = sorted({x for a, b, _, _ in resolved for x in (a, b)})
  index = {x: i for i, x in enumerate(points)}
  # Busy threads per elementary interval, then each segment's share.
  count = [set() for _ in points]
  for a, b, t, _ in resolved:
    for i in range(index[a], index[b]):
      count[i].add(t)
  share = [(points[i + 1] - points[i]) / len(count[i]) / 1e9 if count[i]
           else 0.0 for i in range(len(points) - 1)]
  out = collections.Counter()
  for a, b, t, n in resolved:
    out[n] += sum(share[index[a]:index[b]])
  busy = collections.Counter()
  for i in range(len(points) - 1):
    busy[len(count[i])] += (points[i + 1] - points[i]) / 1e9
  return dict(out), dict(busy)


def trace_ops(step, trace_dir, classes, steps=3):
  """Runs `steps` traced steps of a compiled bench.Step.

  `classes`: `op_classes` of its program (containers are left out: the ops
  inside them have their own events).

  Returns {'wall_s_per_step', 'ops': {HLO name: seconds per step},
  'threads_busy_s_per_step': {k: seconds with k threads in an op}}.
  """
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  for _ in range(2):
    step()
    step.sync()
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(steps):
    step()
    step.sync()
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                          recursive=True), key=os.path.getmtime)[-1]
  plane = [p for p in _profile_data.ProfileData.from_file(path).planes
           if p.name == '/host:CPU'][0]
  lines = []
  for line in plane.lines:
    if 'XLA' not in line.name:
      continue
    named, regions, opened = [], [], None
    for e in sorted(line.events, key=lambda e: e.start_ns):
      if e.name == 'ThreadpoolListener::StartRegion':
        opened = e.start_ns
      elif e.name == 'ThreadpoolListener::StopRegion':
        if opened is not None:
          regions.append((opened, e.start_ns))
        opened = None
      elif not e.name.startswith(('ThunkExecutor', 'ThreadpoolListener',
                                  'end:', 'SlinkyThreadPool')):
        if classes.get(e.name, 'other') is not None:
          named.append((e.name, e.start_ns, e.start_ns + e.duration_ns))
    lines.append((named, regions))
  ops, busy = attribute(
      lines, lambda n: str(classes.get(n, '')).startswith('conv'))
  return {'wall_s_per_step': wall / steps,
          'ops': {k: v / steps for k, v in ops.items()},
          'threads_busy_s_per_step': {str(k): v / steps
                                      for k, v in sorted(busy.items())}}


def by_class(ops, classes):
  """{class: seconds per step}; names not in `classes`: 'other'."""
  out = dict.fromkeys(CLASSES, 0.0)
  for name, secs in ops.items():
    out[classes.get(name) or 'other'] += secs
  return out
