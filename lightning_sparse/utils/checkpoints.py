"""Reading a checkpoint: the one place the project calls ``torch.load`` on a file it did not just write.

The decision: **every file loads with ``weights_only=True``, this project's own checkpoints included**;
a file that needs anything more is refused unread, with one line naming the file.

Why not "our checkpoints load with ``weights_only=False``, foreign ones with ``True``": where a file comes
from cannot be told before unpickling it. A marker (a key our training writes) is data inside the pickle:
reading it means unpickling the file, and anyone can write the same key. What a pickle may build, however,
is checked by torch's weights-only unpickler itself, before anything runs. So trust is granted by content:
tensors, containers and primitives (torch's own allowlist), plus :data:`TRUSTED_GLOBALS`, the classes this
project's training, slim exports and exports write beyond those. Today that tuple is empty: a Lightning
checkpoint of a ``train.py`` run (model and optimizer state, masks and counters in the callbacks'
``state_dict()``, loops, ``hyper_parameters``) holds plain types only, which
``torch.serialization.get_unsafe_globals_in_checkpoint`` confirms (``tests/test_checkpoint_policy.py``
checks it on a real run). Adding a class to it is a deliberate code change with a test.

Consequences:

- no ``weights_only`` warning from torch or Lightning for our loads: the choice is always passed explicitly
  (Lightning's own load in ``trainer.fit/validate/test(ckpt_path=...)`` goes through
  :class:`~lightning_sparse.preemption.AtomicCheckpointIO`, which calls :func:`load_checkpoint`);
- a file whose pickle names any other global (``posix.system``, an ``nn.Module`` saved whole) is refused
  without being unpickled: :class:`UntrustedCheckpoint`;
- a plain pickle or a legacy (pre-zip) torch file is refused unread too: ``torch.save`` has written zip files
  since PyTorch 1.6, and only the zip format can be inspected before unpickling;
- a class of your own in a checkpoint (a ``LightningModule`` hyper-parameter that is an object): register it
  with ``torch.serialization.add_safe_globals([MyClass])``, torch's documented switch, which this policy
  honours.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.utils.errors import InputError

__all__ = ["TRUSTED_GLOBALS", "UnreadableCheckpoint", "UntrustedCheckpoint", "load_checkpoint", "unsafe_globals"]

TRUSTED_GLOBALS: tuple[Any, ...] = ()
"""Classes our checkpoints may hold beyond torch's weights-only allowlist (none: see the module docstring)."""

_ADVICE = ("only torch.save zip files of tensors, containers and primitives load (what lightning_sparse training "
           "and exports write)")


class UnreadableCheckpoint(InputError):
    """The file is missing, truncated, or not a ``torch.save`` file."""


class UntrustedCheckpoint(InputError):
    """The file's pickle would build objects that no checkpoint of this project holds; it was not unpickled."""


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals (``module.Name``) that ``path``'s pickle names beyond torch's allowlist and
    :data:`TRUSTED_GLOBALS`, read without unpickling (a zip checkpoint only)."""
    with torch.serialization.safe_globals(list(TRUSTED_GLOBALS)):
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` under the policy in the module docstring.

    Args:
        path: a local file.
        map_location: as in ``torch.load``.
        mmap: memory-map the tensors (reading a few entries of a large checkpoint).

    Raises:
        UnreadableCheckpoint: no such file, not a ``torch.save`` zip file, or a truncated/corrupt one.
        UntrustedCheckpoint: the pickle names a global outside the allowlist (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(f"checkpoint {str(path)!r} does not exist or is not a file.")
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(f"checkpoint {str(path)!r} is not a readable checkpoint: not a torch.save zip file (a "
                                   f"plain pickle, a legacy torch file or another file), so it was not unpickled; {_ADVICE}.")
    try:
        unsafe = unsafe_globals(path)
    except (RuntimeError, ValueError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None
    if unsafe:
        raise UntrustedCheckpoint(f"checkpoint {str(path)!r} would build Python objects no lightning_sparse checkpoint "
                                  f"holds ({', '.join(unsafe)}); refused without unpickling it, as that could run code: "
                                  f"{_ADVICE}.")
    try:
        with torch.serialization.safe_globals(list(TRUSTED_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: BaseException) -> UnreadableCheckpoint:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return UnreadableCheckpoint(f"checkpoint {str(path)!r} is not a readable checkpoint ({type(err).__name__}: {first}).")
