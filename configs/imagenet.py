"""ImageNet ResNet-50: the paper's Table 4.

  python -m collab_jax.main --config=configs/imagenet.py:h4_hierarchical --workdir=runs/x \
      --config.data_dir=/data/tfds

The argument is the row. Rows and the paper's numbers: top-1 / top-5
validation error (%), training time and memory relative to the baseline:

  single            23.47 / 6.83   1x / 1x         baseline
  label_smoothing   23.34 / 6.80   1x / 1x         label smoothing (0.1)
  distillation      22.65 / 6.34   3.42x / 1.05x   distillation from an ensemble of two ResNet-50
  h2_instances      22.81 / 6.45   2x / 2x         2 instances
  h2_simple         22.70 / 6.37   1.4x / 1.32x    2 heads, simple ILR sharing (split after conv3_x)
  h4_hierarchical   22.29 / 6.21   1.75x / 1.5x    4 heads, hierarchical ILR sharing (after conv3_x and conv4_x)

Needs the prepared tfds `imagenet2012` (manual download; pass
--config.data_dir). Recipe (collab_jax/trainer/recipes.py): He et al. 2016 /
Goyal et al. 2017, 90 epochs, batch 256, lr 0.1 x batch / 256 decayed by 10
at epochs 30, 60 and 80, 5 warm-up epochs.

distillation has two phases, each an ordinary resumable run: phase 1 trains
distill.num_teachers single ResNet-50s on the labels, each with its own seed
(1000 * (seed + 1) + k) in <workdir>/teachers/teacher_<k> (or uses the
finished runs named by --config.distill.teacher_workdirs); phase 2 trains the
student on beta * CE(labels) + (1 - beta) * T^2 * CE(softmax(mean of the
teachers' logits / T), student / T). The paper leaves beta, T and how the
teachers are combined open; we use its collaborative values (beta = 0.5,
T = 2) and the mean of the teachers' logits.

Expected runtime: 90 epochs x 1.28M = 115M images through the training graph.
On 2 CPU cores the single network trains 5 images/s at 224x224
(experiments/results/bench_resnet50.md), i.e. out of reach (about 270 days).
Not yet run on a GPU or TPU. The sweep: experiments/sweep.py
--sweep=imagenet_table4 -- --config.data_dir=/data/tfds.
"""

from collab_jax import paper
from collab_jax.trainer import recipes

ARGUMENTS = tuple(paper.TABLE4.rows)


def paper_row(arg):
  """The paper's label of the row `arg` trains, and its top-1 / top-5 error (%)."""
  _check(arg)
  return paper.TABLE4.label(arg), paper.TABLE4.text(arg, *paper.TABLE4.columns[:2])


def _check(arg):
  if arg not in ARGUMENTS:
    raise ValueError(f'configs/imagenet.py: unknown row {arg!r}; choose one of '
                     f'{", ".join(ARGUMENTS)}.')


def get_config(arg='h4_hierarchical'):
  _check(arg)
  return recipes.imagenet(arg)
