"""Shared defaults and the standard training recipes the configs build on.

`base_config()` lists every key with a comment; `configs/*.py` call one of the
recipe functions here and change only what differs, so that every row of the
paper's tables is trained by the same code with the same recipe.

Recipes (the paper's supplement with its exact recipes is not available, so
we use the standard published ones):
* CIFAR ResNets: He et al. 2016, Sec. 4.2. SGD momentum 0.9, batch 128,
  lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations, weight decay
  1e-4. On the full 50k training set that is 164 epochs with decays at epochs
  82 and 123. ResNet-110 starts at lr 0.01 until training error < 80 % (about
  400 iterations); we use a 1-epoch linear warm-up instead.
* DenseNet-40-12: Huang et al. 2017, Sec. 4.2. Batch 64, 300 epochs, lr 0.1
  divided by 10 at epochs 150 and 225, weight decay 1e-4, Nesterov momentum 0.9.
* ImageNet ResNet-50: He et al. 2016 / Goyal et al. 2017. 90 epochs, batch 256
  with lr 0.1 scaled linearly with the batch (lr = 0.1 * batch / 256), decayed
  by 10 at epochs 30, 60 and 80, 5 warm-up epochs (Goyal et al.; harmless at
  batch 256), weight decay 1e-4, last BatchNorm of each block zero-initialised.
* Collaborative learning: T = 2, beta = 0.5 (paper Sec. 4).

What to expect: He et al.'s recipe is published at 7.51 % CIFAR-10 test error
for ResNet-32 and 6.61 +- 0.16 % for ResNet-110 (their Table 6); the paper's
baselines are 6.66 % and 5.56 %, about 0.9 points lower, so its supplement
must have used another recipe. DenseNet-40-12's published 5.24 % (Huang et
al., C10+) matches the paper's 5.26 %. The paper's absolute numbers are
therefore not the target of our CIFAR ResNet configs; the differences between
rows (same recipe, different training graph) are.
"""

import ml_collections

from collab_jax import models
from collab_jax import paper


def base_config():
  """Every key with its default; the offline Fashion-MNIST run."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # init, data order, augmentation
  # Data.
  c.dataset = 'fashion_mnist_local'  # fashion_mnist_local|fashion_mnist|cifar10|cifar100|imagenet2012
  c.data_dir = ''                  # IDX dir (fashion_mnist_local) or tfds data_dir; '' = default
  c.train_subset = 0               # >0: train on a fixed, class-balanced subset
  c.subset_seed = 0                # chooses that subset (same for all runs)
  c.label_noise = 0.0              # fraction of training labels corrupted (paper Sec. 3.4)
  c.noise_seed = 0                 # chooses the corrupted set (same for all runs)
  c.label_noise_draws = 'per_run'  # per_run: noisy labels from (noise_seed, seed, epoch); shared: (noise_seed, epoch), one draw for all runs
  # Semi-supervised (the paper's future work; data/labeled_split.py, trainer/methods.py).
  c.labeled_per_class = 0          # >0: keep labels of this many examples per class, the rest unlabelled; 0 = all labelled
  #                                  the labelled set is balanced_subset(..., seed=subset_seed): fixed for all runs, and the
  #                                  same set that train_subset=labeled_per_class * classes trains on (the supervised baseline)
  c.labeled_fraction_per_batch = 0.5  # share of labelled examples in every batch (labelled first); each part has its own epochs
  c.unlabeled_weight = 1.0         # weight w of T^2 * CE(q_h, sigma(z_h; T)) on unlabelled examples (labelled: 1 - beta)
  c.unlabeled_rampup = 'sigmoid'   # sigmoid: w * exp(-5 (1 - t)^2) (Laine & Aila 2017) | linear: w * t; t = step / ramp steps
  c.unlabeled_rampup_epochs = 0.0  # length of the ramp-up in epochs of the whole training set; 0 = w from step 0
  c.image_size = 224               # streamed ImageNet crop size
  c.augment = True                 # random crop (pad, crop) + flip, on the device
  c.augment_pad = 4
  c.augment_flip = True
  # Model: a stage-list network and its tree of heads.
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cifar_resnet8'   # see collab_jax.models.NETWORKS
  c.model.kwargs = ml_collections.ConfigDict({'width': 16})  # network hyper-parameters
  c.model.splits = ((1, 2), (2, 2))  # ((stage_index, branches), ...); () = single model
  c.model.rescale = 'backprop'     # backprop|none|loss (paper Table 3)
  c.model.branch_impl = 'loop'     # loop (branches in sequence) | vmap (batched) | auto (per platform); see bench
  c.model.dtype = 'float32'        # computation dtype; 'bfloat16' for mixed precision; auto: bfloat16 on GPU/TPU
  c.model.remat = False            # rematerialise every stage (HeadTree.remat): less memory, more compute
  # Method and loss.
  c.method = 'collaborative'       # collaborative|label_smoothing|distillation|alternating|mean_teacher
  c.beta = 0.5                     # weight of the hard loss (paper: 0.5)
  c.temperature = 2.0              # soft-loss temperature T (paper: 2)
  c.label_smoothing = 0.0          # epsilon of method label_smoothing
  c.consensus_gradient = False     # let gradients flow into the soft labels
  c.distill = ml_collections.ConfigDict()
  c.distill.num_teachers = 2       # phase 1: this many single networks, each its own run and seed
  c.distill.teacher_workdirs = ()  # finished runs to distil from instead; () = <workdir>/teachers/teacher_<k>
  # mean_teacher (Tarvainen & Valpola 2017), the semi-supervised baseline: one network (splits ()) whose
  # consensus target is its own EMA teacher's softmax(z_t / T), on every example; same beta, T, weights
  # and ramp-up as collaborative. The teacher runs in train mode on its own augmentation of the batch;
  # head 1 (the student) is what is evaluated and exported.
  c.mean_teacher = ml_collections.ConfigDict()
  c.mean_teacher.decay = 0.99      # EMA decay of the teacher's parameters (after a 1/(t+2) warm-up)
  # Optimisation.
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.lr_scaling_batch = 0           # >0: lr *= batch_size / lr_scaling_batch
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4            # L2 on conv/dense kernels, as in individual training
  c.lr_schedule = 'cosine'         # step|cosine|constant
  c.lr_decay_epochs = ()           # step schedule: epochs at which lr *= lr_decay_factor
  c.lr_decay_factor = 0.1
  c.warmup_epochs = 0.0
  c.batch_size = 128               # global batch over all devices and processes
  c.cpu_devices = 1                # CPU only: split each host's cores into this many XLA devices and shard the batch over
  #                                  them (data parallelism instead of intra-op threads; experiments/results/bench.md, Options).
  #                                  Applied by collab_jax.main before JAX starts; other programs set jax_num_cpu_devices.
  c.eval_batch_size = 512
  c.num_epochs = 7.0
  c.num_train_steps = -1           # >0 overrides num_epochs
  # Bookkeeping.
  c.eval_every_epochs = 1.0        # 0 = only at the end
  c.eval_train_clean = False       # also evaluate the training set (clean labels, no augmentation) at every evaluation:
  #                                  how well the network fits it (kind 'eval_train' in metrics.jsonl; in-memory data only)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.halt_after_steps = -1          # >0: checkpoint and stop at this step (rerun to go on)
  c.max_nonfinite_streak = 20      # stop after this many consecutive skipped updates (checked on log steps: reading the on-device streak every step would stall dispatch; a run with every update skipped never writes results)
  c.max_divergent_steps = 20       # stop after this many steps in a row (whole log windows) with head 1's training cross-entropy above 10 log(C); 0 = never (trainer/train.py)
  c.allow_config_change = False    # continue a workdir made by a different config
  c.progress = True                # console progress line
  return c


def apply_graph(c, graph):
  """Sets the topology and method of training graph `graph` (`paper.GRAPHS`) on `c`."""
  c.model.splits = models.paper_splits(c.model.name, graph)
  c.method = paper.GRAPHS[graph].method
  return c


def cifar(dataset, network, graph, **overrides):
  """CIFAR-10/100 with a CIFAR ResNet or DenseNet-40-12 (recipes above)."""
  c = base_config()
  c.dataset = dataset
  c.model.name = network
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.branch_impl = 'auto'  # per platform (steps.PLATFORM_DEFAULTS)
  c.lr_schedule = 'step'
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 2000
  if network.startswith('densenet'):
    c.batch_size = 64
    c.num_epochs = 300.0
    c.lr_decay_epochs = (150, 225)
    c.nesterov = True
  else:
    c.num_epochs = 164.0
    c.lr_decay_epochs = (82, 123)
    if network == 'cifar_resnet110':
      c.warmup_epochs = 1.0
  c.label_smoothing = 0.05  # used by the label_smoothing graph (paper Table 1)
  apply_graph(c, graph)
  if overrides:
    c.update_from_flattened_dict(overrides)
  return c


def imagenet(graph, **overrides):
  """ImageNet ResNet-50 (recipe above)."""
  c = base_config()
  c.dataset = 'imagenet2012'
  c.model.name = 'resnet50'
  c.model.kwargs = ml_collections.ConfigDict()
  # bfloat16 computation on GPU/TPU (float32 parameters, optimizer state,
  # BatchNorm statistics, losses and metrics), float32 on CPU; branches per
  # platform (steps.PLATFORM_DEFAULTS).
  c.model.dtype = 'auto'
  c.model.branch_impl = 'auto'
  c.augment = False  # done by the input pipeline (random resized crop)
  c.batch_size = 256
  c.eval_batch_size = 256
  c.lr_scaling_batch = 256
  c.lr_schedule = 'step'
  c.lr_decay_epochs = (30, 60, 80)
  c.warmup_epochs = 5.0
  c.num_epochs = 90.0
  c.eval_every_epochs = 10.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.label_smoothing = 0.1  # used by the label_smoothing graph (paper Table 4)
  apply_graph(c, graph)
  if overrides:
    c.update_from_flattened_dict(overrides)
  return c


def fashion_mnist_study(graph):
  """The Fashion-MNIST analogue of the paper's experiments (experiments/).

  Sized for 2 CPU cores and chosen to be in the paper's regime, where the
  single network fits its training set (training error reaches 0 %, as the
  CIFAR ResNets do after 164 epochs): a CIFAR-style ResNet-8 of width 16 on a
  fixed, class-balanced 1,000-image training subset, no augmentation, 100
  epochs (700 steps of 128) with a cosine schedule; the test set is always the
  whole 10k. experiments/README.md records the pilots behind this choice.
  `graph` names any graph of `collab_jax.paper.GRAPHS`.
  """
  c = base_config()
  c.model.kwargs = ml_collections.ConfigDict({'width': 16})
  c.train_subset = 1000
  c.augment = False
  c.num_epochs = 100.0
  c.eval_every_epochs = 0.0
  c.log_every_steps = 70
  c.checkpoint_every_steps = 140
  c.label_smoothing = 0.05
  return apply_graph(c, graph)


def fashion_mnist_scale(graph):
  """Clean labels at a larger scale than the study's (experiments/README.md).

  The study's recipe made larger along every axis the pilot could afford on
  2 CPU cores: a CIFAR-style ResNet-14 (width 16) on a fixed, class-balanced
  10,000-image subset with standard augmentation (pad 4 and crop, flip), 20
  epochs (1,560 steps of 128) with a cosine schedule; the test set is the
  whole 10k, evaluated every 5 epochs so every run records its curve.
  `graph` names any graph of `collab_jax.paper.GRAPHS`.
  """
  c = fashion_mnist_study(graph)
  c.model.name = 'cifar_resnet14'
  c.train_subset = 10000
  c.augment = True
  c.num_epochs = 20.0
  c.eval_every_epochs = 5.0
  c.log_every_steps = 78
  c.checkpoint_every_steps = 390
  return apply_graph(c, graph)  # the splits again, for the new network


def fashion_mnist_fit(graph, epochs=40.0):
  """Clean labels in a regime where the single network fits its training set.

  The paper's networks reach 0 % training error on CIFAR; `fashion_mnist_scale`
  (augmented, 20 epochs) stops at about 8 %. Here a CIFAR-style ResNet-14
  (width 16) trains on a fixed, class-balanced 5,000-image subset without
  augmentation for `epochs` epochs (39 steps of 128 per epoch) with a cosine
  schedule; the test set is the whole 10k. Every evaluation (each 5 epochs
  and the end) also evaluates the training subset with its clean labels and
  no augmentation (`eval_train_clean`): that is the fit, which the pilot in
  experiments/README.md checks. `graph` names any graph of `paper.GRAPHS`.
  """
  c = fashion_mnist_study(graph)
  c.model.name = 'cifar_resnet14'
  c.train_subset = 5000
  c.augment = False
  c.num_epochs = float(epochs)
  c.eval_every_epochs = 5.0
  c.eval_train_clean = True
  c.log_every_steps = 39
  c.checkpoint_every_steps = 195
  return apply_graph(c, graph)  # the splits again, for the new network


SEMISUP_ROWS = ('supervised_single', 'supervised_h4_hierarchical',
                'semisup_h2_instances', 'semisup_h4_hierarchical',
                'mean_teacher')


def fashion_mnist_semisup(row):
  """Semi-supervised Fashion-MNIST: 100 labels per class, 59k unlabelled.

  The study's recipe (`fashion_mnist_study`: ResNet-8 width 16, no
  augmentation, batch 128, 700 steps, cosine lr 0.1) with 1,000 labelled
  images (100 per class, the subset `train_subset=1000, subset_seed=0` trains
  on) and the other 59,000 training images unlabelled. Rows:

  * `supervised_single`, `supervised_h4_hierarchical`: the labelled 1,000
    alone. They are exactly the study's `single` and `h4_hierarchical`
    configs, so the sweep reuses those runs (fmnist_table1).
  * `semisup_h2_instances`, `semisup_h4_hierarchical`: collaborative
    learning; every batch holds 64 labelled and 64 unlabelled images, the
    unlabelled ones learn from the consensus term only, with weight 1 after
    a sigmoid ramp-up over the first 280 of the 700 steps.
  * `mean_teacher`: the baseline, one ResNet-8 with the same batches, loss
    form, weights and ramp-up, its target the EMA teacher (decay 0.99).

  Same steps and global batch in every row.
  """
  if row not in SEMISUP_ROWS:
    raise ValueError(f'unknown row {row!r}; choose one of {", ".join(SEMISUP_ROWS)}.')
  if row.startswith('supervised_'):
    return fashion_mnist_study(row[len('supervised_'):])
  graph = {'semisup_h2_instances': 'h2_instances',
           'semisup_h4_hierarchical': 'h4_hierarchical',
           'mean_teacher': 'single'}[row]
  c = fashion_mnist_study(graph)
  if row == 'mean_teacher':
    c.method = 'mean_teacher'
  c.train_subset = 0
  c.labeled_per_class = 100
  c.labeled_fraction_per_batch = 0.5
  c.num_train_steps = 700          # the supervised rows' 100 epochs of 7 steps
  c.unlabeled_weight = 1.0
  c.unlabeled_rampup = 'sigmoid'
  c.unlabeled_rampup_epochs = 280 / 468  # 280 steps (one epoch = 60000 // 128 steps)
  return c
