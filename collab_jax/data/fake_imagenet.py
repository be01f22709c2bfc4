"""A tiny ImageNet in the layout of the two manual ILSVRC2012 tars (for tests).

`ILSVRC2012_img_train.tar` holds one tar per class (`n01440764.tar`) of
JPEGs named `n01440764_<k>.JPEG`; `ILSVRC2012_img_val.tar` holds JPEGs
`ILSVRC2012_val_<8 digits>.JPEG` whose labels tfds takes from its own copy
of the validation labels (image i gets line i), so the classes used here are
those of the first validation images. Sizes vary, some images are greyscale.
"""

import io
import os
import tarfile

import numpy as np
from PIL import Image

# The labels of ILSVRC2012_val_00000001 ... _00000012 in tfds's
# validation_labels.txt; the training classes are the distinct ones.
FIRST_VAL_LABELS = (
    'n01751748', 'n09193705', 'n02105855', 'n04263257', 'n03125729',
    'n01735189', 'n02346627', 'n02776631', 'n03794056', 'n02328150',
    'n01917289', 'n02125311')
SIZES = ((60, 40), (40, 60), (97, 75), (33, 33), (160, 120), (75, 110))


def _jpeg(rng, size, grey):
  w, h = size
  base = rng.integers(0, 256, 3)
  yy, xx = np.mgrid[:h, :w]
  pixels = (base + 40 * np.sin(xx[..., None] / 5.0 + yy[..., None] / 7.0)
            + rng.integers(0, 30, (h, w, 3)))
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  if grey:
    image = image.convert('L')
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=90)
  return out.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_tars(manual_dir, *, num_classes=4, per_class=3, num_val=8, seed=0):
  """Writes both tars into `manual_dir`; returns (train names, val names)."""
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  classes = sorted(set(FIRST_VAL_LABELS[:num_val]))[:num_classes]
  train_names, val_names = [], []
  k = 0
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'),
                    'w') as train:
    for synset in classes:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(per_class):
          name = f'{synset}_{10026 + i}.JPEG'
          _add(class_tar, name, _jpeg(rng, SIZES[k % len(SIZES)], k % 4 == 3))
          train_names.append(name)
          k += 1
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'),
                    'w') as val:
    for i in range(1, num_val + 1):
      name = f'ILSVRC2012_val_{i:08d}.JPEG'
      _add(val, name, _jpeg(rng, SIZES[i % len(SIZES)], i % 5 == 2))
      val_names.append(name)
  return train_names, val_names
