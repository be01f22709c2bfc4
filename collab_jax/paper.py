"""The paper's training graphs and reported numbers, each written once.

Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018.
Everything that lists training graphs (`recipes`, `models.paper_splits`, the
benchmark, the sweeps, the PyTorch peer) or quotes a number of the paper (the
config docstrings, the sweeps' tables) reads it from here. The tables hold the
cells as the paper prints them, with `+-` for its `±`, so each can be checked
against the paper by eye.

Standard library only: experiments/torch_reference.py loads this file by its
path in a venv without JAX.
"""

import dataclasses
from typing import Dict, Tuple

Splits = Tuple[Tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Graph:
  """A training graph: its row label, its topology, the training method."""
  label: str
  # Number of stages of the network -> `splits`; empty: one network, unsplit.
  splits: Dict[int, Splits] = dataclasses.field(default_factory=dict)
  method: str = 'collaborative'


# Split points (Sec. 4): networks of 3 stages (the CIFAR ResNets, DenseNet-40-12,
# and our ViTs) split after block group 1, or after groups 1 and 2; ResNet-50
# (4 stages) after conv3_x, or after conv3_x and conv4_x.
GRAPHS: Dict[str, Graph] = {
    'single': Graph('single instance'),
    'label_smoothing': Graph('label smoothing', method='label_smoothing'),
    'distillation': Graph('distillation', method='distillation'),
    'h2_instances': Graph('2 instances', {3: ((0, 2),), 4: ((0, 2),)}),
    'h4_instances': Graph('4 instances', {3: ((0, 4),), 4: ((0, 4),)}),
    'h2_simple': Graph('2 heads, simple ILR sharing', {3: ((1, 2),), 4: ((2, 2),)}),
    'h4_simple': Graph('4 heads, simple ILR sharing', {3: ((1, 4),), 4: ((2, 4),)}),
    'h4_hierarchical': Graph('4 heads, hierarchical ILR sharing',
                             {3: ((1, 2), (2, 2)), 4: ((2, 2), (3, 2))}),
}
# The graphs that differ by topology alone (collaborative loss, any splits).
TOPOLOGIES = tuple(name for name, g in GRAPHS.items() if g.method == 'collaborative')


def splits(graph: str, num_stages: int) -> Splits:
  """The `splits` of training graph `graph` on a network of `num_stages` stages."""
  if graph not in GRAPHS:
    raise ValueError(f'unknown training graph {graph!r}; choose one of: '
                     f'{", ".join(GRAPHS)}.')
  table = GRAPHS[graph].splits
  if table and num_stages not in table:
    raise ValueError(f'training graph {graph!r} has split points for networks of '
                     f'{" or ".join(map(str, table))} stages, not {num_stages}.')
  return table.get(num_stages, ())


@dataclasses.dataclass(frozen=True)
class Table:
  """A result table of the paper: one cell per column, rows by key."""
  name: str
  caption: str
  columns: Tuple[str, ...]
  rows: Dict[str, Tuple[str, ...]]
  # The paper's row labels where they are not the graph's (`GRAPHS[key].label`).
  labels: Dict[str, str] = dataclasses.field(default_factory=dict)

  def label(self, row: str) -> str:
    """The row's label in the paper."""
    return self.labels[row] if row in self.labels else GRAPHS[row].label

  def text(self, row: str, *columns: str) -> str:
    """The cells of `row` in `columns`, joined by ' / '."""
    return ' / '.join(self.rows[row][self.columns.index(c)] for c in columns)


TABLE1 = Table(
    'Table 1', 'CIFAR-10 test error (%), T = 2, beta = 0.5, mean +- std over 5 '
    'runs (DenseNet-40-12: 3 runs)',
    ('ResNet-32', 'ResNet-110', 'DenseNet-40-12'), {
        'single': ('6.66 +- 0.21', '5.56 +- 0.16', '5.26 +- 0.08'),
        'label_smoothing': ('6.83 +- 0.14', '5.66 +- 0.08', '5.40 +- 0.04'),
        'h2_instances': ('6.19 +- 0.17', '5.21 +- 0.14', '5.11 +- 0.15'),
        'h4_instances': ('6.16 +- 0.17', '5.16 +- 0.13', '5.00 +- 0.05'),
        'h2_simple': ('5.97 +- 0.07', '5.15 +- 0.14', '5.04 +- 0.10'),
        'h4_hierarchical': ('5.86 +- 0.13', '4.98 +- 0.12', '4.86 +- 0.12'),
    }, {'label_smoothing': 'label smoothing (0.05)'})

# The collaborative rows share one baseline cell, printed across both rows.
_TABLE2_BASELINE = '30.52 +- 0.35'
TABLE2 = Table(
    'Table 2', 'CIFAR-100 ResNet-32 test error (%), two instances trained by '
    'alternating optimisation (Deep Mutual Learning, Zhang et al. 2017) or '
    'simultaneously (collaborative learning)',
    ('single instance (baseline)', 'head 1 in two instances',
     'head 2 in two instances'), {
        'alternating': ('31.01', '29.25', '28.81'),
        'simultaneous_t1': (_TABLE2_BASELINE, '27.64 +- 0.36', '27.48 +- 0.37'),
        'simultaneous_t2': (_TABLE2_BASELINE, '26.32 +- 0.26', '26.36 +- 0.27'),
    }, {'alternating': 'alternating (DML), T = 1',
        'simultaneous_t1': 'simultaneous, T = 1',
        'simultaneous_t2': 'simultaneous, T = 2'})

# The paper prints this one as a row of three columns; here a row per
# `model.rescale` mode.
TABLE3 = Table(
    'Table 3', 'CIFAR-10 ResNet-32 test error (%), 4 heads sharing the layers '
    'up to the first residual block; loss scaling weighs each head by 1/4',
    ('ResNet-32',), {
        'backprop': ('5.82 +- 0.08',),
        'none': ('6.04 +- 0.17',),
        'loss': ('6.09 +- 0.24',),
    }, {'backprop': 'backprop rescaling', 'none': 'no scaling',
        'loss': 'loss scaling (1/4)'})

TABLE4 = Table(
    'Table 4', 'ImageNet ResNet-50 validation error (%); training time and '
    'memory relative to the baseline',
    ('top-1 error', 'top-5 error', 'training time', 'memory'), {
        'single': ('23.47', '6.83', '1x', '1x'),
        'label_smoothing': ('23.34', '6.80', '1x', '1x'),
        'distillation': ('22.65', '6.34', '3.42x', '1.05x'),
        'h2_instances': ('22.81', '6.45', '2x', '2x'),
        'h2_simple': ('22.70', '6.37', '1.4x', '1.32x'),
        'h4_hierarchical': ('22.29', '6.21', '1.75x', '1.5x'),
    }, {'single': 'baseline', 'label_smoothing': 'label smoothing (0.1)',
        'distillation': 'distillation from an ensemble of two ResNet-50'})
