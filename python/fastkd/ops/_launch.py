"""The one place where tensors become raw pointers for the native kernels.

The extension ``fastkd._C`` includes no torch headers: it takes data pointers as integers. An
integer does not keep its tensor alive, so a pointer taken from a temporary (a contiguous copy
made for the kernel, say) dangles as soon as the temporary's last reference goes, and the kernel
reads freed memory. ``launch`` therefore takes the tensors themselves, turns them into pointers
inside its own frame and holds them there until the kernel has returned. Ops pass tensors, never
``data_ptr()`` values (a test scans the package for that).

On CUDA the kernels run asynchronously on the current stream; a tensor released after the launch
returns to torch's caching allocator, which hands its memory out again only to work ordered
after the kernel on that stream, so holding the tensors until the launch returns is enough there
too.
"""

from __future__ import annotations

import torch

from ._native import native
from ._registry import backend_spec

__all__ = ["launch", "launch_native"]


def _check_real(kernel: str, name: str, value: torch.Tensor) -> None:
    """Raises where ``value`` is a FakeTensor (under FakeTensorMode or while torch.compile
    traces): it reports a real device but has no memory, and its data pointer would send the
    kernel to address 0."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(value):
        raise RuntimeError(
            f"fastkd's kernel {kernel} cannot run on {name}, a fake tensor: it has no data. Call "
            f"it on real tensors (functions with a custom op, such as the losses, trace under "
            f"FakeTensorMode and torch.compile through their fake kernels)"
        )


def launch(kernel: str, *, args: str | None = None, run: dict | None = None, **fields) -> None:
    """Calls ``fastkd._C.<kernel>`` with the tensors in ``fields`` passed as data pointers.

    Args:
        kernel: name of the extension function.
        args: name of the extension's argument struct (e.g. ``"KdLossArgs"``) built from
            ``fields`` and passed first; without it ``fields`` are the kernel's own keyword
            arguments.
        run: further keyword arguments of the kernel (thread count, stream), passed as they are.
        fields: tensors (passed as pointers; None and empty tensors as null pointers) and
            scalars.
    """
    mod = native()
    held: list[torch.Tensor] = []
    converted = {}
    # Tensors become data pointers (0 for None or an empty tensor); other values pass as they
    # are. One loop without a call per field: a kd_loss launch has 26 of them.
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor:
                _check_real(kernel, name, value)
            held.append(value)
            value = value.data_ptr() if value.numel() else 0
        elif value is None:
            value = 0
        converted[name] = value
    extra = run or {}
    if args is None:
        getattr(mod, kernel)(**converted, **extra)
    else:
        getattr(mod, kernel)(getattr(mod, args)(**converted), **extra)
    # `held` references every tensor whose pointer reached the kernel until this point, after it
    # returned.
    del held


def launch_native(
    op: str, backend: str, device: torch.device, *, args: str | None = None, **fields
) -> None:
    """``launch`` of the native kernel ``op`` registered for ``backend`` (its ``native_symbol``):
    on CPU with torch's thread count, on CUDA on ``device``'s current stream."""
    symbol = backend_spec(op, backend).native_symbol
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            launch(symbol, args=args, run=dict(stream=stream), **fields)
    else:
        launch(symbol, args=args, run=dict(num_threads=torch.get_num_threads()), **fields)
