"""The library installs and works with its core dependencies only.

Builds the wheel, installs it into a fresh venv with jax, flax, optax and numpy
(and what they pull in), runs the README's library snippets there and checks
that TensorFlow was neither installed nor imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import test_readme

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent('''
    import importlib.util, json, sys
    snippets = json.loads(sys.argv[1])
    for name, code in snippets.items():
      exec(compile(code, 'README:' + name, 'exec'), {})
    import collab_jax
    print(json.dumps({
        'file': collab_jax.__file__,
        'api': [n for n in ('collaborative_loss', 'backprop_rescale', 'HeadTree',
                            'export_head', 'get_stages') if hasattr(collab_jax, n)],
        'tf_imported': sorted(m for m in sys.modules if m.split('.')[0] in
                              ('tensorflow', 'tensorflow_datasets', 'ml_collections')),
        'tf_installed': importlib.util.find_spec('tensorflow') is not None,
    }))
''')


@pytest.mark.slow
def test_wheel_with_core_dependencies_only(tmp_path):
  wheels = tmp_path / 'wheels'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '-w', str(wheels), REPO], check=True, cwd=tmp_path)
  (wheel,) = wheels.glob('collab_jax-*.whl')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '-q', str(wheel)], check=True)
  snippets = {k: v for k, v in test_readme._snippets().items()  # pylint: disable=protected-access
              if k in ('plain-jax', 'head-tree', 'nnx')}
  assert len(snippets) == 3
  # Run outside the repository, so that the installed wheel is imported.
  # As a user runs it: without the tests' fast-compile setting (conftest).
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')
         and k != 'JAX_DISABLE_MOST_OPTIMIZATIONS'}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([python, '-c', CHECK, json.dumps(snippets)], check=True,
                       cwd=tmp_path, env=env, capture_output=True, text=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['file'].startswith(str(venv)), report
  assert len(report['api']) == 5, report
  assert report['tf_imported'] == [], report
  assert report['tf_installed'] is False, report
