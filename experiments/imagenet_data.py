"""ImageNet's host side: resume time against the step, and the decode rate per core.

  python experiments/imagenet_data.py

1. Resume. Fake ILSVRC2012 tars (60 training JPEGs of 10 classes) go
   through `python -m collab_jax.data.prepare_imagenet`'s `prepare`; the
   training source is then indexed as if it held ImageNet's 1,281,167
   records (record i is fake record i mod 60, read from its ArrayRecord
   file), and the time from opening the stream at a step to its first batch
   (global batch 256, one process, 224 px) is measured at step 0 and at step
   400,320 = 80 epochs of 5,004 steps, alternating, median of `--repeats`.
2. Host rate. `imagenet.measure_host_rate` (decode + random-resized crop +
   flip of 500x375 JPEGs of about 110 kB, 224 px, one thread, per CPU second),
   and the whole stream (record read, decode, crop, batch) in one thread, per
   CPU second of the process.
"""

import argparse
import statistics
import tempfile
import time

from collab_jax.data import fake_imagenet
from collab_jax.data import imagenet
from collab_jax.data import prepare_imagenet

IMAGENET_TRAIN = 1_281_167
BATCH = 256


class Scaled:
  """Indexes `source` as if it held `n` records (record i is i mod len)."""

  def __init__(self, source, n=IMAGENET_TRAIN):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i % len(self.source)]


def time_to_first_batch(source, step, image_size):
  start = time.perf_counter()
  it = imagenet.imagenet_iterator(
      'train', global_batch=BATCH, process_index=0, process_count=1, seed=0,
      image_size=image_size, source=source, start_step=step)
  next(it)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--image_size', type=int, default=224)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as data_dir:
    fake_imagenet.make_tars(f'{data_dir}/downloads/manual', num_classes=10,
                            per_class=6, num_val=10)
    prepare_imagenet.prepare(data_dir, log=lambda _: None)
    source = Scaled(imagenet.open_split('train', data_dir))
    epoch80 = 80 * (IMAGENET_TRAIN // BATCH)
    times = {0: [], epoch80: []}
    for _ in range(args.repeats):
      for step in times:
        times[step].append(time_to_first_batch(source, step, args.image_size))
  print(f'parallelism (workers, threads): {imagenet.host_parallelism()}')
  print('| resume at step | records before it | time to first batch (s), '
        f'median of {args.repeats} | all |')
  print('|---:|---:|---:|---|')
  for step, ts in times.items():
    print(f'| {step:,} | {step * BATCH:,} | {statistics.median(ts):.2f} | '
          f'{", ".join(f"{t:.2f}" for t in ts)} |')

  rate = imagenet.measure_host_rate(image_size=args.image_size,
                                    seconds=args.seconds)
  print(f'\ndecode + random-resized crop ({rate["source"]}, '
        f'{rate["mean_jpeg_kb"]:.0f} kB, {args.image_size} px): '
        f'{rate["img_per_s_per_core"]:.0f} img/s per core (CPU time), '
        f'{rate["img_per_s_wall"]:.0f} img/s wall-clock')

  jpegs = imagenet.synthetic_jpegs()
  records = Scaled([{'image': j, 'label': 0} for j in jpegs])
  it = imagenet.imagenet_iterator(
      'train', global_batch=BATCH, process_index=0, process_count=1, seed=0,
      image_size=args.image_size, source=records, parallelism=(0, 1))
  next(it)  # start-up
  cpu, wall, done = time.process_time(), time.perf_counter(), 0
  while time.perf_counter() - wall < args.seconds:
    done += len(next(it)['label'])
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  print(f'whole stream, 1 thread (read, decode, crop, batch): '
        f'{done / cpu:.0f} img/s per core (process CPU time), '
        f'{done / wall:.0f} img/s wall-clock')
  for target in (3000,):
    print(f'{target} img/s per accelerator needs '
          f'{target / rate["img_per_s_per_core"]:.1f} cores (decode + crop), '
          f'{target / (done / cpu):.1f} (whole stream)')


if __name__ == '__main__':
  main()
