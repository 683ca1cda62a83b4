"""lbgen's errors for bad input: one base class, in a module that imports nothing.

A `UserError`'s message is the whole story (it names the input and what is wrong with it): the
CLI prints it as one line and exits with code 2. Every stage's input checks raise these, so the CLI
can refuse bad input, and show `--help`, without importing torch or Ray. `refusal_reason` puts
torch's refusal of a weights file that would unpickle code into one line of such a message.
"""


class UserError(Exception):
    """Bad input from the user: a setting, a file, a model name; the message names it."""


class ConfigError(UserError, ValueError):
    """A configuration value or file is wrong; the message names which."""


class ClassTableError(UserError, ValueError):
    """A class table cannot be used; the message names the file and line."""


class StorageError(UserError, ValueError):
    """A location cannot be opened or reached; the message names it."""


class DatasetError(UserError, ValueError):
    """An output directory or dataset cannot be used as asked; the message names the path."""


class ShardError(UserError, ValueError):
    """A shard cannot be used; the message names the file."""


class ModelNotFoundError(UserError, RuntimeError):
    """A model could not be found locally nor fetched; the message says how to provide it."""


class UnsafeWeightsError(UserError, ValueError):
    """A weights file would need full unpickling (it could run code); the message names it."""


class BackboneError(UserError, ValueError):
    """A backbone spec cannot be loaded; the message names it."""


class DownstreamError(UserError, ValueError):
    """A downstream dataset cannot be read; the message names the directory."""


class BiasDataError(UserError, ValueError):
    """An ImageNet-9-style directory lacks a folder; the message names it."""


class ReportError(UserError, ValueError):
    """An input of the report cannot be read; the message names the file."""


class OutputInUseError(UserError, RuntimeError):
    """Another running lbgen command holds the output directory; the message names it."""


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception: Ray wraps worker errors (WorkerGroupError -> RayTaskError -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        inner = failures[min(failures)] if failures else getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def refusal_reason(err: Exception) -> str:
    """What `torch.load(weights_only=True)` refused, in one line (torch's own message is a paragraph)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line]
    return (after or [type(err).__name__])[0][:200]
