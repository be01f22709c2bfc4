"""Data for the trainer: every data concern in a module named for it.

  source.py        `DataSource`, what the training loop reads (one per run
                   and process), built from the config by `create_data_source`
  in_memory.py     small image datasets held in host memory (`load_dataset`)
  idx.py           Fashion-MNIST's original IDX files (the offline default)
  tfds_io.py       TensorFlow and tfds, imported only where they are used
  imagenet.py      ImageNet streamed from tfds with tf.data
  order.py         which examples each step trains on, and each process's share
  subset.py        fixed class-balanced training subsets
  labeled_split.py the labelled / unlabelled split of semi-supervised runs
  label_noise.py   the paper's label-noise protocol (Sec. 4.1)
  augment.py       augmentation and normalisation on the device
  streams.py       the random stream of every one of them, each tagged

Everything here needs the `[train]` extra only where it touches TensorFlow
(tfds datasets, ImageNet); the in-memory path reads the IDX files with numpy.
"""
