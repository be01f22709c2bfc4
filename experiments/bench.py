"""Training-step benchmark (issue #7): time, memory and FLOPs of every graph.

One process, one machine; everything timed after compilation, as medians over
several steps. The step timed is the real `collab_jax.train.train_step`,
jitted over a device mesh with the state donated, exactly as
`train.train_and_evaluate` does. Sections:

  graphs    step time, images/s, compiled FLOPs and memory of every training
            graph of CIFAR ResNet-32 (batch 128, 32x32x3) and of a small
            ImageNet-shaped ResNet-50 (real stages, small batch/resolution),
            as ratios to the single model, beside the paper's Table 4.
  impl      branches as one batched `vmap` computation vs the sequential loop.
  torch     the PyTorch peer (experiments/torch_reference.py) on the same
            CPU, timed between two rounds of ours (A-B-A).
  pipeline  host batch assembly and on-device augmentation vs the step.
  options   bfloat16 compute, rematerialisation, data parallel over CPU
            devices, back-to-back steps without host syncs.

Command (about 12 minutes on 2 CPU cores; writes bench.md and bench.json):

  .venv/bin/python experiments/bench.py --out=experiments/results

`--quick` runs every section on the smallest settings in seconds (a smoke
test, numbers meaningless). XLA flags go in the environment as usual
(`XLA_FLAGS=... python experiments/bench.py`); the ones used are recorded.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from collab_jax import heads as heads_lib
from collab_jax import input_pipeline
from collab_jax import models
from collab_jax import recipes
from collab_jax import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402  (imports no torch until used)

GRAPHS = ('single', 'h2_instances', 'h4_instances', 'h2_simple',
          'h4_hierarchical')
# Paper Table 4 (ImageNet ResNet-50, relative to one model): (time, memory).
PAPER_TABLE4 = {'single': (1.0, 1.0), 'h2_instances': (2.0, 2.0),
                'h2_simple': (1.4, 1.32), 'h4_hierarchical': (1.75, 1.5)}
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


def _setting(config):
  """(image_shape, num_classes, data_stats, image dtype, steps/epoch)."""
  if config.dataset == 'imagenet2012':
    s = config.image_size
    return ((s, s, 3), 1000, {'mean': input_pipeline.IMAGENET_MEAN,
                              'std': input_pipeline.IMAGENET_STD},
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
  """`train.train_step` of `config`, compiled on `devices` with donation.

  `like`: a Step with the same variables and optimizer whose (current) state
  is copied instead of initialising a new one (saves compiling `init`).
  """

  def __init__(self, config, devices=None, remat=False, compiler_options=None,
               like=None):
    self.config = config
    devices = devices or jax.devices()[:1]
    if compiler_options is None:  # what this repository recommends
      compiler_options = models.compiler_options(devices[0].platform)
    self.compiler_options = compiler_options
    image_shape, num_classes, stats, dtype, per_epoch = _setting(config)
    model = train.create_model(config, num_classes)
    if remat:
      model = model.clone(remat=True)
    self.model = model
    lr_fn = train.create_learning_rate_fn(config, per_epoch)
    tx = train.create_optimizer(config, lr_fn)
    mesh = Mesh(np.array(devices), ('data',))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P('data'))
    if like is None:
      state = train.create_train_state(jax.random.key(config.seed), config,
                                       model, image_shape, tx)
    else:  # same variables and optimizer: copy `like`'s state, skip init
      state = jax.tree.map(jnp.copy, like.state)
    self.state = jax.device_put(state, replicated)
    batch = _synthetic_batch(config, image_shape, num_classes, dtype)
    self.batch = jax.device_put(batch, data_sharding)
    stats = {k: tuple(float(x) for x in v) for k, v in stats.items()}
    jit_train = jax.jit(
        functools.partial(train.train_step, model=model, tx=tx, config=config,
                          data_stats=stats),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated), donate_argnums=(0,),
        compiler_options=compiler_options or None)
    start = time.perf_counter()
    self.compiled = jit_train.lower(self.state, self.batch, {}).compile()
    self.compile_s = time.perf_counter() - start
    self.program = program_stats(self.compiled)
    self.metrics = None

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
    while len(times) < max_steps and (len(times) < min_steps or
                                      sum(times) < budget_s):
      start = time.perf_counter()
      self()
      self.sync()
      times.append(time.perf_counter() - start)
    self.check_finite()
    return times

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


def program_stats(compiled):
  """FLOPs (train._compiled_stats) and the compiled program's memory."""
  out = train._compiled_stats(compiled)  # pylint: disable=protected-access
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


def _summary(times, batch):
  med = statistics.median(times)
  return {'step_s': med, 'step_s_min': min(times), 'step_s_max': max(times),
          'steps': len(times), 'images_per_s': batch / med}


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
               torch_graphs=(), torch_timing=None, keep=(), log=print):
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
    step = steps[graph] = Step(config)
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
    if r == 0 and torch_graphs:
      torch_rows.extend(run_torch(
          {g: tuple(tuple(s) for s in steps[g].config.model.splits)
           for g in torch_graphs}, steps[graphs[0]].config.batch_size,
          torch_timing, log=log))

  times, medians, loads = _time_in_rounds(steps, timing, rounds, after_round)
  single = graphs[0]
  kept = {g: steps[g] for g in graphs if g in keep}
  del steps
  out = []
  for graph in graphs:
    row = rows[graph]
    row.update(_summary(times[graph], row['batch']))
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
  return out, torch_rows, kept


def run_torch(graph_splits, batch, torch_timing, log=print):
  """The PyTorch peer: every format and thread count, graphs adjacent."""
  rows = []
  all_threads = sorted({1, os.cpu_count() or 1})
  for fmt in ('channels_last', 'nchw'):
    # NCHW (slower than channels_last here) only at one thread per core.
    for threads in all_threads if fmt == 'channels_last' else all_threads[-1:]:
      for graph, splits in graph_splits.items():
        r = torch_reference.measure(splits, batch=batch,
                                    channels_last=fmt == 'channels_last',
                                    num_threads=threads, **torch_timing)
        r['graph'] = graph
        r['load_1min'] = os.getloadavg()[0]
        rows.append(r)
        log(f'  torch {graph:<16} {fmt:<14} {threads} thread(s) '
            f'{1e3 * r["step_s"]:8.1f} ms {r["images_per_s"]:7.1f} img/s  '
            f'load {r["load_1min"]:.2f}')
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
             **step.program, **_summary(times, step.config.batch_size)}
      rows.append(row)
      log(f'  impl {graph:<16} {impl:<5} {1e3 * row["step_s"]:9.1f} ms '
          f'{row["images_per_s"]:7.1f} img/s  load {os.getloadavg()[0]:.2f}')
      del step
    del loop_step
  for loop, vmap in zip(rows[::2], rows[1::2]):
    vmap['slowdown_vs_loop'] = vmap['step_s'] / loop['step_s']
  return rows


def run_pipeline(batch, steps, train_images_per_s, log=print):
  """Host batch assembly and on-device augment+normalize, in images/s."""
  num = 50000
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, num).astype(np.int32)
  noise = input_pipeline.LabelNoise(num, 10, 0.2, seed=0)
  per_epoch = input_pipeline.steps_per_epoch(num, batch)
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = NamedSharding(mesh, P('data'))

  def host_batch(step):
    # What train.create_data_source's train_batch + train_and_evaluate's
    # to_global do for an in-memory dataset.
    idx = input_pipeline.train_indices(step, num_examples=num,
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
    return input_pipeline.normalize(input_pipeline.augment(rng, images),
                                    CIFAR10_MEAN, CIFAR10_STD)

  x = host_batch(0)['image']
  jax.block_until_ready(device_preprocess(0, x))
  times = []
  for step in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(device_preprocess(step, x))
    times.append(time.perf_counter() - start)
  device = _summary(times, batch)
  out = {'batch': batch, 'host': host, 'device_augment': device,
         'train_step_images_per_s': train_images_per_s,
         'host_over_step': host['images_per_s'] / train_images_per_s,
         'device_augment_over_step': device['images_per_s'] / train_images_per_s}
  log(f'  pipeline host {host["images_per_s"]:9.0f} img/s, device augment '
      f'{device["images_per_s"]:9.0f} img/s, step {train_images_per_s:7.1f} '
      'img/s')
  return out


OPTION_VARIANTS = {
    'before: XLA default': {'compiler_options': {}},
    'bfloat16': {'dtype': 'bfloat16'},
    'remat': {'remat': True},
    'CPU devices': {'devices': None},  # all of them (set by --cpu_devices)
}


def run_options(kept, variants, timing, back_to_back_steps, rounds=3,
                log=print):
  """Variants of the kept (already compiled) steps, timed in rounds with them.

  Barriers before/after, bfloat16, remat, data parallelism over CPU devices;
  each graph's variants are compiled, then timed round-robin with its
  baseline like `run_graphs` does, and compared per round.
  """
  rows = []
  for graph in variants:
    base_step = kept[graph]
    steps = {'float32': base_step}
    for name in variants[graph]:
      opts = OPTION_VARIANTS[name]
      devices = jax.devices() if 'devices' in opts else jax.devices()[:1]
      if 'devices' in opts:
        if len(devices) == 1:
          continue
        name = f'{len(devices)} CPU devices'
      config = base_step.config.copy_and_resolve_references()
      if 'dtype' in opts:
        config.model.dtype = opts['dtype']
      steps[name] = Step(config, devices=devices, remat=opts.get('remat', False),
                         compiler_options=opts.get('compiler_options'),
                         like=base_step)
    times, medians, loads = _time_in_rounds(steps, timing, rounds)
    load = loads[-1]
    base = None
    for name, step in steps.items():
      row = {'graph': graph, 'variant': name, 'batch': step.config.batch_size,
             'devices': step.state.step.sharding.num_devices,
             'compiler_options': step.compiler_options,
             'compile_s': step.compile_s, **step.program,
             **_summary(times[name], step.config.batch_size),
             'round_step_s': medians[name], 'load_1min': load}
      if name == 'float32' and back_to_back_steps:  # no syncs in between
        row['back_to_back_step_s'] = step.time_back_to_back(back_to_back_steps)
      if base is None:
        base = row
      row['time_vs_float32'] = _round_ratio(medians, name, 'float32')
      if 'memory_bytes' in row:
        row['memory_vs_float32'] = row['memory_bytes'] / base['memory_bytes']
      rows.append(row)
      log(f'  option {graph:<16} {name:<20} {1e3 * row["step_s"]:8.1f} ms '
          f'x{row["time_vs_float32"]:.2f} time, '
          f'x{row.get("memory_vs_float32", float("nan")):.2f} memory  '
          f'load {load:.2f}')
    del steps
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


def write_report(out_dir, result):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'bench.json'), 'w') as f:
    json.dump(result, f, indent=1, sort_keys=True)
  env = result['environment']
  L = ['# Training-step benchmark', '',
       f'Generated by `{env["command"]}` on {env["date"]} '
       f'({result["total_s"] / 60:.1f} min, one process).', '',
       f'Machine: {env["device"]}, {env["cpu_count"]} CPU cores '
       f'({env["cpu_model"]}); jax {env["jax"]}, jaxlib {env["jaxlib"]}, '
       f'flax {env["flax"]}, torch {env.get("torch", "not installed")}; '
       f'XLA_FLAGS=`{env["xla_flags"] or "(none)"}`. '
       f'Load average (1 min) at start {env["load_start"][0]:.2f}, at end '
       f'{env["load_end"][0]:.2f} (other users share these cores: compare '
       'ratios within this run, not absolute numbers across runs).', '',
       'Every number is the real `collab_jax.train.train_step` (recipe config '
       'of the graph, SGD + weight decay, non-finite guard, metrics), jitted '
       'with the state donated as in `train_and_evaluate`, on one device, '
       'compiled with `compiler_options='
       f'{env["compiler_options"]}` (`collab_jax.models.compiler_options`; '
       'see Options for before/after), after compilation and warm-up. The '
       'graphs of a setting are compiled first and then timed round-robin in '
       '3 rounds, so that load from other processes hits all of them alike: '
       'step time is the median over all timed steps (each waited for), the '
       'time ratio the median over rounds of the ratio to the single model '
       'in the same round, load the median 1-minute load average after each '
       'round. FLOPs are the compiled step\'s '
       '`cost_analysis()["flops"]`, bytes its `cost_analysis()["bytes '
       'accessed"]` (the memory traffic XLA estimates: where a graph\'s bytes '
       'ratio is well above its FLOP ratio, moving parameters, gradients, '
       'optimizer state and activations costs more than the arithmetic, and '
       'the FLOP ratio is not the limit of its time ratio); memory is the compiled program\'s '
       '`memory_analysis()`: temp + argument + output bytes, and the same '
       'minus the donated (aliased) state, which is both an argument and an '
       'output but one buffer. ' + env['runtime_peak_note'], '']
  for name, sect in result['graphs'].items():
    L += [f'## {name}', '', sect['description'], '']
    L += _graph_table(sect['rows']) + ['']
  if result.get('torch'):
    L += ['## PyTorch peer on the same CPU', '',
          'experiments/torch_reference.py (PyTorch ' + env.get('torch', '?') +
          '): the same ResNet-32 head tree, loss and SGD step on a fixed '
          'random float batch of 128 (ours also augments uint8 images on the '
          'device), channels-last with 1 thread and with one per core, NCHW with '
          'one per core. '
          'Timed between the first and the second round of ours (ours: the '
          'median over all rounds). PyTorch\'s OpenMP threads degrade badly when other '
          'processes hold the cores, hence both thread counts; the goal '
          'compares against the best PyTorch row.', '',
          '| graph | PyTorch format | threads | PyTorch img/s | ours img/s '
          '| ours / PyTorch | time ratio vs single (PyTorch) | load |',
          '|---|---|---|---|---|---|---|---|']
    ours = {r['graph']: r for r in result['graphs']['CIFAR ResNet-32']['rows']}
    single = {(r['memory_format'], r['num_threads']): r
              for r in result['torch'] if r['graph'] == 'single'}
    for r in result['torch']:
      o = ours[r['graph']]
      base = single.get((r['memory_format'], r['num_threads']))
      L.append(f'| {r["graph"]} | {r["memory_format"]} | {r["num_threads"]} '
               f'| {r["images_per_s"]:.1f} | {o["images_per_s"]:.1f} '
               f'| {o["images_per_s"] / r["images_per_s"]:.2f} '
               f'| {_fmt(r["step_s"] / base["step_s"] if base else None)} '
               f'| {_fmt(r.get("load_1min"))} |')
    graphs = [g for g in GRAPHS if any(r['graph'] == g for r in result['torch'])]
    L += ['', 'Time ratio of the 4-head tree to the single model: ours ' +
          ', '.join(f'{g} {ours[g]["time_ratio"]:.2f}' for g in graphs[1:]) +
          ' (PyTorch: last column above).', '']
  if result.get('impl'):
    L += ['## Branches: batched vmap vs sequential loop', '',
          result['impl_description'], '',
          '| graph | impl | batch | step ms | img/s | vmap / loop time '
          '| GFLOP/step | compile s |', '|---|---|---|---|---|---|---|---|']
    for r in result['impl']:
      L.append(f'| {r["graph"]} | {r["branch_impl"]} | {r["batch"]} '
               f'| {1e3 * r["step_s"]:.0f} | {r["images_per_s"]:.1f} '
               f'| {_fmt(r.get("slowdown_vs_loop"))} '
               f'| {_fmt(r.get("flops_per_step", 0) / 1e9, ".1f")} '
               f'| {r["compile_s"]:.1f} |')
    L.append('')
  if result.get('pipeline'):
    p = result['pipeline']
    L += ['## Input pipeline', '',
          f'CIFAR-shaped in-memory data (50,000 x 32x32x3 uint8, 20 % label '
          f'noise), batch {p["batch"]}. Host: `train_indices` + gather + '
          '`LabelNoise.labels` + `make_array_from_process_local_data` '
          '(what the trainer does per step, overlapped with the running '
          'step). Device: `augment` + `normalize` jitted alone (inside the '
          'train step they are fused into it).', '',
          '| stage | img/s | vs the ResNet-32 single step it feeds |',
          '|---|---|---|',
          f'| host batch assembly | {p["host"]["images_per_s"]:.0f} '
          f'| {p["host_over_step"]:.0f}x |',
          f'| on-device augment + normalize | '
          f'{p["device_augment"]["images_per_s"]:.0f} '
          f'| {p["device_augment_over_step"]:.0f}x |',
          f'| train step (single, float32) | '
          f'{p["train_step_images_per_s"]:.1f} | 1x |', '']
  if result.get('options'):
    L += ['## Options (same run)', '', result['options_description'], '',
          '| graph | variant | step ms | img/s | time vs float32 '
          '| memory MiB | memory vs float32 | compile s |',
          '|---|---|---|---|---|---|---|---|']
    for r in result['options']:
      L.append(f'| {r["graph"]} | {r["variant"]} | {1e3 * r["step_s"]:.0f} '
               f'| {r["images_per_s"]:.1f} | {_fmt(r["time_vs_float32"])} '
               f'| {_fmt(r.get("memory_bytes", 0) / MiB, ".1f")} '
               f'| {_fmt(r.get("memory_vs_float32"))} | {r["compile_s"]:.1f} |')
    b2b = [r for r in result['options'] if 'back_to_back_step_s' in r]
    if b2b:
      L += ['', 'No host syncs: ' + '; '.join(
          f'{r["graph"]} {1e3 * r["back_to_back_step_s"]:.0f} ms/step '
          f'dispatched back to back vs {1e3 * r["step_s"]:.0f} ms waiting '
          'for every step' for r in b2b) + '.']
    L.append('')
  if result.get('goals'):
    L += ['## Goals', ''] + [f'* {g}' for g in result['goals']] + ['']
  if result.get('notes'):
    L += ['## Notes', ''] + [f'* {n}' for n in result['notes']] + ['']
  with open(os.path.join(out_dir, 'bench.md'), 'w') as f:
    f.write('\n'.join(L))


def _goals(result):
  """One line per goal of issue #7, met or not, from this run's numbers."""
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
  if result.get('pipeline'):
    p = result['pipeline']
    worst = min(p['host_over_step'], p['device_augment_over_step'])
    goals.append(f'input pipeline >= 5x the step it feeds: {worst:.0f}x '
                 'at the slower of its two stages, ' +
                 ('met.' if worst >= 5 else 'not met.'))
  return goals


# ----------------------------------------------------------------------------
# Main.


def _environment(argv):
  import flax
  import jaxlib
  env = {
      'command': 'python experiments/bench.py ' + ' '.join(argv),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'device': f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
      'num_devices': jax.device_count(),
      'cpu_count': os.cpu_count(), 'cpu_model': _cpu_model(),
      'python': platform.python_version(), 'jax': jax.__version__,
      'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compiler_options': models.compiler_options(jax.devices()[0].platform),
      # A persistent cache would turn compile times into cache reads.
      'compilation_cache_dir': jax.config.jax_compilation_cache_dir,
      'load_start': list(os.getloadavg()),
  }
  if torch_reference.torch_available():
    import torch
    env['torch'] = torch.__version__
  peak = runtime_peak_bytes(jax.devices()[0])
  env['runtime_peak_note'] = (
      'The device reports a runtime peak (`memory_stats()`), listed in '
      'bench.json.' if peak is not None else
      f'Runtime peak: this device ({jax.devices()[0].platform}) reports no '
      '`memory_stats()`, so only the compiled numbers are given.')
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


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='experiments/results',
                 help='folder for bench.md and bench.json')
  p.add_argument('--quick', action='store_true',
                 help='smallest settings, a few steps: a smoke test')
  p.add_argument('--sections', default='graphs,impl,torch,pipeline,options',
                 help='comma-separated subset of graphs,impl,torch,pipeline,'
                 'options')
  p.add_argument('--imagenet_batch', type=int, default=16)
  p.add_argument('--imagenet_size', type=int, default=64)
  p.add_argument('--impl_batch', type=int, default=None,
                 help='batch of the vmap-vs-loop comparison (vmap is slow '
                 'on XLA:CPU)')
  p.add_argument('--cpu_devices', type=int, default=2,
                 help='CPU devices to create (the options section tries data '
                 'parallelism over them; everything else uses one)')
  p.add_argument('--imagenet_graphs',
                 default='single,h2_simple,h4_hierarchical',
                 help='graphs of the ResNet-50 setting (default: the rows of '
                 'the paper\'s Table 4 with shared layers; add h2_instances, '
                 'two independent copies, for about 1.5 more minutes)')
  p.add_argument('--budget_s', type=float, default=5.0,
                 help='timed seconds per measurement (within min/max steps)')
  return p.parse_args(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  sections = set(args.sections.split(','))
  try:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  except RuntimeError:  # backends already up (e.g. under pytest): keep them
    pass
  t0 = time.time()
  result = {'environment': _environment(argv), 'graphs': {}}
  def log(message):  # with the elapsed time, so slow sections show
    elapsed = time.time() - t0
    print(f'[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}',
          flush=True)
  log(f'bench: {result["environment"]["device"]}, load '
      f'{result["environment"]["load_start"]}')

  if args.quick:
    timing = dict(warmup=1, min_steps=2, max_steps=2, budget_s=0)
    cifar = functools.partial(cifar_config, batch=8, network='tiny_resnet')
    imagenet = functools.partial(imagenet_config, batch=4, size=32,
                                 network='tiny_resnet50')
    torch_timing = dict(steps=2, warmup=1, depth=8)
    impl_batch, pipeline_steps, b2b = None, 5, 2
    graphs = imagenet_graphs = ('single', 'h4_hierarchical')
    option_variants = {'single': tuple(OPTION_VARIANTS)}
  else:
    timing = dict(warmup=1, min_steps=5, max_steps=15, budget_s=args.budget_s)
    cifar = cifar_config
    imagenet = functools.partial(imagenet_config, batch=args.imagenet_batch,
                                 size=args.imagenet_size)
    torch_timing = dict(steps=5, warmup=2)
    impl_batch, pipeline_steps, b2b = args.impl_batch, 50, 10
    graphs = GRAPHS
    imagenet_graphs = tuple(args.imagenet_graphs.split(','))
    option_variants = {'single': tuple(OPTION_VARIANTS),
                       'h4_hierarchical': ('remat',)}
  with_torch = 'torch' in sections and torch_reference.torch_available()
  if 'torch' in sections and not with_torch:
    log('bench: torch is not installed; skipping the PyTorch peer '
        '(pip install torch==2.13.0, or make bench)')

  kept_steps = {}
  if sections & {'graphs', 'pipeline', 'options'} or with_torch:
    log('section graphs: CIFAR ResNet-32')
    rows, torch_rows, kept = run_graphs(
        'CIFAR ResNet-32', cifar, graphs if 'graphs' in sections else
        ('single', 'h4_hierarchical'), timing,
        torch_graphs=('single', 'h4_hierarchical') if with_torch else (),
        torch_timing=torch_timing,
        keep=(tuple(option_variants) if 'options' in sections else ()) +
        (('h4_hierarchical',) if 'impl' in sections else ()), log=log)
    kept_steps = kept
    result['graphs']['CIFAR ResNet-32'] = {
        'description': 'CIFAR-10 recipe, batch 128 of 32x32x3 uint8 images '
                       '(augmented and normalised inside the step), 10 classes.'
                       if not args.quick else 'quick: tiny_resnet, batch 8.',
        'rows': rows}
    result['torch'] = torch_rows
  if 'graphs' in sections:
    log('section graphs: ImageNet-shaped ResNet-50')
    rows, _, _ = run_graphs('ResNet-50', imagenet, imagenet_graphs, timing,
                            log=log)
    b, s = (args.imagenet_batch, args.imagenet_size) if not args.quick else (4, 32)
    result['graphs']['ImageNet-shaped ResNet-50'] = {
        'description': f'ImageNet recipe with the real ResNet-50 stages '
                       f'(25.6M parameters per instance, 1000 classes), batch '
                       f'{b} of {s}x{s}x3 float32 images (the streamed '
                       'pipeline delivers them preprocessed), to fit the time '
                       'budget; graphs: ' + ', '.join(imagenet_graphs) +
                       ' (--imagenet_graphs; every compile of this network '
                       'takes about a minute here). At this size the '
                       'parameters, gradients and '
                       'momentum outweigh the activations, unlike the paper\'s '
                       '224x224 runs, so memory ratios lean towards the '
                       'parameter ratios.'
                       if not args.quick else 'quick: tiny_resnet50.',
        'rows': rows}
  if 'impl' in sections:
    log('section impl: vmap vs loop')
    impl_timing = dict(timing, warmup=1, min_steps=2, max_steps=2)
    reuse = {g: s for g, s in kept_steps.items()
             if impl_batch in (None, s.config.batch_size)}
    result['impl'] = run_impl(
        functools.partial(cifar, **({'batch': impl_batch} if impl_batch else {})),
        ('h4_hierarchical',), impl_timing, impl_timing, loop_steps=reuse,
        log=log)
    result['impl_description'] = (
        'ResNet-32 at the batch of the CIFAR section (the loop row is that '
        'section\'s compiled step, timed again here), both implementations '
        'on the same stacked parameters; 1 warm-up and 2 timed steps each.')
  if 'pipeline' in sections:
    log('section pipeline')
    single = result['graphs']['CIFAR ResNet-32']['rows'][0]
    result['pipeline'] = run_pipeline(
        single['batch'], pipeline_steps, single['images_per_s'], log=log)
  if 'options' in sections:
    log('section options')
    result['options'] = run_options(kept_steps, option_variants, timing, b2b,
                                    log=log)
    del kept_steps
    result['options_description'] = (
        'ResNet-32 at batch 128; each graph\'s variants are compiled and then '
        'timed round-robin with its baseline (3 rounds; time ratio = median '
        'over rounds), against the first row (what every other section '
        'runs: float32, one device, `models.compiler_options(platform)`). "before: XLA '
        'default": compiled without those options, so XLA:CPU drops the '
        'optimisation barriers after residual blocks (`layers.materialize`) '
        'and recomputes the chain of earlier blocks inside the backward '
        'transposes: the code as it was before this benchmark. bfloat16: '
        '`config.model.dtype="bfloat16"` (parameters stay float32). remat: '
        '`HeadTree(remat=True)`, every stage rematerialised (config key '
        '`model.remat`, once train.create_model passes it). '
        f'{args.cpu_devices} CPU devices: the batch sharded over '
        f'`jax_num_cpu_devices={args.cpu_devices}` devices on the same '
        'cores (data parallelism instead of intra-op threads); its memory '
        'is per device (each holds the whole state and half the batch).')
  result['environment']['load_end'] = list(os.getloadavg())
  result['total_s'] = time.time() - t0
  result['goals'] = _goals(result) if not args.quick else [
      'quick run: settings too small for the goals to mean anything.']
  write_report(args.out, result)
  log(f'bench: wrote {args.out}/bench.md and bench.json in '
      f'{result["total_s"] / 60:.1f} min; load {os.getloadavg()}')
  return result


if __name__ == '__main__':
  main()
