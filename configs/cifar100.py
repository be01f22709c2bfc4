"""CIFAR-100 ResNet-32: the paper's Table 2, and other graphs on the same data.

  python -m collab_jax.main --config=configs/cifar100.py:h2_instances --workdir=runs/x

The argument is the row. Rows and the paper's CIFAR-100 test error (%), two
instances, head 1 / head 2 (the single row: the baseline of the simultaneous
rows):

  single            30.52 +- 0.35                   single instance
  h2_alternating    29.25 / 28.81                   alternating (DML), T = 1; its own baseline 31.01
  h2_instances_t1   27.64 +- 0.36 / 27.48 +- 0.37   simultaneous, T = 1
  h2_instances      26.32 +- 0.26 / 26.36 +- 0.27   simultaneous, T = 2
  h4_instances      not in the paper
  h2_simple         not in the paper
  h4_hierarchical   not in the paper

The alternating row updates the heads one after another, each with its own
optimizer state (Deep Mutual Learning, Zhang et al. 2017, which uses T = 1).
Recipe: He et al.'s CIFAR-10 ResNet recipe (collab_jax/trainer/recipes.py);
compare rows, not the paper's absolute numbers.

Expected runtime: 164 epochs x 50k = 8.2M images through the training graph;
on 2 CPU cores about 11 hours for the single network (0.60 s per step of
128, experiments/results/bench.md) and 1.5-4x that for the other graphs. Not
yet run on a GPU or TPU. The sweep: experiments/sweep.py --sweep=cifar100_table2.
"""

from collab_jax import paper
from collab_jax.trainer import recipes

_T2 = paper.TABLE2
# row: (training graph, overrides, (Table 2's row, columns) or None).
ROWS = {
    'single': ('single', {}, ('simultaneous_t1', _T2.columns[:1])),
    'h2_alternating': ('h2_instances', {'method': 'alternating', 'temperature': 1.0},
                       ('alternating', _T2.columns[1:])),
    'h2_instances_t1': ('h2_instances', {'temperature': 1.0},
                        ('simultaneous_t1', _T2.columns[1:])),
    'h2_instances': ('h2_instances', {}, ('simultaneous_t2', _T2.columns[1:])),
    'h4_instances': ('h4_instances', {}, None),
    'h2_simple': ('h2_simple', {}, None),
    'h4_hierarchical': ('h4_hierarchical', {}, None),
}
ARGUMENTS = tuple(ROWS)


def paper_row(arg):
  """The paper's label of the row `arg` trains, and its test error (%) or ''."""
  graph, _, cell = _row(arg)
  if cell is None:
    return paper.GRAPHS[graph].label, ''
  text = _T2.text(cell[0], *cell[1])
  # The single network is the baseline column of the simultaneous rows.
  return (paper.GRAPHS[graph].label if arg == 'single' else _T2.label(cell[0])), text


def _row(arg):
  if arg not in ROWS:
    raise ValueError(f'configs/cifar100.py: unknown row {arg!r}; choose one of '
                     f'{", ".join(ROWS)}.')
  return ROWS[arg]


def get_config(arg='h2_instances'):
  graph, overrides, _ = _row(arg)
  return recipes.cifar('cifar100', 'cifar_resnet32', graph, **overrides)
