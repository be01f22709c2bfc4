"""The input mistakes the trainer answers with one `error:` line (see main.py).

Plain Python, imported by the data package and the trainer alike.
"""

import contextlib


class ConfigError(ValueError):
  """A bad configuration value; the message names the key and the fix."""


class WorkdirError(ValueError):
  """The workdir belongs to another run or is damaged; the message says what to do."""


class DatasetError(ValueError):
  """A dataset is missing, corrupt or unknown; the message says the fix."""


class NonFiniteError(RuntimeError):
  """Training produced too many consecutive non-finite losses or gradients."""


@contextlib.contextmanager
def config_keys(default, **names):
  """Turns a component's ValueError (or TypeError) in the block into ConfigError.

  Components check their own arguments and say `name=value is wrong because
  ...`; the trainer knows which config key each argument came from. The
  message keeps its words and is prefixed with that key: the key of `names`
  for the argument the message starts with (`rescale='x' is not one of ...`
  becomes `config.model.rescale: 'x' is not one of ...`), else `default`.
  """
  try:
    yield
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    message, key = str(e), default
    for name, config_key in names.items():
      if message.startswith(f'{name}='):
        message, key = message[len(name) + 1:], config_key
        break
    raise ConfigError(f'config.{key}: {message}') from None
