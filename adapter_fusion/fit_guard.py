"""A fit's stop points and its clean-up: a cancelled fit stops within one block's forward or
backward, and a finished one gives its memory back to the system.

One micro-batch of a couple of thousand tokens through a 30-block model takes tens of seconds on
a CPU; checking only between micro-batches would leave a cancelled call running that long. So
`stop_points` calls `tick` before every block's forward and after every block's backward (a
hook on the block's output gradient); whatever `tick` raises unwinds the fit from there.

glibc keeps freed heap memory mapped (its mmap threshold grows with every large free), so after
a fit of a few GB the process stays a few GB larger than it needs; `malloc_trim` returns it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import traceback
from collections.abc import Callable, Iterator

import torch

Tick = Callable[[], None]  # raises to stop the fit


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: every member of every ModuleList (decoder layers; for a
    seq2seq model the encoder's and the decoder's)."""
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]


@contextlib.contextmanager
def stop_points(model: torch.nn.Module, tick: Tick | None) -> Iterator[None]:
    """Within the block, `tick` runs before each block's forward and after its backward."""
    if tick is None:
        yield
        return

    def before(module, args) -> None:
        tick()

    def after(module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: tick())

    handles = []
    try:
        for block in blocks(model):
            handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _libc_trim()


def release_memory() -> None:
    """Collect what a fit left (its model copy, activations) and hand the freed heap back."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


@contextlib.contextmanager
def releasing() -> Iterator[None]:
    """Around a fit on its own model copy: however it ends, what its frames held is dropped (a
    failure's traceback would keep the model and the activations alive) and the heap trimmed."""
    try:
        yield
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        release_memory()
