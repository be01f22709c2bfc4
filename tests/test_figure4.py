"""Figure 4 analogue: layer statistics from exports, table and plot from the JSON."""

import json
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import figure4  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_committed_table_and_plot_are_rebuilt_from_the_committed_json(tmp_path):
  shutil.copy(os.path.join(figure4.OUT, 'fmnist_figure4.json'), tmp_path)
  figure4.main([f'--out={tmp_path}'])
  for name in ('fmnist_figure4.md', 'fmnist_figure4.png'):
    with open(os.path.join(figure4.OUT, name), 'rb') as f:
      assert (tmp_path / name).read_bytes() == f.read(), f'{name} is stale'
  stats = json.loads((tmp_path / 'fmnist_figure4.json').read_text())
  assert stats['layers'][0].endswith('stem_conv')  # network order
  for graph in stats['graphs'].values():
    assert graph['runs'] == len(graph['run_ids']) == len(
        graph['near_zero_fraction_per_run']) == 3
    assert np.allclose(np.mean(graph['near_zero_fraction_per_run'], 0),
                       graph['near_zero_fraction'])
    assert len(graph['histograms']) == len(stats['layers'])


def _export(path, kernels):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = {'stage_0': {'stem_conv': {'kernel': kernels[0]}},
            'stage_1': {'block_10': {'Conv_0': {'kernel': kernels[1]}},
                        'block_2': {'Conv_0': {'kernel': kernels[2]},
                                    'BatchNorm_0': {'scale': np.ones(4)}}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), {'params': params})


def test_layer_statistics_from_exported_heads(tmp_path):
  # The export-reading path, for users who have the runs: two graphs, one
  # run each, kernels whose near-zero fraction is known.
  kernel = np.full((3, 3, 1, 4), 0.5, np.float32)
  kernel[0, 0, 0, :2] = 0.001  # 2 of 36 weights under 1 % of the max
  for slug in figure4.GRAPHS.values():
    _export(tmp_path / 'fmnist_table1' / slug / 'seed_0' / 'export' / 'head_1',
            [kernel, np.ones((3, 3, 4, 4), np.float32), kernel])
  figure4.main([f'--runs={tmp_path}', f'--out={tmp_path}/out'])
  stats = json.loads((tmp_path / 'out' / 'fmnist_figure4.json').read_text())
  assert stats['layers'] == ['stage_0/stem_conv', 'stage_1/block_2/Conv_0',
                             'stage_1/block_10/Conv_0']
  for graph in stats['graphs'].values():
    assert graph['run_ids'] == [graph['run_ids'][0]]
    assert graph['near_zero_fraction'] == [2 / 36, 2 / 36, 0.0]
  assert '| stage_0/stem_conv | 5.56 % | 5.56 % |' in (
      tmp_path / 'out' / 'fmnist_figure4.md').read_text()
  assert (tmp_path / 'out' / 'fmnist_figure4.png').read_bytes().startswith(b'\x89PNG')


def test_natural_order():
  keys = ['block_10', 'stem_conv', 'block_2', 'block_0']
  assert sorted(keys, key=figure4._natural) == [  # pylint: disable=protected-access
      'stem_conv', 'block_0', 'block_2', 'block_10']
