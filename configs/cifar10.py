"""CIFAR-10: the paper's Table 1 (three networks) and Table 3 (ResNet-32).

  python -m collab_jax.main --config=configs/cifar10.py:resnet32,h4_hierarchical --workdir=runs/x

The argument is `<network>,<row>`. Networks, Table 1's columns: resnet32
(ResNet-32), resnet110 (ResNet-110), densenet40 (DenseNet-40-12). Rows and
the paper's CIFAR-10 test error (%), T = 2, beta = 0.5, mean +- std over 5
runs (DenseNet-40-12: 3 runs):

  Table 1              ResNet-32      ResNet-110     DenseNet-40-12
  single               6.66 +- 0.21   5.56 +- 0.16   5.26 +- 0.08
  label_smoothing      6.83 +- 0.14   5.66 +- 0.08   5.40 +- 0.04   (epsilon 0.05)
  h2_instances         6.19 +- 0.17   5.21 +- 0.14   5.11 +- 0.15
  h4_instances         6.16 +- 0.17   5.16 +- 0.13   5.00 +- 0.05
  h2_simple            5.97 +- 0.07   5.15 +- 0.14   5.04 +- 0.10
  h4_hierarchical      5.86 +- 0.13   4.98 +- 0.12   4.86 +- 0.12

  Table 3, resnet32 only: 4 heads sharing the layers up to block 1
  h4_simple_backprop   5.82 +- 0.08   backprop rescaling
  h4_simple_none       6.04 +- 0.17   no scaling
  h4_simple_loss       6.09 +- 0.24   loss scaling (1/4)

Recipes (collab_jax/trainer/recipes.py): He et al. 2016 for the ResNets (164
epochs of batch 128, lr 0.1 divided by 10 at epochs 82 and 123), Huang et al.
2017 for DenseNet-40-12 (300 epochs of batch 64). They are published at
7.51 % (ResNet-32), 6.61 +- 0.16 % (ResNet-110) and 5.24 % (DenseNet-40-12)
for the single network. Where that is above the paper's baseline, the paper's
supplement used another recipe, so the target is the difference between
rows, not the paper's absolute numbers.

Expected runtime: a ResNet run is 164 epochs x 50k = 8.2M images through the
training graph, a DenseNet run 300 x 50k = 15M. On 2 CPU cores the single
ResNet-32 step of batch 128 takes 0.60 s (experiments/results/bench.md), so a
single ResNet-32 run takes about 11 hours and the multi-head graphs 1.5-4x
that (the bench's time ratios). Not yet run on a GPU or TPU. The sweeps:
experiments/sweep.py --sweep=cifar10_table1_resnet32 (and _resnet110,
_densenet40), --sweep=cifar10_table3.
"""

from collab_jax import paper
from collab_jax.trainer import recipes

# The argument's network: (collab_jax.models name, Table 1's column).
NETWORKS = {'resnet32': ('cifar_resnet32', 'ResNet-32'),
            'resnet110': ('cifar_resnet110', 'ResNet-110'),
            'densenet40': ('densenet40_12', 'DenseNet-40-12')}
# Table 3's rows: 4 heads sharing up to block 1, by `model.rescale`.
TABLE3 = {f'h4_simple_{mode}': mode for mode in paper.TABLE3.rows}
ARGUMENTS = (*(f'{net},{row}' for net in NETWORKS for row in paper.TABLE1.rows),
             *(f'resnet32,{row}' for row in TABLE3))


def paper_row(arg):
  """The paper's label of the row `arg` trains, and its test error (%)."""
  net, row = _parse(arg)
  if row in TABLE3:
    return paper.TABLE3.label(TABLE3[row]), paper.TABLE3.text(TABLE3[row], 'ResNet-32')
  return paper.TABLE1.label(row), paper.TABLE1.text(row, NETWORKS[net][1])


def _parse(arg):
  if arg not in ARGUMENTS:
    raise ValueError(f'configs/cifar10.py: unknown argument {arg!r}; choose one '
                     f'of {", ".join(ARGUMENTS)}.')
  return arg.split(',')


def get_config(arg='resnet32,h4_hierarchical'):
  net, row = _parse(arg)
  if row in TABLE3:
    return recipes.cifar('cifar10', 'cifar_resnet32', 'h4_simple',
                         **{'model.rescale': TABLE3[row]})
  return recipes.cifar('cifar10', NETWORKS[net][0], row)
