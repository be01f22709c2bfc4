"""The sweep runner end to end: run, kill part way, rerun, tables."""

import json
import os
import signal
import subprocess
import sys
import time

import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


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


def test_sweep_kill_resume_and_tables(tmp_path):
  data_dir = tmp_path / 'data'
  testutil.fake_fashion_mnist(str(data_dir), num_train=96, num_test=40, shape=(12, 12))
  driver = _write_driver(tmp_path, data_dir)
  first = tmp_path / 'runs' / 'tiny' / 'single' / 'seed_0' / 'results.json'
  proc = _run(driver, tmp_path)
  deadline = time.time() + 240
  while not first.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  assert first.exists(), proc.communicate()[0][-3000:]
  os.killpg(proc.pid, signal.SIGKILL)  # part way: the second run is starting
  proc.wait()
  first_mtime = first.stat().st_mtime
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

  # A finished sweep trains nothing and rewrites identical tables.
  out, _ = _run(driver, tmp_path).communicate(timeout=300)
  assert '4/4 runs finished, 0 to go' in out
  assert json.loads((tmp_path / 'results' / 'tiny.json').read_text()) == table
  assert (tmp_path / 'results' / 'tiny.md').read_text() == md


def _sweep_module():
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import sweep  # pylint: disable=g-import-not-at-top
  return sweep


def test_identical_runs_are_shared_between_sweeps():
  sweep = _sweep_module()
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


def test_overridden_sweep_writes_its_own_tables(tmp_path):
  sweep = _sweep_module()
  table = sweep.write_tables(sweep.SWEEPS['fmnist_table3'], str(tmp_path / 'runs'),
                             str(tmp_path), extra=('--config.beta=0.9',))
  assert table['sweep'] == 'fmnist_table3__beta_0_9'
  assert '--config.beta=0.9' in table['title']
  assert sorted(os.listdir(tmp_path)) == [
      'fmnist_table3__beta_0_9.json', 'fmnist_table3__beta_0_9.md']
  assert all(c['n'] == 0 for c in table['cells'])  # the plain runs are not it


def test_a_run_locked_by_another_sweep_process_is_skipped(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  sweep = _sweep_module()
  tiny = sweep.Sweep('locked', 'locked', (
      sweep.Row('single', 'configs/fmnist_study.py:single',
                (('num_epochs', 1.0),)),), seeds=1)  # shares no run
  workdir = tmp_path / 'locked' / 'single' / 'seed_0'
  workdir.mkdir(parents=True)
  logs = []
  with open(workdir / '.sweep.lock', 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    assert sweep.run_sweep(tiny, str(tmp_path), log=logs.append) == 0
  assert 'another sweep process is training it' in logs[-1], logs
  assert not (workdir / 'stdout.log').exists()


def test_committed_tables_are_rewritten_identically_from_committed_runs(tmp_path):
  # The Fashion-MNIST tables in experiments/results/ are what the committed
  # finished runs aggregate to: no hand-edited numbers, nothing left stale.
  sweep = _sweep_module()
  root = os.path.join(REPO, 'experiments', 'runs')
  names = [n for n in sweep.SWEEPS if n.startswith('fmnist_')]
  assert names
  for name in names:
    sweep.write_tables(sweep.SWEEPS[name], root, str(tmp_path))
    for ext in ('md', 'json'):
      with open(tmp_path / f'{name}.{ext}') as f:
        fresh = f.read()
      with open(os.path.join(sweep.RESULTS, f'{name}.{ext}')) as f:
        assert f.read() == fresh, f'{name}.{ext} is stale: run ' \
            f'experiments/sweep.py --sweep={name} --aggregate_only'


def test_top5_column_when_the_sweep_asks_for_it(tmp_path):
  sweep = _sweep_module()
  for seed, (top1, top5) in enumerate(((30.0, 10.0), (32.0, 12.0))):
    workdir = tmp_path / 't5' / 'single' / f'seed_{seed}'
    workdir.mkdir(parents=True)
    (workdir / 'results.json').write_text(json.dumps({
        'head_1_test_error': top1, 'head_1_test_top5_error': top5,
        'head_test_errors': [top1], 'ensemble_test_error': top1, 'steps': 10,
        'median_step_time_s': 0.5}))
  rows = (sweep.Row('single', 'configs/fmnist_study.py:single',
                    (('num_epochs', 1.0),)),)  # shares no run
  with_top5 = sweep.Sweep('t5', 't5', rows, seeds=2, show_top5=True)
  table = sweep.aggregate(with_top5, str(tmp_path))
  assert table['cells'][0]['head_1_top5'][0] == 11.0
  md = sweep.to_markdown(table)
  assert '| head 1 top-5 |' in md and '| 11.00 +- 1.41 (n=2) |' in md, md
  plain = sweep.Sweep('t5', 't5', rows, seeds=2)
  assert 'top-5' not in sweep.to_markdown(sweep.aggregate(plain, str(tmp_path)))


def test_mean_of_heads_and_ensemble_columns_when_the_sweep_asks(tmp_path):
  sweep = _sweep_module()
  for seed, (heads, ens) in enumerate((([10.0, 12.0], 9.0), ([11.0, 13.0], 10.0))):
    workdir = tmp_path / 'ens' / 'h2' / f'seed_{seed}'
    workdir.mkdir(parents=True)
    (workdir / 'results.json').write_text(json.dumps({
        'head_1_test_error': heads[0], 'head_test_errors': heads,
        'ensemble_test_error': ens, 'steps': 10, 'median_step_time_s': 0.5}))
  rows = (sweep.Row('h2', 'configs/fmnist_study.py:h2_simple',
                    (('num_epochs', 1.0),)),)  # shares no run
  with_ens = sweep.Sweep('ens', 'ens', rows, seeds=2, show_ensemble=True)
  table = sweep.aggregate(with_ens, str(tmp_path))
  assert table['cells'][0]['heads_mean'][0] == 11.5  # (11 + 12) / 2
  assert table['cells'][0]['ensemble'][0] == 9.5
  md = sweep.to_markdown(table)
  assert '| mean of the heads | ensemble of the heads (mean logits) |' in md, md
  assert '| 10.50 +- 0.71 (n=2) | 11.50 +- 0.71 (n=2) | 9.50 +- 0.71 (n=2) |' in md, md
  sweep.plot_heads(table, str(tmp_path / 'ens.png'))
  assert (tmp_path / 'ens.png').stat().st_size > 1000
  plain = sweep.Sweep('ens', 'ens', rows, seeds=2)
  assert 'ensemble' not in sweep.to_markdown(sweep.aggregate(plain, str(tmp_path)))


def test_heads_columns_are_each_paired_with_the_baseline_when_shown(tmp_path):
  sweep = _sweep_module()
  rows = (sweep.Row('one', 'configs/fmnist_study.py:single', (('num_epochs', 1.0),)),
          sweep.Row('two', 'configs/fmnist_study.py:h2_simple', (('num_epochs', 1.0),)),
          sweep.Row('ls', 'configs/fmnist_study.py:label_smoothing', (('num_epochs', 1.0),)))
  runs = {'one': (([20.0], 20.0), ([21.0], 21.0)),
          # head 1 ties, the mean of the heads is worse, the ensemble better
          'two': (([20.0, 22.0], 18.0), ([21.5, 23.5], 19.2)),
          'ls': (([19.0], 19.0), ([20.0], 20.0))}  # one head: head 1 only
  for name, per_seed in runs.items():
    for seed, (heads, ens) in enumerate(per_seed):
      workdir = tmp_path / 'pe' / name / f'seed_{seed}'
      workdir.mkdir(parents=True)
      (workdir / 'results.json').write_text(json.dumps({
          'head_1_test_error': heads[0], 'head_test_errors': heads,
          'ensemble_test_error': ens, 'steps': 10, 'median_step_time_s': 0.5}))
  table = sweep.aggregate(sweep.Sweep('pe', 'pe', rows, seeds=2, show_ensemble=True),
                          str(tmp_path))
  assert [(p['row'], p['metric']) for p in table['paired'] if p['row'] == 'ls'] == [
      ('ls', 'head 1')]
  by_metric = {p['metric']: p for p in table['paired'] if p['row'] == 'two'}
  assert sorted(by_metric) == ['ensemble of the heads', 'head 1', 'mean of the heads']
  assert by_metric['head 1']['diff'] == 0.25 and by_metric['head 1']['wins'] == 0
  assert by_metric['mean of the heads']['diff'] == 1.25  # (21 - 20 + 22.5 - 21) / 2
  assert abs(by_metric['ensemble of the heads']['diff'] + 1.9) < 1e-12
  assert by_metric['ensemble of the heads']['wins'] == 2
  md = sweep.to_markdown(table)
  assert '| training graph | compared | pairs |' in md, md
  assert '| two | ensemble of the heads | 2 | -1.90 +- 0.10 | 2/2 |' in md, md
  # Without the heads' columns the comparison stays head 1 only, unlabelled.
  plain = sweep.aggregate(sweep.Sweep('pe', 'pe', rows, seeds=2), str(tmp_path))
  assert [p.get('metric') for p in plain['paired']] == [None, None]


def test_curves_section_averages_each_rows_runs_from_their_metrics(tmp_path):
  sweep = _sweep_module()
  rows = (sweep.Row('one', 'configs/fmnist_study.py:single', (('num_epochs', 1.0),)),)
  # Two runs of 2 epochs at 10 steps an epoch; seed 1 was resumed and logged
  # step 10 twice (the last record counts).
  logs = {0: [('train', 10, 30.0), ('eval', 10, 25.0), ('train', 20, 10.0),
              ('eval', 20, 15.0)],
          1: [('train', 10, 50.0), ('train', 10, 32.0), ('eval', 10, 27.0),
              ('train', 20, 12.0), ('eval', 20, 17.0)]}
  for seed, records in logs.items():
    workdir = tmp_path / 'cv' / 'one' / f'seed_{seed}'
    workdir.mkdir(parents=True)
    (workdir / 'results.json').write_text(json.dumps({
        'head_1_test_error': records[-1][2], 'head_test_errors': [records[-1][2]],
        'ensemble_test_error': records[-1][2], 'steps': 20, 'median_step_time_s': 0.5}))
    (workdir / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': step, 'kind': kind, 'head_1/error': err,
                    **({'epoch': step / 10} if kind == 'train' else {})}) + '\n'
        for kind, step, err in records)
        + json.dumps({'step': 20, 'kind': 'final', 'head_1_test_error': 1.0}) + '\n')
  with_curves = sweep.Sweep('cv', 'cv', rows, seeds=2, show_curves=True)
  table = sweep.aggregate(with_curves, str(tmp_path))
  assert table['cells'][0]['curve'] == {
      'train_epochs': [1.0, 2.0], 'train': [31.0, 11.0],
      'test_epochs': [1.0, 2.0], 'test': [26.0, 16.0]}
  md = sweep.to_markdown(table)
  assert '| training graph | epoch 1 | epoch 2 |' in md, md
  assert '| one (n=2) | 31.00 / 26.00 | 11.00 / 16.00 |' in md, md
  sweep.plot_curves(table, str(tmp_path / 'cv.png'))
  assert (tmp_path / 'cv.png').stat().st_size > 1000
  assert 'epoch 1' not in sweep.to_markdown(
      sweep.aggregate(sweep.Sweep('cv', 'cv', rows, seeds=2), str(tmp_path)))


def test_paired_comparison_against_the_baseline():
  sweep = _sweep_module()
  base = [{'seed': s, 'head_1': e} for s, e in enumerate((20.0, 21.0, 19.0))]
  # Differences -1.0, -1.2, -0.8: mean -1.0, s.e. 0.2/sqrt(3), t = -8.66.
  better = [{'seed': s, 'head_1': e} for s, e in enumerate((19.0, 19.8, 18.2))]
  p = sweep.paired(base, better)
  assert p['n'] == 3 and p['wins'] == 3 and p['verdict'] == 'better'
  assert abs(p['diff'] + 1.0) < 1e-12 and abs(p['t'] + 8.660254) < 1e-5
  # Wins in every seed but too noisy for 3 pairs (t = -1.6 > -4.303): a tie.
  noisy = [{'seed': s, 'head_1': e} for s, e in enumerate((19.9, 20.0, 16.0))]
  assert sweep.paired(base, noisy)['verdict'] == 'tie'
  assert sweep.paired(better, base)['verdict'] == 'worse'
  # Only common seeds are paired; one pair decides nothing.
  assert sweep.paired(base, better[:1] + [{'seed': 7, 'head_1': 1.0}])['verdict'] == 'n/a'


def test_bad_arguments_are_one_line(tmp_path):
  cases = [
      (['--sweep=fmnist_table1', '--max_seeds=-1'],
       "error: argument --max_seeds: -1 must be >= 1 (see --help)"),
      (['--sweep=fmnist_table1', '--max_seeds=two'],
       "error: argument --max_seeds: 'two' is not an integer (see --help)"),
      (['--sweep=fmnist_table1', '--bogus'],
       'error: unrecognized arguments: --bogus (see --help)'),
      (['--sweep=no_such_sweep'],
       "error: unknown sweep 'no_such_sweep'; --list shows the sweeps (see --help)"),
      (['--sweep=fmnist_table1', '--', 'learning_rate=0.4'],
       "error: extra argument 'learning_rate=0.4' is not a --config.KEY=VALUE "
       'override (put overrides after --) (see --help)'),
  ]
  for args, message in cases:
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
         f'--root={tmp_path}/runs', f'--out={tmp_path}/results', *args],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, (args, out.stderr)
    assert out.stderr.splitlines() == [message], (args, out.stderr)
    assert out.stdout == '' and not (tmp_path / 'runs').exists()
