"""Sweep runner: configs x seeds (x noise levels) -> runs -> result tables.

Each run is `python -m collab_jax.main` in its own workdir
`<root>/<sweep>/<row>/seed_<k>` (a subprocess, so a stopped sweep leaves
resumable checkpoints). A run whose `results.json` exists is skipped, so
re-running a finished sweep trains nothing and rewrites identical tables.
A run identical to one of an earlier sweep (same resolved config and seed,
see `run_key`) is that sweep's run: trained once, counted in both tables.
Tables (mean +- std of head 1's test error, with the run count of each cell)
go to `experiments/results/<sweep>.md` and `.json`.

  python experiments/sweep.py --sweep=fmnist_table1             # run + tables
  python experiments/sweep.py --sweep=fmnist_table1 --aggregate_only
  python experiments/sweep.py --list

The paper's own sweeps (`cifar10_table1_resnet32`, ...: a row per argument of
the config families configs/cifar10.py, cifar100.py, imagenet.py, with the
paper's number from collab_jax/paper.py) are defined here too; run them on
accelerators with the same command.
"""

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import functools
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'results')
# The runs are `python -m collab_jax.main` in ROOT: their configs are read
# here with the same checkout's collab_jax, whatever else is installed.
sys.path.insert(0, ROOT)
from collab_jax import paper  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class Row:
  """One cell group of a table: a config file plus overrides."""
  name: str             # row label in the table
  config: str           # path relative to the repository root[:argument]
  overrides: Tuple[Tuple[str, object], ...] = ()
  paper: str = ''       # the paper's number for the analogous row
  x: Optional[float] = None  # the row's value of the factor a sensitivity sweep varies
  seeds: Optional[int] = None  # this row's seed count, if not the sweep's


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  title: str
  rows: Tuple[Row, ...]
  seeds: int = 3
  noise_levels: Tuple[float, ...] = (0.0,)
  # Seed counts of some noise levels, if not the rows' (e.g. {0.8: 5}).
  seeds_by_noise: Tuple[Tuple[float, int], ...] = ()
  # Extra columns (besides head 1): 'heads' reports every head's error.
  show_heads: bool = False
  # Head 1's top-5 error beside top-1 (the paper's Table 4 has both).
  show_top5: bool = False
  # The mean of the heads' errors and the error of the heads' ensemble (mean
  # logits) beside head 1; a bar plot of the three.
  show_ensemble: bool = False
  # Sensitivity sweeps: the factor the rows' `x` values vary (plot's x axis).
  factor: str = ''
  # Head 1's training and test error against epochs per row (mean over its
  # runs), from each run's metrics.jsonl: a section of the table and a plot
  # `<sweep>_curves.png`. The runs must evaluate during training
  # (`eval_every_epochs`) for the test curve to have more than its end.
  show_curves: bool = False


# ---------------------------------------------------------------------------
# Fashion-MNIST analogues of the paper's claims (fit 2 CPU cores).

FMNIST = 'configs/fmnist_study.py'


def _fm(name, graph, paper='', x=None, seeds=None, **overrides):
  return Row(name, f'{FMNIST}:{graph}', tuple(sorted(overrides.items())), paper, x,
             seeds)


SWEEPS: Dict[str, Sweep] = {}


def _add(sweep):
  SWEEPS[sweep.name] = sweep


# Each analogue row quotes the paper's number of its row (ResNet-32's column).
_T1, _T2, _T3 = paper.TABLE1, paper.TABLE2, paper.TABLE3
_add(Sweep('fmnist_table1', 'Table 1 analogue: training graphs', tuple(
    _fm(_T1.label(g), g, _T1.text(g, 'ResNet-32')) for g in _T1.rows)))
_HEADS = _T2.columns[1:]
_add(Sweep('fmnist_table2', 'Table 2 analogue: alternating vs simultaneous, T = 1 and 2', (
    _fm(paper.GRAPHS['single'].label, 'single',
        _T2.text('simultaneous_t1', _T2.columns[0])),
    _fm(_T2.label('alternating'), 'h2_instances', _T2.text('alternating', *_HEADS),
        method='alternating', temperature=1.0),
    _fm(_T2.label('simultaneous_t1'), 'h2_instances',
        _T2.text('simultaneous_t1', *_HEADS), temperature=1.0),
    _fm(_T2.label('simultaneous_t2'), 'h2_instances',
        _T2.text('simultaneous_t2', *_HEADS), temperature=2.0),
), seeds=5, show_heads=True))
_add(Sweep('fmnist_table3', 'Table 3 analogue: 4 heads sharing stage 1, gradient scaling', (
    *(_fm(_T3.label(m), 'h4_simple', _T3.text(m, 'ResNet-32'),
          seeds=3 if m == 'loss' else 5, **{'model.rescale': m})
      for m in _T3.rows),
    # Beyond the paper: the same trees trained on the labels alone (beta = 1,
    # no consensus target), to separate the effect of the gradient scaling on
    # the shared stage from that of collaboration.
    *(_fm(f'{_T3.label(m)}, labels only (beta = 1)', 'h4_simple', seeds=5,
          **{'model.rescale': m, 'beta': 1.0}) for m in ('backprop', 'none')),
    # The single network (Table 1's runs), to compare each tree with it.
    _fm(paper.GRAPHS['single'].label, 'single', seeds=5),
)))
# Beyond the paper: does a larger learning rate alone give what 'no scaling'
# gives in Table 3 (there the shared stage's gradient is the sum over 4 heads)?
_add(Sweep('fmnist_lr_check', 'Learning-rate check: single network at 1x, 2x, 4x lr', (
    _fm('single instance, lr 0.1 (study default)', 'single'),
    _fm('single instance, lr 0.2', 'single', learning_rate=0.2),
    _fm('single instance, lr 0.4', 'single', learning_rate=0.4),
)))
_FIGURE3 = ('single', 'h2_instances', 'h2_simple', 'h4_hierarchical')
_add(Sweep('fmnist_figure3', 'Figure 3 analogue: label noise', tuple(
    _fm(paper.GRAPHS[g].label, g) for g in _FIGURE3),
           seeds=3, noise_levels=(0.0, 0.2, 0.4, 0.6, 0.8),
           seeds_by_noise=((0.8, 5),)))
# The same with one noisy-label draw shared by every run (the draws depend on
# the noise seed and the epoch only), to compare the two protocols.
_add(Sweep('fmnist_figure3_shared_draws',
           'Figure 3 analogue, first protocol: one noisy-label draw shared by all runs',
           tuple(_fm(paper.GRAPHS[g].label, g, label_noise_draws='shared')
                 for g in _FIGURE3),
           seeds=3, noise_levels=(0.2, 0.4, 0.6, 0.8)))

# Sensitivity (the paper's supplement, Sec. 6, studies beta, T and the split
# point of ResNet-32 on CIFAR-10): one factor at a time around the paper's
# values, on 2 heads with simple ILR sharing, against the single network.
_SINGLE = _fm(paper.GRAPHS['single'].label, 'single')
_add(Sweep('fmnist_sensitivity_beta', 'Sensitivity to beta (2 heads, simple ILR sharing)', (
    _SINGLE, *(_fm(f'beta = {b}' + (' (labels only)' if b == 1.0 else ''),
                   'h2_simple', x=b, beta=b) for b in (0.25, 0.5, 0.75, 1.0))),
           factor='beta'))
_add(Sweep('fmnist_sensitivity_temperature',
           'Sensitivity to T (2 heads, simple ILR sharing)', (
               _SINGLE, *(_fm(f'T = {t:g}', 'h2_simple', x=t, temperature=t)
                          for t in (1.0, 2.0, 4.0, 8.0))), factor='T'))
_add(Sweep('fmnist_sensitivity_split', 'Sensitivity to the split point (2 heads)', (
    _SINGLE,
    _fm('split before stage 0 (2 instances)', 'h2_instances', x=0),
    _fm('split before stage 1 (paper)', 'h2_simple', x=1),
    _fm('split before stage 2', 'h2_simple', x=2, **{'model.splits': ((2, 2),)}),
), factor='split point (stage index)'))

# The clean-label claim at a larger scale (ResNet-14, 10k images, standard
# augmentation, 20 epochs): recipes.fashion_mnist_scale; the pilot behind it
# in experiments/README.md.
SCALE = 'configs/fmnist_scale.py'
_add(Sweep('fmnist_scale', 'Clean labels at a larger scale: ResNet-14, 10k images, '
           'augmentation, 20 epochs', tuple(
               Row(_T1.label(g), f'{SCALE}:{g}', paper=_T1.text(g, 'ResNet-32'))
               for g in ('single', 'label_smoothing', 'h2_instances', 'h2_simple',
                         'h4_hierarchical')), show_ensemble=True, show_curves=True))

# The clean-label claim where the single network fits its training set
# (recipes.fashion_mnist_fit: ResNet-14, 5k images, no augmentation, 40
# epochs); the pilot behind it in experiments/README.md.
FIT = 'configs/fmnist_fit.py'
_add(Sweep('fmnist_fit', 'Clean labels, fitted regime: ResNet-14, 5k images, no '
           'augmentation, 40 epochs', (
               *(Row(_T1.label(g), f'{FIT}:{g}', paper=_T1.text(g, 'ResNet-32'))
                 for g in ('single', 'h2_instances', 'h2_simple', 'h4_hierarchical')),
               Row('4 heads, simple ILR sharing, no scaling', f'{FIT}:h4_simple',
                   (('model.rescale', 'none'),)),
           ), seeds=5, show_ensemble=True, show_curves=True))
# Label noise where the network cannot memorise it: the fitted regime at 60 %
# noise, without and with augmentation (pad 4 and crop, flip).
for _aug in (False, True):
  _add(Sweep(f'fmnist_fit_noise60{"_aug" if _aug else ""}',
             f'60 % label noise, fitted regime {"with" if _aug else "without"} '
             'augmentation', tuple(
                 Row(_T1.label(g), f'{FIT}:{g}', (('augment', _aug),))
                 for g in ('single', 'h2_instances', 'h4_hierarchical')),
             seeds=3, noise_levels=(0.6,), show_ensemble=True, show_curves=True))

# Beyond the paper (its future work): semi-supervised collaborative learning.
# 100 labelled images per class (the study's 1,000-image subset), the other
# 59,000 training images unlabelled; the same ResNet-8, batch 128 and 700 steps
# in every row (semi-supervised batches: 64 labelled + 64 unlabelled). The two
# supervised rows are the study's single and 4-head runs (configs identical, so
# the runs of fmnist_table1 are reused).
SEMISUP = 'configs/fmnist_semisup.py'
_add(Sweep('fmnist_semisup', 'Semi-supervised: 100 labels per class, 59k unlabelled images', (
    Row('supervised only, single network', f'{SEMISUP}:supervised_single'),
    Row('supervised only, 4 heads hierarchical', f'{SEMISUP}:supervised_h4_hierarchical'),
    Row('semi-supervised, 2 instances', f'{SEMISUP}:semisup_h2_instances'),
    Row('semi-supervised, 4 heads hierarchical', f'{SEMISUP}:semisup_h4_hierarchical'),
    Row('Mean Teacher (baseline), single network', f'{SEMISUP}:mean_teacher'),
), seeds=3, show_heads=True))


# ---------------------------------------------------------------------------
# The paper's own sweeps (accelerators): a row per argument of a config family.

@functools.lru_cache(maxsize=None)
def _family(path):
  """The module of config family `path` (configs/<name>.py)."""
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _paper_sweep(name, title, path, arguments, **kwargs):
  """A row per argument of family `path` that the paper reports, with its number."""
  rows = []
  for arg in arguments:
    label, text = _family(path).paper_row(arg)
    if text:
      rows.append(Row(label, f'{path}:{arg}', paper=text))
  _add(Sweep(name, title, tuple(rows), **kwargs))


for _net, (_, _column) in _family('configs/cifar10.py').NETWORKS.items():
  _paper_sweep(f'cifar10_table1_{_net}', f'Table 1, CIFAR-10 {_column}',
               'configs/cifar10.py', [f'{_net},{row}' for row in _T1.rows], seeds=5)
_paper_sweep('cifar100_table2', 'Table 2, CIFAR-100 ResNet-32', 'configs/cifar100.py',
             _family('configs/cifar100.py').ARGUMENTS, seeds=5, show_heads=True)
_paper_sweep('cifar10_table3', 'Table 3, CIFAR-10 ResNet-32, 4 heads simple',
             'configs/cifar10.py',
             [f'resnet32,{row}' for row in _family('configs/cifar10.py').TABLE3], seeds=5)
_paper_sweep('imagenet_table4', 'Table 4, ImageNet ResNet-50', 'configs/imagenet.py',
             paper.TABLE4.rows, seeds=1, show_top5=True)


# ---------------------------------------------------------------------------


def _slug(text):
  keep = ''.join(ch if ch.isalnum() else '_' for ch in text.lower())
  return '_'.join(p for p in keep.split('_') if p)


def variant_name(sweep, extra=()):
  """The sweep's name, suffixed by its command-line overrides if any.

  Runs and tables of `--sweep=fmnist_table1 -- --config.learning_rate=0.4`
  live under `fmnist_table1__learning_rate_0_4`, never in the plain sweep's
  folders: a finished run of another config is not mistaken for this one,
  and the plain sweep's tables are not overwritten.
  """
  if not extra:
    return sweep.name
  return sweep.name + '__' + _slug(' '.join(e.replace('--config.', '', 1)
                                            for e in extra))


def _own_dirs(sweep, root, extra=()):
  out = []
  name = variant_name(sweep, extra)
  for row in sweep.rows:
    for noise in sweep.noise_levels:
      seeds = dict(sweep.seeds_by_noise).get(noise, row.seeds or sweep.seeds)
      for seed in range(seeds):
        parts = [root, name, _slug(row.name)]
        if len(sweep.noise_levels) > 1:
          parts.append(f'noise_{int(round(noise * 100)):02d}')
        parts.append(f'seed_{seed}')
        out.append((row, noise, seed, os.path.join(*parts)))
  return out


@functools.lru_cache(maxsize=None)
def _load_config(config):
  """`get_config(arg)` of a `path[:arg]` config file, as a plain dict."""
  path, _, arg = config.partition(':')
  spec = importlib.util.spec_from_file_location(
      'sweep_config', path if os.path.isabs(path) else os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return (module.get_config(arg) if arg else module.get_config()).to_dict()


def run_key(row, noise, seed, extra=()):
  """What a run computes: its resolved config (plus the command-line extras).

  Two runs with equal keys are the same run, so sweeps share it (Figure 3's
  0 % noise cells are Table 1's runs; Table 2's single and T = 2 rows are
  Table 1's single and 2 instances). The keys ignore `progress`.
  """
  config = copy.deepcopy(_load_config(row.config))
  for key, value in (*row.overrides, ('seed', seed), ('label_noise', noise)):
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise SystemExit(f'{row.config}: override {key!r} names no config field.')
    node[leaf] = value
  config.pop('progress', None)
  return json.dumps(config, sort_keys=True, default=str), tuple(extra)


def run_dirs(sweep, root, extra=()) -> List[Tuple[Row, float, int, str]]:
  """(row, noise, seed, workdir) of every run of `sweep`.

  A run's workdir is `<root>/<sweep>/<row>[/noise_<p>]/seed_<k>`, unless an
  identical run (same `run_key`) belongs to a sweep defined earlier in
  `SWEEPS`: then it is that sweep's workdir, trained once for both.
  """
  owners = {}
  for other in SWEEPS.values():
    if other.name == sweep.name:
      break
    for row, noise, seed, workdir in _own_dirs(other, root, extra):
      try:
        owners.setdefault(run_key(row, noise, seed, extra), workdir)
      except (OSError, ImportError):  # a config this checkout cannot load
        continue
  out = []
  for row, noise, seed, workdir in _own_dirs(sweep, root, extra):
    if owners:
      workdir = owners.get(run_key(row, noise, seed, extra), workdir)
    out.append((row, noise, seed, workdir))
  return out


def _command(row, noise, seed, workdir, extra):
  cmd = [sys.executable, '-m', 'collab_jax.main',
         f'--config={os.path.join(ROOT, row.config)}', f'--workdir={workdir}',
         f'--config.seed={seed}', '--config.progress=False']
  for key, value in row.overrides:
    cmd.append(f'--config.{key}={value}')
  if noise:
    cmd.append(f'--config.label_noise={noise}')
  return cmd + list(extra)


def run_sweep(sweep, root, extra=(), log=print, max_seeds=None):
  """Runs every unfinished run of `sweep` in turn; returns the number run.

  `max_seeds` limits this pass to seeds `< max_seeds`, so that a long
  sweep fills every cell once before adding seeds.
  """
  runs = run_dirs(sweep, root, extra)
  todo = [r for r in runs
          if not os.path.exists(os.path.join(r[3], 'results.json'))
          and (max_seeds is None or r[2] < max_seeds)]
  # Seed-major, then noise level, then row: a sweep stopped part way leaves
  # whole columns (every graph at the same noise level and seed).
  todo.sort(key=lambda r: (r[2], r[1]))
  done = sum(os.path.exists(os.path.join(r[3], 'results.json')) for r in runs)
  log(f'{variant_name(sweep, extra)}: {done}/{len(runs)} runs finished, {len(todo)} to go'
      + (f' in this pass (seeds < {max_seeds})' if max_seeds else ''))
  ran = 0
  for i, (row, noise, seed, workdir) in enumerate(todo):
    cmd = _command(row, noise, seed, workdir, extra)
    log(f'[{i + 1}/{len(todo)}] {row.name} noise={noise} seed={seed} -> {workdir}')
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    # Shared runs can be due in two sweep processes at once: one trains.
    lock = open(os.path.join(workdir, '.sweep.lock'), 'w')
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.close()
      log('    another sweep process is training it; skipped in this pass')
      continue
    with lock, open(os.path.join(workdir, 'stdout.log'), 'a') as out:
      if os.path.exists(os.path.join(workdir, 'results.json')):
        log('    finished meanwhile by another sweep process')
        continue
      proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    ran += 1
    if proc.returncode != 0:
      raise SystemExit(f'run failed (exit {proc.returncode}); see '
                       f'{workdir}/stdout.log. Rerun the sweep to resume.')
    if not os.path.exists(os.path.join(workdir, 'results.json')):
      raise SystemExit(f'run stopped before finishing ({workdir}); rerun the '
                       'sweep to resume it.')
    log(f'    finished in {time.time() - t0:.0f} s')
  return ran


def _mean_std(values):
  """Mean and sample standard deviation; exact sums, so every Python agrees."""
  if not values:
    return None, None
  return (statistics.fmean(values),
          statistics.stdev(values) if len(values) > 1 else 0.0)


# Two-sided 5 % critical values of Student's t for 1..10 degrees of freedom
# (any statistics table); more seeds than 11 use the normal 1.96.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


# What a paired comparison can compare, by key: a label and the run's value.
# Against a single network every one of them is its one head's error.
METRICS = {
    'head_1': ('head 1', lambda r: r['head_1']),
    'heads_mean': ('mean of the heads', lambda r: statistics.fmean(r['heads'])),
    'ensemble': ('ensemble of the heads', lambda r: r['ensemble']),
}


def paired(base_runs, runs, metric='head_1'):
  """Paired comparison of a row with the baseline row over their common seeds.

  Returns {n, diff, se, wins, t, verdict}: `diff` is the mean over seeds of
  (row - baseline) error (`metric`, a key of METRICS; head 1 by default),
  `se` its standard error, `wins` the seeds in which the row's error is
  lower. The verdict is 'better' or 'worse' when a two-sided paired t-test
  rejects equality at the 5 % level, else 'tie' (no difference shown); one
  pair decides nothing.
  """
  value = METRICS[metric][1]
  base = {r['seed']: value(r) for r in base_runs}
  diffs = [value(r) - base[r['seed']] for r in runs if r['seed'] in base]
  n = len(diffs)
  if n < 2:
    return {'n': n, 'diff': diffs[0] if diffs else None, 'se': None,
            'wins': sum(d < 0 for d in diffs), 't': None, 'verdict': 'n/a'}
  mean, std = _mean_std(diffs)
  se = std / math.sqrt(n)
  t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
  crit = _T_975[n - 2] if n - 1 <= len(_T_975) else 1.96
  verdict = 'better' if t < -crit else 'worse' if t > crit else 'tie'
  return {'n': n, 'diff': mean, 'se': se, 'wins': sum(d < 0 for d in diffs),
          't': t, 'verdict': verdict}


def _read_curve(path):
  """Head 1's error per epoch in one run: ({epoch: train}, {epoch: test}).

  Train is the mean over the log window's batches (one epoch in the curve
  sweeps), test the evaluations during training and the final one. A
  resumed run may log a step twice; the last record wins.
  """
  train, test = {}, {}
  per_epoch = None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  for r in records:
    if r['kind'] == 'train' and r.get('epoch'):
      per_epoch = r['step'] / r['epoch']
  if per_epoch is None:
    raise ValueError(f'{path} has no training records with an epoch; rerun '
                     'the sweep with the current collab_jax.')
  for r in records:
    if r['kind'] in ('train', 'eval'):
      epoch = round(r['step'] / per_epoch, 3)
      (train if r['kind'] == 'train' else test)[epoch] = r['head_1/error']
  return train, test


def _mean_curve(paths):
  """The mean over runs of their curves, at the epochs every run has."""
  curves = [_read_curve(p) for p in paths]
  out = {}
  for k, name in enumerate(('train', 'test')):
    epochs = sorted(set.intersection(*(set(c[k]) for c in curves))) if curves else []
    out[f'{name}_epochs'] = epochs
    out[name] = [statistics.fmean(c[k][e] for c in curves) for e in epochs]
  return out


def _fmt(mean, std, n):
  if mean is None:
    return 'n/a (0 runs)'
  if n == 1:  # no spread from one run
    return f'{mean:.2f} (n=1)'
  return f'{mean:.2f} +- {std:.2f} (n={n})'


def aggregate(sweep, root, extra=()):
  """Collects finished runs into a table dict (JSON-ready)."""
  cells = []
  all_runs = run_dirs(sweep, root, extra)
  for row in sweep.rows:
    for noise in sweep.noise_levels:
      runs = []
      for r, nz, seed, workdir in all_runs:
        path = os.path.join(workdir, 'results.json')
        if r == row and nz == noise and os.path.exists(path):
          with open(path) as f:
            res = json.load(f)
          runs.append({'seed': seed, 'workdir': os.path.relpath(workdir, root),
                       'head_1': res['head_1_test_error'],
                       'heads': res['head_test_errors'],
                       'ensemble': res['ensemble_test_error'],
                       'steps': res['steps'],
                       'train_time_s': res.get('train_time_s_this_session'),
                       # robust to pauses: steps x median step time
                       'step_time_s': res.get('median_step_time_s'),
                       **({'head_1_top5': res.get('head_1_test_top5_error')}
                          if sweep.show_top5 else {})})
      mean, std = _mean_std([r['head_1'] for r in runs])
      top5 = [r['head_1_top5'] for r in runs if r.get('head_1_top5') is not None]
      extra_cols = {}
      if sweep.show_ensemble:
        extra_cols = {k: _mean_std([METRICS[k][1](r) for r in runs])
                      for k in ('heads_mean', 'ensemble')}
      if sweep.show_curves:
        extra_cols['curve'] = _mean_curve(
            [os.path.join(root, r['workdir'], 'metrics.jsonl') for r in runs])
      heads = None
      if runs and sweep.show_heads:
        heads = [_mean_std([r['heads'][h] for r in runs])
                 for h in range(len(runs[0]['heads']))]
      cells.append({'row': row.name, 'noise': noise, 'paper': row.paper,
                    'config': row.config, 'overrides': dict(row.overrides),
                    'n': len(runs), 'head_1_mean': mean, 'head_1_std': std,
                    'heads': heads, 'runs': runs, **extra_cols,
                    **({'head_1_top5': _mean_std(top5), 'n_top5': len(top5)}
                       if sweep.show_top5 else {})})
  title = sweep.title + (f' ({" ".join(extra)})' if extra else '')
  base = sweep.rows[0].name
  # With the heads' columns shown, each of them is compared too (labelled),
  # for rows with several heads (with one head all three are head 1).
  metrics = ('head_1', 'heads_mean', 'ensemble') if sweep.show_ensemble else ('head_1',)
  comparisons = [
      {'row': c['row'], 'noise': c['noise'], 'baseline': base,
       **({'metric': METRICS[m][0]} if sweep.show_ensemble else {}),
       **paired(next(b['runs'] for b in cells
                     if b['row'] == base and b['noise'] == c['noise']), c['runs'], m)}
      for m in metrics for c in cells if c['row'] != base
      and (m == 'head_1' or any(len(r['heads']) > 1 for r in c['runs']))]
  return {'sweep': variant_name(sweep, extra), 'title': title, 'seeds': sweep.seeds,
          'cells': cells, 'paired': comparisons}


def to_markdown(table):
  lines = [f'# {table["title"]}', '',
           'Head 1 test error (%), mean +- std over seeds (n = finished runs).', '']
  noise_levels = sorted({c['noise'] for c in table['cells']})
  if len(noise_levels) > 1:
    header = '| training graph | ' + ' | '.join(
        f'noise {int(n * 100)} %' for n in noise_levels) + ' |'
    lines += [header, '|' + '---|' * (len(noise_levels) + 1)]
    for row in dict.fromkeys(c['row'] for c in table['cells']):
      cells = {c['noise']: c for c in table['cells'] if c['row'] == row}
      lines.append(f'| {row} | ' + ' | '.join(
          _fmt(cells[n]['head_1_mean'], cells[n]['head_1_std'], cells[n]['n'])
          for n in noise_levels) + ' |')
  else:
    with_heads = any(c['heads'] for c in table['cells'])
    with_top5 = any('head_1_top5' in c for c in table['cells'])
    header = '| training graph | head 1 | '
    header += 'head 1 top-5 | ' if with_top5 else ''
    header += 'every head (mean +- std) | ' if with_heads else ''
    with_ensemble = any('ensemble' in c for c in table['cells'])
    header += ('mean of the heads | ensemble of the heads (mean logits) | '
               if with_ensemble else '')
    header += 'paper (analogous row) | run time (s) |'
    lines += [header, '|---|---|' + ('---|' if with_top5 else '')
              + ('---|' if with_heads else '')
              + ('---|---|' if with_ensemble else '') + '---|---|']
    for c in table['cells']:
      line = f'| {c["row"]} | {_fmt(c["head_1_mean"], c["head_1_std"], c["n"])} | '
      if with_top5:
        line += _fmt(*c['head_1_top5'], c['n_top5']) + ' | '
      if with_heads:
        line += (' / '.join(f'{m:.2f} +- {s:.2f}' if c['n'] > 1 else f'{m:.2f}'
                            for m, s in c['heads'])
                 if c['heads'] else 'n/a') + ' | '
      if with_ensemble:
        line += (_fmt(*c['heads_mean'], c['n']) + ' | '
                 + _fmt(*c['ensemble'], c['n']) + ' | ')
      times = _run_times(c['runs'])
      run_time = f'{statistics.fmean(times):.0f}' if times else '-'
      line += f'{c["paper"] or "-"} | {run_time} |'
      lines.append(line)
  if any(p['n'] for p in table['paired']):
    noisy = len(noise_levels) > 1
    by_metric = any('metric' in p for p in table['paired'])
    compared = ('the row\'s head 1, mean of the heads or ensemble against the '
                'baseline\'s head 1' if by_metric else 'head 1 error')
    lines += ['', f'Paired by seed against "{table["paired"][0]["baseline"]}" '
              f'(row minus baseline, {compared} in points; negative = the row is '
              'better; verdict by a two-sided paired t-test at 5 %, see '
              'experiments/README.md):', '',
              '| training graph | ' + ('noise | ' if noisy else '')
              + ('compared | ' if by_metric else '')
              + 'pairs | mean difference +- s.e. | seeds won | verdict |',
              '|---|' + ('---|' if noisy else '') + ('---|' if by_metric else '')
              + '---|---|---|---|']
    for p in table['paired']:
      if not p['n']:
        continue
      diff = (f'{p["diff"]:+.2f} +- {p["se"]:.2f}' if p['se'] is not None
              else f'{p["diff"]:+.2f}')
      lines.append(f'| {p["row"]} | ' + (f'{int(p["noise"] * 100)} % | ' if noisy else '')
                   + (f'{p["metric"]} | ' if by_metric else '')
                   + f'{p["n"]} | {diff} | {p["wins"]}/{p["n"]} | {p["verdict"]} |')
  curves = [c for c in table['cells'] if c.get('curve') and c['curve']['test']]
  if curves:
    epochs = sorted(set.union(*(set(c['curve']['test_epochs']) for c in curves)))
    lines += ['', 'Head 1 error (%) against epochs, train / test, mean over each '
              "row's finished runs (train: the epoch's augmented batches as the "
              'network trained through them; test: the test set):', '',
              '| training graph | ' + ' | '.join(f'epoch {e:g}' for e in epochs) + ' |',
              '|---|' + '---|' * len(epochs)]
    for c in curves:
      train = dict(zip(c['curve']['train_epochs'], c['curve']['train']))
      test = dict(zip(c['curve']['test_epochs'], c['curve']['test']))
      lines.append(f'| {c["row"]} (n={c["n"]}) | ' + ' | '.join(
          (f'{train[e]:.2f}' if e in train else '-') + ' / '
          + (f'{test[e]:.2f}' if e in test else '-') for e in epochs) + ' |')
  seen, total = set(), 0.0
  for c in table['cells']:
    for r in c['runs']:
      if r['workdir'] not in seen:
        seen.add(r['workdir'])
        total += sum(_run_times([r]))
  lines += ['', f'Training time of the {len(seen)} distinct finished runs: '
            f'{total / 60:.0f} min (run time = steps x median step time, '
            'compilation and evaluation excluded; runs shared with an earlier '
            'sweep are counted here too).']
  return '\n'.join(lines) + '\n'


def _run_times(runs):
  return [r['steps'] * r['step_time_s'] for r in runs if r.get('step_time_s')]


@contextlib.contextmanager
def _figure(table, path, size, ylabel, xlabel=None, fontsize=8, grid='both'):
  """Yields the axes of a new figure; then labels it and saves it to `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=size)
  try:
    yield ax
    if xlabel:
      ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(table['title'], fontsize=fontsize + 1)
    ax.grid(alpha=0.3, axis=grid)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before any run
      ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


def _plot(table, path, xlabel, lines, hlines=(), size=(5.5, 4)):
  """Head 1 error (mean +- std) of `lines` [(label, xs, cells)] against x."""
  with _figure(table, path, size, 'head 1 test error (%)', xlabel) as ax:
    for label, xs, cells in lines:
      ax.errorbar(xs, [c['head_1_mean'] for c in cells],
                  yerr=[c['head_1_std'] for c in cells], marker='o', capsize=3,
                  label=label)
    for label, y in hlines:
      ax.axhline(y, color='gray', ls='--', label=label)


def plot_noise(table, path):
  """Figure 3 analogue: head 1 error against the noise level, one line per row."""
  lines = []
  for row in dict.fromkeys(c['row'] for c in table['cells']):
    cells = [c for c in table['cells'] if c['row'] == row and c['n']]
    if cells:
      lines.append((row, [100 * c['noise'] for c in cells], cells))
  _plot(table, path, 'label noise (%)', lines)


def plot_factor(table, sweep, path):
  """Sensitivity plot: head 1 error against the factor, the single network as a line."""
  xs = {r.name: r.x for r in sweep.rows}
  cells = [c for c in table['cells'] if c['n'] and xs[c['row']] is not None]
  lines = [('head 1 (mean +- std over seeds)', [xs[c['row']] for c in cells],
            cells)] if cells else []
  hlines = [(c['row'], c['head_1_mean']) for c in table['cells']
            if xs[c['row']] is None and c['n']]
  _plot(table, path, sweep.factor, lines, hlines, size=(5, 3.6))


def plot_heads(table, path):
  """Head 1, the mean of the heads and their ensemble per row (mean +- std)."""
  cells = [c for c in table['cells'] if c['n']]
  bars = (('head 1', lambda c: (c['head_1_mean'], c['head_1_std'])),
          ('mean of the heads', lambda c: c['heads_mean']),
          ('ensemble of the heads', lambda c: c['ensemble']))
  width = 0.8 / len(bars)
  with _figure(table, path, (7, 3.8), 'test error (%)', fontsize=7, grid='y') as ax:
    for k, (label, get) in enumerate(bars):
      values = [get(c) for c in cells]
      ax.bar([i + (k - 1) * width for i in range(len(cells))],
             [v[0] for v in values], width,
             yerr=[v[1] or 0.0 for v in values], capsize=2, label=label)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([c['row'] for c in cells], rotation=20, ha='right',
                       fontsize=7)
    if cells:
      low = min(min(c['head_1_mean'], c['ensemble'][0]) for c in cells)
      high = max(c['head_1_mean'] + (c['head_1_std'] or 0) for c in cells)
      ax.set_ylim(max(0.0, low - 1.0), high + 0.5)


def plot_curves(table, path):
  """Head 1's train (dashed) and test (solid) error against epochs per row."""
  cells = [c for c in table['cells'] if c.get('curve') and c['n']]
  with _figure(table, path, (6, 4), 'head 1 error (%): train dashed, test solid',
               'epoch', fontsize=7) as ax:
    for i, c in enumerate(cells):
      ax.plot(c['curve']['train_epochs'], c['curve']['train'], ls='--', color=f'C{i}')
      ax.plot(c['curve']['test_epochs'], c['curve']['test'], marker='o',
              color=f'C{i}', label=f'{c["row"]} (n={c["n"]})')
    # Early training errors (about 40 % in epoch 1) are clipped.
    ax.set_ylim(0, max((max(c['curve']['test']) for c in cells), default=20.0) + 5.0)


def write_tables(sweep, root, out_dir=RESULTS, extra=()):
  table = aggregate(sweep, root, extra)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{table["sweep"]}.json'), 'w') as f:
    json.dump(table, f, indent=2, sort_keys=True)
    f.write('\n')
  with open(os.path.join(out_dir, f'{table["sweep"]}.md'), 'w') as f:
    f.write(to_markdown(table))
  if len(sweep.noise_levels) > 1:
    plot_noise(table, os.path.join(out_dir, f'{table["sweep"]}.png'))
  if sweep.factor:
    plot_factor(table, sweep, os.path.join(out_dir, f'{table["sweep"]}.png'))
  if sweep.show_ensemble:
    plot_heads(table, os.path.join(out_dir, f'{table["sweep"]}.png'))
  if sweep.show_curves:
    plot_curves(table, os.path.join(out_dir, f'{table["sweep"]}_curves.png'))
  return table


class _Parser(argparse.ArgumentParser):
  """argparse, with a mistake reported as one `error:` line (exit status 2)."""

  def error(self, message):
    self.exit(2, f'error: {message} (see --help)\n')


def _at_least_one(text):
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} must be >= 1')
  return value


def main(argv=None):
  parser = _Parser(description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sweep', action='append', default=[],
                      help='sweep name (repeatable); see --list')
  parser.add_argument('--root', default=os.path.join(HERE, 'runs'),
                      help='where run workdirs live')
  parser.add_argument('--out', default=RESULTS, help='where tables go')
  parser.add_argument('--aggregate_only', action='store_true',
                      help='only rewrite the tables from finished runs')
  parser.add_argument('--list', action='store_true', help='list the sweeps')
  parser.add_argument('--max_seeds', type=_at_least_one, default=None,
                      help='only run seeds below this (fill every cell first)')
  parser.add_argument('extra', nargs='*',
                      help='extra --config.KEY=VALUE overrides for every run')
  args = parser.parse_args(argv)
  for extra in args.extra:
    if not (extra.startswith('--config.') and '=' in extra):
      parser.error(f'extra argument {extra!r} is not a --config.KEY=VALUE '
                   'override (put overrides after --)')
  if args.list or not args.sweep:
    for s in SWEEPS.values():
      print(f'{s.name:28s} {len(run_dirs(s, args.root)):4d} runs  {s.title}')
    return
  for name in args.sweep:
    if name not in SWEEPS:
      parser.error(f'unknown sweep {name!r}; --list shows the sweeps')
  for name in args.sweep:
    sweep = SWEEPS[name]
    t0 = time.time()
    if not args.aggregate_only:
      run_sweep(sweep, args.root, args.extra, max_seeds=args.max_seeds)
    table = write_tables(sweep, args.root, args.out, args.extra)
    done = sum(c['n'] for c in table['cells'])
    print(f'{table["sweep"]}: {done} finished runs tabulated in '
          f'{args.out}/{table["sweep"]}.md '
          f'({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
