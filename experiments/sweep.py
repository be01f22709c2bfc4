"""Sweep runner: configs x seeds (x noise levels) -> runs -> run records -> tables.

Each run is `python -m collab_jax.main` in its own workdir
`<root>/<sweep>/<row>[/noise_<p>]/seed_<k>` (a subprocess, so a stopped sweep
leaves resumable checkpoints; the root, experiments/runs by default, is not
committed). A finished run becomes a record, one line of
`experiments/results/<sweep>.runs.jsonl` (`read_run`): its resolved config,
its results, its provenance and its head-1 curve. The records are what is
committed; every table and plot is rebuilt from them alone. A run with a
record is never trained again (on a fresh clone neither), and a finished
workdir under the root is ingested into the records.

A run identical to one of an earlier sweep (same resolved config and seed,
see `run_key`) is that sweep's run: trained once, recorded once in that
sweep's file (its id names the sweep), counted in both tables.

  python experiments/sweep.py --sweep=fmnist_table1              # run, record, tabulate
  python experiments/sweep.py --sweep=fmnist_table1 --aggregate_only  # record, tabulate
  python experiments/sweep.py --all --aggregate_only --root=DIR  # ingest DIR into every study
  python experiments/sweep.py --list

Tables never shrink: a table over zero runs, or over fewer runs than the one
it replaces, is refused (`--allow_fewer_runs` writes it anyway).

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
import glob
import importlib.util
import io
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
RUNS = os.path.join(HERE, 'runs')
# The runs are `python -m collab_jax.main` in ROOT: their configs are read
# here with the same checkout's collab_jax, whatever else is installed.
sys.path.insert(0, ROOT)
from collab_jax import paper  # pylint: disable=g-import-not-at-top,wrong-import-position

RECORDS = '.runs.jsonl'  # <results>/<sweep>.runs.jsonl
# Runs record their commit since this commit, which also gave every random
# stream (batch order, noise set, noise draws, augmentation, subsets) its own
# tag; a run without a commit drew from untagged streams.
TAGGED_STREAMS_SINCE = 'e852bbc'
ALPHA = 0.05  # the level of every test


class SweepError(Exception):
  """A mistake or a failure, reported as one `error:` line (exit status 2)."""


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
  # Paired comparisons besides "every row against the first": (row, baseline)
  # by row name, head 1, row minus baseline at every noise level.
  pairs: Tuple[Tuple[str, str], ...] = ()
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
  # runs), from each run's curve: a section of the table and a plot
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
  names = [r.name for r in sweep.rows]
  for pair in sweep.pairs:
    if not set(pair) <= set(names) or pair[0] == pair[1]:
      raise ValueError(f'{sweep.name}: pair {pair} does not name two of its rows')
  SWEEPS[sweep.name] = sweep


# Each analogue row quotes the paper's number of its row (ResNet-32's column).
_T1, _T2, _T3 = paper.TABLE1, paper.TABLE2, paper.TABLE3
_SINGLE_LABEL = paper.GRAPHS['single'].label
_add(Sweep('fmnist_table1', 'Table 1 analogue: training graphs', tuple(
    _fm(_T1.label(g), g, _T1.text(g, 'ResNet-32')) for g in _T1.rows)))
_HEADS = _T2.columns[1:]
# The paper's own comparisons of Table 2: simultaneous against alternating
# (both T = 1), and T = 2 against T = 1.
_T2_PAIRS = ((_T2.label('simultaneous_t1'), _T2.label('alternating')),
             (_T2.label('simultaneous_t2'), _T2.label('simultaneous_t1')))
_add(Sweep('fmnist_table2', 'Table 2 analogue: alternating vs simultaneous, T = 1 and 2', (
    _fm(_SINGLE_LABEL, 'single', _T2.text('simultaneous_t1', _T2.columns[0])),
    _fm(_T2.label('alternating'), 'h2_instances', _T2.text('alternating', *_HEADS),
        method='alternating', temperature=1.0),
    _fm(_T2.label('simultaneous_t1'), 'h2_instances',
        _T2.text('simultaneous_t1', *_HEADS), temperature=1.0),
    _fm(_T2.label('simultaneous_t2'), 'h2_instances',
        _T2.text('simultaneous_t2', *_HEADS), temperature=2.0),
), seeds=5, show_heads=True, pairs=_T2_PAIRS))
_LABELS_ONLY = {m: f'{_T3.label(m)}, labels only (beta = 1)' for m in ('backprop', 'none')}
_add(Sweep('fmnist_table3', 'Table 3 analogue: 4 heads sharing stage 1, gradient scaling', (
    *(_fm(_T3.label(m), 'h4_simple', _T3.text(m, 'ResNet-32'),
          seeds=3 if m == 'loss' else 5, **{'model.rescale': m})
      for m in _T3.rows),
    # Beyond the paper: the same trees trained on the labels alone (beta = 1,
    # no consensus target), to separate the effect of the gradient scaling on
    # the shared stage from that of collaboration.
    *(_fm(label, 'h4_simple', seeds=5, **{'model.rescale': m, 'beta': 1.0})
      for m, label in _LABELS_ONLY.items()),
    # The single network, to compare each tree with it.
    _fm(_SINGLE_LABEL, 'single', seeds=5),
), pairs=(
    # The scaling without collaboration, and collaboration without scaling.
    (_LABELS_ONLY['none'], _LABELS_ONLY['backprop']),
    (_T3.label('none'), _LABELS_ONLY['none']),
    # Each tree against the single network (backprop's is the first-row pair).
    *((name, _SINGLE_LABEL) for name in (_T3.label('none'), _T3.label('loss'),
                                         *_LABELS_ONLY.values())),
)))
# Beyond the paper: does a larger learning rate alone give what 'no scaling'
# gives in Table 3 (there the shared stage's gradient is the sum over 4 heads)?
_add(Sweep('fmnist_lr_check', 'Learning-rate check: single network at 1x, 2x, 4x lr', (
    _fm('single instance, lr 0.1 (study default)', 'single'),
    _fm('single instance, lr 0.2', 'single', learning_rate=0.2),
    _fm('single instance, lr 0.4', 'single', learning_rate=0.4),
)))
_FIGURE3 = ('single', 'h2_instances', 'h2_simple', 'h4_hierarchical')
# Between the collaborative graphs (the paper remarks on deeper trees at high
# noise), at every noise level.
_FIGURE3_PAIRS = tuple((paper.GRAPHS[a].label, paper.GRAPHS[b].label) for a, b in (
    ('h2_instances', 'h2_simple'), ('h2_instances', 'h4_hierarchical'),
    ('h2_simple', 'h4_hierarchical')))
_add(Sweep('fmnist_figure3', 'Figure 3 analogue: label noise', tuple(
    _fm(paper.GRAPHS[g].label, g) for g in _FIGURE3),
           seeds=3, noise_levels=(0.0, 0.2, 0.4, 0.6, 0.8),
           seeds_by_noise=((0.8, 5),), pairs=_FIGURE3_PAIRS))
# The same with one noisy-label draw shared by every run (the draws depend on
# the noise seed and the epoch only), to compare the two protocols.
_add(Sweep('fmnist_figure3_shared_draws',
           'Figure 3 analogue, first protocol: one noisy-label draw shared by all runs',
           tuple(_fm(paper.GRAPHS[g].label, g, label_noise_draws='shared')
                 for g in _FIGURE3),
           seeds=3, noise_levels=(0.2, 0.4, 0.6, 0.8), pairs=_FIGURE3_PAIRS))

# Sensitivity (the paper's supplement, Sec. 6, studies beta, T and the split
# point of ResNet-32 on CIFAR-10): one factor at a time around the paper's
# values, on 2 heads with simple ILR sharing, against the single network.
_SINGLE = _fm(_SINGLE_LABEL, 'single')
_add(Sweep('fmnist_sensitivity_beta', 'Sensitivity to beta (2 heads, simple ILR sharing)', (
    _SINGLE, *(_fm(f'beta = {b}' + (' (labels only)' if b == 1.0 else ''),
                   'h2_simple', x=b, beta=b) for b in (0.25, 0.5, 0.75, 1.0))),
           factor='beta'))
_add(Sweep('fmnist_sensitivity_temperature',
           'Sensitivity to T (2 heads, simple ILR sharing)', (
               _SINGLE, *(_fm(f'T = {t:g}', 'h2_simple', x=t, temperature=t)
                          for t in (1.0, 2.0, 4.0, 8.0))), factor='T',
           pairs=(('T = 8', 'T = 1'),)))
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
_SEMISUP_ROWS = {
    'supervised_single': 'supervised only, single network',
    'supervised_h4_hierarchical': 'supervised only, 4 heads hierarchical',
    'semisup_h2_instances': 'semi-supervised, 2 instances',
    'semisup_h4_hierarchical': 'semi-supervised, 4 heads hierarchical',
    'mean_teacher': 'Mean Teacher (baseline), single network'}
_S = _SEMISUP_ROWS
_add(Sweep('fmnist_semisup', 'Semi-supervised: 100 labels per class, 59k unlabelled images',
           tuple(Row(label, f'{SEMISUP}:{row}') for row, label in _S.items()),
           seeds=3, show_heads=True, pairs=(
               # The same tree with and without the unlabelled consensus.
               (_S['semisup_h4_hierarchical'], _S['supervised_h4_hierarchical']),
               (_S['semisup_h2_instances'], _S['mean_teacher']),
               (_S['semisup_h4_hierarchical'], _S['semisup_h2_instances']))))


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
             _family('configs/cifar100.py').ARGUMENTS, seeds=5, show_heads=True,
             pairs=_T2_PAIRS)
_paper_sweep('cifar10_table3', 'Table 3, CIFAR-10 ResNet-32, 4 heads simple',
             'configs/cifar10.py',
             [f'resnet32,{row}' for row in _family('configs/cifar10.py').TABLE3], seeds=5)
_paper_sweep('imagenet_table4', 'Table 4, ImageNet ResNet-50', 'configs/imagenet.py',
             paper.TABLE4.rows, seeds=1, show_top5=True)


# ---------------------------------------------------------------------------
# Runs: where each lives and what it computes.


def _slug(text):
  keep = ''.join(ch if ch.isalnum() else '_' for ch in text.lower())
  return '_'.join(p for p in keep.split('_') if p)


def variant_name(sweep, extra=()):
  """The sweep's name, suffixed by its command-line overrides if any.

  Runs and tables of `--sweep=fmnist_table1 -- --config.learning_rate=0.4`
  live under `fmnist_table1__learning_rate_0_4`, never in the plain sweep's
  folders or records: a finished run of another config is not mistaken for
  this one, and the plain sweep's tables are not overwritten.
  """
  if not extra:
    return sweep.name
  return sweep.name + '__' + _slug(' '.join(e.replace('--config.', '', 1)
                                            for e in extra))


def _seeds(sweep, row, noise):
  return dict(sweep.seeds_by_noise).get(noise, row.seeds or sweep.seeds)


def _own_dirs(sweep, root, extra=()):
  out = []
  name = variant_name(sweep, extra)
  for row in sweep.rows:
    for noise in sweep.noise_levels:
      for seed in range(_seeds(sweep, row, noise)):
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


def _set(config, key, value, where):
  """Sets dotted `key` of a config dict; a key that names no field is a mistake."""
  node = config
  *parents, leaf = key.split('.')
  for name in parents:
    node = node.get(name) if isinstance(node, dict) else None
  if not isinstance(node, dict) or leaf not in node:
    raise SweepError(f'{where}: override {key!r} names no config field')
  node[leaf] = value


def resolved_config(row, noise, seed):
  """The config of one run as a plain dict (the row's, its overrides, seed, noise)."""
  config = copy.deepcopy(_load_config(row.config))
  for key, value in (*row.overrides, ('seed', seed), ('label_noise', noise)):
    _set(config, key, value, row.config)
  config.pop('progress', None)
  return config


def run_key(row, noise, seed, extra=()):
  """What a run computes: its resolved config (plus the command-line extras).

  Two runs with equal keys are the same run, so sweeps share it (Figure 3's
  0 % noise cells are Table 1's runs; Table 2's single and T = 2 rows are
  Table 1's single and 2 instances). The keys ignore `progress`.
  """
  return (json.dumps(resolved_config(row, noise, seed), sort_keys=True, default=str),
          tuple(extra))


def run_dirs(sweep, root, extra=()) -> List[Tuple[Row, float, int, str]]:
  """(row, noise, seed, workdir) of every run of `sweep`.

  A run's workdir is `<root>/<sweep>/<row>[/noise_<p>]/seed_<k>`, unless an
  identical run (same `run_key`) belongs to a sweep defined earlier in
  `SWEEPS`: then it is that sweep's workdir, trained once for both. With
  `root=''` the workdirs are the runs' ids (the records' keys).
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


# ---------------------------------------------------------------------------
# Records: one line per finished run in results/<owner sweep>.runs.jsonl.

PROVENANCE = ('commit', 'dirty', 'versions')
CURVE_KINDS = ('train', 'eval', 'eval_train')  # eval_train: clean train-set error
HEAD_1_ERROR = 'head_1/error'  # collab_jax.trainer.metrics.head(0, 'error')


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise SweepError(f'{path}: {e}') from None


def read_run(workdir, run_id):
  """The record of the finished run in `workdir` (it has `results.json`).

  {id, config, results, commit, dirty, versions, curve}: `config` is the
  resolved config (config.json), `results` results.json's fields but the
  provenance, which stands beside it (commit, dirty tree, library versions;
  null where the run did not record them), and `curve` head 1's error of
  every train, eval and eval_train record of metrics.jsonl (step, kind,
  epoch where logged), the last of a step's duplicates kept (a resumed run
  may log a step twice).
  """
  results = _read_json(os.path.join(workdir, 'results.json'))
  info_path = os.path.join(workdir, 'run_info.json')
  info = _read_json(info_path) if os.path.exists(info_path) else {}
  record = {'id': run_id, 'config': _read_json(os.path.join(workdir, 'config.json'))}
  for key in PROVENANCE:
    record[key] = results.pop(key, info.get(key))
  record['results'] = results
  curve = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except ValueError:
          raise SweepError(f'{path}:{number} is not JSON') from None
        if r.get('kind') in CURVE_KINDS and HEAD_1_ERROR in r:
          curve.pop((r['kind'], r['step']), None)  # the last of a step's records
          curve[r['kind'], r['step']] = {
              'kind': r['kind'], 'step': r['step'], HEAD_1_ERROR: r[HEAD_1_ERROR],
              **({'epoch': r['epoch']} if 'epoch' in r else {})}
  record['curve'] = list(curve.values())
  return record


def _owner(run_id):
  return run_id.split('/', 1)[0]


def load_records(out_dir):
  """{id: record} of every `<out_dir>/<sweep>.runs.jsonl`."""
  records = {}
  for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), '*' + RECORDS))):
    owner = os.path.basename(path)[:-len(RECORDS)]
    with open(path) as f:
      for number, line in enumerate(f, 1):
        try:
          record = json.loads(line)
          run_id = record['id']
        except (ValueError, KeyError, TypeError):
          raise SweepError(f'{path}:{number} is not a run record') from None
        if _owner(run_id) != owner or run_id in records:
          raise SweepError(f'{path}:{number}: run {run_id!r} belongs in '
                           f'{_owner(run_id)}{RECORDS}, once')
        records[run_id] = record
  return records


def records_files(records, owners):
  """{file name: text} of the records files of sweeps `owners`."""
  files = {}
  for owner in sorted(owners):
    ids = sorted(i for i in records if _owner(i) == owner)
    files[owner + RECORDS] = ''.join(
        json.dumps(records[i], sort_keys=True) + '\n' for i in ids)
  return files


@contextlib.contextmanager
def _merged(out_dir, records):
  """Holds `out_dir` locked, with the records other processes wrote there merged in.

  Sweep processes that share an output directory take turns, so none writes
  a records file without the runs another one recorded meanwhile.
  """
  if not os.path.isdir(out_dir):  # nobody wrote there yet
    yield
    return
  fd = os.open(out_dir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    for run_id, record in load_records(out_dir).items():
      records.setdefault(run_id, record)
    yield
  finally:
    os.close(fd)


def save_records(out_dir, records, run_ids):
  """Writes the records files that hold `run_ids`, merged with those on disk."""
  with _merged(out_dir, records):
    return write_files(out_dir, records_files(records, {_owner(i) for i in run_ids}))


def _differences(recorded, expected, prefix=''):
  """(dotted key, recorded, expected) where both configs have a key and differ."""
  for key in sorted(recorded.keys() & expected.keys()):
    old, new = recorded[key], expected[key]
    if isinstance(old, dict) and isinstance(new, dict):
      yield from _differences(old, new, f'{prefix}{key}.')
    elif json.dumps(old, default=str) != json.dumps(new, default=str):
      yield prefix + key, old, new


def check_record(record, row, noise, seed):
  """Refuses a run whose config differs from the row's where both have a key.

  Runs recorded before a key existed lack it and are compared on the rest.
  """
  differ = [d for d in _differences(record['config'], resolved_config(row, noise, seed))
            if d[0] != 'progress']
  if differ:
    raise SweepError(
        f'run {record["id"]} was made by another config than row {row.name!r} '
        f'({row.config}): ' + ', '.join(f'{k}: {old!r} != {new!r}'
                                        for k, old, new in differ[:3]))


def ingest(sweep, root, records, extra=()):
  """Adds the record of every finished, unrecorded run of `sweep` under `root`.

  Returns the ids added. A recorded run is never replaced.
  """
  added = []
  for row, noise, seed, run_id in run_dirs(sweep, '', extra):
    workdir = os.path.join(root, run_id)
    if run_id in records or not os.path.exists(os.path.join(workdir, 'results.json')):
      continue
    record = read_run(workdir, run_id)
    if not extra:  # the extras' values are strings until the trainer parses them
      check_record(record, row, noise, seed)
    records[run_id] = record
    added.append(run_id)
  return added


# ---------------------------------------------------------------------------
# Running.


def _command(row, noise, seed, workdir, extra):
  cmd = [sys.executable, '-m', 'collab_jax.main',
         f'--config={os.path.join(ROOT, row.config)}', f'--workdir={workdir}',
         f'--config.seed={seed}', '--config.progress=False']
  for key, value in row.overrides:
    cmd.append(f'--config.{key}={value}')
  if noise:
    cmd.append(f'--config.label_noise={noise}')
  return cmd + list(extra)


def run_sweep(sweep, root, records, extra=(), log=print, max_seeds=None,
              on_finished=None):
  """Runs every run of `sweep` that has no record and no finished workdir.

  Returns the number run. `max_seeds` limits this pass to seeds
  `< max_seeds`, so that a long sweep fills every cell once before adding
  seeds; `on_finished(run_id)` is called after each run that finishes.
  """
  runs = run_dirs(sweep, '', extra)
  finished = [r[3] in records or os.path.exists(os.path.join(root, r[3], 'results.json'))
              for r in runs]
  todo = [r for r, done in zip(runs, finished)
          if not done and (max_seeds is None or r[2] < max_seeds)]
  # Seed-major, then noise level, then row: a sweep stopped part way leaves
  # whole columns (every graph at the same noise level and seed).
  todo.sort(key=lambda r: (r[2], r[1]))
  log(f'{variant_name(sweep, extra)}: {sum(finished)}/{len(runs)} runs finished, '
      f'{len(todo)} to go' + (f' in this pass (seeds < {max_seeds})' if max_seeds else ''))
  ran = 0
  for i, (row, noise, seed, run_id) in enumerate(todo):
    workdir = os.path.join(root, run_id)
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
      raise SweepError(f'run {workdir} failed (exit {proc.returncode}); see its '
                       'stdout.log. Rerun the sweep to resume it.')
    if not os.path.exists(os.path.join(workdir, 'results.json')):
      raise SweepError(f'run {workdir} stopped before finishing; rerun the sweep '
                       'to resume it.')
    log(f'    finished in {time.time() - t0:.0f} s')
    if on_finished:
      on_finished(run_id)
  return ran


# ---------------------------------------------------------------------------
# Statistics.


def _mean_std(values):
  """Mean and sample standard deviation; exact sums, so every Python agrees."""
  if not values:
    return None, None
  return (statistics.fmean(values),
          statistics.stdev(values) if len(values) > 1 else 0.0)


def t_pvalue(t, df):
  """Two-sided p-value of Student's t with `df` (an int >= 1) degrees of freedom.

  The closed forms of Abramowitz & Stegun 26.7.3-4 (exact for integer df;
  standard library only, the same on every machine).
  """
  if math.isinf(t):
    return 0.0
  theta = math.atan(abs(t) / math.sqrt(df))
  c2, s = math.cos(theta) ** 2, math.sin(theta)
  if df % 2:  # odd: A = (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + ...))
    term, series = 1.0, 1.0 if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
      term *= c2 * (2 * k) / (2 * k + 1)
      series += term
    inside = (2 / math.pi) * (theta + s * math.cos(theta) * series)
  else:  # even: A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    term, series = 1.0, 1.0
    for k in range(1, df // 2):
      term *= c2 * (2 * k - 1) / (2 * k)
      series += term
    inside = s * series
  return min(1.0, max(0.0, 1.0 - inside))


# What a paired comparison can compare, by key: a label and the run's value.
# Against a single network every one of them is its one head's error.
METRICS = {
    'head_1': ('head 1', lambda r: r['head_1']),
    'heads_mean': ('mean of the heads', lambda r: statistics.fmean(r['heads'])),
    'ensemble': ('ensemble of the heads', lambda r: r['ensemble']),
}


def paired(base_runs, runs, metric='head_1'):
  """Paired comparison of a row with a baseline row over their common seeds.

  Returns {n, diff, se, wins, t, p, verdict}: `diff` is the mean over seeds
  of (row - baseline) error (`metric`, a key of METRICS; head 1 by default),
  `se` its standard error, `wins` the seeds in which the row's error is
  lower, `p` the two-sided p-value of the paired t-test. The verdict is
  'better' or 'worse' when p < 5 %, else 'tie' (no difference shown); one
  pair decides nothing ('n/a').
  """
  value = METRICS[metric][1]
  base = {r['seed']: value(r) for r in base_runs}
  diffs = [value(r) - base[r['seed']] for r in runs if r['seed'] in base]
  n = len(diffs)
  if n < 2:
    return {'n': n, 'diff': diffs[0] if diffs else None, 'se': None,
            'wins': sum(d < 0 for d in diffs), 't': None, 'p': None, 'verdict': 'n/a'}
  mean, std = _mean_std(diffs)
  se = std / math.sqrt(n)
  t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
  p = t_pvalue(t, n - 1)
  return {'n': n, 'diff': mean, 'se': se, 'wins': sum(d < 0 for d in diffs),
          't': t, 'p': p, 'verdict': _verdict(t, p)}


def _verdict(t, p):
  return 'tie' if p >= ALPHA else 'better' if t < 0 else 'worse'


def holm(comparisons):
  """Adds Holm's step-down adjusted p-value and verdict to each comparison.

  The family is every comparison with a p-value (2 or more pairs). Sorted by
  p, the k-th smallest of m is multiplied by (m - k + 1), and each adjusted
  value is at least the one before (Holm 1979): rejecting where it is below
  5 % keeps the chance of any false "better"/"worse" in the family at 5 %.
  Returns the family's size m.
  """
  tested = sorted((c for c in comparisons if c['p'] is not None), key=lambda c: c['p'])
  m, running = len(tested), 0.0
  for k, c in enumerate(tested):
    running = max(running, min(1.0, (m - k) * c['p']))
    c['p_holm'] = running
    c['verdict_holm'] = _verdict(c['t'], running)
  for c in comparisons:
    if c['p'] is None:
      c['p_holm'], c['verdict_holm'] = None, 'n/a'
  return m


# ---------------------------------------------------------------------------
# Tables.


def _read_curve(curve, run_id):
  """Head 1's error per epoch of one run: {kind: {epoch: error}}.

  Train is the mean over the log window's batches (one epoch in the curve
  sweeps), eval the test set during training and at the end, eval_train the
  training set with clean labels, no augmentation.
  """
  per_epoch = None
  for r in curve:
    if r['kind'] == 'train' and r.get('epoch'):
      per_epoch = r['step'] / r['epoch']
  if per_epoch is None:
    raise SweepError(f'run {run_id} has no training records with an epoch; rerun '
                     'it with the current collab_jax.')
  out = {kind: {} for kind in CURVE_KINDS}
  for r in curve:
    out[r['kind']][round(r['step'] / per_epoch, 3)] = r[HEAD_1_ERROR]
  return out


def _mean_curve(runs):
  """The mean over runs of their curves, at the epochs every run has."""
  curves = [_read_curve(curve, run_id) for run_id, curve in runs]
  out = {}
  for kind, name in zip(CURVE_KINDS, ('train', 'test', 'train_clean')):
    epochs = sorted(set.intersection(*(set(c[kind]) for c in curves))) if curves else []
    if kind == 'eval_train' and not epochs:
      continue  # runs that did not evaluate their training set
    out[f'{name}_epochs'] = epochs
    out[name] = [statistics.fmean(c[kind][e] for c in curves) for e in epochs]
  return out


def provenance(record):
  """The toolchain and code version of a run, as a table names it."""
  versions = record.get('versions')
  tool = (f'JAX {versions.get("jax")}, Python {versions.get("python")}' if versions
          else 'versions not recorded')
  if not record.get('commit'):
    return (f'{tool}; no commit recorded (before {TAGGED_STREAMS_SINCE}: untagged '
            'random streams)')
  dirty = ' with uncommitted changes' if record.get('dirty') else ''
  return f'{tool}; commit {record["commit"][:7]}{dirty} (tagged random streams)'


def _fmt(mean, std, n):
  if mean is None:
    return 'n/a (0 runs)'
  if n == 1:  # no spread from one run
    return f'{mean:.2f} (n=1)'
  return f'{mean:.2f} +- {std:.2f} (n={n})'


def aggregate(sweep, records, extra=()):
  """The table of `sweep` (a JSON-ready dict) from the run records `{id: record}`."""
  cells = []
  all_runs = run_dirs(sweep, '', extra)
  for row in sweep.rows:
    for noise in sweep.noise_levels:
      runs = []
      for r, nz, seed, run_id in all_runs:
        if r == row and nz == noise and run_id in records:
          record = records[run_id]
          res = record['results']
          runs.append({'seed': seed, 'id': run_id,
                       'head_1': res['head_1_test_error'],
                       'heads': res['head_test_errors'],
                       'ensemble': res['ensemble_test_error'],
                       'steps': res['steps'],
                       'train_time_s': res.get('train_time_s_this_session'),
                       # robust to pauses: steps x median step time
                       'step_time_s': res.get('median_step_time_s'),
                       'provenance': provenance(record),
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
            [(r['id'], records[r['id']]['curve']) for r in runs])
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
  comparisons = _comparisons(sweep, cells)
  family = holm(comparisons)
  return {'sweep': variant_name(sweep, extra), 'title': title, 'seeds': sweep.seeds,
          'cells': cells, 'paired': comparisons, 'family': family}


def _comparisons(sweep, cells):
  """Every row against the first, then the sweep's own pairs (head 1)."""
  cell = {(c['row'], c['noise']): c for c in cells}
  base = sweep.rows[0].name
  # With the heads' columns shown, each of them is compared too (labelled),
  # for rows with several heads (with one head all three are head 1).
  metrics = ('head_1', 'heads_mean', 'ensemble') if sweep.show_ensemble else ('head_1',)
  label = lambda m: {'metric': METRICS[m][0]} if sweep.show_ensemble else {}
  out = [{'row': c['row'], 'noise': c['noise'], 'baseline': base, **label(m),
          **paired(cell[base, c['noise']]['runs'], c['runs'], m)}
         for m in metrics for c in cells if c['row'] != base
         and (m == 'head_1' or any(len(r['heads']) > 1 for r in c['runs']))]
  out += [{'row': a, 'noise': noise, 'baseline': b, **label('head_1'),
           **paired(cell[b, noise]['runs'], cell[a, noise]['runs'])}
          for a, b in sweep.pairs for noise in sweep.noise_levels]
  return out


def _seed_list(seeds):
  """'0-2, 4' for [0, 1, 2, 4]."""
  spans = []
  for s in sorted(seeds):
    if spans and s == spans[-1][1] + 1:
      spans[-1][1] = s
    else:
      spans.append([s, s])
  return ', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in spans)


def _provenance_lines(table):
  """A note listing the code versions of a table whose runs mix them."""
  groups = {}  # provenance -> {(row, noise): seeds}
  for c in table['cells']:
    for r in c['runs']:
      groups.setdefault(r['provenance'], {}).setdefault(
          (c['row'], c['noise']), []).append(r['seed'])
  if len(groups) < 2:
    return []
  rows = list(dict.fromkeys(c['row'] for c in table['cells']))
  noise_levels = sorted({c['noise'] for c in table['cells']})
  lines = ['', f'**Mixed code versions.** These runs come from {len(groups)} '
           'toolchains or code versions, and rows or pairs below may compare runs '
           'across them:', '']
  for label, cells in groups.items():
    parts = []
    for noise in noise_levels:
      here = {row: seeds for (row, nz), seeds in cells.items() if nz == noise}
      at = f' at {int(noise * 100)} %' if len(noise_levels) > 1 else ''
      if len(here) == len(rows) and len({tuple(s) for s in here.values()}) == 1:
        here = {'every row': next(iter(here.values()))}
      parts += [f'{row}{at}, seed{"s" if len(s) > 1 else ""} {_seed_list(s)}'
                for row, s in here.items()]
    count = sum(len(s) for s in cells.values())
    lines.append(f'* {label}: {count} run{"s" if count > 1 else ""} ({"; ".join(parts)})')
  return lines


def _p_text(p):
  return '-' if p is None else '<0.001' if p < 0.001 else f'{p:.3f}'


def to_markdown(table):
  lines = [f'# {table["title"]}', '',
           'Head 1 test error (%), mean +- std over seeds (n = finished runs).']
  lines += _provenance_lines(table) + ['']
  noise_levels = sorted({c['noise'] for c in table['cells']})
  noisy = len(noise_levels) > 1
  if noisy:
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
    by_metric = any('metric' in p for p in table['paired'])
    compared = ('the row\'s head 1, mean of the heads or ensemble against the '
                'baseline\'s head 1' if by_metric else 'head 1 error')
    lines += ['', f'Paired by seed (row minus baseline, {compared} in points; '
              'negative = the row is better). Verdict: a two-sided paired t-test '
              'at 5 % on its own; Holm: the same test with Holm\'s correction for '
              f'the family of this table\'s {table["family"]} paired tests (every '
              'comparison below with 2 or more pairs). See experiments/README.md, '
              '"How a difference is decided".', '',
              '| training graph | baseline | ' + ('noise | ' if noisy else '')
              + ('compared | ' if by_metric else '')
              + 'pairs | mean difference +- s.e. | t | p | seeds won | verdict '
              '| Holm p | Holm verdict |',
              '|---|---|' + ('---|' if noisy else '') + ('---|' if by_metric else '')
              + '---|---|---|---|---|---|---|---|']
    for p in table['paired']:
      if not p['n']:
        continue
      diff = (f'{p["diff"]:+.2f} +- {p["se"]:.2f}' if p['se'] is not None
              else f'{p["diff"]:+.2f}')
      t = '-' if p['t'] is None else f'{p["t"]:.2f}'
      lines.append(f'| {p["row"]} | {p["baseline"]} | '
                   + (f'{int(p["noise"] * 100)} % | ' if noisy else '')
                   + (f'{p["metric"]} | ' if by_metric else '')
                   + f'{p["n"]} | {diff} | {t} | {_p_text(p["p"])} | '
                   f'{p["wins"]}/{p["n"]} | {p["verdict"]} | '
                   f'{_p_text(p["p_holm"])} | {p["verdict_holm"]} |')
  curves = [c for c in table['cells'] if c.get('curve') and c['curve']['test']]
  if curves:
    clean = any(c['curve'].get('train_clean') for c in curves)
    epochs = sorted(set.union(*(set(c['curve']['test_epochs']) for c in curves)))
    lines += ['', 'Head 1 error (%) against epochs, train / '
              + ('clean train / ' if clean else '') + 'test, mean over each '
              "row's finished runs (train: the epoch's batches as the network "
              'trained through them; '
              + ('clean train: the training set with its clean labels, no '
                 'augmentation; ' if clean else '')
              + 'test: the test set):', '',
              '| training graph | ' + ' | '.join(f'epoch {e:g}' for e in epochs) + ' |',
              '|---|' + '---|' * len(epochs)]
    for c in curves:
      kinds = ('train', 'train_clean', 'test') if clean else ('train', 'test')
      values = {k: dict(zip(c['curve'].get(f'{k}_epochs', []), c['curve'].get(k, [])))
                for k in kinds}
      lines.append(f'| {c["row"]} (n={c["n"]}) | ' + ' | '.join(
          ' / '.join(f'{values[k][e]:.2f}' if e in values[k] else '-' for k in kinds)
          for e in epochs) + ' |')
  seen, total = set(), 0.0
  for c in table['cells']:
    for r in c['runs']:
      if r['id'] not in seen:
        seen.add(r['id'])
        total += sum(_run_times([r]))
  lines += ['', f'Training time of the {len(seen)} distinct finished runs: '
            f'{total / 60:.0f} min (run time = steps x median step time, '
            'compilation and evaluation excluded; runs shared with an earlier '
            'sweep are counted here too).']
  return '\n'.join(lines) + '\n'


def _run_times(runs):
  return [r['steps'] * r['step_time_s'] for r in runs if r.get('step_time_s')]


def distinct_runs(table):
  return len({r['id'] for c in table['cells'] for r in c['runs']})


# ---------------------------------------------------------------------------
# Plots.


@contextlib.contextmanager
def _figure(table, out, size, ylabel, xlabel=None, fontsize=8, grid='both'):
  """Yields the axes of a new figure; then labels it and saves it as PNG into `out`."""
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
    fig.savefig(out, dpi=120, format='png')
  finally:
    plt.close(fig)


def _plot(table, out, xlabel, lines, hlines=(), size=(5.5, 4)):
  """Head 1 error (mean +- std) of `lines` [(label, xs, cells)] against x."""
  with _figure(table, out, size, 'head 1 test error (%)', xlabel) as ax:
    for label, xs, cells in lines:
      ax.errorbar(xs, [c['head_1_mean'] for c in cells],
                  yerr=[c['head_1_std'] for c in cells], marker='o', capsize=3,
                  label=label)
    for label, y in hlines:
      ax.axhline(y, color='gray', ls='--', label=label)


def plot_noise(table, out):
  """Figure 3 analogue: head 1 error against the noise level, one line per row."""
  lines = []
  for row in dict.fromkeys(c['row'] for c in table['cells']):
    cells = [c for c in table['cells'] if c['row'] == row and c['n']]
    if cells:
      lines.append((row, [100 * c['noise'] for c in cells], cells))
  _plot(table, out, 'label noise (%)', lines)


def plot_factor(table, sweep, out):
  """Sensitivity plot: head 1 error against the factor, the single network as a line."""
  xs = {r.name: r.x for r in sweep.rows}
  cells = [c for c in table['cells'] if c['n'] and xs[c['row']] is not None]
  lines = [('head 1 (mean +- std over seeds)', [xs[c['row']] for c in cells],
            cells)] if cells else []
  hlines = [(c['row'], c['head_1_mean']) for c in table['cells']
            if xs[c['row']] is None and c['n']]
  _plot(table, out, sweep.factor, lines, hlines, size=(5, 3.6))


def plot_heads(table, out):
  """Head 1, the mean of the heads and their ensemble per row (mean +- std)."""
  cells = [c for c in table['cells'] if c['n']]
  bars = (('head 1', lambda c: (c['head_1_mean'], c['head_1_std'])),
          ('mean of the heads', lambda c: c['heads_mean']),
          ('ensemble of the heads', lambda c: c['ensemble']))
  width = 0.8 / len(bars)
  with _figure(table, out, (7, 3.8), 'test error (%)', fontsize=7, grid='y') as ax:
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


def plot_curves(table, out):
  """Head 1's train (dashed), clean train (dotted) and test (solid) error per row."""
  cells = [c for c in table['cells'] if c.get('curve') and c['n']]
  clean = any(c['curve'].get('train_clean') for c in cells)
  ylabel = ('head 1 error (%): train dashed, ' + ('clean train dotted, ' if clean else '')
            + 'test solid')
  with _figure(table, out, (6, 4), ylabel, 'epoch', fontsize=7) as ax:
    for i, c in enumerate(cells):
      ax.plot(c['curve']['train_epochs'], c['curve']['train'], ls='--', color=f'C{i}')
      if c['curve'].get('train_clean'):
        ax.plot(c['curve']['train_clean_epochs'], c['curve']['train_clean'], ls=':',
                color=f'C{i}')
      ax.plot(c['curve']['test_epochs'], c['curve']['test'], marker='o',
              color=f'C{i}', label=f'{c["row"]} (n={c["n"]})')
    # Early training errors (about 40 % in epoch 1) are clipped.
    ax.set_ylim(0, max((max(c['curve']['test']) for c in cells), default=20.0) + 5.0)


def render(sweep, table):
  """{file name: bytes} of the table's Markdown, JSON and plots."""
  name = table['sweep']
  files = {f'{name}.json': (json.dumps(table, indent=2, sort_keys=True) + '\n').encode(),
           f'{name}.md': to_markdown(table).encode()}
  plots = []
  if len(sweep.noise_levels) > 1:
    plots.append((f'{name}.png', lambda out: plot_noise(table, out)))
  if sweep.factor:
    plots.append((f'{name}.png', lambda out: plot_factor(table, sweep, out)))
  if sweep.show_ensemble:
    plots.append((f'{name}.png', lambda out: plot_heads(table, out)))
  if sweep.show_curves:
    plots.append((f'{name}_curves.png', lambda out: plot_curves(table, out)))
  for path, plot in plots:
    buffer = io.BytesIO()
    plot(buffer)
    files[path] = buffer.getvalue()
  return files


def _holds(path, data):
  """Whether the file at `path` exists and holds exactly `data` (bytes)."""
  if not os.path.exists(path):
    return False
  with open(path, 'rb') as f:
    return f.read() == data


def write_files(out_dir, files):
  """Writes {name: text or bytes} into `out_dir`, each atomically; returns the names changed."""
  os.makedirs(out_dir, exist_ok=True)
  changed = []
  for name, content in files.items():
    data = content.encode() if isinstance(content, str) else content
    path = os.path.join(out_dir, name)
    if _holds(path, data):
      continue
    with open(path + '.tmp', 'wb') as f:
      f.write(data)
    os.replace(path + '.tmp', path)
    changed.append(name)
  return changed


def write_tables(sweep, records, out_dir=RESULTS, extra=()):
  """Writes the table files of `sweep` from `records`; returns the table."""
  table = aggregate(sweep, records, extra)
  write_files(out_dir, render(sweep, table))
  return table


# ---------------------------------------------------------------------------
# Command line.


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


def _check_dir(flag, path, must_exist):
  """A directory argument: an existing directory, or one that can be made."""
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise SweepError(f'{flag} {path} is not a directory')
    return
  if must_exist:
    raise SweepError(f'{flag} {path} does not exist')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise SweepError(f'{flag} {path}: {parent} is not a directory')
  if not os.access(parent, os.W_OK):
    raise SweepError(f'{flag} {path}: {parent} is not writable')


def _check_extra(sweeps, extra):
  """Every `--config.KEY=VALUE` names a field of every row's config."""
  for item in extra:
    if not (item.startswith('--config.') and '=' in item):
      raise SweepError(f'extra argument {item!r} is not a --config.KEY=VALUE '
                       'override (put overrides after --)')
    key = item[len('--config.'):].partition('=')[0]
    for sweep in sweeps:
      for row in sweep.rows:
        _set(copy.deepcopy(_load_config(row.config)), key, None,
             f'extra argument {item!r} ({row.config})')


def _studies(out_dir):
  """The sweeps with a table or records in `out_dir`, in definition order."""
  return [s for s in SWEEPS.values()
          if any(os.path.exists(os.path.join(out_dir, s.name + ext))
                 for ext in ('.json', RECORDS))]


def _committed_runs(out_dir, name):
  path = os.path.join(out_dir, f'{name}.json')
  if not os.path.exists(path):
    return 0
  table = _read_json(path)
  return len({r.get('id', r.get('workdir')) for c in table.get('cells', ())
              for r in c.get('runs', ())})


def tabulate(sweeps, records, out_dir, extra=(), allow_fewer=False):
  """{file name: content} of every table of `sweeps`, after the refusal check.

  A table over zero runs, or over fewer distinct runs than the table it
  replaces, is refused unless `allow_fewer` (a table whose files would not
  change is never refused).
  """
  files = {}
  for sweep in sweeps:
    table = aggregate(sweep, records, extra)
    rendered = render(sweep, table)
    name, now = table['sweep'], distinct_runs(table)
    before = _committed_runs(out_dir, name)
    unchanged = all(_holds(os.path.join(out_dir, f), data)
                    for f, data in rendered.items() if not f.endswith('.png'))
    if not allow_fewer and not unchanged and (now == 0 or now < before):
      raise SweepError(
          f'{name}: the table would hold {now} runs where {out_dir}/{name}.json '
          f'holds {before}; nothing written (check --root and --out, or pass '
          '--allow_fewer_runs to write it anyway)')
    files.update(rendered)
  return files


def main(argv=None):
  parser = _Parser(description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sweep', action='append', default=[],
                      help='sweep name (repeatable); see --list')
  parser.add_argument('--all', action='store_true',
                      help='every sweep with a table or records in --out')
  parser.add_argument('--root', default=None,
                      help=f'where run workdirs live (default {RUNS})')
  parser.add_argument('--out', default=RESULTS,
                      help='where run records and tables live')
  parser.add_argument('--aggregate_only', action='store_true',
                      help='train nothing: ingest finished workdirs, rewrite the tables')
  parser.add_argument('--allow_fewer_runs', action='store_true',
                      help='write a table even over fewer runs than the one it replaces')
  parser.add_argument('--list', action='store_true', help='list the sweeps')
  parser.add_argument('--max_seeds', type=_at_least_one, default=None,
                      help='only run seeds below this (fill every cell first)')
  parser.add_argument('extra', nargs='*',
                      help='extra --config.KEY=VALUE overrides for every run')
  args = parser.parse_args(argv)
  try:
    _main(args)
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _main(args):
  root = RUNS if args.root is None else args.root
  _check_dir('--root', root, must_exist=args.aggregate_only and args.root is not None)
  _check_dir('--out', args.out, must_exist=False)
  for name in args.sweep:
    if name not in SWEEPS:
      raise SweepError(f'unknown sweep {name!r}; --list shows the sweeps')
  if args.all and args.sweep:
    raise SweepError('give --sweep or --all, not both')
  sweeps = _studies(args.out) if args.all else [SWEEPS[n] for n in args.sweep]
  if args.all and not sweeps:
    raise SweepError(f'--all: no sweep has a table or records in {args.out}')
  _check_extra(sweeps, args.extra)
  records = load_records(args.out) if os.path.isdir(args.out) else {}
  if args.list or not sweeps:
    for s in SWEEPS.values():
      ids = [r[3] for r in run_dirs(s, '')]
      print(f'{s.name:30s} {sum(i in records for i in ids):4d}/{len(ids):4d} runs '
            f'recorded  {s.title}')
    return
  extra = tuple(args.extra)
  before = set(records)
  added = [i for sweep in sweeps for i in ingest(sweep, root, records, extra)]
  if not args.aggregate_only:
    save_records(args.out, records, added)  # what finished before is kept first
    for sweep in sweeps:
      t0 = time.time()
      run_sweep(sweep, root, records, extra, max_seeds=args.max_seeds,
                on_finished=lambda run_id, s=sweep: save_records(
                    args.out, records, [run_id, *ingest(s, root, records, extra)]))
      print(f'{variant_name(sweep, extra)}: ran in {time.time() - t0:.0f} s')
    # Runs another sweep process finished meanwhile.
    save_records(args.out, records,
                 [i for sweep in sweeps for i in ingest(sweep, root, records, extra)])
  with _merged(args.out, records):
    new = set(records) - before
    # The other studies that read a run just recorded (shared runs) change too.
    also = [s for s in _studies(args.out) if s not in sweeps and not extra
            and any(r[3] in new for r in run_dirs(s, ''))]
    files = tabulate(sweeps + also, records, args.out, extra, args.allow_fewer_runs)
    files.update(records_files(records, {_owner(i) for i in new}))
    changed = write_files(args.out, files)
  for sweep in sweeps + also:
    name = variant_name(sweep, extra)
    table = json.loads(files[f'{name}.json'])
    print(f'{name}: {distinct_runs(table)} distinct finished runs in '
          f'{args.out}/{name}.md')
  print(f'{len(new)} runs newly recorded; {len(changed)} files changed in {args.out}')


if __name__ == '__main__':
  main()
