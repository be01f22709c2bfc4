"""The sweep runner: runs, run records, tables from records, statistics, refusals."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

SWEEP_PY = os.path.join(REPO, 'experiments', 'sweep.py')
STUDY = 'configs/fmnist_study.py'


def _write_driver(tmp_path, data_dir):
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(
      f'import sys\nsys.path.insert(0, {TESTS!r})\nimport testutil\n\n\n'
      f'def get_config(splits="1"):\n'
      f'  c = testutil.tiny_config({str(data_dir)!r}, num_train_steps=6,\n'
      f'                           checkpoint_every_steps=2)\n'
      f'  c.model.splits = () if splits == "0" else ((1, 2),)\n'
      f'  return c\n')
  driver = tmp_path / 'driver.py'
  driver.write_text(
      f'import sys\nsys.path.insert(0, {os.path.join(REPO, "experiments")!r})\n'
      f'import sweep\n'
      f'sweep._add(sweep.Sweep("tiny", "tiny sweep", (\n'
      f'    sweep.Row("single", {str(cfg)!r} + ":0"),\n'
      f'    sweep.Row("2 heads", {str(cfg)!r} + ":1")), seeds=2))\n'
      f'sweep.main(sys.argv[1:])\n')
  return driver


def _run(driver, tmp_path, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, str(driver), '--sweep=tiny', f'--root={tmp_path}/runs',
       f'--out={tmp_path}/results'], cwd=REPO, env=env, start_new_session=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_sweep_kill_resume_records_and_a_fresh_clone(tmp_path):
  data_dir = tmp_path / 'data'
  testutil.fake_fashion_mnist(str(data_dir), num_train=96, num_test=40, shape=(12, 12))
  driver = _write_driver(tmp_path, data_dir)
  first = tmp_path / 'runs' / 'tiny' / 'single' / 'seed_0' / 'results.json'
  records = tmp_path / 'results' / 'tiny.runs.jsonl'
  proc = _run(driver, tmp_path)
  deadline = time.time() + 240
  while not records.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  assert records.exists(), proc.communicate()[0][-3000:]
  os.killpg(proc.pid, signal.SIGKILL)  # part way: the second run is starting
  proc.wait()
  first_mtime = first.stat().st_mtime
  assert [json.loads(l)['id'] for l in records.read_text().splitlines()] == [
      'tiny/single/seed_0']  # recorded as soon as it finished
  assert not (tmp_path / 'results' / 'tiny.json').exists()

  out, _ = _run(driver, tmp_path).communicate(timeout=600)
  assert '1/4 runs finished, 3 to go' in out, out[-3000:]
  assert first.stat().st_mtime == first_mtime  # not retrained
  table = json.loads((tmp_path / 'results' / 'tiny.json').read_text())
  assert [(c['row'], c['n']) for c in table['cells']] == [('single', 2), ('2 heads', 2)]
  for cell in table['cells']:
    errors = [r['head_1'] for r in cell['runs']]
    assert cell['head_1_mean'] == sum(errors) / 2
  md = (tmp_path / 'results' / 'tiny.md').read_text()
  assert '(n=2)' in md and '| single |' in md
  record = {json.loads(l)['id']: json.loads(l) for l in records.read_text().splitlines()}
  assert sorted(record) == ['tiny/2_heads/seed_0', 'tiny/2_heads/seed_1',
                            'tiny/single/seed_0', 'tiny/single/seed_1']
  record = record['tiny/single/seed_0']
  assert record['commit'] and record['versions']['jax'] and record['curve']
  assert record['config']['seed'] == 0 and record['config']['model']['splits'] == []

  # A fresh clone has the records but no workdirs: it trains nothing and
  # rewrites identical tables.
  shutil.rmtree(tmp_path / 'runs')
  out, _ = _run(driver, tmp_path).communicate(timeout=300)
  assert '4/4 runs finished, 0 to go' in out, out[-3000:]
  assert not (tmp_path / 'runs' / 'tiny').exists()
  assert json.loads((tmp_path / 'results' / 'tiny.json').read_text()) == table
  assert (tmp_path / 'results' / 'tiny.md').read_text() == md


def test_identical_runs_are_shared_between_sweeps():
  table2 = {(r.name, s): w for r, _, s, w in
            sweep.run_dirs(sweep.SWEEPS['fmnist_table2'], 'R')}
  # Same resolved config (T = 2 is the study's default) -> Table 1's run.
  assert table2['single instance', 1] == 'R/fmnist_table1/single_instance/seed_1'
  assert table2['simultaneous, T = 2', 0] == 'R/fmnist_table1/2_instances/seed_0'
  # A different temperature or method is a run of its own.
  assert table2['simultaneous, T = 1', 0] == 'R/fmnist_table2/simultaneous_t_1/seed_0'
  assert table2['alternating (DML), T = 1', 2].startswith('R/fmnist_table2/')
  figure3 = {(r.name, n, s): w for r, n, s, w in
             sweep.run_dirs(sweep.SWEEPS['fmnist_figure3'], 'R')}
  assert figure3['single instance', 0.0, 0] == 'R/fmnist_table1/single_instance/seed_0'
  assert figure3['single instance', 0.2, 0].startswith('R/fmnist_figure3/')
  # Extra overrides apply to the whole invocation: its runs live apart from
  # the plain sweep's (a finished run of another config is not reused) and
  # are still shared between sweeps invoked with the same overrides.
  extra = ('--config.learning_rate=0.4',)
  with_extra = sweep.run_dirs(sweep.SWEEPS['fmnist_table2'], 'R', extra=extra)
  assert with_extra[0][3] == 'R/fmnist_table1__learning_rate_0_4/single_instance/seed_0'
  assert with_extra[7][3] == 'R/fmnist_table2__learning_rate_0_4/alternating_dml_t_1/seed_2'
  # Seeds beyond an earlier sweep's count are this sweep's own runs.
  assert table2['single instance', 4] == 'R/fmnist_table2/single_instance/seed_4'
  # With root '' the workdirs are the runs' ids, the records' keys.
  assert sweep.run_dirs(sweep.SWEEPS['fmnist_table1'], '')[0][3] == (
      'fmnist_table1/single_instance/seed_0')


def test_every_sweep_pair_names_two_rows():
  for s in sweep.SWEEPS.values():
    names = [r.name for r in s.rows]
    for a, b in s.pairs:
      assert a in names and b in names and a != b, (s.name, a, b)
  with pytest.raises(ValueError, match='does not name two of its rows'):
    sweep._add(sweep.Sweep('bad', 'bad', (sweep.Row('a', STUDY),), pairs=(('a', 'b'),)))


def test_overridden_sweep_writes_its_own_tables(tmp_path):
  table = sweep.write_tables(sweep.SWEEPS['fmnist_table3'],
                             sweep.load_records(sweep.RESULTS), str(tmp_path),
                             extra=('--config.beta=0.9',))
  assert table['sweep'] == 'fmnist_table3__beta_0_9'
  assert '--config.beta=0.9' in table['title']
  assert sorted(os.listdir(tmp_path)) == [
      'fmnist_table3__beta_0_9.json', 'fmnist_table3__beta_0_9.md']
  assert all(c['n'] == 0 for c in table['cells'])  # the plain runs are not it


def test_a_run_locked_by_another_sweep_process_is_skipped(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  tiny = sweep.Sweep('locked', 'locked', (
      sweep.Row('single', STUDY + ':single', (('num_epochs', 1.0),)),), seeds=1)
  workdir = tmp_path / 'locked' / 'single' / 'seed_0'
  workdir.mkdir(parents=True)
  logs = []
  with open(workdir / '.sweep.lock', 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    assert sweep.run_sweep(tiny, str(tmp_path), {}, log=logs.append) == 0
  assert 'another sweep process is training it' in logs[-1], logs
  assert not (workdir / 'stdout.log').exists()


def test_a_recorded_run_is_not_run_again(tmp_path):
  tiny = sweep.Sweep('rec', 'rec', (
      sweep.Row('single', STUDY + ':single', (('num_epochs', 1.0),)),), seeds=1)
  logs = []
  records = {'rec/single/seed_0': _record('rec/single/seed_0', [20.0])}
  assert sweep.run_sweep(tiny, str(tmp_path), records, log=logs.append) == 0
  assert logs == ['rec: 1/1 runs finished, 0 to go'], logs
  assert not os.listdir(tmp_path)


def test_committed_tables_and_plots_are_rebuilt_from_the_records_byte_for_byte():
  # Every Fashion-MNIST table, JSON and plot in experiments/results/ is what
  # the committed run records aggregate to: no hand-edited numbers, nothing
  # stale, and no run directory needed.
  records = sweep.load_records(sweep.RESULTS)
  assert len(records) >= 186
  names = [n for n in sweep.SWEEPS if n.startswith('fmnist_')]
  read = set()
  for name in names:
    s = sweep.SWEEPS[name]
    read |= {r[3] for r in sweep.run_dirs(s, '')}
    for file, data in sweep.render(s, sweep.aggregate(s, records)).items():
      with open(os.path.join(sweep.RESULTS, file), 'rb') as f:
        assert f.read() == data, (
            f'{file} is stale: run experiments/sweep.py --sweep={name} --aggregate_only')
  assert set(records) <= read, sorted(set(records) - read)[:5]  # no orphans


def test_committed_records_agree_with_their_rows_configs():
  # A record is counted in a table only if the run's own config.json agrees
  # with its row's current config on every key both have (runs made before a
  # key existed lack it).
  records = sweep.load_records(sweep.RESULTS)
  for s in sweep.SWEEPS.values():
    if s.name.startswith('fmnist_'):
      for row, noise, seed, run_id in sweep.run_dirs(s, ''):
        if run_id in records:
          sweep.check_record(records[run_id], row, noise, seed)


def _workdir(path, config, results, metrics=(), run_info=None):
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps(config))
  (path / 'results.json').write_text(json.dumps(results))
  if run_info is not None:
    (path / 'run_info.json').write_text(json.dumps(run_info))
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metrics))


def test_read_run_makes_one_record_of_a_workdir(tmp_path):
  metrics = [{'step': 10, 'kind': 'train', 'head_1/error': 50.0, 'head_2/error': 1.0,
              'loss': 2.0, 'epoch': 1.0},
             {'step': 10, 'kind': 'train', 'head_1/error': 30.0, 'epoch': 1.0},
             {'step': 10, 'kind': 'eval', 'head_1/error': 25.0},
             {'step': 10, 'kind': 'eval_train', 'head_1/error': 5.0},
             {'step': 10, 'kind': 'final', 'head_1_test_error': 25.0}]
  results = {'head_1_test_error': 25.0, 'head_test_errors': [25.0], 'steps': 10,
             'commit': 'a' * 40, 'dirty': False, 'versions': {'jax': '0.12.1'}}
  _workdir(tmp_path / 'w', {'seed': 0, 'model': {'splits': []}}, results, metrics)
  record = sweep.read_run(str(tmp_path / 'w'), 's/row/seed_0')
  assert record == {
      'id': 's/row/seed_0', 'config': {'seed': 0, 'model': {'splits': []}},
      'commit': 'a' * 40, 'dirty': False, 'versions': {'jax': '0.12.1'},
      'results': {'head_1_test_error': 25.0, 'head_test_errors': [25.0], 'steps': 10},
      'curve': [{'kind': 'train', 'step': 10, 'head_1/error': 30.0, 'epoch': 1.0},
                {'kind': 'eval', 'step': 10, 'head_1/error': 25.0},
                {'kind': 'eval_train', 'step': 10, 'head_1/error': 5.0}]}
  # The oldest runs recorded no provenance; some wrote versions to run_info.json.
  _workdir(tmp_path / 'old', {}, {'head_1_test_error': 1.0}, run_info={'versions': {}})
  old = sweep.read_run(str(tmp_path / 'old'), 's/r/seed_1')
  assert (old['commit'], old['dirty'], old['versions']) == (None, None, {})


def test_ingest_records_finished_runs_and_refuses_another_config(tmp_path):
  tiny = sweep.Sweep('ing', 'ing', (
      sweep.Row('single', STUDY + ':single', (('num_epochs', 1.0),)),), seeds=3)
  row = tiny.rows[0]
  results = {'head_1_test_error': 20.0, 'head_test_errors': [20.0],
             'ensemble_test_error': 20.0, 'steps': 7}
  for seed in (0, 1):
    _workdir(tmp_path / 'ing' / 'single' / f'seed_{seed}',
             sweep.resolved_config(row, 0.0, seed), results)
  (tmp_path / 'ing' / 'single' / 'seed_2').mkdir()  # unfinished: no results.json
  records = {'ing/single/seed_1': {'id': 'ing/single/seed_1', 'kept': True}}
  assert sweep.ingest(tiny, str(tmp_path), records) == ['ing/single/seed_0']
  assert records['ing/single/seed_1'] == {'id': 'ing/single/seed_1', 'kept': True}
  files = sweep.records_files(records, {'ing'})
  assert list(files) == ['ing.runs.jsonl']
  assert [json.loads(l)['id'] for l in files['ing.runs.jsonl'].splitlines()] == [
      'ing/single/seed_0', 'ing/single/seed_1']
  # A workdir whose config says another learning rate is not this row's run.
  config = sweep.resolved_config(row, 0.0, 2)
  config['learning_rate'] = 0.4
  shutil.rmtree(tmp_path / 'ing' / 'single' / 'seed_2')
  _workdir(tmp_path / 'ing' / 'single' / 'seed_2', config, results)
  with pytest.raises(sweep.SweepError, match='learning_rate: 0.4 != 0.1'):
    sweep.ingest(tiny, str(tmp_path), records)


def test_saving_records_keeps_what_another_process_recorded_meanwhile(tmp_path):
  # Two sweep processes share the results: each writes its new record into
  # the file as it is on disk then, not as it was when the process started.
  other = _record('s/a/seed_0', [20.0])
  (tmp_path / 's.runs.jsonl').write_text(json.dumps(other, sort_keys=True) + '\n')
  mine = {'s/b/seed_0': _record('s/b/seed_0', [21.0])}
  assert sweep.save_records(str(tmp_path), mine, ['s/b/seed_0']) == ['s.runs.jsonl']
  assert sorted(sweep.load_records(str(tmp_path))) == ['s/a/seed_0', 's/b/seed_0']
  assert sorted(mine) == ['s/a/seed_0', 's/b/seed_0']


def test_load_records_refuses_a_record_in_the_wrong_file(tmp_path):
  (tmp_path / 'a.runs.jsonl').write_text(json.dumps({'id': 'b/row/seed_0'}) + '\n')
  with pytest.raises(sweep.SweepError, match='belongs in b.runs.jsonl'):
    sweep.load_records(str(tmp_path))


def _record(run_id, heads, ensemble=None, curve=(), top5=None, **provenance):
  results = {'head_1_test_error': heads[0], 'head_test_errors': list(heads),
             'ensemble_test_error': heads[0] if ensemble is None else ensemble,
             'steps': 10, 'median_step_time_s': 0.5}
  if top5 is not None:
    results['head_1_test_top5_error'] = top5
  return {'id': run_id, 'config': {}, 'results': results, 'curve': list(curve),
          'commit': None, 'dirty': None, 'versions': None, **provenance}


def _records(sweep_name, runs):
  """{id: record} of {row: [(heads, ensemble), ...] per seed}."""
  return {f'{sweep_name}/{row}/seed_{seed}': _record(
      f'{sweep_name}/{row}/seed_{seed}', heads, ens)
          for row, per_seed in runs.items() for seed, (heads, ens) in enumerate(per_seed)}


def _rows(*names):
  # num_epochs=1: configs no earlier sweep has, so no run is shared.
  return tuple(sweep.Row(n, f'{STUDY}:{g}', (('num_epochs', 1.0),)) for n, g in names)


def test_top5_column_when_the_sweep_asks_for_it():
  records = {f't5/single/seed_{s}': _record(f't5/single/seed_{s}', [top1], top5=top5)
             for s, (top1, top5) in enumerate(((30.0, 10.0), (32.0, 12.0)))}
  rows = _rows(('single', 'single'))
  table = sweep.aggregate(sweep.Sweep('t5', 't5', rows, seeds=2, show_top5=True), records)
  assert table['cells'][0]['head_1_top5'][0] == 11.0
  md = sweep.to_markdown(table)
  assert '| head 1 top-5 |' in md and '| 11.00 +- 1.41 (n=2) |' in md, md
  plain = sweep.Sweep('t5', 't5', rows, seeds=2)
  assert 'top-5' not in sweep.to_markdown(sweep.aggregate(plain, records))


def test_mean_of_heads_and_ensemble_columns_when_the_sweep_asks(tmp_path):
  records = _records('ens', {'h2': (([10.0, 12.0], 9.0), ([11.0, 13.0], 10.0))})
  rows = _rows(('h2', 'h2_simple'))
  with_ens = sweep.Sweep('ens', 'ens', rows, seeds=2, show_ensemble=True)
  table = sweep.aggregate(with_ens, records)
  assert table['cells'][0]['heads_mean'][0] == 11.5  # (11 + 12) / 2
  assert table['cells'][0]['ensemble'][0] == 9.5
  md = sweep.to_markdown(table)
  assert '| mean of the heads | ensemble of the heads (mean logits) |' in md, md
  assert '| 10.50 +- 0.71 (n=2) | 11.50 +- 0.71 (n=2) | 9.50 +- 0.71 (n=2) |' in md, md
  png = sweep.render(with_ens, table)['ens.png']
  assert png.startswith(b'\x89PNG') and len(png) > 1000
  plain = sweep.Sweep('ens', 'ens', rows, seeds=2)
  assert 'ensemble' not in sweep.to_markdown(sweep.aggregate(plain, records))


def test_heads_columns_are_each_paired_with_the_baseline_when_shown():
  rows = _rows(('one', 'single'), ('two', 'h2_simple'), ('ls', 'label_smoothing'))
  records = _records('pe', {
      'one': (([20.0], 20.0), ([21.0], 21.0)),
      # head 1 ties, the mean of the heads is worse, the ensemble better
      'two': (([20.0, 22.0], 18.0), ([21.5, 23.5], 19.2)),
      'ls': (([19.0], 19.0), ([20.0], 20.0))})  # one head: head 1 only
  table = sweep.aggregate(sweep.Sweep('pe', 'pe', rows, seeds=2, show_ensemble=True),
                          records)
  assert [(p['row'], p['metric']) for p in table['paired'] if p['row'] == 'ls'] == [
      ('ls', 'head 1')]
  by_metric = {p['metric']: p for p in table['paired'] if p['row'] == 'two'}
  assert sorted(by_metric) == ['ensemble of the heads', 'head 1', 'mean of the heads']
  assert by_metric['head 1']['diff'] == 0.25 and by_metric['head 1']['wins'] == 0
  assert by_metric['mean of the heads']['diff'] == 1.25  # (21 - 20 + 22.5 - 21) / 2
  assert abs(by_metric['ensemble of the heads']['diff'] + 1.9) < 1e-12
  assert by_metric['ensemble of the heads']['wins'] == 2
  assert table['family'] == 4
  md = sweep.to_markdown(table)
  assert '| training graph | baseline | compared | pairs |' in md, md
  assert '| two | one | ensemble of the heads | 2 | -1.90 +- 0.10 | -19.00 |' in md, md
  # Without the heads' columns the comparison stays head 1 only, unlabelled.
  plain = sweep.aggregate(sweep.Sweep('pe', 'pe', rows, seeds=2), records)
  assert [p.get('metric') for p in plain['paired']] == [None, None]


def test_a_sweeps_own_pairs_are_compared_at_every_noise_level_and_in_the_family():
  rows = _rows(('single', 'single'), ('a', 'h2_instances'), ('b', 'h2_simple'))
  noisy = sweep.Sweep('pp', 'pp', rows, seeds=3, noise_levels=(0.2, 0.4),
                      pairs=(('a', 'b'),))
  records = {}
  errors = {'single': (30.0, 31.0, 32.0), 'a': (27.0, 28.2, 28.8), 'b': (28.0, 29.0, 30.0)}
  for row, noise, seed, run_id in sweep.run_dirs(noisy, ''):
    records[run_id] = _record(run_id, [errors[row.name][seed] + 10 * noise])
  table = sweep.aggregate(noisy, records)
  pairs = [p for p in table['paired'] if p['baseline'] == 'b']
  assert [(p['row'], p['noise']) for p in pairs] == [('a', 0.2), ('a', 0.4)]
  # a - b: -1.0, -0.8, -1.2: mean -1.0, s.e. 0.2 / sqrt(3), t = -8.66, 3/3.
  assert abs(pairs[0]['diff'] + 1.0) < 1e-9 and pairs[0]['wins'] == 3
  assert abs(pairs[0]['t'] + 8.660254) < 1e-5 and pairs[0]['verdict'] == 'better'
  assert table['family'] == 6  # 2 rows x 2 levels against single, 2 pairs
  md = sweep.to_markdown(table)
  assert '| a | b | 20 % | 3 | -1.00 +- 0.12 | -8.66 | 0.013 | 3/3 | better |' in md, md
  assert "family of this table's 6 paired tests" in md


def test_curves_section_averages_each_rows_runs_and_shows_the_clean_fit(tmp_path):
  rows = _rows(('one', 'single'))
  # Two runs of 2 epochs at 10 steps an epoch; seed 1 also evaluated its
  # training set with clean labels once.
  logs = {0: [('train', 10, 30.0), ('eval', 10, 25.0), ('train', 20, 10.0),
              ('eval', 20, 15.0), ('eval_train', 20, 1.0)],
          1: [('train', 10, 32.0), ('eval', 10, 27.0), ('train', 20, 12.0),
              ('eval', 20, 17.0), ('eval_train', 20, 3.0)]}
  records = {}
  for seed, log in logs.items():
    curve = [{'step': step, 'kind': kind, 'head_1/error': err,
              **({'epoch': step / 10} if kind == 'train' else {})}
             for kind, step, err in log]
    records[f'cv/one/seed_{seed}'] = _record(f'cv/one/seed_{seed}', [log[3][2]],
                                             curve=curve)
  with_curves = sweep.Sweep('cv', 'cv', rows, seeds=2, show_curves=True)
  table = sweep.aggregate(with_curves, records)
  assert table['cells'][0]['curve'] == {
      'train_epochs': [1.0, 2.0], 'train': [31.0, 11.0],
      'test_epochs': [1.0, 2.0], 'test': [26.0, 16.0],
      'train_clean_epochs': [2.0], 'train_clean': [2.0]}
  md = sweep.to_markdown(table)
  assert '| training graph | epoch 1 | epoch 2 |' in md, md
  assert '| one (n=2) | 31.00 / - / 26.00 | 11.00 / 2.00 / 16.00 |' in md, md
  assert 'train / clean train / test' in md
  png = sweep.render(with_curves, table)['cv_curves.png']
  assert png.startswith(b'\x89PNG') and len(png) > 1000
  assert 'epoch 1' not in sweep.to_markdown(
      sweep.aggregate(sweep.Sweep('cv', 'cv', rows, seeds=2), records))


def test_a_table_mixing_code_versions_says_so_in_its_header():
  rows = _rows(('one', 'single'), ('two', 'h2_simple'))
  records = _records('mx', {'one': (([20.0], None), ([21.0], None)),
                            'two': (([19.0, 19.0], None), ([20.0, 20.0], None))})
  plain = sweep.Sweep('mx', 'mx', rows, seeds=2)
  assert 'Mixed code versions' not in sweep.to_markdown(sweep.aggregate(plain, records))
  records['mx/two/seed_1'].update(commit='abcdef1234', dirty=False,
                                  versions={'jax': '0.12.1', 'python': '3.13.0'})
  md = sweep.to_markdown(sweep.aggregate(plain, records))
  assert md.splitlines()[4].startswith('**Mixed code versions.** These runs come '
                                       'from 2 toolchains or code versions'), md
  assert ('* versions not recorded; no commit recorded (before e852bbc: untagged '
          'random streams): 3 runs (one, seeds 0-1; two, seed 0)') in md, md
  assert ('* JAX 0.12.1, Python 3.13.0; commit abcdef1 (tagged random streams): '
          '1 run (two, seed 1)') in md, md


def test_paired_comparison_against_the_baseline():
  base = [{'seed': s, 'head_1': e} for s, e in enumerate((20.0, 21.0, 19.0))]
  # Differences -1.0, -1.2, -0.8: mean -1.0, s.e. 0.2/sqrt(3), t = -8.66.
  better = [{'seed': s, 'head_1': e} for s, e in enumerate((19.0, 19.8, 18.2))]
  p = sweep.paired(base, better)
  assert p['n'] == 3 and p['wins'] == 3 and p['verdict'] == 'better'
  assert abs(p['diff'] + 1.0) < 1e-12 and abs(p['t'] + 8.660254) < 1e-5
  # df = 2: p = 1 - |t| / sqrt(2 + t^2) exactly.
  assert abs(p['p'] - (1 - 8.660254 / math.sqrt(2 + 75.0))) < 1e-6
  # Wins in every seed but too noisy for 3 pairs (t = -1.6 > -4.303): a tie.
  noisy = [{'seed': s, 'head_1': e} for s, e in enumerate((19.9, 20.0, 16.0))]
  assert sweep.paired(base, noisy)['verdict'] == 'tie'
  assert sweep.paired(better, base)['verdict'] == 'worse'
  # Only common seeds are paired; one pair decides nothing.
  one = sweep.paired(base, better[:1] + [{'seed': 7, 'head_1': 1.0}])
  assert (one['verdict'], one['p']) == ('n/a', None)


def test_t_pvalue_against_closed_forms_and_tables():
  for t in (0.0, 0.5, 1.0, 3.0, 12.706):
    assert abs(sweep.t_pvalue(t, 1) - (1 - 2 * math.atan(t) / math.pi)) < 1e-12
    assert abs(sweep.t_pvalue(-t, 2) - (1 - t / math.sqrt(2 + t * t))) < 1e-12
  # Two-sided 5 % critical values of Student's t (any statistics table).
  for df, crit in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571),
                   (9, 2.262), (10, 2.228), (30, 2.042)):
    assert abs(sweep.t_pvalue(crit, df) - 0.05) < 2e-4, df
  assert sweep.t_pvalue(math.inf, 4) == 0.0


def test_holm_against_a_hand_computed_example():
  # p = 0.01, 0.04, 0.03, 0.005 (m = 4), all with negative t. Sorted:
  # 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, but
  # at least the 0.06 before it. At 5 %: the first two pass, the others not.
  comparisons = [{'p': p, 't': -3.0} for p in (0.01, 0.04, 0.03, 0.005)]
  comparisons.append({'p': None, 't': None})  # one pair: not in the family
  assert sweep.holm(comparisons) == 4
  adjusted = [c['p_holm'] for c in comparisons]
  assert [round(a, 12) if a is not None else None for a in adjusted] == [
      0.03, 0.06, 0.06, 0.02, None]
  assert [c['verdict_holm'] for c in comparisons] == [
      'better', 'tie', 'tie', 'better', 'n/a']
  big = [{'p': 0.5, 't': 1.0}, {'p': 0.4, 't': 1.0}, {'p': 0.3, 't': 1.0}]
  sweep.holm(big)
  assert [round(c['p_holm'], 12) for c in big] == [0.9, 0.9, 0.9]  # monotone


def _cli(args, capsys):
  """`sweep.py ARGS` in this process: (exit status, stdout, stderr)."""
  capsys.readouterr()
  try:
    sweep.main(args)
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = [
      (['--sweep=fmnist_table1', '--max_seeds=-1'],
       'error: argument --max_seeds: -1 must be >= 1 (see --help)'),
      (['--sweep=fmnist_table1', '--max_seeds=two'],
       "error: argument --max_seeds: 'two' is not an integer (see --help)"),
      (['--sweep=fmnist_table1', '--bogus'],
       'error: unrecognized arguments: --bogus (see --help)'),
      (['--sweep=no_such_sweep'],
       "error: unknown sweep 'no_such_sweep'; --list shows the sweeps"),
      (['--sweep=fmnist_table1', '--', 'learning_rate=0.4'],
       "error: extra argument 'learning_rate=0.4' is not a --config.KEY=VALUE "
       'override (put overrides after --)'),
      (['--sweep=fmnist_table1', '--', '--config.learning_rte=0.4'],
       "error: extra argument '--config.learning_rte=0.4' "
       f"({STUDY}:single): override 'learning_rte' names no config field"),
      (['--sweep=fmnist_table1', f'--root={a_file}'],
       f'error: --root {a_file} is not a directory'),
      (['--sweep=fmnist_table1', '--aggregate_only', f'--root={tmp_path}/none'],
       f'error: --root {tmp_path}/none does not exist'),
      (['--sweep=fmnist_table1', f'--out={a_file}/x'],
       f'error: --out {a_file}/x: {a_file} is not a directory'),
      (['--sweep=fmnist_table1', '--all'], 'error: give --sweep or --all, not both'),
  ]
  for args, message in cases:
    code, out, err = _cli([f'--root={tmp_path}/runs', f'--out={tmp_path}/results',
                           *args], capsys)
    assert code == 2, (args, err)
    assert err.splitlines() == [message], (args, err)
    assert out == '' and not (tmp_path / 'runs').exists()
    assert not (tmp_path / 'results').exists()
    assert a_file.read_text() == ''
  # The same as a program.
  out = subprocess.run([sys.executable, SWEEP_PY, '--sweep=no_such_sweep'],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert (out.returncode, out.stderr, out.stdout) == (
      2, "error: unknown sweep 'no_such_sweep'; --list shows the sweeps\n", '')


def _snapshot(path):
  return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def test_aggregate_only_against_an_empty_or_wrong_root_changes_no_committed_file(
    tmp_path, capsys):
  results = tmp_path / 'results'
  shutil.copytree(sweep.RESULTS, results)
  before = _snapshot(results)
  (tmp_path / 'empty').mkdir()
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  for root, code in ((tmp_path / 'empty', 0), (a_file, 2), (tmp_path / 'none', 2)):
    status, out, err = _cli(['--sweep=fmnist_table1', '--aggregate_only',
                             f'--root={root}', f'--out={results}'], capsys)
    assert status == code, (root, out, err)
    assert _snapshot(results) == before, root
  assert '0 runs newly recorded; 0 files changed' in _cli(
      ['--all', '--aggregate_only', f'--root={tmp_path}/empty', f'--out={results}'],
      capsys)[1]
  assert _snapshot(results) == before


def test_a_table_over_fewer_runs_than_the_committed_one_is_refused(tmp_path, capsys):
  results = tmp_path / 'results'
  shutil.copytree(sweep.RESULTS, results)
  (results / 'fmnist_table1.runs.jsonl').unlink()  # as if --out were wrong
  (tmp_path / 'empty').mkdir()
  before = _snapshot(results)
  args = ['--sweep=fmnist_table1', '--aggregate_only', f'--root={tmp_path}/empty',
          f'--out={results}']
  code, _, err = _cli(args, capsys)
  assert code == 2, err
  assert err.splitlines() == [
      f'error: fmnist_table1: the table would hold 0 runs where {results}/'
      'fmnist_table1.json holds 18; nothing written (check --root and --out, or '
      'pass --allow_fewer_runs to write it anyway)'], err
  assert _snapshot(results) == before
  code, _, err = _cli([*args, '--allow_fewer_runs'], capsys)
  assert code == 0, err
  assert 'n/a (0 runs)' in (results / 'fmnist_table1.md').read_text()


def test_a_failed_run_is_one_error_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sweep.SWEEPS, 'fails', sweep.Sweep(
      'fails', 'fails', _rows(('single', 'single')), seeds=1))
  monkeypatch.setattr(sweep, '_command', lambda *a: [
      sys.executable, '-c', 'import sys; sys.exit(3)'])
  code, _, err = _cli(['--sweep=fails', f'--root={tmp_path}/runs',
                       f'--out={tmp_path}/out'], capsys)
  assert code == 2
  workdir = tmp_path / 'runs' / 'fails' / 'single' / 'seed_0'
  assert err.splitlines() == [
      f'error: run {workdir} failed (exit 3); see its stdout.log. Rerun the sweep '
      'to resume it.']
