"""The library installs and works with its core dependencies only.

Builds the wheel, installs it into a fresh venv with jax, flax, optax and numpy
(and what they pull in), runs the README's library snippets there and checks
that TensorFlow was neither installed nor imported.
"""

import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import typing

import pytest

import collab_jax
import test_readme

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent('''
    import importlib.util, json, os, sys
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
        'all': sorted(collab_jax.__all__),
        'py_typed': os.path.exists(os.path.join(
            os.path.dirname(collab_jax.__file__), 'py.typed')),
    }))
''')


@pytest.fixture
def venv_dir(tmp_path):
  """Where the wheel test's venv goes: in memory (tmpfs) when there is room.

  The venv is about 15k files and 620 MB (jaxlib most of it). On a disk
  mounted with online discard (ext4 `discard`, as on the machines this suite
  is timed on) unlinking them took 52 s, paid in pytest's clean-up of old
  temporary folders; on tmpfs it is instant.
  """
  shm = '/dev/shm'
  if (os.path.isdir(shm) and os.access(shm, os.W_OK)
      and shutil.disk_usage(shm).free > 4 << 30):
    with tempfile.TemporaryDirectory(dir=shm, prefix='collab_jax_venv_') as d:
      yield pathlib.Path(d) / 'venv'
  else:
    yield tmp_path / 'venv'


@pytest.mark.slow
def test_wheel_with_core_dependencies_only(tmp_path, venv_dir):
  # Built from a copy: an in-tree build leaves build/lib behind, and a later
  # wheel would ship modules that have since been moved or deleted.
  src = tmp_path / 'src'
  shutil.copytree(os.path.join(REPO, 'collab_jax'), src / 'collab_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  wheels = tmp_path / 'wheels'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '-w', str(wheels), str(src)], check=True, cwd=tmp_path)
  (wheel,) = wheels.glob('collab_jax-*.whl')
  venv = venv_dir
  # A venv without its own pip, filled by this pip (--python), without
  # byte-compiling: the same packages installed, in about half the time.
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                 check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install',
                  '-q', '--no-compile', str(wheel)], check=True)
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
  assert report['all'] == sorted(collab_jax.__all__), report
  assert report['py_typed'] is True, report  # PEP 561: the hints ship
  # The trainer on a core-only install: one line naming the extra.
  out = subprocess.run([python, '-m', 'collab_jax.main', '--config=c.py',
                        '--workdir=w'], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
      r"error: the trainer needs the \[train\] extra \(\w+ is not installed\): "
      r"pip install 'collab_jax\[train\]', or in a checkout pip install -e "
      r"'\.\[train\]'\.", lines[0]), lines
  assert not os.path.exists(tmp_path / 'w')


def _untyped(fn):
  """Names of `fn`'s parameters (and 'return') that carry no type hint."""
  signature = inspect.signature(fn)
  missing = [name for name, p in signature.parameters.items()
             if name != 'self' and p.annotation is inspect.Parameter.empty]
  if (fn.__name__ != '__init__'
      and signature.return_annotation is inspect.Signature.empty):
    missing.append('return')
  typing.get_type_hints(fn)  # and the hints resolve
  return missing


def test_public_api_is_declared_typed_and_documented():
  public = sorted(name for name, value in vars(collab_jax).items()
                  if not name.startswith('_')
                  and not isinstance(value, types.ModuleType))
  assert sorted(collab_jax.__all__) == public
  namespace = {}
  exec('from collab_jax import *', namespace)  # pylint: disable=exec-used
  assert set(namespace) - {'__builtins__'} == set(collab_jax.__all__)
  for name in collab_jax.__all__:
    value = getattr(collab_jax, name)
    # The module docstring's list names every public symbol.
    assert f'\n  {name} ' in collab_jax.__doc__, name
    assert value.__doc__, name
    if inspect.isfunction(value):
      assert not _untyped(value), (name, _untyped(value))
    else:  # the modules: their constructor and call
      for method in ('__init__', '__call__', 'export_head'):
        fn = vars(value).get(method)
        if inspect.isfunction(fn):
          assert not _untyped(fn), (name, method, _untyped(fn))
  package = os.path.dirname(collab_jax.__file__)
  assert os.path.exists(os.path.join(package, 'py.typed'))
