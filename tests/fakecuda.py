"""CUDA without a GPU, for the CPU test suite: fake `cuda:N` tensors with CUDA's own autocast
rules, and a count of the operations that make the host wait for the device.

- `pretend_cuda(monkeypatch)`: torch.cuda answers as on a machine with GPUs (undone after the test).
- `FakeCuda()`: torch's FakeTensorMode. Tensors moved to "cuda" inside it hold no data but keep
  their device and dtype, every op runs torch's meta kernels under the CUDA dispatch keys (so
  autocast applies CUDA's op lists), and an op mixing cuda and cpu tensors raises, as on a GPU.
- `Syncs()`: a dispatch mode over real CPU tensors that notes every op that would make the host
  wait for a CUDA device (a scalar read, nonzero, boolean-mask indexing, unique, ...), with the
  line of our code that asked for it and whether it ran inside backward.
- Data-dependent code (decoding: finished captions leave the batch) cannot run on data-free
  tensors; `record(fn)` runs it on the CPU under Syncs, and `Replay(log)` answers each of those
  ops under FakeCuda with the value or shape the CPU run saw.
- The autograd engine needs a real GPU for cuda tensors, so `fake_backward(params)` turns
  `loss.backward()` into zero gradients on the parameters' device (backward's syncs are counted
  on the CPU run).
"""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
ROOT = str(Path(__file__).resolve().parents[1]) + "/"

# Ops whose result the host needs before it can go on (on CUDA: a device synchronisation).
_SYNC_OPS = {
    aten._local_scalar_dense.default: "scalar read (.item/.tolist/bool/int)",
    aten.item.default: "scalar read (.item/.tolist/bool/int)",
    aten.is_nonzero.default: "scalar read (.item/.tolist/bool/int)",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique", aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
    aten.bincount.default: "bincount",
}
_SCALAR_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}


def sync_kind(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` would make the host wait for a CUDA device, or None."""
    if func in _SYNC_OPS:
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            return None
        return _SYNC_OPS[func]
    if func in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return "boolean-mask indexing"
    return None


def our_line() -> str | None:
    """file:line of the innermost frame of this project's code (tests and .venv excluded)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.startswith(ROOT) and "/.venv/" not in name and "/tests/" not in name:
            return f"{name[len(ROOT):]}:{frame.lineno}"
    return None


def pretend_cuda(monkeypatch, n_gpus: int = 1, native_bf16: bool = True) -> None:
    """What the project (and torch's autocast, GradScaler, optimizers) ask of torch.cuda, answered
    as on a machine with `n_gpus` GPUs; `native_bf16` False: a V100/T4, whose bf16 is emulated."""
    import torch.cuda.amp.common as amp_common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    # Optimizer.step asks the real device whether a CUDA graph is being captured.
    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None)


class FakeCuda(FakeTensorMode):
    """FakeTensorMode that never initialises a device, though pretend_cuda says there is one."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)

    @property
    def avoid_device_init(self) -> bool:
        return True


def to_fake(module: torch.nn.Module, fake: FakeCuda, device="cuda:0") -> torch.nn.Module:
    """The module's parameters and buffers as fake tensors on `device`, in place."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                with fake:
                    t = fake.from_tensor(p.detach()).to(device)
                mod._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                with fake:
                    mod._buffers[name] = fake.from_tensor(b).to(device)
    return module


def real(fn, *args, **kwargs):
    """fn run outside every fake/dispatch mode (building a model's real weights)."""
    with _disable_current_modes():
        return fn(*args, **kwargs)


def _tolist(self):
    # Through item() per value, so that Syncs and Replay see each value as a scalar read.
    return self.item() if self.dim() == 0 else [t.tolist() for t in self.unbind(0)]


@contextlib.contextmanager
def tolist_through_item():
    original = torch.Tensor.tolist
    torch.Tensor.tolist = _tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


class Syncs(TorchDispatchMode):
    """Runs every op for real and notes the syncs: `log` entries (kind, our line, in backward,
    op, the value read or the outputs' shapes and dtypes)."""

    def __init__(self):
        super().__init__()
        self.log: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = sync_kind(func, args, kwargs)
        if kind:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.log.append({"kind": kind, "where": our_line(), "op": func,
                             "backward": torch._C._current_autograd_node() is not None,
                             "value": out if func in _SCALAR_OPS else
                             [(tuple(o.shape), o.dtype) for o in outs]})
        return out

    def summary(self) -> list[tuple[str, str | None, bool]]:
        return [(e["kind"], e["where"], e["backward"]) for e in self.log]


def record(fn) -> Syncs:
    """fn() on real tensors, its syncs noted (tolist counted per value)."""
    with tolist_through_item(), Syncs() as syncs:
        fn()
    return syncs


class Replay(TorchDispatchMode):
    """Under FakeCuda: each forward sync op returns what `record` saw at the same point (fake
    tensors hold no values); `seen` lists them (kind, our line, device type), and
    `blocking_copies` the host-to-device copies that wait (non_blocking=False) made by our code."""

    def __init__(self, syncs: Syncs):
        super().__init__()
        self.todo = [e for e in syncs.log if not e["backward"]]
        self.seen: list[tuple[str, str | None, str]] = []
        self.blocking_copies: list[str | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is None:
            if _blocking_upload(func, args, kwargs):
                self.blocking_copies.append(our_line())
            return func(*args, **kwargs)
        entry = self.todo[len(self.seen)]
        assert entry["op"] is func, f"replay out of step at {our_line()}: {func}, recorded {entry['op']}"
        device = next(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)).device
        self.seen.append((kind, our_line(), device.type))
        if func in _SCALAR_OPS:
            return entry["value"]
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in entry["value"]]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _blocking_upload(func, args, kwargs) -> bool:
    """A cpu -> cuda copy that the host waits for (a tensor built from a Python list on the
    device, or .to(device) without non_blocking)."""
    if func is aten._to_copy.default:
        src, dst, wait = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
    elif func is aten.copy_.default:
        src, dst, wait = args[1], args[0].device, not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return False
    return (wait and isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None
            and torch.device(dst).type == "cuda" and our_line() is not None)


@contextlib.contextmanager
def replaying(syncs: Syncs):
    """FakeCuda with Replay of `syncs` on top: yields (fake mode, replay)."""
    fake = FakeCuda()
    with tolist_through_item(), fake, Replay(syncs) as replay:
        yield fake, replay


@contextlib.contextmanager
def fake_backward(params):
    """loss.backward() -> zero gradients on the parameters' (fake) device."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original
