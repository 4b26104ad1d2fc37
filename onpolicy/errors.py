"""The errors a command reports in one line, without a traceback (no torch needed to catch them)."""


class ConfigError(ValueError):
    """A config that cannot be run, with a message that says how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def yaml_problem(path, e: Exception) -> str:
    """A YAML parse error in one line: path:line:column and the parser's complaint."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})"
