"""The benchmark runs end to end (tiny settings), and its options keep the maths.

No timing assertions: timings on shared CI machines mean nothing.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax import models
from collab_jax.models import onednn_conv
import collab_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import bench  # noqa: E402
import op_profile  # noqa: E402


@pytest.mark.slow
def test_quick_bench_writes_every_section(tmp_path):
  result = bench.main(['--quick', f'--out={tmp_path}',
                       '--sections=graphs,torch,impl,pipeline,options,'
                       'contention,vit,profile,resnet50'])
  with open(tmp_path / 'bench.json') as f:
    saved = json.load(f)
  report = (tmp_path / 'bench.md').read_text()
  for section in ('CIFAR ResNet-32', 'ImageNet-shaped ResNet-50'):
    rows = saved['graphs'][section]['rows']
    assert [r['graph'] for r in rows] == ['single', 'h4_hierarchical']
    assert rows[0]['time_ratio'] == 1.0 and rows[1]['heads'] == 4
    assert rows[1]['flop_ratio'] > 1.0  # four heads cost more than one
    assert rows[1]['bytes_ratio'] > 1.0 and 'bytes ratio' in report
    assert rows[0]['cpu_s_per_step'] > 0
    assert section in report
  vit = saved['graphs']['Fashion-MNIST ViT-tiny']['rows']
  assert [r['graph'] for r in vit] == ['single', 'h4_hierarchical']
  assert [r['heads'] for r in vit] == [1, 4] and vit[1]['flop_ratio'] > 1.0
  assert 'Fashion-MNIST ViT-tiny' in report
  assert {r['branch_impl'] for r in saved['impl']} == {'loop', 'vmap'}
  assert saved['pipeline']['host']['images_per_s'] > 0
  decode = saved['pipeline']['imagenet_decode']
  assert decode['img_per_s_per_core'] > 0 and decode['images'] > 0
  assert saved['pipeline']['imagenet_cores_per_accelerator'] == pytest.approx(
      bench.ACCELERATOR_IMAGES_PER_S / decode['img_per_s_per_core'])
  assert 'host cores per accelerator' in report
  variants = {r['variant'] for r in saved['options']}
  assert {'baseline', 'bfloat16', 'remat', '1 intra-op thread'} <= variants
  assert any('CPU devices' in v for v in variants)
  onednn = [r for r in saved['options'] if r['variant'] == bench.ONEDNN_FFI]
  assert {r['graph'] for r in onednn} == {'single', bench.MAKE_RUN}
  assert all(r.get('failed') != onednn_conv.available() for r in onednn)
  assert all(r['reason'] == 'not built (make onednn)'
             for r in onednn if r.get('failed'))
  profiled = [p['name'] for p in saved['profile']]
  assert profiled[0] == 'ours (XLA)' and "by op class" in report
  assert ((f'ours, {bench.ONEDNN_FFI}' in profiled) ==
          onednn_conv.available())
  for p in saved['profile']:
    assert set(p['classes']) <= set(op_profile.CLASSES)
    assert sum(p['classes'].values()) > 0 and p['wall_s_per_step'] > 0
  assert saved['goals'] and '## Goals' in report
  ours = [r for r in saved['contention'] if r['who'] == 'ours']
  assert {r['variant'] for r in ours} >= {'single', 'h4_hierarchical'}
  assert all(r['slowdown'] > 0 for r in saved['contention'])
  if bench.torch_python() is not None:  # make bench builds .venv-torch
    assert {r['memory_format'] for r in saved['torch']} == {'channels_last', 'nchw'}
    assert profiled[-1].startswith('PyTorch single')
    assert any(r['who'] == 'PyTorch' for r in saved['contention'])
  assert result['total_s'] > 0
  # The Markdown is rendered from the JSON alone.
  (tmp_path / 'bench.md').unlink()
  bench.main([f'--render={tmp_path / "bench.json"}'])
  assert (tmp_path / 'bench.md').read_text() == report


@pytest.mark.slow
def test_tiny_device_check_runs_on_cpu(tmp_path):
  """`make bench-device`'s script, tiny models, 1-2 steps (here on CPU)."""
  result = bench.main(['--device', '--tiny', f'--out={tmp_path}'])
  name = f'bench_{bench.device_slug()}'
  with open(tmp_path / f'{name}.json') as f:
    saved = json.load(f)
  assert (tmp_path / f'{name}.md').exists()
  assert not saved['skipped']
  for section in ('tiny ResNet-50', 'CIFAR ResNet-32'):
    rows = saved['graphs'][section]['rows']
    assert [r['graph'] for r in rows] == ['single', 'h4_hierarchical']
    assert rows[1]['memory_ratio'] > 1.0
  assert {(r['setting'], r['branch_impl']) for r in saved['impl']} == {
      (s, i) for s in ('tiny ResNet-50', 'CIFAR ResNet-32') for i in ('loop', 'vmap')}
  assert {r['variant'] for r in saved['options']} == {'baseline', 'CPU options'}
  assert result['mode'] == 'device'


def test_torch_reference_prints_json():
  """The PyTorch peer as bench.py runs it: a subprocess in its own venv."""
  python = bench.torch_python()
  if python is None:
    pytest.skip('no .venv-torch (make bench builds it)')
  out = bench.torch_script(python, ('single', 'h2_simple'), batch=4,
                           formats=('channels_last',), threads=(1,), steps=1,
                           warmup=1, depth=8, log=lambda _: None)
  assert [r['graph'] for r in out['results']] == ['single', 'h2_simple']
  assert out['results'][1]['heads'] == 2 and out['torch'].startswith('2.13')


@pytest.mark.parametrize('impl', ['loop', 'vmap'])
def test_remat_keeps_variables_outputs_and_gradients(impl):
  stages = models.get_stages('tiny_resnet', 10)
  splits = ((1, 2), (2, 2))
  plain = collab_jax.HeadTree(stages, splits, branch_impl=impl)
  remat = collab_jax.HeadTree(stages, splits, branch_impl=impl, remat=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)
  variables = plain.init(jax.random.key(0), x)
  assert (jax.tree.structure(remat.init(jax.random.key(0), x)) ==
          jax.tree.structure(variables))
  labels = jnp.arange(4)

  def loss_and_grads(tree):
    def loss_fn(params):
      logits, new = tree.apply({'params': params,
                                'batch_stats': variables['batch_stats']},
                               x, train=True, mutable=['batch_stats'])
      return collab_jax.collaborative_loss(logits, labels), new
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])

  (loss_a, new_a), grads_a = loss_and_grads(plain)
  (loss_b, new_b), grads_b = loss_and_grads(remat)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((grads_a, new_a)), jax.tree.leaves((grads_b, new_b))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_residual_barriers_keep_the_maths_under_the_recommended_options():
  """`models.compiler_options` keeps XLA:CPU's barriers; results are unchanged."""
  stages = models.get_stages('tiny_resnet', 10)
  tree = collab_jax.HeadTree(stages, ((1, 2),))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)
  variables = tree.init(jax.random.key(0), x)

  def loss_fn(params):
    logits, _ = tree.apply({'params': params, 'batch_stats': variables['batch_stats']},
                           x, train=True, mutable=['batch_stats'])
    return collab_jax.collaborative_loss(logits, jnp.arange(4))

  grad = jax.value_and_grad(loss_fn)
  options = models.compiler_options('cpu')
  assert options  # on CPU the barriers need them
  with models.optimization_barriers():  # what the trainer opens on CPU
    kept = jax.jit(grad).lower(variables['params']).compile(compiler_options=options)
  assert 'opt-barrier' in kept.as_text()
  want = jax.jit(grad)(variables['params'])
  got = kept(variables['params'])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert models.compiler_options('gpu') == {}


@pytest.mark.parametrize('args, named', [
    (['--budget_s=-1'], '--budget_s'),
    (['--cpu_devices=0'], '--cpu_devices'),
    (['--sections=foo'], '--sections'),
    (['--sections=graphs,foo'], 'foo'),
    (['--sections='], '--sections'),
    (['--imagenet_graphs=single,bar'], 'bar'),
    (['--impl_batch=0'], '--impl_batch'),
    (['--device', '--device_budget_s=0'], '--device_budget_s'),
    (['--torch_python=/nonexistent/python'], '--torch_python'),
    (['--render=/nonexistent/bench.json'], '--render'),
])
def test_a_bad_argument_ends_with_one_error_line_and_status_2(
    args, named, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(args + [f'--out={tmp_path}'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert [l for l in err if 'error:' in l] == err[-1:]
  assert named in err[-1] and 'Traceback' not in '\n'.join(err)
  assert not os.listdir(tmp_path)  # nothing ran, nothing written


@pytest.mark.parametrize('content', ['not json', '[1, 2]', '{"graphs": {}}',
                                     '{"environment": {}, "graphs": {}, '
                                     '"total_s": 1}'])
def test_render_of_a_bad_json_is_an_error_and_keeps_the_markdown(
    content, capsys, tmp_path):
  (tmp_path / 'bench.json').write_text(content)
  (tmp_path / 'bench.md').write_text('previous report')
  with pytest.raises(SystemExit) as exit_info:
    bench.main([f'--render={tmp_path / "bench.json"}'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert 'error:' in err[-1] and '--render' in err[-1]
  assert (tmp_path / 'bench.md').read_text() == 'previous report'


def test_a_failed_report_leaves_the_previous_results(tmp_path, monkeypatch):
  for name in ('bench.json', 'bench.md'):
    (tmp_path / name).write_text('previous')

  def broken(result, name):
    raise RuntimeError('rendering failed')

  monkeypatch.setattr(bench, 'render_markdown', broken)
  with pytest.raises(RuntimeError):
    bench.write_report(str(tmp_path), 'bench', {'total_s': 1.0})
  assert sorted(os.listdir(tmp_path)) == ['bench.json', 'bench.md']
  assert {p.read_text() for p in tmp_path.iterdir()} == {'previous'}


def test_op_classes_tell_the_three_convolutions_apart():
  x = jnp.zeros((8, 6, 6, 4))
  w = jnp.zeros((3, 3, 4, 5))

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.maximum(y, 0.0))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  classes = op_profile.op_classes(compiled.as_text(), batch=8)
  assert {'conv forward', 'conv input gradient',
          'conv weight gradient'} <= set(classes.values())


def test_pool_tasks_go_to_the_op_beside_them_or_the_last_convolution():
  ms = 1_000_000
  lines = [([('fusion.1', 0, 10 * ms), ('conv.2', 20 * ms, 21 * ms)], []),
           ([], [(2 * ms, 6 * ms), (21 * ms, 31 * ms)])]
  ops, busy = op_profile.attribute(lines, lambda name: name.startswith('conv'))
  # fusion.1 alone for 6 ms, and 4 ms shared with its own pool task;
  # conv.2's pool task runs after it, alone.
  assert ops['fusion.1'] == pytest.approx(0.010)
  assert ops['conv.2'] == pytest.approx(0.011)
  assert busy[2] == pytest.approx(0.004)
