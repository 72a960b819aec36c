"""The CLI's argument parser: errors raised, not printed; option names never abbreviated; every instantiator
reports which class refused its arguments.

- ``exit_on_error=False``: jsonargparse raises its documented :class:`~jsonargparse.ArgumentError` instead of
  printing usage and exiting; :class:`~lightning_sparse.cli.app.SparseCLI` turns it into one line
  (:mod:`lightning_sparse.cli.parse_errors`).
- ``allow_abbrev=False``: ``--trainer.max_epoch=3`` is an unknown option, not ``max_epochs`` taken by prefix.
- :meth:`SparseArgumentParser.add_instantiator` wraps each instantiator (LightningCLI's own for the model and
  the data, and :data:`DEFAULT_INSTANTIATOR` for every other class) so that a constructor's input error
  is raised as :class:`RefusedArguments`, naming the class and the arguments it was given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

__all__ = ["INPUT_ERRORS", "RefusedArguments", "SparseArgumentParser", "default_instantiator", "refused_in"]

INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError, MisconfigurationException)


class RefusedArguments(ValueError):
    """A configured class raised an input error in its constructor.

    Attributes:
        class_type: the class.
        kwargs: the keyword arguments it was called with.
        error: what it raised (also ``__cause__``).
    """

    def __init__(self, class_type: type, kwargs: dict[str, Any], error: BaseException) -> None:
        super().__init__(f"{class_type.__module__}.{class_type.__qualname__}: {error}")
        self.class_type = class_type
        self.kwargs = kwargs
        self.error = error


def default_instantiator(class_type: type, *args: Any, **kwargs: Any) -> Any:
    """jsonargparse's default: ``class_type(*args, **kwargs)``."""
    return class_type(*args, **kwargs)


def locating(instantiator: Callable[..., Any]) -> Callable[..., Any]:
    """``instantiator`` raising :class:`RefusedArguments` when the class refuses its arguments."""
    takes_links = "applied_instantiation_links" in inspect.signature(instantiator).parameters

    def instantiate(class_type: type, *args: Any, applied_instantiation_links: dict | None = None,
                    **kwargs: Any) -> Any:
        links = {"applied_instantiation_links": applied_instantiation_links or {}} if takes_links else {}
        try:
            return instantiator(class_type, *args, **links, **kwargs)
        except RefusedArguments:
            raise
        except INPUT_ERRORS as err:
            raise RefusedArguments(class_type, kwargs, err) from err

    return instantiate


def refused_in(err: BaseException) -> RefusedArguments | None:
    """The innermost :class:`RefusedArguments` in ``err``'s chain of causes (jsonargparse wraps it)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RefusedArguments):
            found = err
        err = err.__cause__ or err.__context__
    return found


class SparseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with the settings in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    @override
    def add_instantiator(self, instantiator: Callable[..., Any], class_type: type, subclasses: bool = True,
                         prepend: bool = False) -> None:
        """Register ``instantiator`` wrapped by :func:`locating`; the catch-all for ``object`` stays last."""
        catch_all = class_type is object and subclasses
        super().add_instantiator(locating(instantiator), class_type, subclasses=subclasses,
                                 prepend=prepend or not catch_all)
