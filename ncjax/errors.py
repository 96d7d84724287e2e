"""User-facing errors: bad input is reported in one line, without a traceback.

Everything a user can get wrong (config, data folders, workdirs) raises a
subclass of `NcjaxError`; `ncjax.main` prints its message as one line and exits
with status 2. Programming errors keep their tracebacks.
"""


class NcjaxError(Exception):
  """An error in what the user asked for, explained in one line."""


class ConfigError(NcjaxError):
  """A config field is unknown, mistyped or impossible."""


class DataError(NcjaxError):
  """A dataset is missing, not prepared, or malformed."""


class WorkdirError(NcjaxError):
  """A workdir belongs to another run or cannot be written."""
