"""Errors in user input (config files, flags, env vars).

A `ConfigError` is permanent: retrying will not fix it. At start-up it ends the process with exit code 1 and the
message; while serving, the daemon keeps the config it has and reports the error.
"""


class ConfigError(Exception):
    """A message a user can act on: where (file, key path, flag or env var), what value, what is accepted."""
