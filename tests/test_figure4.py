"""Figure 4 analogue from the committed exports of the Fashion-MNIST study."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import figure4  # noqa: E402


def test_rewrites_the_committed_table_from_the_committed_exports(tmp_path,
                                                                 monkeypatch):
  committed = os.path.join(REPO, 'experiments', 'results', 'fmnist_figure4.md')
  if not os.path.exists(committed):
    pytest.skip('no committed Figure 4 table')
  monkeypatch.setattr(figure4, 'OUT', str(tmp_path))
  figure4.main()
  table = json.loads((tmp_path / 'fmnist_figure4.json').read_text())
  assert table['layers'][0].endswith('stem_conv')  # network order
  for graph in table['graphs'].values():
    assert graph['runs'] >= 1
    assert all(0.0 <= f < 1.0 for f in graph['near_zero_fraction'])
  with open(committed) as f:
    assert (tmp_path / 'fmnist_figure4.md').read_text() == f.read()
  assert (tmp_path / 'fmnist_figure4.png').stat().st_size > 0


def test_natural_order():
  keys = ['block_10', 'stem_conv', 'block_2', 'block_0']
  assert sorted(keys, key=figure4._natural) == [  # pylint: disable=protected-access
      'stem_conv', 'block_0', 'block_2', 'block_10']
