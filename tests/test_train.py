"""The trainer end to end on tiny data: runs, resumes, shards, refuses bad input."""

import json
import logging
import shutil
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from collab_jax.data import streams
from collab_jax.data import tfds_io
from collab_jax.trainer import metrics as metrics_lib
from collab_jax.trainer import parallel
from collab_jax.trainer import recipes
from collab_jax.trainer import steps
from collab_jax.trainer import train
import test_methods
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('fmnist')
  testutil.fake_fashion_mnist(str(d), num_train=96, num_test=40, shape=(12, 12))
  return d


def _metrics(workdir, kind='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def _final_params(workdir, config):
  _, variables = train.load_run_variables(config, workdir)
  return variables


def test_end_to_end_local_idx_with_export_and_logs(data_dir, tmp_path):
  config = testutil.tiny_config(data_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= results['head_1_test_error'] <= 100
  assert len(results['head_test_errors']) == 2
  assert results['head_1_test_error'] == results['head_test_errors'][0]
  assert results['steps'] == 6 and results['devices'] == 8
  assert 0 <= results['head_1_test_top5_error'] <= results['head_1_test_error']
  assert results['head_1_test_top5_error'] == results['head_test_top5_errors'][0]
  assert results['versions']['jax'] == jax.__version__
  # What computed it: the source's commit (this checkout's), and whether the
  # tree differed from it.
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, text=True,
                        capture_output=True, check=True).stdout.strip()
  assert results['commit'] == head and isinstance(results['dirty'], bool)
  with open(tmp_path / 'run_info.json') as f:
    info = json.load(f)
  assert (info['commit'], info['versions']) == (head, results['versions'])
  with open(tmp_path / 'data.json') as f:  # the record names its data too
    assert results['data_fingerprint'] == json.load(f)
  assert any(r.get('head_1/top5_error') is not None
             for r in _metrics(tmp_path, 'eval'))
  for name in ('config.json', 'run_info.json', 'metrics.jsonl', 'results.json'):
    assert os.path.exists(tmp_path / name), name
  assert os.listdir(tmp_path / 'tensorboard')
  assert [r['step'] for r in _metrics(tmp_path)] == [2, 4, 6]
  assert all(np.isfinite(r['loss']) for r in _metrics(tmp_path))
  # The exported head 1 is the plain network and reproduces head 1 exactly.
  import orbax.checkpoint as ocp
  import collab_jax
  from collab_jax import models
  with ocp.StandardCheckpointer() as ckptr:
    exported = ckptr.restore(os.path.abspath(tmp_path / 'export' / 'head_1'))
  variables = _final_params(tmp_path, config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 1)), jnp.float32)
  tree = steps.create_model(config, 10)
  net = collab_jax.StageNetwork(models.get_stages('tiny_resnet', 10))
  np.testing.assert_array_equal(jax.jit(net.apply)(exported, x),
                                jax.jit(tree.apply)(variables, x)[0])
  # A finished run is not trained again.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == results
  assert [r['step'] for r in _metrics(tmp_path)] == [2, 4, 6]


def test_eval_step_top5_error_matches_numpy(data_dir):
  config = testutil.tiny_config(data_dir)
  built, state, _ = test_methods._setup(config)  # pylint: disable=protected-access
  model, preprocess = built.model, built.data.preprocess
  batch = next(iter(built.data.eval_batches()))
  metrics = metrics_lib.reduce(steps.eval_step(
      state, batch, model=model, method=built.method, preprocess=preprocess))
  images = preprocess(None, batch['image'], train=False)
  logits = np.asarray(model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=False))
  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask']).astype(bool)
  def top5_error(z):
    top5 = np.argsort(-z, axis=-1, kind='stable')[:, :5]
    return 100 * np.mean(~(top5 == labels[:, None]).any(-1)[mask])
  for h in range(logits.shape[0]):
    np.testing.assert_allclose(metrics[f'head_{h + 1}/top5_error'],
                               top5_error(logits[h]), atol=1e-4)
    assert metrics[f'head_{h + 1}/top5_error'] <= metrics[f'head_{h + 1}/error']
  np.testing.assert_allclose(metrics['ensemble/top5_error'],
                             top5_error(logits.mean(0)), atol=1e-4)


def test_halt_and_resume_is_exact(data_dir, tmp_path):
  config = testutil.tiny_config(data_dir, label_noise=0.3)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  halted = testutil.tiny_config(data_dir, label_noise=0.3, halt_after_steps=4)
  assert train.train_and_evaluate(halted, str(tmp_path / 'split')) is None
  assert not os.path.exists(tmp_path / 'split' / 'results.json')
  # The same command again resumes past the halt and finishes.
  resumed = train.train_and_evaluate(halted, str(tmp_path / 'split'))
  # The second run started at step 4 (it logged steps 6 only).
  assert [r['step'] for r in _metrics(tmp_path / 'split')] == [2, 4, 6]
  a = _final_params(tmp_path / 'full', config)
  b = _final_params(tmp_path / 'split', config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert resumed['head_1_test_error'] == full['head_1_test_error']


def _run_steps(config, placement, num_steps=3):
  """Runs `num_steps` train steps of `config` on `placement` (the trainer's
  `make_train_step`); returns the losses."""
  built, state, _ = test_methods._setup(config)  # pylint: disable=protected-access
  step_fn = steps.make_train_step(
      placement, model=built.model, tx=built.tx, method=built.method,
      preprocess=built.data.preprocess, seed=config.seed,
      unlabeled_weight_fn=built.unlabeled_weight_fn)
  state = jax.device_put(state, placement.replicated)
  losses = []
  for _, local in zip(range(num_steps), built.data.train_iter(0)):
    state, metrics = step_fn(state, parallel.to_global(local, placement.batch), {})
    losses.append(float(metrics['loss'][0]))
  return np.array(losses)


def test_eight_devices_match_one_device(data_dir):
  """Same global batch on 8 devices and on 1: same losses (float32 reduction order)."""
  config = testutil.tiny_config(data_dir)
  one = _run_steps(config, parallel.data_parallel(jax.devices()[:1]))
  eight = _run_steps(config, parallel.data_parallel())
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  assert len(set(one.tolist())) == 3  # training moved


def test_train_step_compiles_once(data_dir, tmp_path, caplog):
  config = testutil.tiny_config(data_dir, num_train_steps=8,
                                eval_every_epochs=16 / 96)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  compiles = [r.getMessage() for r in caplog.records
              if 'Compiling' in r.getMessage()]
  assert sum('train_step' in m for m in compiles) == 1, compiles
  assert sum('eval_step' in m for m in compiles) == 1, compiles


@pytest.mark.parametrize('method,splits', [
    ('label_smoothing', ()), ('alternating', ((0, 2),)), ('distillation', ()),
    ('collaborative', ((0, 2), (1, 2)))])
def test_methods_run(data_dir, tmp_path, capsys, method, splits):
  config = testutil.tiny_config(data_dir, method=method, num_train_steps=2,
                                label_smoothing=0.1)
  config.model.splits = splits
  results = train.train_and_evaluate(config, str(tmp_path))
  heads = int(np.prod([b for _, b in splits])) if splits else 1
  assert results['steps'] == 2 and results['nonfinite_skipped'] == 0
  assert len(results['head_test_errors']) == heads == results['heads']
  # Every head trained: its parameters moved from the initialisation.
  built = train.build(config)
  init = steps.create_train_state(streams.init_key(config.seed), built.model,
                                  (12, 12, 1), built.tx, built.method.init_opt_state)
  final = _final_params(tmp_path, config)['params']
  moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b),
                       init.params, final)
  assert any(np.any(m) for m in jax.tree.leaves(moved))
  for level, tree in moved.items():
    if level.startswith('level_'):  # stacked over its branches: each one moved
      depth = int(level.split('_')[1])
      for leaf in jax.tree.leaves(tree):
        per_branch = leaf.reshape(int(np.prod(leaf.shape[:depth])), -1)
        assert per_branch.any(-1).all(), level
  if method == 'distillation':  # the teachers first, each its own run, kept
    out = capsys.readouterr().out
    assert 'teacher run 1/2' in out and 'teacher run 2/2' in out
    assert 'phase 2/2' in out
    # Independent teachers: separate runs, each with its own seed.
    seeds = []
    for k in (1, 2):
      teacher_dir = tmp_path / 'teachers' / f'teacher_{k}'
      with open(teacher_dir / 'results.json') as f:
        assert json.load(f)['heads'] == 1
      with open(teacher_dir / 'config.json') as f:
        seeds.append(json.load(f)['seed'])
    assert seeds == [1001, 1002]
    assert len(results['teacher_test_errors']) == 2
    assert 0 <= results['teacher_ensemble_test_error'] <= 100


@pytest.mark.slow
def test_cifar10_and_imagenet_on_mock_data(tmp_path):
  tfds = tfds_io.import_tfds()
  config = testutil.tiny_config('', dataset='cifar10', num_train_steps=2)
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(config, str(tmp_path / 'cifar'))
  assert results['train_examples'] == 64 and np.isfinite(results['head_1_test_error'])
  config = recipes.imagenet('h4_hierarchical')
  config.update_from_flattened_dict({
      'model.name': 'tiny_resnet50', 'image_size': 32, 'batch_size': 16,
      'eval_batch_size': 16, 'num_train_steps': 2, 'progress': False,
      'log_every_steps': 1, 'warmup_epochs': 0.0})
  with tfds.testing.mock_data(num_examples=32):
    results = train.train_and_evaluate(config, str(tmp_path / 'imagenet'))
  assert results['heads'] == 4 and np.isfinite(results['head_1_test_error'])


def _main(args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run([sys.executable, '-m', 'collab_jax.main', *args],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=300)


def test_help_explains_itself():
  out = _main(['--help'])
  assert out.returncode in (0, 1), out.stderr  # absl exits 1 after --help
  assert '--config' in out.stdout and '--workdir' in out.stdout
  assert 'configs/imagenet_resnet50_h4.py' in out.stdout
  assert 'Traceback' not in out.stderr


@pytest.fixture(scope='module')
def halted_run(data_dir, tmp_path_factory):
  """A workdir holding checkpoints of an unfinished tiny run, and its config file."""
  root = tmp_path_factory.mktemp('halted')
  config = testutil.tiny_config(data_dir, halt_after_steps=3)
  train.train_and_evaluate(config, str(root / 'run'))
  cfg = root / 'tiny_config.py'
  cfg.write_text(
      f'import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
      f'import testutil\n\n\ndef get_config():\n'
      f'  return testutil.tiny_config({str(data_dir)!r})\n')
  return root / 'run', cfg


def _snapshot(workdir):
  """Every file's mtime, but the lock's (a run that starts records its pid)."""
  return {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
          for dp, _, fs in os.walk(workdir) for f in fs
          if not f.startswith('trainer.lock')}


# One case per path to the CLI's error line (the config checks' messages are
# tested in-process: test_reliability.BAD_CONFIGS): a component's ConfigError,
# a DatasetError, the workdir's refusal, and main.py's own check.
@pytest.mark.parametrize('override,expected', [
    ('--config.model.splits=((5, 2),)', 'split index 5 is out of range'),
    ('--config.data_dir=/nonexistent', 'Fashion-MNIST IDX files not found'),
    ('--config.num_train_steps=9', 'was made by a different config'),
    ('--config.cpu_devices=0', 'config.cpu_devices: 0 must be an integer >= 1'),
])
def test_bad_input_one_line_and_workdir_untouched(halted_run, override, expected):
  """Each mistake: exit code 2, one 'error:' line, the checkpoints untouched."""
  workdir, cfg = halted_run
  before = _snapshot(workdir)
  out = _main([f'--config={cfg}', f'--workdir={workdir}', override])
  assert _snapshot(workdir) == before
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert expected in lines[0]


def test_cpu_devices_may_change_when_a_run_resumes(halted_run, tmp_path):
  """The run halted on 8 CPU devices finishes on the 2 that cpu_devices asks for."""
  workdir, cfg = halted_run
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  out = _main([f'--config={cfg}', f'--workdir={run}', '--config.cpu_devices=2'])
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((run / 'results.json').read_text())
  assert results['devices'] == 2 and results['steps'] == 6
  assert np.isfinite(results['head_1_test_error'])


def test_unknown_config_key_is_one_line(halted_run):
  workdir, cfg = halted_run
  out = _main([f'--config={cfg}', f'--workdir={workdir}', '--config.nosuchkey=1'])
  assert out.returncode != 0
  assert 'nosuchkey' in out.stderr and 'Traceback' not in out.stderr
