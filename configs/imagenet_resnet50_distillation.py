"""ImageNet ResNet-50, distillation from an ensemble of two ResNet-50: paper
Table 4, columns "top-1 error" / "top-5 error".
Paper: 22.65 / 6.34 % validation error.
Needs the prepared tfds `imagenet2012` (manual download; pass
--config.data_dir).
Two phases, each an ordinary resumable run: phase 1 trains
distill.num_teachers single ResNet-50s on the labels, each with its own seed
(1000 * (seed + 1) + k) in <workdir>/teachers/teacher_<k> (or uses the
finished runs named by --config.distill.teacher_workdirs); phase 2 trains the
student on beta * CE(labels) + (1 - beta) * T^2 * CE(softmax(mean of the
teachers' logits / T), student / T). The paper leaves beta, T and how the
teachers are combined open; we use its collaborative values (beta = 0.5,
T = 2) and the mean of the teachers' logits.

  python -m collab_jax.main --config=configs/imagenet_resnet50_distillation.py --workdir=runs/imagenet_resnet50_distillation

Cost: 90 epochs x 1.28M = 115M images through the training graph; on 2 CPU
cores this is out of reach; see experiments/results/bench.md.
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.imagenet('distillation')
