"""Distillation's teachers: ordinary finished runs that the student reads.

The teachers are runs of the single network, trained on the labels alone and
independently of each other (own seed, hence own initialisation, data order
and augmentation), as an ensemble of separately trained networks is what the
paper distils from. The student never trains them: `train.train_teachers`
(called by main.py before the student) launches them as ordinary runs, and
the student loads their checkpoints here.
"""

import json
import os

import jax.numpy as jnp
import ml_collections

from collab_jax import errors
from collab_jax.trainer import checkpointing
from collab_jax.trainer import logging_utils


def teacher_runs(config, workdir):
  """`(config, workdir)` of every teacher run of the student `config`.

  `distill.teacher_workdirs` names finished runs to use; otherwise teacher k
  (1-based) of a student with seed s is `<workdir>/teachers/teacher_<k>`,
  trained with seed `1000 * (s + 1) + k`.
  """
  if config.distill.teacher_workdirs:
    out = []
    for teacher_dir in config.distill.teacher_workdirs:
      path = os.path.join(teacher_dir, 'config.json')
      try:
        with open(path) as f:
          out.append((ml_collections.ConfigDict(json.load(f)), teacher_dir))
      except (OSError, ValueError) as e:
        raise errors.ConfigError(
            f'config.distill.teacher_workdirs: cannot read {path} ({e}); name '
            'the workdirs of finished collab_jax runs.') from None
    return out
  out = []
  for k in range(1, config.distill.num_teachers + 1):
    teacher = ml_collections.ConfigDict(config.to_dict())
    teacher.method = 'collaborative'
    teacher.beta = 1.0
    teacher.model.splits = ()
    teacher.seed = 1000 * (config.seed + 1) + k
    teacher.distill.teacher_workdirs = ()
    out.append((teacher, os.path.join(workdir, 'teachers', f'teacher_{k}')))
  return out


def load_teachers(config, workdir, num_classes, image_shape):
  """The finished teacher runs of `config`.

  Returns:
    `apply(variables, images) -> [N, B, C]` logits of the N teachers, their
    variables, and their test errors (from their results.json).
  """
  nets, variables, test_errors = [], [], []
  for teacher, teacher_dir in teacher_runs(config, workdir):
    if not os.path.exists(os.path.join(teacher_dir, 'results.json')):
      raise errors.ConfigError(
          f'distillation: teacher run {teacher_dir} has not finished; '
          'python -m collab_jax.main trains the teachers first '
          '(or call train.train_teachers).')
    model, v = checkpointing.load_run_variables(teacher_dir, teacher,
                                                num_classes, image_shape)
    results = checkpointing.read_json(
        os.path.join(teacher_dir, 'results.json'), 'results of the teacher run',
        'remove it to train that teacher again')
    nets.append(model)
    variables.append(v)
    test_errors.append(results['head_1_test_error'])

  def apply(teacher_vars, images):
    return jnp.stack([net.apply(v, images, train=False)[0]
                      for net, v in zip(nets, teacher_vars)])

  logging_utils.console(
      'distillation phase 2/2: training the student against the mean logits '
      f'of {len(nets)} independently trained teachers')
  return apply, variables, test_errors
