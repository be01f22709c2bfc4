"""The named ImageNet job end to end at tiny size, as a pod runs it.

Fake ILSVRC2012 tars -> `python -m collab_jax.data.prepare_imagenet` ->
`configs/imagenet_resnet50_h4.py` (a tiny ResNet-50-shaped network, 32x32
crops) on 2 processes x 4 CPU devices -> SIGTERM to one process between log
steps -> both save that step -> the rerun resumes there -> top-1 and top-5
results -> head 1 exported. (That the rerun ends bit-identical to an
uninterrupted 2-process run is tested in test_reliability.)
"""

import json
import os
import signal
import time

import pytest

from collab_jax.data import fake_imagenet
import testutil


@pytest.mark.slow
def test_imagenet_config_prepared_preempted_resumed_on_two_processes(tmp_path):
  data_dir = tmp_path / 'imagenet'
  fake_imagenet.make_tars(data_dir / 'downloads' / 'manual', num_classes=4,
                          per_class=4, num_val=8)
  prepare = testutil.start_cli([f'--data_dir={data_dir}'], tmp_path / 'prepare.log',
                               module='collab_jax.data.prepare_imagenet')
  assert prepare.wait(300) == 0, open(tmp_path / 'prepare.log').read()[-3000:]

  steps = 16  # one log step, the last: the signal comes before it (at step ~3)
  args = ['--config=configs/imagenet_resnet50_h4.py', f'--config.data_dir={data_dir}',
          '--config.model.name=tiny_resnet50', '--config.image_size=32',
          '--config.batch_size=8', '--config.eval_batch_size=8',
          f'--config.num_train_steps={steps}', f'--config.log_every_steps={steps}',
          f'--config.checkpoint_every_steps={steps}', '--config.warmup_epochs=0',
          '--config.eval_every_epochs=0', '--config.progress=False']
  workdir = tmp_path / 'run'
  procs = testutil.launch_two(args, workdir, tmp_path / 'log', devices=4)
  t0 = time.time()
  while not (workdir / 'run_info.json').exists():  # written once compiled
    assert all(p.poll() is None for p in procs), open(tmp_path / 'log_0').read()[-3000:]
    assert time.time() - t0 < 300
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  logs = testutil.wait_all(procs, tmp_path / 'log')
  stopped = [l for l in logs[0].splitlines() if l.startswith('pre-empted at')]
  assert len(stopped) == 1, logs[0][-3000:]
  step = int(stopped[0].split()[3].rstrip(';'))
  assert 0 < step < steps, stopped  # not a log step
  # One checkpoint, of that step: a multi-process save completes only when
  # every process takes part, so both agreed on it.
  saved = sorted(os.listdir(workdir / 'checkpoints'))
  assert saved == [str(step)], saved
  assert not (workdir / 'results.json').exists()
  with open(workdir / 'run_info.json') as f:
    info = json.load(f)
  assert (info['processes'], info['devices'], info['heads']) == (2, 8, 4)

  rerun = testutil.launch_two(args, workdir, tmp_path / 'log_rerun', devices=4)
  logs = testutil.wait_all(rerun, tmp_path / 'log_rerun')
  assert f'resuming from the checkpoint at step {step}' in logs[0]
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['steps'] == steps
  assert 0 <= results['head_1_test_top5_error'] <= results['head_1_test_error'] <= 100
  assert len(results['head_test_top5_errors']) == 4
  assert os.listdir(workdir / 'export' / 'head_1')
