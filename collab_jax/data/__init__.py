"""Data for the trainer: every data concern in a module named for it.

  source.py        `DataSource`, what the training loop reads (one per run
                   and process), built from the config by `create_data_source`
  in_memory.py     small image datasets held in host memory (`load_dataset`)
  idx.py           Fashion-MNIST's original IDX files (the offline default)
  tfds_io.py       TensorFlow and tfds, imported only where they are used
  imagenet.py      ImageNet read by index from tfds ArrayRecord files (grain)
  prepare_imagenet.py  the ILSVRC2012 tars (or a TFRecord preparation) to
                   the ArrayRecord data dir that imagenet.py reads
  fake_imagenet.py a tiny pair of ILSVRC2012 tars for tests and smoke runs
  order.py         which examples each step trains on, and each process's share
  subset.py        fixed class-balanced training subsets
  labeled_split.py the labelled / unlabelled split of semi-supervised runs
  label_noise.py   the paper's label-noise protocol (Sec. 4.1)
  augment.py       augmentation and normalisation on the device
  streams.py       the random stream of every one of them, each tagged

Everything here needs the `[train]` extra only where it touches TensorFlow
(tfds datasets, ImageNet); the in-memory path reads the IDX files with numpy.
"""
