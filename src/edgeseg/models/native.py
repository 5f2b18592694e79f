"""The C kernels of fused inference, compiled on first use: where eager PyTorch loses to memory traffic and operator
overhead, or vectorises along the wrong axis.

- **DGL plans** (``native_dgl.c``, :class:`NativePlan`): a fused DGL site's gate, Top-r and gathers in one call. In
  eager PyTorch a site's plan is ~15 small operators. Each costs a few microseconds alone, and about three times
  that inside a real forward pass, where every operator meets cold caches: measured on SegFormer-B0 at 512², the
  16 plans take 4–7 ms of a 60–80 ms DynaSegFormer forward — more than half of what 30 % sparsity saves. The C
  loop nest does the same arithmetic (the gate MLP is a few thousand MACs per image) and writes the gathered
  weights into buffers that are reused from one forward to the next, so a site costs one call, which also pools
  its tokens. Buffers are per site, batch size and thread: a returned plan is valid until the same thread runs the
  same site with the same batch size again — within one forward pass, which is how the sites use it.
- **Resize-and-add** (``native_resize.c``, :func:`resize_add_`): SegFormer's additive decoder adds three maps,
  bilinearly upsampled to the 1/4 grid, into the first; done here in one pass over the output instead of writing and
  re-reading a full-resolution map per resize. **Resize-and-argmax** (:func:`resize_argmax`), the labels of logits
  resized to the image, likewise without the resized logits.
- **Attention** (``native_attention.c``, :func:`attention`): SegFormer's efficient self-attention, fused and DGL.
  PyTorch's fused CPU attention vectorises along the head width, so a DGL head of 24 kept channels costs ~0.9 of a
  32-channel one; here the queries fill the vector lanes and the time falls with the width (0.78 at 24 channels,
  0.6 at 16), and a dense head runs in ~0.7 of PyTorch's time (B0 at 512², two threads). Its threads are PyTorch's
  OpenMP threads.
- **LayerNorm** (``native_norm.c``, :func:`layer_norm`): short token rows (32 channels at B0's stage 1) without
  PyTorch's per-row overhead; fused models' norms are :class:`~.layers.NativeLayerNorm`.

On Linux, the kernels are compiled on first use with the system C compiler (``$CC`` or ``cc``; with ``-fopenmp``
where it has it) into ``$EDGESEG_CACHE_DIR`` (default ``~/.cache/edgeseg``), keyed by the sources' hash. Without a
compiler, off CPU, for dtypes other than float32, under autograd, tracing, ``torch.export`` or ONNX export, and with
``EDGESEG_NATIVE=0``, PyTorch operators run instead; both give the same outputs up to float32 rounding (DGL slot
order within a head may differ, the interpolation and the attention sum in another order): ≤ 1e-5 at the library's
initialisation, and for dynamic models with non-trivial weights and gates each path is as far from the float64 result
as the other.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # dynamic.py imports this module
    from .dynamic import FoldedGate

log = logging.getLogger(__name__)
ENV_SWITCH = "EDGESEG_NATIVE"
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("native_dgl.c", "native_resize.c", "native_attention.c", "native_norm.c"))
HEADERS = tuple(Path(__file__).with_name(name)  # part of the build's cache key
                for name in ("native_dispatch.h", "native_attention_block.h"))

_I64, _F32P, _I64P = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
_MAX_RESIZE_SOURCES = 8  # MAX_SOURCES in native_resize.c


class _Selection(ctypes.Structure):
    _fields_ = [("start", _I64), ("groups", _I64), ("per_group", _I64), ("keep", _I64), ("width", _I64)]


class _Part(ctypes.Structure):
    _fields_ = [("src", _F32P), ("first", _I64), ("count", _I64), ("offset", _I64), ("scale", ctypes.c_int32)]


class _Output(ctypes.Structure):
    _fields_ = [("dst", _F32P), ("row", _I64), ("rows", _I64), ("parts", ctypes.POINTER(_Part)), ("n_parts", _I64)]


class _ResizeSource(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("h", _I64), ("w", _I64)]


class _AttentionArgs(ctypes.Structure):  # pointers as integers, strides as plain fields: built per call, cheaply
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "out")] + [
        (f"{t}_{axis}", _I64) for t in ("q", "k", "v", "out") for axis in ("image", "token", "head")] + [
        (name, _I64) for name in ("batch", "heads", "N", "M", "dq", "dv")] + [("scale", ctypes.c_float)]


class _Site(ctypes.Structure):
    _fields_ = [("w1", _F32P), ("b1", _F32P), ("w2", _F32P), ("b2", _F32P), ("channels", _I64), ("hidden", _I64),
                ("n", _I64), ("eps", ctypes.c_double), ("selections", ctypes.POINTER(_Selection)),
                ("n_selections", _I64), ("slots", _I64), ("values", _F32P), ("index", _I64P),
                ("outputs", ctypes.POINTER(_Output)), ("n_outputs", _I64)]


_warned: set[str] = set()  # switches already warned about


def env_switch(name: str) -> bool:
    """An on/off environment variable, on unless set to 0/false/no/off; another value is said once and left on
    (``EDGESEG_NATIVE=disable`` would otherwise pass for "on" unnoticed)."""
    value = os.environ.get(name, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("", "1", "true", "yes", "on") and name not in _warned:
        _warned.add(name)
        log.warning("edgeseg: %s=%r is not one of 0/1, false/true, no/yes, off/on: taken as on", name, value)
    return True


def cache_dir() -> Path:
    """Where compiled kernels live: ``$EDGESEG_CACHE_DIR`` or ``$XDG_CACHE_HOME/edgeseg`` (``~/.cache/edgeseg``)."""
    if os.environ.get("EDGESEG_CACHE_DIR"):
        return Path(os.environ["EDGESEG_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeseg"


def kernel_path(compiler: str) -> Path:
    """The cached build of the kernels by ``compiler``: named by the sources' and the compiler's hash and the CPU
    architecture, so an edited source or another compiler builds anew."""
    sources = b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + compiler.encode()).hexdigest()[:16]
    return cache_dir() / f"edgeseg_native-{key}-{os.uname().machine}.so"


def _compile(compiler: str, target: Path) -> None:
    """With OpenMP where the compiler has it (the kernels split their work over PyTorch's threads), else without
    (each kernel then runs on one thread; the attention kernel leaves multi-threaded calls to PyTorch)."""
    command = [compiler, "-O3", "-std=c99", "-shared", "-fPIC", "-o", str(target), *map(str, SOURCES), "-lm"]
    try:
        subprocess.run([*command, "-fopenmp"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError:
        subprocess.run(command, check=True, capture_output=True, text=True)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (once logged) where they cannot be built or are switched
    off."""
    if not env_switch(ENV_SWITCH) or not sys.platform.startswith("linux"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("edgeseg: no C compiler found ($CC or cc); fused inference runs in PyTorch only")
        return None
    target = kernel_path(compiler)
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                _compile(compiler, built)
                os.replace(built, target)  # atomic: a concurrent process sees no half-written library
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            log.warning("edgeseg: could not build the native kernels (%s); fused inference runs in PyTorch only",
                        detail)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:  # e.g. a cache shared with another kind of machine
        log.warning("edgeseg: could not load the native kernels %s (%s); fused inference runs in PyTorch only",
                    target, err)
        return None
    lib.dgl_plan.argtypes = [ctypes.POINTER(_Site), ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, ctypes.c_int]
    lib.dgl_plan.restype = ctypes.c_int
    lib.resize_add.argtypes = [ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.POINTER(_ResizeSource), _I64,
                               ctypes.c_int, ctypes.c_int]
    lib.resize_add.restype = ctypes.c_int
    lib.resize_argmax.argtypes = [_F32P, _I64 * 3, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64P,
                                  ctypes.c_int]
    lib.resize_argmax.restype = ctypes.c_int
    lib.attention.argtypes = [ctypes.POINTER(_AttentionArgs), ctypes.c_int, ctypes.c_int]
    lib.attention.restype = ctypes.c_int
    lib.attention_widest.restype = ctypes.c_int
    lib.layer_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, _I64, _I64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_float, ctypes.c_int]
    lib.layer_norm.restype = None
    lib.attention_threaded.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded here."""
    return library() is not None


def _ptr(t: Tensor, kind=_F32P):
    return ctypes.cast(t.data_ptr(), kind)


@dataclass(frozen=True)
class Selection:
    """``Top-r`` over ``groups`` slices of ``per_group`` gate logits starting at ``start``: ``keep`` slots with
    their values, then ``width - keep`` padding slots (value 0), per slice, as :func:`~.dynamic.top_r`."""

    start: int
    groups: int
    per_group: int
    keep: int
    width: int


@dataclass(frozen=True)
class Part:
    """Rows ``index - offset`` of ``source`` (rows, row) for the slots ``[first, first + count)`` of each image, times
    the gate value (``scale="value"``), the slot's support (``"support"``: 1 real, 0 padding) or 1."""

    source: Tensor
    first: int
    count: int
    offset: int = 0
    scale: str = "none"


_KEPT_BATCHES = 2  # batch sizes whose plan buffers a thread keeps per site (a fixed size plus a last short batch)


class NativePlan:
    """A site's folded gate, its selections and gathers, and their buffers; ``__call__`` returns the gathered tensors.

    ``gate`` is the site's ``FoldedGate`` (its LN has no affine). Slots are numbered selection by selection, and a
    slot's index is its position in the gate's output. Each entry of ``outputs`` is one gathered tensor: its parts,
    one after another, per image (all parts of an output have the same row length). ``views(buffers, batch)`` shapes
    the (B, rows, row) buffers into what the site's forward consumes, once per buffer set, so a call creates no
    tensors. The plan holds its sources (the layer's weights, detached: in-place updates are seen, as by the
    PyTorch plan) and the gate's tensors, so the pointers the kernel reads stay valid whatever becomes of the
    module's parameters.
    """

    _SCALES = {"none": 0, "value": 1, "support": 2}

    def __init__(self, gate: FoldedGate, selections: Sequence[Selection], outputs: Sequence[Sequence[Part]],
                 views: Callable[[list[Tensor], int], tuple[Tensor, ...]]) -> None:
        def frozen(t: Tensor) -> Tensor:
            return t.detach().to(torch.float32).contiguous()

        self.w1, self.b1, self.w2, self.b2 = (frozen(t) for t in (gate.w1, gate.b1, gate.w2, gate.b2))
        self.eps = float(gate.eps)
        self.selections = list(selections)
        self.slots = sum(s.groups * s.width for s in self.selections)
        self.outputs = [[Part(frozen(p.source.reshape(p.source.shape[0], -1)), p.first, p.count, p.offset, p.scale)
                         for p in parts] for parts in outputs]
        for parts in self.outputs:
            if len({p.source.shape[1] for p in parts}) != 1:
                raise ValueError("the parts of one gathered output must have the same row length")
        self.views = views
        self._local = threading.local()

    # Buffers and ctypes structs belong to one thread of one process: a copy rebuilds them on first use.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _state(self, batch: int) -> tuple:
        """This thread's buffers for ``batch`` images: each thread writes its own (a server's request threads), and
        they go with the thread; a thread keeps those of its last ``_KEPT_BATCHES`` batch sizes."""
        states = self._local.__dict__.setdefault("states", {})
        state = states.pop(batch, None)
        if state is None:
            if len(states) >= _KEPT_BATCHES:
                del states[next(iter(states))]  # the least recently used
            with torch.inference_mode(False):  # normal tensors: written under inference mode and under no_grad
                values = torch.empty(batch, self.slots, dtype=torch.float32)
                index = torch.empty(batch, self.slots, dtype=torch.int64)
                buffers = [torch.empty(batch, sum(p.count for p in parts), parts[0].source.shape[1],
                                       dtype=torch.float32) for parts in self.outputs]
            selections = (_Selection * len(self.selections))(
                *[_Selection(s.start, s.groups, s.per_group, s.keep, s.width) for s in self.selections])
            parts = [(_Part * len(ps))(*[_Part(_ptr(p.source), p.first, p.count, p.offset, self._SCALES[p.scale])
                                         for p in ps]) for ps in self.outputs]
            outputs = (_Output * len(buffers))(*[_Output(_ptr(buf), buf.shape[2], buf.shape[1], ps, len(ps))
                                                 for buf, ps in zip(buffers, parts)])
            site = _Site(_ptr(self.w1), _ptr(self.b1), _ptr(self.w2), _ptr(self.b2), self.w1.shape[1],
                         self.w1.shape[0], self.w2.shape[0], self.eps, selections, len(selections), self.slots,
                         _ptr(values), _ptr(index, _I64P), outputs, len(outputs))
            # the ctypes objects stay referenced here: the kernel reads them through raw pointers
            state = (ctypes.byref(site), values, index, self.views(buffers, batch), (site, selections, parts, outputs))
        states[batch] = state
        return state

    def __call__(self, x: Tensor, dims: tuple[int, ...] = (1,)) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """The plan for ``x``, pooled over ``dims`` (tokens (B, N, C): ``(1,)``; maps (B, C, H, W): ``(2, 3)``).
        The kernel pools ``x`` itself, in place.

        Returns (``views`` of the gathered tensors, gate values, index), values and index (B, slots)."""
        if dims not in ((1,), (2, 3)) or x.dim() != 1 + len(dims) + 1:
            raise ValueError(f"NativePlan pools tokens (B, N, C) over (1,) or maps (B, C, H, W) over (2, 3); got "
                             f"{tuple(x.shape)} over {dims}")
        B = x.shape[0]
        site_ref, values, index, views, _ = self._state(B)
        if dims == (2, 3):  # maps (B, C, H, W): their H·W tokens at one stride (NCHW and channels-last both)
            H, W = x.shape[2:]
            if W > 1 and H > 1 and x.stride(2) != W * x.stride(3):
                x = x.contiguous()
            tokens, token_stride, channel_stride = H * W, x.stride(3) if W > 1 else x.stride(2), x.stride(1)
        else:  # tokens (B, N, C)
            tokens, token_stride, channel_stride = x.shape[1], x.stride(1), x.stride(2)
        if library().dgl_plan(site_ref, x.data_ptr(), B, tokens, x.stride(0), token_stride, channel_stride,
                              torch.get_num_threads()):
            raise MemoryError("DGL native plan: out of memory")
        return views, values, index


def usable(x: Tensor) -> bool:
    """Whether the native plan may run on ``x`` now: a plain CPU float32 tensor, no autograd, no TorchScript tracing.

    Exporters never hand the forward a plain eager tensor outside tracing: the TorchScript ONNX exporter traces, and
    ``torch.export`` (the dynamo ONNX exporter, ExecuTorch, AOTInductor) runs on fake tensors — a ``Tensor``
    subclass, whose data pointer the kernel could not read anyway. Asking ``torch.onnx.is_in_onnx_export()`` instead
    would re-import two modules per call: 25–150 µs inside a forward, at each of the 16 sites of a B0.
    """
    return (type(x) is Tensor and x.dtype is torch.float32 and x.is_cpu and not torch.is_grad_enabled()
            and not torch.jit.is_tracing())


def resize_add_(acc: Tensor, maps: Sequence[Tensor], row0: int, height: int, relu: bool = False) -> bool:
    """``acc += Σ resize(map, (height, W))[:, :, row0 : row0 + rows]``, then with ``relu`` ``acc.relu_()``, in one
    native pass, for the maps' bilinear resize (``align_corners=False``) to a ``height`` × W grid; returns False,
    touching nothing, where the kernel does not apply (then the caller resizes in PyTorch).

    ``acc`` (B, C, rows, W) and every map (B, C, h, w) are channels-last views of contiguous (B, ·, ·, C) tensors —
    the layout SegFormer's decoder keeps its maps in.
    """
    lib = library()
    if lib is None or not usable(acc) or not all(usable(m) for m in maps) or len(maps) > _MAX_RESIZE_SOURCES:
        return False
    tokens = [t.permute(0, 2, 3, 1) for t in (acc, *maps)]
    if not all(t.is_contiguous() for t in tokens) or len({t.shape[3] for t in tokens}) != 1 \
            or len({t.shape[0] for t in tokens}) != 1:
        return False
    out, *sources = tokens
    batch, rows, width, channels = out.shape
    table = (_ResizeSource * len(sources))(*[_ResizeSource(t.data_ptr(), t.shape[1], t.shape[2]) for t in sources])
    if lib.resize_add(out.data_ptr(), batch, rows, row0, height, width, channels, table, len(sources), int(relu),
                      torch.get_num_threads()):
        raise MemoryError("native resize_add: out of memory")
    return True


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor | None:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last axis of a contiguous ``x`` (``native_norm.c``:
    short rows without PyTorch's per-row overhead); None, computing nothing, where the kernel does not apply (not a
    plain CPU float32 inference call, ``x`` not contiguous, no kernel built)."""
    lib = library()
    if lib is None or not usable(x) or not x.is_contiguous() or x.dim() == 0 or x.shape[-1] == 0:
        return None
    C = x.shape[-1]
    for t in (weight, bias):
        if t.shape != (C,) or t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return None
    y = torch.empty_like(x)
    lib.layer_norm(x.data_ptr(), y.data_ptr(), x.numel() // C, C, weight.data_ptr(), bias.data_ptr(), eps,
                   torch.get_num_threads())
    return y


def resize_argmax(logits: Tensor, size: Sequence[int], out_size: Sequence[int] | None = None) -> Tensor | None:
    """``argmax`` over classes of ``logits`` (B, K, h, w) resized bilinearly (``align_corners=False``) to ``size``
    and then to ``out_size`` (mmseg's two test-time resizes; None: one), as (B, H, W) int64 — without the resized
    logits ever existing (``native_resize.c``). None, computing nothing, where the kernel does not apply: not a plain
    CPU float32 inference call, classes not contiguous (NCHW logits), no kernel built. Pixels may be strided: a
    fused SegFormer's logits are a view of its padded classifier's output.

    Labels equal ``argmax`` of PyTorch's resizes except where two classes' resized logits are within float32
    rounding (~1e-7 relative) of each other.
    """
    lib = library()
    if lib is None or not usable(logits) or logits.dim() != 4 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        return None
    B, K, h, w = logits.shape
    (H1, W1), (H2, W2) = tuple(size), tuple(out_size if out_size is not None else size)
    labels = torch.empty(B, H2, W2, dtype=torch.int64)
    strides = (_I64 * 3)(logits.stride(0), logits.stride(2), logits.stride(3))
    if lib.resize_argmax(_ptr(logits), strides, B, h, w, K, H1, W1, H2, W2, _ptr(labels, _I64P),
                         torch.get_num_threads()):
        raise MemoryError("native resize_argmax: out of memory")
    return labels


@functools.lru_cache(maxsize=1)
def _attention_paths() -> tuple[int, bool]:
    """The widest vector path of the attention kernel on this CPU, and whether it was built with threads."""
    lib = library()
    return lib.attention_widest(), bool(lib.attention_threaded())


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, path: int | None = None) -> Tensor | None:
    """``softmax(q kᵀ · scale) v`` (``native_attention.c``) for q (B, heads, N, dq), k (B, heads, M, dq) and v
    (B, heads, M, dv), each with contiguous channels (any other strides: the heads of one token-major product are
    read in place). Returns the output in token order, (B, N, heads · dv) — the layout the output projection reads
    — or None where the kernel does not apply (then the caller runs PyTorch's attention): not a plain CPU float32
    inference call, no kernel built, or a build without threads while PyTorch runs several.

    ``path`` picks a vector width (0 baseline, 1 AVX2, 2 AVX-512; at most what the CPU has), for tests.
    """
    lib = library()
    if lib is None or not all(usable(t) for t in (q, k, v)) or any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    threads = torch.get_num_threads()
    widest, threaded = _attention_paths()
    if threads > 1 and not threaded:
        return None
    B, heads, N, dq = q.shape
    M, dv = v.shape[2], v.shape[3]
    if k.shape != (B, heads, M, dq) or v.shape[:2] != (B, heads) or min(B, heads, N, M) == 0:
        return None
    path = widest if path is None else path
    if not 0 <= path <= widest:
        raise ValueError(f"native attention: vector path {path} is not available here (widest {widest})")
    out = torch.empty(B, N, heads, dv, dtype=torch.float32)
    args = _AttentionArgs(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                          *(s for t in (q, k, v) for s in (t.stride(0), t.stride(2), t.stride(1))),
                          *out.stride()[:3], B, heads, N, M, dq, dv, scale)
    if lib.attention(ctypes.byref(args), threads, path):
        raise MemoryError("native attention: out of memory")
    return out.view(B, N, heads * dv)


__all__ = ["ENV_SWITCH", "NativePlan", "Part", "Selection", "attention", "available", "cache_dir", "kernel_path",
           "layer_norm", "library", "resize_add_", "resize_argmax", "usable"]
