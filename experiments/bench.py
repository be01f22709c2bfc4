"""Training-step benchmark: time, memory and FLOPs of every training graph.

Times the real train step, compiled by `collab_jax.trainer.steps.make_train_step`
as `train.train_and_evaluate` compiles it, and writes
`<out>/bench.json` and `bench.md` rendered from it. What each section and
option measures, and how to read the tables: experiments/README.md,
"Benchmark".

  make bench            # CPU sections, about 15 minutes on 2 cores
  python experiments/bench.py --quick --out=/tmp/bench          # smoke test
  python experiments/bench.py --sections=resnet50_224           # opt-in
  make bench-device     # on a GPU: experiments/results/bench_<device>.md
  python experiments/bench.py --render=experiments/results/bench.json

The PyTorch peer (experiments/torch_reference.py) runs as a subprocess in
its own venv (`--torch_python`, default `.venv-torch/bin/python`).
"""

import argparse
import datetime
import functools
import importlib.util
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from collab_jax import heads as heads_lib
from collab_jax import models
from collab_jax import paper
from collab_jax.data import augment
from collab_jax.data import imagenet
from collab_jax.data import label_noise
from collab_jax.data import order
from collab_jax.data import streams
from collab_jax.models import layers
from collab_jax.models import onednn_conv
from collab_jax.trainer import logging_utils
from collab_jax.trainer import methods
from collab_jax.trainer import parallel
from collab_jax.trainer import recipes
from collab_jax.trainer import steps

import op_profile  # experiments/op_profile.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TORCH_SCRIPT = os.path.join(HERE, 'torch_reference.py')
# Table 1's training graphs that differ by topology (label smoothing trains
# the single network's).
GRAPHS = tuple(g for g in paper.TABLE1.rows if g in paper.TOPOLOGIES)
# Paper Table 4 (ImageNet ResNet-50, relative to one model): (time, memory).
PAPER_TABLE4 = {g: tuple(float(paper.TABLE4.text(g, c).rstrip('x'))
                         for c in ('training time', 'memory'))
                for g in paper.TABLE4.rows}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MiB = 2.0**20


# ----------------------------------------------------------------------------
# Settings.


def cifar_config(graph, batch=128, network='cifar_resnet32'):
  """The CIFAR-10 recipe of `graph` (uint8 images, on-device augmentation)."""
  return recipes.cifar('cifar10', network, graph, batch_size=batch)


def imagenet_config(graph, batch, size, network='resnet50'):
  """The ImageNet recipe of `graph` at a small batch and resolution."""
  c = recipes.imagenet(graph, batch_size=batch, image_size=size)
  c.model.name = network
  return c


def make_run_config(batch=128, network=None):
  """`make run`'s training (configs/default.py: Fashion-MNIST ResNet-8 tree)."""
  c = recipes.base_config()
  c.batch_size = batch
  if network:  # another network: its own hyper-parameters, not ResNet-8's width
    c.model.name = network
    c.model.kwargs = ml_collections.ConfigDict()
  return c


def vit_config(graph, batch=128, network='vit_tiny'):
  """`configs/fmnist_vit.py` (the ViT on Fashion-MNIST) for `graph`."""
  spec = importlib.util.spec_from_file_location(
      'fmnist_vit', os.path.join(REPO, 'configs', 'fmnist_vit.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(graph)
  c.batch_size = batch
  c.model.name = network
  return c


def _setting(config):
  """(image_shape, num_classes, data_stats, image dtype, steps/epoch)."""
  if config.dataset == 'fashion_mnist_local':  # 28x28x1 uint8; stats only scale
    return ((28, 28, 1), 10, {'mean': (0.286,), 'std': (0.353,)}, np.uint8,
            60000 // config.batch_size)
  if config.dataset == 'imagenet2012':
    s = config.image_size
    return ((s, s, 3), 1000, {'mean': imagenet.IMAGENET_MEAN,
                              'std': imagenet.IMAGENET_STD},
            np.float32, 1281167 // config.batch_size)
  return ((32, 32, 3), 10, {'mean': CIFAR10_MEAN, 'std': CIFAR10_STD},
          np.uint8, 50000 // config.batch_size)


def _synthetic_batch(config, image_shape, num_classes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  shape = (config.batch_size,) + tuple(image_shape)
  if dtype == np.uint8:  # raw pixels; augmented and normalised in the step
    images = rng.integers(0, 256, shape, dtype=np.uint8)
  else:  # streamed ImageNet arrives normalised float32
    images = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, num_classes, config.batch_size).astype(np.int32)
  return {'image': images, 'label': labels}


# ----------------------------------------------------------------------------
# The real train step, compiled like train_and_evaluate compiles it.


class Step:
  """The train step of `config` (`steps.make_train_step`) on `devices`.

  `compiler_options`: None for what this repository recommends
  (`models.compiler_options(platform)`); `extra_options` are added to them.
  `like`: a Step with the same variables and optimizer whose (current) state
  is copied instead of initialising a new one (saves compiling `init`).
  """

  def __init__(self, config, devices=None, remat=False, compiler_options=None,
               extra_options=None, like=None):
    self.config = config
    devices = devices or jax.devices()[:1]
    if compiler_options is None:  # what this repository recommends
      compiler_options = models.compiler_options(devices[0].platform)
    compiler_options = {**compiler_options, **(extra_options or {})}
    self.compiler_options = compiler_options
    self.num_devices = len(devices)
    image_shape, num_classes, stats, dtype, per_epoch = _setting(config)
    model = steps.create_model(config, num_classes)
    if remat:
      model = model.clone(remat=True)
    self.model = model
    method = methods.create(config, model.num_heads)
    lr_fn = steps.create_learning_rate_fn(config, per_epoch)
    tx = steps.create_optimizer(config, lr_fn, method)
    placement = parallel.data_parallel(devices)
    if like is None:
      state = steps.create_train_state(streams.init_key(config.seed), model,
                                       image_shape, tx, method.init_opt_state)
    else:  # same variables and optimizer: copy `like`'s state, skip init
      state = jax.tree.map(jnp.copy, like.state)
    self.state = jax.device_put(state, placement.replicated)
    batch = _synthetic_batch(config, image_shape, num_classes, dtype)
    self.batch = jax.device_put(batch, placement.batch)
    preprocess = augment.Preprocess(
        tuple(stats['mean']), tuple(stats['std']), augment=config.augment,
        pad=config.augment_pad, flip=config.augment_flip)
    jit_train = steps.make_train_step(
        placement, model=model, tx=tx, method=method, preprocess=preprocess,
        seed=config.seed,
        unlabeled_weight_fn=methods.unlabeled_weight_fn(config, per_epoch),
        compiler_options=compiler_options)
    start = time.perf_counter()
    self.compiled = jit_train.lower(self.state, self.batch, {}).compile()
    self.compile_s = time.perf_counter() - start
    self.program = program_stats(self.compiled)
    self.metrics = None
    self.cpu_s = self.timed_steps = 0  # process CPU time of the timed steps

  def __call__(self):
    self.state, self.metrics = self.compiled(self.state, self.batch, {})
    return self.state

  def sync(self):
    jax.block_until_ready((self.state, self.metrics))

  def time(self, *, warmup, min_steps, max_steps, budget_s):
    """Per-step wall times (each step waited for) after `warmup` steps."""
    for _ in range(warmup):
      self()
      self.sync()
    times = []
    cpu_start = _cpu_s()
    while len(times) < max_steps and (len(times) < min_steps or
                                      sum(times) < budget_s):
      start = time.perf_counter()
      self()
      self.sync()
      times.append(time.perf_counter() - start)
    self.cpu_s += _cpu_s() - cpu_start
    self.timed_steps += len(times)
    self.check_finite()
    return times

  def cpu_s_per_step(self):
    return self.cpu_s / max(self.timed_steps, 1)

  def time_back_to_back(self, steps):
    """Mean step time of `steps` dispatched without waiting in between."""
    self.sync()
    start = time.perf_counter()
    for _ in range(steps):
      self()
    self.sync()
    return (time.perf_counter() - start) / steps

  def check_finite(self):
    loss = np.asarray(self.metrics['loss'])
    if not np.isfinite(loss[0]):
      raise FloatingPointError(f'non-finite loss {loss} in the benchmark')


def _cpu_s():
  """CPU seconds used by this process (all threads) so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def program_stats(compiled):
  """FLOPs (logging_utils.compiled_stats), memory, and a hash of the program text."""
  out = logging_utils.compiled_stats(compiled)
  try:  # equal hashes: an option did not change the compiled program
    text = re.sub(r'\S*metadata=\{[^}]*\}', '', compiled.as_text())
    # The stack-frame tables at the end name the Python lines that built
    # the step: not part of the program.
    text = text.split('\nFileNames\n')[0]
    out['program_hash'] = hashlib.sha1(text.encode()).hexdigest()[:10]
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    mem = compiled.memory_analysis()
    out['alias_size_in_bytes'] = int(getattr(mem, 'alias_size_in_bytes', 0))
  except Exception:  # pylint: disable=broad-except
    pass
  keys = ('temp_size_in_bytes', 'argument_size_in_bytes',
          'output_size_in_bytes')
  if all(k in out for k in keys):
    out['memory_bytes'] = sum(out[k] for k in keys)
    # Donated state is an argument and an output in the same buffer.
    out['memory_bytes_unaliased'] = (out['memory_bytes'] -
                                     out.get('alias_size_in_bytes', 0))
  return out


def runtime_peak_bytes(device):
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def _summary(times, batch, step=None):
  med = statistics.median(times)
  out = {'step_s': med, 'step_s_min': min(times), 'step_s_max': max(times),
         'steps': len(times), 'images_per_s': batch / med}
  if step is not None:
    out['cpu_s_per_step'] = step.cpu_s_per_step()
    out['cpu_per_wall'] = out['cpu_s_per_step'] / med  # cores kept busy
  return out


# ----------------------------------------------------------------------------
# Sections.


def _time_in_rounds(steps, timing, rounds, after_round=None):
  """Times compiled `steps` ({name: Step}) round-robin, `rounds` times.

  The timing budget and step counts of `timing` are split over the rounds;
  only the first round warms up fully. `after_round(r, medians, load)` runs
  after each round.

  Returns:
    ({name: all step times}, {name: median per round}, [load after each round]).
  """
  per_round = dict(timing, budget_s=timing['budget_s'] / rounds,
                   min_steps=max(2, -(-timing['min_steps'] // rounds)),
                   max_steps=max(2, -(-timing['max_steps'] // rounds)))
  times = {n: [] for n in steps}
  medians = {n: [] for n in steps}
  loads = []
  for r in range(rounds):
    for name, step in steps.items():
      t = step.time(**dict(per_round, warmup=timing['warmup'] if r == 0 else 1))
      times[name] += t
      medians[name].append(statistics.median(t))
    loads.append(os.getloadavg()[0])
    if after_round is not None:
      after_round(r, medians, loads[-1])
  return times, medians, loads


def _round_ratio(medians, name, base):
  """Median over rounds of `name`'s step time over `base`'s in that round."""
  return statistics.median(a / b for a, b in zip(medians[name], medians[base]))


def run_graphs(setting_name, make_config, graphs, timing, rounds=3,
               torch=None, keep=(), remat=False, log=print):
  """Every graph of one setting, timed in interleaved rounds.

  All graphs are compiled first, then timed round-robin (`rounds` times), so
  a change of load from other processes hits every graph alike; the time
  ratio of a graph is the median over rounds of its ratio to the single
  model in the same round. The PyTorch peer runs between the first and the
  second round (so ours brackets it), single and 4-head adjacent.

  Returns:
    (rows, PyTorch rows, {graph: compiled Step} for the graphs in `keep`).
  """
  steps, rows = {}, {}
  for graph in graphs:
    config = make_config(graph)
    step = steps[graph] = Step(config, remat=remat)
    rows[graph] = {'setting': setting_name, 'graph': graph,
                   'splits': [list(s) for s in config.model.splits],
                   'heads': step.model.num_heads, 'batch': config.batch_size,
                   'compiler_options': step.compiler_options,
                   'compile_s': step.compile_s, **step.program,
                   'runtime_peak_bytes': runtime_peak_bytes(jax.devices()[0])}
    log(f'  {setting_name} {graph:<16} compiled in {step.compile_s:5.1f} s  '
        f'{step.program.get("flops_per_step", 0) / 1e9:7.1f} GFLOP  '
        f'{step.program.get("memory_bytes", 0) / MiB:7.1f} MiB')
  torch_rows = []

  def after_round(r, medians, load):
    log(f'  {setting_name} round {r + 1}/{rounds}: ' + ', '.join(
        f'{g} {1e3 * medians[g][-1]:.0f} ms' for g in graphs) +
        f'  load {load:.2f}')
    if r == 0 and torch:
      torch_rows.extend(run_torch(log=log, **torch))

  times, medians, loads = _time_in_rounds(steps, timing, rounds, after_round)
  single = graphs[0]
  kept = {g: steps[g] for g in graphs if g in keep}
  out = []
  for graph in graphs:
    row = rows[graph]
    row.update(_summary(times[graph], row['batch'], steps[graph]))
    row['round_step_s'] = medians[graph]
    row['load_1min'] = statistics.median(loads)
    row['time_ratio'] = _round_ratio(medians, graph, single)
    if 'flops_per_step' in row:
      row['flop_ratio'] = row['flops_per_step'] / rows[single]['flops_per_step']
    if 'bytes_accessed_per_step' in row:
      row['bytes_ratio'] = (row['bytes_accessed_per_step'] /
                            rows[single]['bytes_accessed_per_step'])
    if 'memory_bytes' in row:
      row['memory_ratio'] = row['memory_bytes'] / rows[single]['memory_bytes']
      row['memory_ratio_unaliased'] = (row['memory_bytes_unaliased'] /
                                       rows[single]['memory_bytes_unaliased'])
    if graph in PAPER_TABLE4:
      row['paper_time_ratio'], row['paper_memory_ratio'] = PAPER_TABLE4[graph]
    log(f'  {setting_name} {graph:<16} {1e3 * row["step_s"]:8.1f} ms '
        f'{row["images_per_s"]:7.1f} img/s  time x{row["time_ratio"]:.2f} '
        f'(FLOPs x{row.get("flop_ratio", float("nan")):.2f})')
    out.append(row)
  del steps
  return out, torch_rows, kept


def torch_python(path=None):
  """The Python of the PyTorch peer's venv, or None if there is none."""
  for candidate in (path, os.environ.get('TORCH_PYTHON'),
                    os.path.join(REPO, '.venv-torch', 'bin', 'python')):
    if candidate and os.access(candidate, os.X_OK):
      return candidate
  return None


def torch_script(python, graphs, *, batch, formats, threads, steps, warmup,
                 depth=32, profile=0, log=print):
  """Runs experiments/torch_reference.py in `python`; returns its rows.

  `profile`: also profile that many steps by op class.
  """
  cmd = [python, TORCH_SCRIPT, '--graphs', ','.join(graphs),
         '--formats', ','.join(formats),
         '--threads', ','.join(str(t) for t in threads), '--batch', str(batch),
         '--steps', str(steps), '--warmup', str(warmup), '--depth', str(depth),
         '--profile', str(profile), '--json', '-']
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('XLA_', 'JAX_', 'PYTHONPATH'))}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n'
                       + proc.stderr[-3000:])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for r in out['results']:
    log(f'  torch {r["graph"]:<16} {r["memory_format"]:<14} '
        f'{r["num_threads"]} thread(s) {1e3 * r["step_s"]:8.1f} ms '
        f'{r["images_per_s"]:7.1f} img/s  load {r["load_1min"]:.2f}')
  return out


def run_torch(python, graphs, batch, timing, log=print):
  """The PyTorch peer: channels-last at 1 thread and one per core, NCHW at
  one per core (slower than channels-last here); graphs adjacent."""
  ncpu = os.cpu_count() or 1
  rows = []
  for formats, threads in ((('channels_last',), sorted({1, ncpu})),
                           (('nchw',), (ncpu,))):
    out = torch_script(python, graphs, batch=batch, formats=formats,
                       threads=threads, log=log, **timing)
    rows += out['results']
  return rows


def run_impl(make_config, graphs, timing, vmap_timing, loop_steps=None,
             log=print):
  """Loop vs vmap branches on the same stacked parameters.

  `loop_steps`: already compiled loop Steps by graph (from `run_graphs`),
  reused instead of compiling them again.
  """
  rows = []
  for graph in graphs:
    loop_step = (loop_steps or {}).get(graph)
    for impl in ('loop', 'vmap'):
      if impl == 'loop' and loop_step is not None:
        step = loop_step
      else:
        config = make_config(graph)
        config.model.branch_impl = impl
        step = Step(config, like=loop_step)  # same variables, copied
        loop_step = loop_step or step
      times = step.time(**(timing if impl == 'loop' else vmap_timing))
      row = {'graph': graph, 'branch_impl': impl,
             'batch': step.config.batch_size, 'compile_s': step.compile_s,
             **step.program, **_summary(times, step.config.batch_size, step)}
      rows.append(row)
      log(f'  impl {graph:<16} {impl:<5} {1e3 * row["step_s"]:9.1f} ms '
          f'{row["images_per_s"]:7.1f} img/s  load {os.getloadavg()[0]:.2f}')
      del step
    del loop_step
  for loop, vmap in zip(rows[::2], rows[1::2]):
    vmap['slowdown_vs_loop'] = vmap['step_s'] / loop['step_s']
  return rows


# Step rate of ResNet-50 on one MLPerf-class H100 (img/s), for the host-side
# arithmetic: how many host cores one accelerator's input needs.
ACCELERATOR_IMAGES_PER_S = 3000


def run_pipeline(batch, steps, train_images_per_s, log=print, host_seconds=10.0):
  """Host batch assembly and on-device augment+normalize, in images/s; and
  ImageNet's decode + crop rate per host core (`imagenet.measure_host_rate`)."""
  num = 50000
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, num).astype(np.int32)
  noise = label_noise.LabelNoise(num, 10, 0.2, seed=0)
  per_epoch = order.steps_per_epoch(num, batch)
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = NamedSharding(mesh, P('data'))

  def host_batch(step):
    # What data.create_data_source's train_iter + data.to_global do for an
    # in-memory dataset.
    idx = order.train_indices(step, num_examples=num,
                                       global_batch=batch, seed=0)
    local = {'image': images[idx],
             'label': noise.labels(idx, labels[idx], step // per_epoch)}
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local.items()}

  jax.block_until_ready(host_batch(0))
  times = []
  for step in range(1, steps + 1):
    start = time.perf_counter()
    jax.block_until_ready(host_batch(step))
    times.append(time.perf_counter() - start)
  host = _summary(times, batch)

  @jax.jit
  def device_preprocess(step, images):
    rng = jax.random.fold_in(jax.random.key(0), step)
    return augment.normalize(augment.augment(rng, images),
                                    CIFAR10_MEAN, CIFAR10_STD)

  x = host_batch(0)['image']
  jax.block_until_ready(device_preprocess(0, x))
  times = []
  for step in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(device_preprocess(step, x))
    times.append(time.perf_counter() - start)
  device = _summary(times, batch)
  decode = imagenet.measure_host_rate(seconds=host_seconds)
  out = {'batch': batch, 'host': host, 'device_augment': device,
         'train_step_images_per_s': train_images_per_s,
         'host_over_step': host['images_per_s'] / train_images_per_s,
         'device_augment_over_step': device['images_per_s'] / train_images_per_s,
         'imagenet_decode': decode,
         'imagenet_cores_per_accelerator':
             ACCELERATOR_IMAGES_PER_S / decode['img_per_s_per_core']}
  log(f'  pipeline host {host["images_per_s"]:9.0f} img/s, device augment '
      f'{device["images_per_s"]:9.0f} img/s, step {train_images_per_s:7.1f} '
      f'img/s; ImageNet decode+crop {decode["img_per_s_per_core"]:.0f} '
      'img/s per core')
  return out


# Variants of the recommended step (float32, one device,
# models.compiler_options): what each changes is in experiments/README.md.
# `extra_options` are XLA:CPU debug options of jaxlib 0.12 (names from
# `strings libjax_common.so | grep xla_cpu_`), per compile.
OPTION_VARIANTS = {
    'before: XLA default': {'compiler_options': {}},
    # jaxlib 0.12's default YNNPACK fusions (convolutions too), barriers kept:
    # the recommended options as they were before this row's measurement.
    'YNNPACK convolutions': {'compiler_options': {
        'xla_disable_hlo_passes': 'cse_barrier_expander'}},
    # --device: what XLA:CPU gets (models.compiler_options('cpu')) vs none.
    'CPU options': {'compiler_options': 'cpu'},
    'bfloat16': {'dtype': 'bfloat16'},
    'remat': {'remat': True},
    'CPU devices': {'devices': 'all'},
    'CPU devices, batch per device': {'devices': 'all',
                                      'batch_per_device': True},
    '1 intra-op thread': {'extra_options': {
        'xla_cpu_multi_thread_eigen': False}},
    'concurrency scheduler': {'extra_options': {
        'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED'}},
    'XNNPACK graph fusion': {'extra_options': {
        'xla_cpu_experimental_xnn_graph_fusion_mode':
            'XNN_GRAPH_FUSION_MODE_GREEDY'}},
    # oneDNN (PyTorch's CPU convolution library) inside XLA:CPU.
    'oneDNN': {'extra_options': {'xla_cpu_use_onednn': True}},
    'oneDNN custom calls': {'extra_options': {
        'xla_cpu_use_onednn': True,
        'xla_cpu_experimental_onednn_custom_call': True}},
    # oneDNN's convolution primitives called through jax.ffi
    # (collab_jax/models/onednn_conv.py; built by `make onednn`).
    'oneDNN convolutions (jax.ffi)': {'conv': 'onednn'},
}
ONEDNN_FFI = 'oneDNN convolutions (jax.ffi)'
MAKE_RUN = 'make run: ResNet-8 4-head tree'  # configs/default.py


def option_step(base_step, name, log=print):
  """(row name, Step) of variant `name` of `base_step`, or None to skip."""
  opts = OPTION_VARIANTS[name]
  devices = jax.devices() if opts.get('devices') == 'all' else jax.devices()[:1]
  if opts.get('devices') == 'all' and len(devices) == 1:
    return None
  config = base_step.config.copy_and_resolve_references()
  if 'devices' in opts:
    name = name.replace('CPU devices', f'{len(devices)} CPU devices')
  if opts.get('batch_per_device'):  # throughput only: a bigger global batch
    config.batch_size *= len(devices)
    name = name.replace('batch per device',
                        f'batch {config.batch_size // len(devices)} per device')
  if 'dtype' in opts:
    config.model.dtype = opts['dtype']
  compiler_options = opts.get('compiler_options')
  if compiler_options == 'cpu':
    compiler_options = models.compiler_options('cpu')
  conv = None
  if opts.get('conv') == 'onednn':
    if not onednn_conv.available():
      log(f'  option {name}: not built (make onednn)')
      return name, None
    conv = onednn_conv.conv_general_dilated
  try:
    with layers.conv_implementation(conv):
      step = Step(config, devices=devices, remat=opts.get('remat', False),
                  compiler_options=compiler_options,
                  extra_options=opts.get('extra_options'), like=base_step)
  except Exception as e:  # pylint: disable=broad-except
    # An XLA option this jaxlib does not know: record it, go on.
    log(f'  option {name}: not compiled ({type(e).__name__}: '
        f'{str(e).splitlines()[0][:200]})')
    return name, None
  return name, step


def run_options(kept, variants, timing, back_to_back_steps, rounds=3,
                keep=(), log=print):
  """Variants of the kept (already compiled) steps, timed in rounds with them.

  Each graph's variants are compiled, then timed round-robin with its
  baseline like `run_graphs` does, and compared per round.

  Returns:
    (rows, {(graph, variant): Step} for the variant names in `keep`).
  """
  rows, kept_out = [], {}
  for graph in variants:
    base_step = kept[graph]
    steps, failed = {'baseline': base_step}, []
    for name in variants[graph]:
      made = option_step(base_step, name, log=log)
      if made is None:
        continue
      if made[1] is None:
        failed.append(made[0])
      else:
        steps[made[0]] = made[1]
    times, medians, loads = _time_in_rounds(steps, timing, rounds)
    load = loads[-1]
    base = None
    for name, step in steps.items():
      row = {'graph': graph, 'variant': name, 'batch': step.config.batch_size,
             'devices': step.num_devices,
             'compiler_options': step.compiler_options,
             'compile_s': step.compile_s, **step.program,
             **_summary(times[name], step.config.batch_size, step),
             'round_step_s': medians[name], 'load_1min': load}
      if name == 'baseline' and back_to_back_steps:  # no syncs in between
        row['back_to_back_step_s'] = step.time_back_to_back(back_to_back_steps)
      if base is None:
        base = row
      row['time_vs_baseline'] = _round_ratio(medians, name, 'baseline')
      # images/s ratio: differs from 1 / time ratio when the batch differs
      row['throughput_vs_baseline'] = (row['batch'] / row['time_vs_baseline'] /
                                      base['batch'])
      row['same_program_as_baseline'] = (
          name != 'baseline' and
          row.get('program_hash') == base.get('program_hash'))
      if 'memory_bytes' in row:
        row['memory_vs_baseline'] = row['memory_bytes'] / base['memory_bytes']
      rows.append(row)
      if any(name.startswith(k) or name == k for k in keep):
        kept_out[(graph, name)] = step
      log(f'  option {graph:<16} {name:<28} {1e3 * row["step_s"]:8.1f} ms '
          f'x{row["time_vs_baseline"]:.2f} time, '
          f'x{row.get("memory_vs_baseline", float("nan")):.2f} memory, '
          f'{row["cpu_per_wall"]:.2f} cores busy  load {load:.2f}')
    for name in failed:
      rows.append({'graph': graph, 'variant': name, 'failed': True,
                   'reason': ('not built (make onednn)'
                              if OPTION_VARIANTS.get(name, {}).get('conv')
                              else 'not compiled by this jaxlib (see the log)')})
    del steps
  return rows, kept_out


def run_profile(steps, trace_dir, torch=None, trace_steps=3, log=print):
  """Where each step's time goes, by op class (experiments/op_profile.py).

  `steps`: {name: compiled Step}, each traced for `trace_steps` steps;
  `torch`: kwargs of `torch_script` for the PyTorch peer's profile
  (torch.profiler; `torch_reference.profile_by_class`).

  Returns [{'name', 'wall_s_per_step', 'classes': {class: s/step}, ...}]
  in the order profiled.
  """
  out = []
  for name, step in steps.items():
    classes = op_profile.op_classes(step.compiled.as_text(),
                                    step.config.batch_size)
    traced = op_profile.trace_ops(step, os.path.join(trace_dir, 'trace'),
                                  classes, steps=trace_steps)
    by_class = op_profile.by_class(traced['ops'], classes)
    top = sorted(traced['ops'].items(), key=lambda kv: -kv[1])[:12]
    out.append({'name': name, 'batch': step.config.batch_size,
                'wall_s_per_step': traced['wall_s_per_step'],
                 'threads_busy_s_per_step': traced['threads_busy_s_per_step'],
                 'classes': by_class,
                'top_ops': [[n, classes.get(n) or 'other', v]
                            for n, v in top]})
    log(f'  profile {name}: {1e3 * traced["wall_s_per_step"]:.0f} ms/step; '
        + ', '.join(f'{c} {1e3 * v:.0f}' for c, v in by_class.items() if v))
  if torch:
    for r in torch_script(log=log, **torch)['results']:
      name = (f'PyTorch {r["graph"]}, {r["memory_format"]}, '
              f'{r["num_threads"]} thread(s)')
      out.append({'name': name, 'batch': r['batch'], **r['profile']})
      log(f'  profile {name}: '
          f'{1e3 * r["profile"]["wall_s_per_step"]:.0f} ms/step; ' +
          ', '.join(f'{c} {1e3 * v:.0f}'
                    for c, v in r['profile']['classes'].items() if v))
  return out


def busy_process():
  """A competing CPU-bound process (one busy Python loop, not pinned)."""
  return subprocess.Popen([sys.executable, '-c', 'while True: pass'])


def run_contention(steps, timing, torch=None, log=print):
  """Ours and PyTorch's step alone and beside one busy process.

  `steps`: {name: compiled Step}; each is timed quiet, then with the
  competitor running, adjacent, so their ratio is the slowdown.
  `torch`: kwargs of `torch_script` (run once quiet, once contended).
  """
  rows = []
  def measure_ours(name, step):
    t = step.time(**timing)
    return {'step_s': statistics.median(t), 'steps': len(t)}

  items = list(steps.items())
  for name, step in items:
    quiet = measure_ours(name, step)
    competitor = busy_process()
    try:
      time.sleep(0.5)
      busy = measure_ours(name, step)
    finally:
      competitor.kill()
      competitor.wait()
    rows.append({'who': 'ours', 'variant': name, 'quiet_step_s':
                 quiet['step_s'], 'busy_step_s': busy['step_s'],
                 'slowdown': busy['step_s'] / quiet['step_s'],
                 'load_1min': os.getloadavg()[0]})
    log(f'  contention ours {name:<32} quiet {1e3 * quiet["step_s"]:7.0f} ms'
        f', busy {1e3 * busy["step_s"]:7.0f} ms: x{rows[-1]["slowdown"]:.2f}')
  if torch:
    quiet = torch_script(log=log, **torch)['results']
    competitor = busy_process()
    try:
      time.sleep(0.5)
      busy = torch_script(log=log, **torch)['results']
    finally:
      competitor.kill()
      competitor.wait()
    for q, b in zip(quiet, busy):
      rows.append({'who': 'PyTorch', 'variant':
                   f'{q["graph"]}, {q["memory_format"]}, '
                   f'{q["num_threads"]} thread(s)',
                   'quiet_step_s': q['step_s'], 'busy_step_s': b['step_s'],
                   'slowdown': b['step_s'] / q['step_s'],
                   'load_1min': os.getloadavg()[0]})
      log(f'  contention torch {rows[-1]["variant"]:<31} x'
          f'{rows[-1]["slowdown"]:.2f}')
  return rows


# ----------------------------------------------------------------------------
# Report.


def _fmt(x, spec='.2f', missing='—'):
  return missing if x is None else format(x, spec)


def _graph_table(rows):
  lines = [
      '| graph | heads | step ms | img/s | time ratio | FLOP ratio '
      '| bytes ratio | paper time '
      '| memory MiB (temp+arg+out) | memory ratio | minus donated: ratio '
      '| paper memory | GFLOP/step | GB accessed/step | compile s | load |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["graph"]} `{tuple(tuple(s) for s in r["splits"])}` | {r["heads"]} '
        f'| {1e3 * r["step_s"]:.0f} | {r["images_per_s"]:.1f} '
        f'| {_fmt(r["time_ratio"])} | {_fmt(r.get("flop_ratio"))} '
        f'| {_fmt(r.get("bytes_ratio"))} '
        f'| {_fmt(r.get("paper_time_ratio"))} '
        f'| {_fmt(r.get("memory_bytes", 0) / MiB, ".1f")} '
        f'| {_fmt(r.get("memory_ratio"))} | {_fmt(r.get("memory_ratio_unaliased"))} '
        f'| {_fmt(r.get("paper_memory_ratio"))} '
        f'| {_fmt(r.get("flops_per_step", 0) / 1e9, ".1f")} '
        f'| {_fmt(r.get("bytes_accessed_per_step", 0) / 1e9, ".2f")} '
        f'| {r["compile_s"]:.1f} | {_fmt(r.get("load_1min"))} |')
  return lines


def write_report(out_dir, name, result):
  """Writes `<name>.json` and `<name>.md` rendered from that JSON."""
  write_files(out_dir, name, result, json_too=True)


def write_files(out_dir, name, result, json_too):
  """The JSON (if `json_too`) and its Markdown, written to temporary files
  and renamed into place only when both are complete: a run or a render
  that fails leaves the previous results as they were."""
  os.makedirs(out_dir, exist_ok=True)
  # The Markdown shows exactly what the JSON holds (a round trip).
  text = json.dumps(result, indent=1, sort_keys=True)
  files = {f'{name}.md': render_markdown(json.loads(text), name)}
  if json_too:
    files[f'{name}.json'] = text
  temps = {}
  try:
    for filename, content in files.items():
      temps[filename] = os.path.join(out_dir, f'.{filename}.tmp{os.getpid()}')
      with open(temps[filename], 'w') as f:
        f.write(content)
    for filename, temp in temps.items():
      os.replace(temp, os.path.join(out_dir, filename))
  finally:
    for temp in temps.values():
      if os.path.exists(temp):
        os.remove(temp)


def write_markdown(out_dir, name, result):
  """Writes `<name>.md` rendered from `result` (atomically)."""
  write_files(out_dir, name, result, json_too=False)


def render_markdown(result, name):
  """The Markdown report of a bench.py result (`name`.json)."""
  env = result['environment']
  device_mode = result.get('mode') == 'device'
  L = ['# Training-step benchmark' + (' (device check)' if device_mode else ''),
       '',
       f'Generated by `{env["command"]}` on {env["date"]} '
       f'({result["total_s"] / 60:.1f} min, one process); rendered from '
       f'`{name}.json`. How to read it: experiments/README.md, "Benchmark".',
       '',
       f'Machine: {env["device"]} ({env["num_devices"]} device(s)), '
       f'{env["cpu_count"]} CPU cores ({env["cpu_model"]}); Python '
       f'{env.get("python", "?")}, jax {env["jax"]}, jaxlib {env["jaxlib"]}, '
       f'flax {env["flax"]}, PyTorch peer: '
       f'{env.get("torch", "not run")}; XLA_FLAGS=`{env["xla_flags"] or "(none)"}`; '
       f'recommended compiler options `{env["compiler_options"]}`. '
       f'Load average (1 min) at start {env["load_start"][0]:.2f}, at end '
       f'{env["load_end"][0]:.2f}: other processes share these cores, so '
       'compare ratios within this run, not absolute numbers across runs.', '']
  for sect_name, sect in result['graphs'].items():
    L += [f'## {sect_name}', '', sect['description'], '']
    L += _graph_table(sect['rows']) + ['']
  if result.get('torch'):
    L += _torch_table(result)
  if result.get('impl'):
    L += ['## Branches: batched vmap vs sequential loop', '',
          '| setting | graph | impl | batch | step ms | img/s '
          '| vmap / loop time | GFLOP/step | memory MiB | compile s |',
          '|---|---|---|---|---|---|---|---|---|---|']
    for r in result['impl']:
      L.append(f'| {r.get("setting", "CIFAR ResNet-32")} | {r["graph"]} '
               f'| {r["branch_impl"]} | {r["batch"]} '
               f'| {1e3 * r["step_s"]:.0f} | {r["images_per_s"]:.1f} '
               f'| {_fmt(r.get("slowdown_vs_loop"))} '
               f'| {_fmt(r.get("flops_per_step", 0) / 1e9, ".1f")} '
               f'| {_fmt(r.get("memory_bytes", 0) / MiB, ".1f")} '
               f'| {r["compile_s"]:.1f} |')
    L.append('')
  if result.get('pipeline'):
    p = result['pipeline']
    L += ['## Input pipeline', '',
          f'Batch {p["batch"]} of CIFAR-shaped in-memory data.', '',
          '| stage | img/s | vs the ResNet-32 single step it feeds |',
          '|---|---|---|',
          f'| host batch assembly | {p["host"]["images_per_s"]:.0f} '
          f'| {p["host_over_step"]:.0f}x |',
          f'| on-device augment + normalize | '
          f'{p["device_augment"]["images_per_s"]:.0f} '
          f'| {p["device_augment_over_step"]:.0f}x |',
          f'| train step (single, float32) | '
          f'{p["train_step_images_per_s"]:.1f} | 1x |', '']
    if p.get('imagenet_decode'):
      d = p['imagenet_decode']
      L += [f'ImageNet host side (`imagenet.measure_host_rate`, {d["source"]} '
            f'JPEGs of {d["mean_jpeg_kb"]:.0f} kB, {d["image_size"]} px): '
            f'decode + random-resized crop + flip at '
            f'{d["img_per_s_per_core"]:.0f} img/s per host core (per CPU '
            f'second of one thread); feeding {ACCELERATOR_IMAGES_PER_S} img/s '
            '(ResNet-50 on one MLPerf-class H100) takes '
            f'{p["imagenet_cores_per_accelerator"]:.1f} host cores per '
            'accelerator.', '']
  if result.get('options'):
    L += ['## Options (same run)' if not device_mode else
          '## CPU-motivated compiler options on this device', '',
          'Each graph\'s variants timed round-robin with its baseline (the '
          'recommended step every other section runs); ratios are medians '
          'over rounds. "cores busy": process CPU seconds per wall second '
          'during its steps. "same program": the variant compiled to the '
          'baseline\'s program text (its ratio is noise).', '',
          '| graph | variant | batch | devices | step ms | img/s '
          '| time vs baseline | img/s vs baseline | cores busy '
          '| memory MiB | memory vs baseline | same program | compile s |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in result['options']:
      if r.get('failed'):
        L.append(f'| {r["graph"]} | {r["variant"]} | '
                 f'{r.get("reason", "not compiled by this jaxlib")} '
                 '|||||||||||')
        continue
      L.append(f'| {r["graph"]} | {r["variant"]} | {r["batch"]} '
               f'| {r["devices"]} | {1e3 * r["step_s"]:.0f} '
               f'| {r["images_per_s"]:.1f} | {_fmt(r["time_vs_baseline"])} '
               f'| {_fmt(r.get("throughput_vs_baseline"))} '
               f'| {_fmt(r.get("cpu_per_wall"))} '
               f'| {_fmt(r.get("memory_bytes", 0) / MiB, ".1f")} '
               f'| {_fmt(r.get("memory_vs_baseline"))} '
               f'| {_same_program(r)} '
               f'| {r["compile_s"]:.1f} |')
    b2b = [r for r in result['options'] if 'back_to_back_step_s' in r]
    if b2b:
      L += ['', 'No host syncs: ' + '; '.join(
          f'{r["graph"]} {1e3 * r["back_to_back_step_s"]:.0f} ms/step '
          f'dispatched back to back vs {1e3 * r["step_s"]:.0f} ms waiting '
          'for every step' for r in b2b) + '.']
    L.append('')
  if result.get('contention'):
    L += ['## One competing busy process', '',
          'Each step timed alone and then beside one busy Python loop (not '
          'pinned), adjacent; slowdown = contended / alone step time.', '',
          '| who | variant | alone ms | with a busy process ms | slowdown |',
          '|---|---|---|---|---|']
    for r in result['contention']:
      L.append(f'| {r["who"]} | {r["variant"]} | {1e3 * r["quiet_step_s"]:.0f} '
               f'| {1e3 * r["busy_step_s"]:.0f} | {r["slowdown"]:.2f} |')
    L.append('')
  if result.get('profile'):
    L += _profile_table(result['profile'])
  if result.get('skipped'):
    L += ['## Skipped (time budget)', ''] + [
        f'* {s}' for s in result['skipped']] + ['']
  if result.get('goals'):
    L += ['## Goals', ''] + [f'* {g}' for g in result['goals']] + ['']
  return '\n'.join(L)


def _profile_table(profiles):
  """Op classes (rows) by profiled step (columns): ms per step and share."""
  profile = {p['name']: p for p in profiles}
  names = list(profile)
  classes = [c for c in op_profile.CLASSES if any(
      profile[n]['classes'].get(c) for n in names)]
  L = ['## Where the step\'s time goes, by op class', '',
       f'The single network\'s step, batch {profiles[0]["batch"]}. Ours: '
       '`jax.profiler` trace of '
       'the compiled step, every HLO op\'s time in its class '
       '(experiments/op_profile.py; pool tasks of Eigen convolutions to '
       'their convolution; an instant two threads share counts half to '
       'each, so the classes add up to the time any op ran). PyTorch: '
       'torch.profiler self times, its convolution backward split into input '
       'and weight gradient in the ratio of oneDNN\'s own times '
       '(experiments/torch_reference.py `--profile`). Traced steps are '
       'slower than untraced ones; compare shares and the columns.', '',
       '| op class | ' + ' | '.join(f'{n}: ms (share)' for n in names) + ' |',
       '|---|' + '---|' * len(names)]
  totals = {n: sum(profile[n]['classes'].values()) for n in names}
  for c in classes:
    cells = []
    for n in names:
      v = profile[n]['classes'].get(c, 0.0)
      cells.append(f'{1e3 * v:.0f} ({100 * v / totals[n]:.0f} %)'
                   if totals[n] else '—')
    L.append(f'| {c} | ' + ' | '.join(cells) + ' |')
  L.append('| all ops | ' + ' | '.join(f'{1e3 * totals[n]:.0f}'
                                       for n in names) + ' |')
  L.append('| traced step (wall) | ' + ' | '.join(
      f'{1e3 * profile[n]["wall_s_per_step"]:.0f}' for n in names) + ' |')
  busy = [f'{n}: ' + ', '.join(f'{k}: {v:.3f} s'
                               for k, v in p['threads_busy_s_per_step'].items())
          for n, p in profile.items() if 'threads_busy_s_per_step' in p]
  if busy:
    L += ['', 'Seconds per step with k XLA threads inside an op: ' +
          '; '.join(busy) + '.']
  return L + ['']


def _same_program(row):
  if row['variant'] == 'baseline' or 'same_program_as_baseline' not in row:
    return '—'
  return 'yes' if row['same_program_as_baseline'] else 'no'


def _torch_table(result):
  L = ['## PyTorch peer on the same CPU', '',
       'experiments/torch_reference.py in its own venv (subprocess): the same '
       'ResNet-32 head tree, loss and SGD step on a fixed float batch, timed '
       'between the first and the second round of ours.', '',
       '| graph | PyTorch format | threads | PyTorch img/s | ours img/s '
       '| ours / PyTorch | CPU s/step PyTorch | CPU s/step ours '
       '| time ratio vs single (PyTorch) | load |',
       '|---|---|---|---|---|---|---|---|---|---|']
  ours = {r['graph']: r for r in result['graphs']['CIFAR ResNet-32']['rows']}
  single = {(r['memory_format'], r['num_threads']): r
            for r in result['torch'] if r['graph'] == 'single'}
  for r in result['torch']:
    o = ours.get(r['graph'])
    if o is None:
      continue
    base = single.get((r['memory_format'], r['num_threads']))
    L.append(f'| {r["graph"]} | {r["memory_format"]} | {r["num_threads"]} '
             f'| {r["images_per_s"]:.1f} | {o["images_per_s"]:.1f} '
             f'| {o["images_per_s"] / r["images_per_s"]:.2f} '
             f'| {_fmt(r.get("cpu_s_per_step"))} '
             f'| {_fmt(o.get("cpu_s_per_step"))} '
             f'| {_fmt(r["step_s"] / base["step_s"] if base else None)} '
             f'| {_fmt(r.get("load_1min"))} |')
  return L + ['']


def _goals(result):
  """One line per performance goal, met or not, from this run's numbers."""
  goals = []
  for name, sect in result['graphs'].items():
    over = [f'{r["graph"]} {r["time_ratio"]:.2f} > {r["flop_ratio"]:.2f}'
            + (f' (bytes ratio {r["bytes_ratio"]:.2f})' if 'bytes_ratio' in r
               else '')
            for r in sect['rows'][1:]
            if 'flop_ratio' in r and r['time_ratio'] > r['flop_ratio'] * 1.02]
    goals.append(f'{name}: every graph\'s time ratio at or below its FLOP '
                 'ratio (2 % tolerance): ' +
                 ('met.' if not over else 'not met for ' + ', '.join(over) + '.'))
  if result.get('torch'):
    ours = {r['graph']: r for r in result['graphs']['CIFAR ResNet-32']['rows']}
    for g in GRAPHS:
      if g not in ours:
        continue
      rows = [r for r in result['torch'] if r['graph'] == g]
      if not rows:
        continue
      best = max(rows, key=lambda r: r['images_per_s'])
      ratio = ours[g]['images_per_s'] / best['images_per_s']
      goals.append(
          f'our CPU step >= PyTorch\'s, {g}: {ours[g]["images_per_s"]:.1f} vs '
          f'{best["images_per_s"]:.1f} img/s (best PyTorch row: '
          f'{best["memory_format"]}, {best["num_threads"]} thread(s)) = '
          f'{ratio:.2f}x, ' + ('met.' if ratio >= 1 else 'not met.'))
      onednn = [r for r in result.get('options', ())
                if r['graph'] == g and r['variant'] == ONEDNN_FFI
                and not r.get('failed')]
      if onednn:  # its time ratio to the recommended step, same rounds
        equivalent = ours[g]['images_per_s'] / onednn[0]['time_vs_baseline']
        ratio = equivalent / best['images_per_s']
        goals.append(
            f'with {ONEDNN_FFI}, {g}: {equivalent:.1f} img/s (the '
            f'recommended step\'s {ours[g]["images_per_s"]:.1f} over the '
            f'option\'s time ratio {onednn[0]["time_vs_baseline"]:.2f}) = '
            f'{ratio:.2f}x the best PyTorch row; within 1.2x (>= 0.83x, '
            f'the bar for keeping an option): '
            + ('yes.' if ratio >= 1 / 1.2 else 'no.'))
  if result.get('contention'):
    rows = result['contention']
    worst = {who: max((r for r in rows if r['who'] == who),
                      key=lambda r: r['slowdown'])
             for who in ('ours', 'PyTorch') if any(r['who'] == who for r in rows)}
    goals.append('degrade gracefully beside one busy process: worst slowdown ' +
                 ', '.join(f'{who} {r["slowdown"]:.2f}x ({r["variant"]})'
                           for who, r in worst.items()) + '.')
  if result.get('pipeline'):
    p = result['pipeline']
    worst = min(p['host_over_step'], p['device_augment_over_step'])
    goals.append(f'input pipeline >= 5x the step it feeds: {worst:.0f}x '
                 'at the slower of its two stages, ' +
                 ('met.' if worst >= 5 else 'not met.'))
  return goals


# ----------------------------------------------------------------------------
# Main.


def _environment(argv, torch_py):
  import flax
  import jaxlib
  dev = jax.devices()[0]
  env = {
      'command': 'python experiments/bench.py ' + ' '.join(argv),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'device': f'{dev.platform}: {dev.device_kind}',
      'platform': dev.platform,
      'num_devices': jax.device_count(),
      'cpu_count': os.cpu_count(), 'cpu_model': _cpu_model(),
      'python': platform.python_version(), 'jax': jax.__version__,
      'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compiler_options': models.compiler_options(dev.platform),
      # A persistent cache would turn compile times into cache reads.
      'compilation_cache_dir': jax.config.jax_compilation_cache_dir,
      'torch_python': torch_py,
      'load_start': list(os.getloadavg()),
      'runtime_peak_reported': runtime_peak_bytes(dev) is not None,
  }
  return env


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


ALL_SECTIONS = ('graphs', 'torch', 'impl', 'pipeline', 'options', 'contention',
                'vit', 'profile', 'resnet50', 'resnet50_224')
DEFAULT_SECTIONS = 'graphs,torch,impl,pipeline,options,contention,vit,profile'


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='experiments/results',
                 help='folder for bench.md and bench.json')
  p.add_argument('--quick', '--tiny', action='store_true', dest='quick',
                 help='tiny models, 1-2 steps: a smoke test (numbers '
                 'meaningless); with --device too')
  p.add_argument('--sections', default=DEFAULT_SECTIONS,
                 help=f'comma-separated subset of {",".join(ALL_SECTIONS)} '
                 '(resnet50 and resnet50_224 are opt-in)')
  p.add_argument('--device', action='store_true',
                 help='the accelerator check (ResNet-50 224x224 bfloat16, '
                 'CIFAR ResNet-32, vmap vs loop, CPU options on and off); '
                 'writes bench_<device>.md/.json')
  p.add_argument('--render', default=None, metavar='BENCH_JSON',
                 help='only write the Markdown of an existing JSON result')
  p.add_argument('--torch_python', default=None,
                 help='Python with torch for the PyTorch peer (default: '
                 '$TORCH_PYTHON, then .venv-torch/bin/python)')
  p.add_argument('--imagenet_batch', type=int, default=16)
  p.add_argument('--imagenet_size', type=int, default=64)
  p.add_argument('--imagenet224_batch', type=int, default=8,
                 help='batch of the opt-in resnet50_224 section')
  p.add_argument('--imagenet224_remat', action='store_true',
                 help='rematerialise every stage in resnet50_224 (memory)')
  p.add_argument('--imagenet_graphs',
                 default='single,h2_simple,h4_hierarchical',
                 help='graphs of the ResNet-50 sections (Table 4\'s rows with '
                 'shared layers; add h2_instances for two copies)')
  p.add_argument('--impl_batch', type=int, default=None,
                 help='batch of the vmap-vs-loop comparison')
  p.add_argument('--cpu_devices', type=int, default=2,
                 help='CPU devices to create (the options and contention '
                 'sections use them; everything else uses one)')
  p.add_argument('--budget_s', type=float, default=4.0,
                 help='timed seconds per measurement (within min/max steps)')
  p.add_argument('--device_batch', type=int, default=64,
                 help='--device: ResNet-50 224x224 batch per graph')
  p.add_argument('--device_budget_s', type=float, default=270,
                 help='--device: skip what would start after this many '
                 'seconds (the check must end within 6 minutes)')
  args = p.parse_args(argv)
  check_args(p, args)
  return args


def check_args(parser, args):
  """Every argument checked before anything runs: a mistake ends with one
  `error: ...` line and exit status 2 (argparse's), never a traceback."""
  positive = ('imagenet_batch', 'imagenet_size', 'imagenet224_batch',
              'cpu_devices', 'device_batch', 'device_budget_s')
  for name in positive:
    if getattr(args, name) <= 0:
      parser.error(f'--{name}={getattr(args, name)}: must be positive')
  if args.budget_s < 0:
    parser.error(f'--budget_s={args.budget_s}: must be 0 or more')
  if args.impl_batch is not None and args.impl_batch <= 0:
    parser.error(f'--impl_batch={args.impl_batch}: must be positive')
  sections = [s for s in args.sections.split(',') if s]
  unknown = sorted(set(sections) - set(ALL_SECTIONS))
  if unknown or not sections:
    parser.error(f'--sections={args.sections}: unknown {unknown}; choose '
                 f'from {",".join(ALL_SECTIONS)}')
  graphs = [g for g in args.imagenet_graphs.split(',') if g]
  bad = sorted(set(graphs) - set(paper.TOPOLOGIES))
  if bad or not graphs:
    parser.error(f'--imagenet_graphs={args.imagenet_graphs}: unknown {bad}; '
                 f'choose from {",".join(paper.TOPOLOGIES)}')
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    parser.error(f'--torch_python={args.torch_python}: not an executable')
  if args.render:
    try:
      with open(args.render) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      parser.error(f'--render={args.render}: {e}')
    if not isinstance(result, dict) or not {'environment', 'graphs',
                                            'total_s'} <= set(result):
      parser.error(f'--render={args.render}: not a bench.py result (no '
                   'environment, graphs and total_s)')
    args.render_result = result
  elif os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f'--out={args.out}: not a folder')


def _logger(t0):
  def log(message):  # with the elapsed time, so slow sections show
    elapsed = time.time() - t0
    print(f'[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}',
          flush=True)
  return log


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.render:
    name = os.path.splitext(os.path.basename(args.render))[0]
    try:
      write_files(os.path.dirname(args.render) or '.', name,
                  args.render_result, json_too=False)
    except (KeyError, TypeError, ValueError) as e:  # an older or edited JSON
      print(f'bench.py: error: --render={args.render}: cannot render '
            f'({type(e).__name__}: {e})', file=sys.stderr)
      raise SystemExit(2) from None
    return args.render_result
  try:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  except RuntimeError:  # backends already up (e.g. under pytest): keep them
    pass
  t0 = time.time()
  log = _logger(t0)
  if args.device:
    return main_device(args, argv, t0, log)
  sections = {s for s in args.sections.split(',') if s}
  torch_py = (torch_python(args.torch_python)
              if sections & {'torch', 'contention'} else None)
  result = {'mode': 'cpu', 'environment': _environment(argv, torch_py),
            'graphs': {}, 'sections': sorted(sections)}
  log(f'bench: {result["environment"]["device"]}, load '
      f'{result["environment"]["load_start"]}')
  if sections & {'torch', 'contention'} and torch_py is None:
    log('bench: no Python with torch (make bench builds .venv-torch); '
        'skipping the PyTorch peer')

  if args.quick:
    timing = dict(warmup=1, min_steps=2, max_steps=2, budget_s=0)
    cifar = functools.partial(cifar_config, batch=8, network='tiny_resnet')
    imagenet = functools.partial(imagenet_config, batch=4, size=32,
                                 network='tiny_resnet50')
    imagenet224 = imagenet
    torch_timing = dict(steps=2, warmup=1, depth=8)
    impl_batch, pipeline_steps, b2b = None, 5, 2
    graphs = imagenet_graphs = ('single', 'h4_hierarchical')
    option_variants = {'single': ('before: XLA default', 'YNNPACK convolutions',
                                  'bfloat16', 'remat', 'CPU devices',
                                  '1 intra-op thread', ONEDNN_FFI),
                       MAKE_RUN: (ONEDNN_FFI,)}
    make_run = functools.partial(make_run_config, batch=8,
                                 network='tiny_resnet')
  else:
    timing = dict(warmup=1, min_steps=4, max_steps=15, budget_s=args.budget_s)
    cifar = cifar_config
    imagenet = functools.partial(imagenet_config, batch=args.imagenet_batch,
                                 size=args.imagenet_size)
    imagenet224 = functools.partial(imagenet_config,
                                    batch=args.imagenet224_batch, size=224)
    torch_timing = dict(steps=5, warmup=2)
    impl_batch, pipeline_steps, b2b = args.impl_batch, 50, 10
    graphs = GRAPHS
    imagenet_graphs = tuple(args.imagenet_graphs.split(','))
    option_variants = {
        'single': tuple(k for k in OPTION_VARIANTS if k != 'CPU options'),
        'h4_hierarchical': ('YNNPACK convolutions', 'remat', 'CPU devices',
                            ONEDNN_FFI),
        MAKE_RUN: (ONEDNN_FFI,)}
    make_run = make_run_config
  contention_timing = dict(timing, warmup=1, min_steps=min(3, timing['max_steps']),
                           budget_s=timing['budget_s'] / 2)
  cifar_batch = cifar('single').batch_size
  torch_kw = None
  if torch_py is not None:
    torch_kw = dict(python=torch_py, batch=cifar_batch,
                    graphs=('single', 'h4_hierarchical'))

  kept_steps = {}
  if sections & {'graphs', 'torch', 'pipeline', 'options', 'contention',
                 'impl', 'profile'}:
    log('section graphs: CIFAR ResNet-32')
    keep = ('single', 'h4_hierarchical')
    rows, torch_rows, kept_steps = run_graphs(
        'CIFAR ResNet-32', cifar, graphs if 'graphs' in sections else
        ('single', 'h4_hierarchical'), timing,
        torch=(dict(torch_kw, timing=torch_timing)
               if torch_kw and 'torch' in sections else None),
        keep=keep, log=log)
    result['graphs']['CIFAR ResNet-32'] = {
        'description': 'CIFAR-10 recipe, batch 128 of 32x32x3 uint8 images '
                       '(augmented and normalised inside the step), 10 classes.'
                       if not args.quick else 'quick: tiny_resnet, batch 8.',
        'rows': rows}
    if torch_rows:
      result['torch'] = torch_rows
      result['environment']['torch'] = torch_rows[0]['torch_version']
  if 'impl' in sections:
    log('section impl: vmap vs loop')
    impl_timing = dict(timing, warmup=1, min_steps=2, max_steps=2)
    reuse = {g: s for g, s in kept_steps.items()
             if impl_batch in (None, s.config.batch_size)}
    result['impl'] = run_impl(
        functools.partial(cifar, **({'batch': impl_batch} if impl_batch else {})),
        ('h4_hierarchical',), impl_timing, impl_timing, loop_steps=reuse,
        log=log)
  if 'pipeline' in sections:
    log('section pipeline')
    single = result['graphs']['CIFAR ResNet-32']['rows'][0]
    result['pipeline'] = run_pipeline(
        single['batch'], pipeline_steps, single['images_per_s'], log=log,
        host_seconds=0.5 if args.quick else 10.0)
  contention_steps = {'single': kept_steps.get('single'),
                      'h4_hierarchical': kept_steps.get('h4_hierarchical')}
  kept_options = {}
  if 'options' in sections:
    log('section options')
    kept_steps[MAKE_RUN] = Step(make_run())
    result['options'], kept_options = run_options(
        kept_steps, option_variants, timing, b2b,
        keep=('CPU devices', '2 CPU devices', '1 intra-op thread', ONEDNN_FFI),
        log=log)
    del kept_steps[MAKE_RUN]
    for (graph, name), step in kept_options.items():
      if graph == 'single' and 'per device' not in name:
        contention_steps[f'single, {name}'] = step
  if 'contention' in sections:
    log('section contention: one competing busy process')
    result['contention'] = run_contention(
        {k: v for k, v in contention_steps.items() if v is not None},
        contention_timing,
        torch=(dict(torch_kw, formats=('channels_last',),
                    threads=sorted({1, os.cpu_count() or 1}), **torch_timing)
               if torch_kw else None), log=log)
  if 'vit' in sections:
    log('section vit: Fashion-MNIST ViT-tiny')
    vit = functools.partial(vit_config, batch=8 if args.quick else 128,
                            network='tiny_vit' if args.quick else 'vit_tiny')
    rows, _, _ = run_graphs('Fashion-MNIST ViT-tiny', vit,
                            ('single', 'h2_simple', 'h4_hierarchical')
                            if not args.quick else graphs, timing, log=log)
    c = vit('single')
    result['graphs']['Fashion-MNIST ViT-tiny'] = {
        'description': f'configs/fmnist_vit.py, {c.model.name} (3 stages of '
                       'transformer blocks), batch '
                       f'{c.batch_size} of 28x28x1 uint8 images, 10 classes.',
        'rows': rows}
  if 'profile' in sections:
    log('section profile: the single step by op class')
    profiled = {'ours (XLA)': kept_steps['single']}
    onednn_step = kept_options.get(('single', ONEDNN_FFI))
    if onednn_step is None and onednn_conv.available():
      onednn_step = option_step(kept_steps['single'], ONEDNN_FFI, log=log)[1]
    if onednn_step is not None:
      profiled[f'ours, {ONEDNN_FFI}'] = onednn_step
    with tempfile.TemporaryDirectory() as trace_dir:
      result['profile'] = run_profile(
          profiled, trace_dir, trace_steps=1 if args.quick else 3, log=log,
          torch=(dict(torch_kw, graphs=('single',), formats=('channels_last',),
                      threads=(os.cpu_count() or 1,),
                      profile=1 if args.quick else 3, **torch_timing)
                 if torch_kw else None))
    del profiled, onednn_step
  del kept_steps, contention_steps, kept_options
  for section, make, setting in (
      ('resnet50', imagenet, 'ImageNet-shaped ResNet-50'),
      ('resnet50_224', imagenet224, 'ResNet-50 224x224')):
    if section not in sections:
      continue
    log(f'section {section}')
    remat = section == 'resnet50_224' and args.imagenet224_remat
    rows, _, _ = run_graphs(setting, make, imagenet_graphs, timing, log=log,
                            remat=remat)
    c = make('single')
    result['graphs'][setting] = {
        'description': f'ImageNet recipe, {c.model.name}, batch '
                       f'{c.batch_size} of {c.image_size}x{c.image_size}x3 '
                       'float32 images (preprocessed, as streamed)' +
                       (', every stage rematerialised' if remat else '') + '.',
        'rows': rows}
  result['environment']['load_end'] = list(os.getloadavg())
  result['total_s'] = time.time() - t0
  result['goals'] = _goals(result) if not args.quick else [
      'quick run: settings too small for the goals to mean anything.']
  write_report(args.out, 'bench', result)
  log(f'bench: wrote {args.out}/bench.md and bench.json in '
      f'{result["total_s"] / 60:.1f} min; load {os.getloadavg()}')
  return result


def device_slug():
  kind = jax.devices()[0].device_kind
  return re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_') or 'device'


def main_device(args, argv, t0, log):
  """The accelerator check: ResNet-50 224x224 bfloat16 and CIFAR ResNet-32.

  Parts run in order of importance and are skipped (and listed) when they
  would start after `--device_budget_s`, so the check ends in time (not
  with --tiny, a smoke test of every part).
  """
  result = {'mode': 'device', 'environment': _environment(argv, None),
            'graphs': {}, 'skipped': []}
  slug = device_slug()
  log(f'bench --device: {result["environment"]["device"]}')
  graphs = ('single', 'h2_simple', 'h4_hierarchical')
  if args.quick:
    graphs = ('single', 'h4_hierarchical')  # the code paths of all three
    timing, rounds = dict(warmup=1, min_steps=2, max_steps=2, budget_s=0), 1
    r50 = functools.partial(imagenet_config, batch=4, size=32,
                            network='tiny_resnet50')
    cifar = functools.partial(cifar_config, batch=8, network='tiny_resnet')
  else:
    timing, rounds = dict(warmup=2, min_steps=5, max_steps=30, budget_s=1.5), 2
    r50 = functools.partial(imagenet_config, batch=args.device_batch, size=224)
    cifar = cifar_config
    reserve_s = 45  # about one ResNet-50 compile

  def bf16(make):
    def config(graph):
      c = make(graph)
      c.model.dtype = 'bfloat16'
      return c
    return config
  r50 = bf16(r50)

  def in_budget(part):
    if args.quick or time.time() - t0 + reserve_s <= args.device_budget_s:
      return True
    result['skipped'].append(part)
    log(f'  skipped {part}: out of time budget')
    return False

  kept = {}
  setting = 'ResNet-50 224x224 bfloat16' if not args.quick else 'tiny ResNet-50'
  if in_budget(setting):
    log(f'section {setting}')
    rows, _, kept_r50 = run_graphs(setting, r50, graphs, timing, rounds=rounds,
                                   keep=('single', 'h4_hierarchical'), log=log)
    c = r50('single')
    result['graphs'][setting] = {
        'description': f'ImageNet recipe, {c.model.name}, batch '
                       f'{c.batch_size} of {c.image_size}x{c.image_size}x3, '
                       'bfloat16 compute, float32 parameters.', 'rows': rows}
    kept.update({('r50', g): s for g, s in kept_r50.items()})
  if in_budget('CIFAR ResNet-32'):
    log('section CIFAR ResNet-32')
    rows, _, kept_cifar = run_graphs('CIFAR ResNet-32', cifar, graphs, timing,
                                     rounds=rounds, keep=('h4_hierarchical',),
                                     log=log)
    result['graphs']['CIFAR ResNet-32'] = {
        'description': 'CIFAR-10 recipe (float32), batch '
                       f'{cifar("single").batch_size}.', 'rows': rows}
    kept.update({('cifar', g): s for g, s in kept_cifar.items()})
  impl_timing = dict(timing, warmup=1, min_steps=3, max_steps=5)
  result['impl'] = []
  for key, make, name in ((('r50', 'h4_hierarchical'), r50, setting),
                          (('cifar', 'h4_hierarchical'), cifar,
                           'CIFAR ResNet-32')):
    if key in kept and in_budget(f'vmap vs loop, {name}'):
      log(f'section impl: {name}')
      rows = run_impl(make, ('h4_hierarchical',), impl_timing, impl_timing,
                      loop_steps={'h4_hierarchical': kept[key]}, log=log)
      for r in rows:
        r['setting'] = name
      result['impl'] += rows
  result['options'] = []
  for graph in ('single', 'h4_hierarchical'):
    key = ('r50', graph)
    if key in kept and in_budget(f'CPU options, {setting} {graph}'):
      log(f'section options: CPU options, {graph}')
      rows, _ = run_options({graph: kept[key]}, {graph: ('CPU options',)},
                            timing, 0, rounds=rounds, log=log)
      result['options'] += rows
  del kept
  result['environment']['load_end'] = list(os.getloadavg())
  result['total_s'] = time.time() - t0
  result['goals'] = []
  write_report(args.out, f'bench_{slug}', result)
  log(f'bench --device: wrote {args.out}/bench_{slug}.md and .json in '
      f'{result["total_s"] / 60:.1f} min')
  return result


if __name__ == '__main__':
  main()
