"""Writes configs/*.py: one thin file per cell of the paper's tables.

Every file calls a recipe of `collab_jax.trainer.recipes` and carries a docstring with
the paper's table, row and number (read from `collab_jax.paper`), the command
and the expected cost. `CONFIGS` lists them; the sweeps of the paper's tables
(experiments/sweep.py) read it too. Rerun after changing either (a test checks
that configs/ holds what this writes):

  python experiments/make_configs.py
"""

import dataclasses
import os
import re
import sys
import textwrap
from typing import Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's table, whatever collab_jax is installed
from collab_jax import paper  # pylint: disable=g-import-not-at-top,wrong-import-position

# Table 1's columns: (network, short name in file and sweep names).
TABLE1_NETWORKS = {'ResNet-32': ('cifar_resnet32', 'resnet32'),
                   'ResNet-110': ('cifar_resnet110', 'resnet110'),
                   'DenseNet-40-12': ('densenet40_12', 'densenet40')}
COST = {  # training images processed, per run
    'cifar_resnet32': '164 epochs x 50k = 8.2M images',
    'cifar_resnet110': '164 epochs x 50k = 8.2M images',
    'densenet40_12': '300 epochs x 50k = 15M images',
}

# What the recipes of collab_jax/recipes.py are published to reach for the
# single network (CIFAR-10 with the standard augmentation).
RECIPE_RESULT = {
    'cifar_resnet32': '7.51 % (He et al. 2016, Table 6)',
    'cifar_resnet110': '6.61 +- 0.16 % over 5 runs (He et al. 2016, Table 6)',
    'densenet40_12': '5.24 % (Huang et al. 2017, Table 2, C10+)',
}

DISTILL_NOTE = '''
Two phases, each an ordinary resumable run: phase 1 trains
distill.num_teachers single ResNet-50s on the labels, each with its own seed
(1000 * (seed + 1) + k) in <workdir>/teachers/teacher_<k> (or uses the
finished runs named by --config.distill.teacher_workdirs); phase 2 trains the
student on beta * CE(labels) + (1 - beta) * T^2 * CE(softmax(mean of the
teachers' logits / T), student / T). The paper leaves beta, T and how the
teachers are combined open; we use its collaborative values (beta = 0.5,
T = 2) and the mean of the teachers' logits.'''


@dataclasses.dataclass(frozen=True)
class Config:
  """configs/<name>.py: the paper's cell it reproduces and the recipe it calls."""
  name: str
  title: str                      # what it trains, e.g. 'CIFAR-10 ResNet-32'
  label: str                      # the row it trains, as the tables name it
  recipe: str                     # the body of get_config()
  note: str
  cost: str
  table: Optional[paper.Table] = None   # None: a row the paper does not report
  row: str = ''
  columns: Tuple[str, ...] = ()

  @property
  def paper_text(self):
    """The paper's number(s) for this row, '' where it reports none."""
    return self.table.text(self.row, *self.columns) if self.table else ''

  def doc(self):
    if self.table:
      where = [f'paper {self.table.name}']
      if self.table.label(self.row) != self.label:
        where.append(f'row "{self.table.label(self.row)}"')
      where.append(f'column{"s" if len(self.columns) > 1 else ""} '
                   + ' / '.join(f'"{c}"' for c in self.columns))
      metric = 'validation error' if self.table is paper.TABLE4 else 'test error'
      source = f'{", ".join(where)}.\nPaper: {self.paper_text} % {metric}.'
    else:
      source = 'a row the paper does not report.'
    head, _, number = f'{self.title}, {self.label}: {source}'.partition('\n')
    # 76 columns, and the opening quotes make 79; no break inside a quoted label.
    head = re.sub(r'"[^"]*"', lambda m: m.group().replace(' ', '\0'), head)
    return (textwrap.fill(head, 76).replace('\0', ' ')
            + (f'\n{number}' if number else '')
            + f'\n{self.note}\n\n'
            f'  python -m collab_jax.main --config=configs/{self.name}.py '
            f'--workdir=runs/{self.name}\n\n{self.cost}\n')


def target_note(network):
  """Why the paper's absolute numbers are not the target of these configs."""
  return (f'Our recipe (collab_jax/recipes.py) is published at\n'
          f'{RECIPE_RESULT[network]} for the single network. Where that is\n'
          'above the paper\'s baseline, the paper\'s supplement used another '
          'recipe, so\nthe target is the difference between rows, not the '
          'paper\'s absolute numbers.')


def cifar_cost(network):
  return (f'Cost: {COST[network]} through the training graph; measured '
          'throughput per graph: experiments/results/bench.md.')


def _table1():
  for column, (network, short) in TABLE1_NETWORKS.items():
    for graph in paper.TABLE1.rows:
      yield Config(
          f'cifar10_{short}_{graph}', f'CIFAR-10 {column}', paper.TABLE1.label(graph),
          f"recipes.cifar('cifar10', '{network}', '{graph}')", target_note(network),
          cifar_cost(network), paper.TABLE1, graph, (column,))


def _table2():
  """CIFAR-100 ResNet-32: Table 2's rows, then other graphs on the same data."""
  t2 = paper.TABLE2
  baseline, heads = t2.columns[0], t2.columns[1:]
  note = ('The alternating row updates the heads one after another with their own\n'
          'optimizer states (Zhang et al. 2017); DML uses T = 1. Our recipe is He et\n'
          'al.\'s CIFAR-10 one; compare rows, not the paper\'s absolute numbers.')
  rows = (
      # name, label, graph, overrides, (table row, columns)
      ('single', 'single instance', 'single', '',
       ('simultaneous_t1', (baseline,))),
      ('h2_alternating', t2.label('alternating'), 'h2_instances',
       ", method='alternating', temperature=1.0", ('alternating', heads)),
      ('h2_instances_t1', t2.label('simultaneous_t1'), 'h2_instances',
       ', temperature=1.0', ('simultaneous_t1', heads)),
      ('h2_instances', t2.label('simultaneous_t2'), 'h2_instances', '',
       ('simultaneous_t2', heads)),
      *((graph, paper.GRAPHS[graph].label, graph, '', None)
        for graph in ('h4_instances', 'h2_simple', 'h4_hierarchical')))
  dml_baseline = (f'\nThe alternating row\'s own baseline: '
                  f'{t2.text("alternating", baseline)} % test error.')
  for key, label, graph, extra, cell in rows:
    where = dict(table=t2, row=cell[0], columns=cell[1]) if cell else {}
    yield Config(f'cifar100_resnet32_{key}', 'CIFAR-100 ResNet-32', label,
                 f"recipes.cifar('cifar100', 'cifar_resnet32', '{graph}'{extra})",
                 note + (dml_baseline if key == 'single' else ''),
                 cifar_cost('cifar_resnet32'), **where)


def _table3():
  for mode in paper.TABLE3.rows:
    yield Config(
        f'cifar10_resnet32_h4_simple_{mode}',
        'CIFAR-10 ResNet-32, 4 heads sharing up to block 1', paper.TABLE3.label(mode),
        f"recipes.cifar('cifar10', 'cifar_resnet32', 'h4_simple', "
        f"**{{'model.rescale': '{mode}'}})",
        target_note('cifar_resnet32'), cifar_cost('cifar_resnet32'),
        paper.TABLE3, mode, paper.TABLE3.columns)


def _table4():
  for graph in paper.TABLE4.rows:
    name = 'h4' if graph == 'h4_hierarchical' else graph
    note = ('Needs the prepared tfds `imagenet2012` (manual download; pass\n'
            '--config.data_dir).' + (DISTILL_NOTE if graph == 'distillation' else ''))
    yield Config(
        f'imagenet_resnet50_{name}', 'ImageNet ResNet-50', paper.TABLE4.label(graph),
        f"recipes.imagenet('{graph}')", note,
        'Cost: 90 epochs x 1.28M = 115M images through the training graph; on 2 CPU\n'
        'cores this is out of reach; see experiments/results/bench.md.',
        paper.TABLE4, graph, paper.TABLE4.columns[:2])


CONFIGS = (*_table1(), *_table2(), *_table3(), *_table4())


def render(config):
  """The text of configs/<name>.py."""
  return (f'"""{config.doc().strip()}\n"""\n\nfrom collab_jax.trainer import recipes\n\n\n'
          f'def get_config():\n  return {config.recipe}\n')


def main():
  for config in CONFIGS:
    with open(os.path.join(ROOT, 'configs', f'{config.name}.py'), 'w') as f:
      f.write(render(config))
  print('\n'.join(sorted(c.name for c in CONFIGS)))


if __name__ == '__main__':
  main()
