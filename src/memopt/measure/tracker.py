"""Live tensor bytes, by category and by module, with a timeline: what a model holds while it runs.

The tracker counts tensor *storages*, not tensors: every view (``x.t()``, ``x[::2]``, ``x.view(...)``)
shares its base's storage, and PyTorch keeps one Python object per storage for as long as the storage
lives (``t.untyped_storage() is t[1:].untyped_storage()``), so that object is the key and a weak
reference to it says when the memory goes away. A ``TorchDispatchMode`` sees the output of every aten
op (factories, in-place and ``out=`` ops included), which is where new storages appear and where a
storage may grow (``resize_``). The same code runs on the meta device, where storages have a size but no
data, which is how memopt predicts memory without loading weights.

Categories are decided with final knowledge: the tracker records a stream of (storage id, byte delta)
events and classifies storages as it learns what they are (a parameter, a ``.grad``, optimizer state).
A storage keeps one category for its whole life, so a gradient that autograd allocated as a temporary
and then installed as ``.grad`` counts as ``grads`` at the peak as well. The peak breakdown is worked out
by replaying the events up to the peak with those categories.

Not seen: memory that kernels allocate internally and free before returning (workspaces), tensors
created without an aten op (``torch.from_numpy``, a storage loaded by mmap) unless passed to
:meth:`MemoryTracker.track_existing`, and storages resized by calling ``UntypedStorage.resize_``
directly. On CUDA the allocator's own figures are added to the result for that reason.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from memopt.core.frontends import adapter_for

__all__ = [
    "CATEGORIES",
    "MemoryTracker",
    "ModuleStats",
    "TimelinePoint",
    "TrackerResult",
]

CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations")
# Categories are small ints internally; a lower number wins when a storage is claimed twice
# (a parameter that is also passed to track_existing() stays a parameter).
_PARAMS, _BUFFERS, _GRADS, _OPTIMIZER, _ACTIVATIONS = range(len(CATEGORIES))

# Ops whose output is annotated as an alias of an input but that really hand over a tensor built
# from Python data outside the dispatcher (torch.tensor(...) ends in lift_fresh): their storage is new.
_FRESH_ALIAS_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})


@dataclass
class ModuleStats:
    """Memory seen while one module ran, over the whole tracked region (the max over its calls).

    Only modules that ran are listed, in ``named_modules()`` order. Without a model, every module
    that ran is listed under ModTracker's name (``"ClassName.child.grandchild"``).
    """

    name: str  # fully qualified name in the tracked model; "" for the root
    forward_peak_bytes: int = 0  # max total live bytes while inside this module's forward
    forward_delta_bytes: int = 0  # that peak minus the live bytes when the forward began
    backward_peak_bytes: int = 0  # the same for its backward (0 if no backward ran)
    backward_delta_bytes: int = 0
    param_bytes: int = 0  # bytes of the module's own parameters, recursive, each storage once


@dataclass
class TimelinePoint:
    index: int  # allocation/free event number (0 is the state at __enter__)
    seconds: float  # since __enter__
    phase: str  # the label given by the last mark()
    bytes: dict[str, int]  # live bytes by category after this event


@dataclass
class TrackerResult:
    peak_bytes: int
    breakdown: dict[str, int]  # at the peak, keys CATEGORIES; sums to peak_bytes
    current_bytes: int
    modules: list[ModuleStats]
    timeline: list[TimelinePoint]  # at most max_timeline_points, always including the peak
    peak_index: int = 0  # the event at which the peak was reached
    peak_phase: str = ""
    cuda: dict[str, int] | None = None  # torch.cuda allocator figures when CUDA tensors were seen
    current_breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: only dicts, lists, ints, floats and strings."""
        return asdict(self)


class _StorageRef(weakref.ref):
    """A weak reference to a storage that also carries what the tracker knows about it.

    Keeping the bookkeeping on the reference itself saves a dict lookup in the free callback, which
    runs once per freed storage.
    """

    __slots__ = ("key", "sid", "nbytes")

    key: int  # id() of the storage object, the key of MemoryTracker._live
    sid: int  # serial id, the index into MemoryTracker._category
    nbytes: int  # size last seen; a free subtracts exactly what was added


class _DispatchSpy(TorchDispatchMode):
    """Calls back the tracker with the outputs of every aten op."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self._tracker._on_op(func, out)
        return out


class MemoryTracker:
    """Counts live tensor storage bytes by category, by module and over time.

    Use it as a context manager::

        with MemoryTracker(model, optimizer=opt) as tracker:
            tracker.mark("forward");  loss = model(x).sum()
            tracker.mark("backward"); loss.backward()
            tracker.mark("optimizer"); opt.step()
        result = tracker.result()

    Storages alive at ``__enter__`` are counted only when they belong to the model's parameters or
    buffers, to a ``.grad`` or to the optimizer's state, or when passed to :meth:`track_existing`.

    A Keras model (torch backend) is tracked through its front end's adapter
    (:mod:`memopt.core.frontends`): its layers are named by their Keras path and its compiled
    optimizer's variables count as ``optimizer``, with no ``optimizer=`` argument.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        per_module: bool = True,
        timeline: bool = True,
        max_timeline_points: int = 2000,
    ) -> None:
        if max_timeline_points < 2:
            raise ValueError(f"max_timeline_points must be at least 2, got {max_timeline_points}")
        self.model = model
        # a front end's adapter (Keras) names the layers and finds the optimizer state
        self._adapter = adapter_for(model) if model is not None else None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._pending_optimizer = optimizer
        self._per_module = per_module
        self._timeline_enabled = timeline
        self._max_points = max_timeline_points
        # Re-entrant: a weakref callback can fire inside our own bookkeeping when a temporary dies,
        # and CUDA backward runs on other threads.
        self._lock = threading.RLock()
        self._active = False
        self._entered = False
        self._pending_existing: list[tuple[torch.Tensor, int]] = []

        # Live storages: id(storage) -> its weak reference (with sid and nbytes on it).
        self._live: dict[int, _StorageRef] = {}
        self._category: list[int] = []  # by sid
        # The event stream; event 0 is the state at __enter__.
        self._ev_sid: list[int] = []
        self._ev_delta: list[int] = []
        self._ev_total: list[int] = []
        self._ev_time: list[float] = []
        self._ev_phase: list[int] = []
        self._initial: list[tuple[int, int]] = []  # (sid, nbytes) alive at event 0
        self._current = 0
        self._peak = 0
        self._peak_index = 0
        self._phases: list[str] = ["start"]
        self._phase = 0
        self._t0 = 0.0
        self._saw_cuda = False
        self._cuda: dict[str, int] | None = None
        self._final_breakdown: dict[str, int] | None = None

        self._mode: _DispatchSpy | None = None
        self._handles: list[Any] = []
        self._mod_tracker: Any = None
        self._module_names: dict[int, str] = {}
        self._module_stats: dict[str, ModuleStats] = {}
        self._fw_stack: dict[int, list[tuple[int, int]]] = {}
        self._bw_stack: dict[int, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> MemoryTracker:
        if self._entered:
            raise RuntimeError("a MemoryTracker can be entered only once; create a new one")
        self._entered = True
        self._t0 = time.perf_counter()
        with self._lock:
            self._active = True
            # Register what exists now, strongest category first, so that a tensor that is both a
            # parameter and something else keeps "params".
            if self.model is not None:
                for p in self.model.parameters():
                    self._claim(p, _PARAMS, initial=True)
                for b in self.model.buffers():
                    self._claim(b, _BUFFERS, initial=True)
                for p in self.model.parameters():
                    if p.grad is not None:
                        self._claim(p.grad, _GRADS, initial=True)
            if self._pending_optimizer is not None:
                self._attach(self._pending_optimizer, initial=True)
            self._scan_frontend_optimizer(initial=True)
            for t, cat in self._pending_existing:
                self._claim(t, cat, initial=True, explicit=True)
            self._pending_existing.clear()
            self._append_event(-1, 0)  # event 0: the baseline
            self._peak = self._current
            self._peak_index = 0

        if self.model is not None:
            # The moment a gradient lands in .grad is the moment its storage becomes a "grad".
            for p in self.model.parameters():
                if p.requires_grad and p.is_leaf:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._module_names = {id(m): name for name, m in self._named_modules()}
        if self._per_module:
            self._start_module_tracking()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._mode = _DispatchSpy(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self._mode = None
        if self._mod_tracker is not None:
            self._mod_tracker.__exit__(*exc)
            self._mod_tracker.clear_user_hooks()
            self._mod_tracker = None
            warnings.formatwarning = self._formatwarning
            self._quiet.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        with self._lock:
            self._rescan()
            if self._saw_cuda:
                self._cuda = _cuda_stats()
            self._final_breakdown = self.current_breakdown()
            self._active = False
            # Dropping the weak references also drops their callbacks: nothing fires after exit.
            self._live.clear()

    # ------------------------------------------------------------------ public API

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Classify ``optimizer.state`` as "optimizer" (state is created lazily inside step())."""
        if not self._entered:
            self._pending_optimizer = optimizer
            return
        with self._lock:
            self._attach(optimizer, initial=False)

    def track_existing(self, *tensors: torch.Tensor, category: str = "activations") -> None:
        """Count tensors that existed before ``__enter__`` (model inputs, say) from now on."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        cat = CATEGORIES.index(category)
        with self._lock:
            for t in tensors:
                if not self._entered:
                    self._pending_existing.append((t, cat))
                elif self._active:
                    self._claim(t, cat, explicit=True)

    def mark(self, phase: str) -> None:
        """Label the events that follow (in the timeline and in ``peak_phase``)."""
        with self._lock:
            if phase not in self._phases:
                self._phases.append(phase)
            self._phase = self._phases.index(phase)

    def reset_peak(self) -> None:
        """Peak := current, e.g. to measure a steady-state step after a warm-up step."""
        with self._lock:
            self._peak = self._current
            self._peak_index = len(self._ev_total) - 1

    @property
    def current_bytes(self) -> int:
        return self._current

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def current_breakdown(self) -> dict[str, int]:
        if not self._active and self._final_breakdown is not None:
            return dict(self._final_breakdown)
        out = [0] * len(CATEGORIES)
        with self._lock:
            for ref in self._live.values():
                out[self._category[ref.sid]] += ref.nbytes
        return dict(zip(CATEGORIES, out, strict=True))

    def peak_breakdown(self) -> dict[str, int]:
        """The split by category of the bytes alive at the peak; sums to ``peak_bytes``."""
        self._require_entered()
        with self._lock:
            if self._active:
                self._rescan()
            snaps = self._replay([self._peak_index])
        return snaps[self._peak_index]

    def result(self) -> TrackerResult:
        self._require_entered()
        with self._lock:
            if self._active:
                self._rescan()
            n = len(self._ev_total)
            keep = self._timeline_indices() if self._timeline_enabled and n else []
            snaps = self._replay(sorted({self._peak_index, *keep}))
            timeline = [
                TimelinePoint(
                    index=i,
                    seconds=self._ev_time[i],
                    phase=self._phases[self._ev_phase[i]],
                    bytes=snaps[i],
                )
                for i in keep
            ]
            cuda = self._cuda if not self._active else (_cuda_stats() if self._saw_cuda else None)
            return TrackerResult(
                peak_bytes=self._peak,
                breakdown=snaps[self._peak_index],
                current_bytes=self._current,
                modules=self._modules_result(),
                timeline=timeline,
                peak_index=self._peak_index,
                peak_phase=self._phases[self._ev_phase[self._peak_index]] if n else "",
                cuda=cuda,
                current_breakdown=self.current_breakdown(),
            )

    def _require_entered(self) -> None:
        if not self._entered:
            raise RuntimeError("the MemoryTracker has not been entered (use it in a `with` block)")

    # ------------------------------------------------------------------ storages and events

    def _append_event(self, sid: int, delta: int) -> None:
        self._current += delta
        self._ev_sid.append(sid)
        self._ev_delta.append(delta)
        self._ev_total.append(self._current)
        self._ev_time.append(time.perf_counter() - self._t0)
        self._ev_phase.append(self._phase)
        if self._current > self._peak:
            self._peak = self._current
            self._peak_index = len(self._ev_total) - 1

    def _register(self, storage: torch.UntypedStorage, category: int, initial: bool) -> None:
        nbytes = storage.nbytes()
        ref = _StorageRef(storage, self._on_free)
        ref.key = id(storage)
        ref.sid = len(self._category)
        ref.nbytes = nbytes
        self._category.append(category)
        self._live[ref.key] = ref
        if storage.device.type == "cuda":
            self._saw_cuda = True
        if initial:
            self._initial.append((ref.sid, nbytes))
            self._current += nbytes
        else:
            self._append_event(ref.sid, nbytes)

    def _on_free(self, ref: _StorageRef) -> None:
        with self._lock:
            if not self._active or self._live.pop(ref.key, None) is not ref:
                return
            self._append_event(ref.sid, -ref.nbytes)

    def _claim(
        self, t: torch.Tensor, category: int, initial: bool = False, explicit: bool = False
    ) -> None:
        """Start counting ``t``'s storage if needed and give it ``category`` (or a stronger one)."""
        for storage in _storages(t):
            ref = self._live.get(id(storage))
            if ref is None:
                self._register(storage, category, initial)
            elif explicit or category < self._category[ref.sid]:
                self._category[ref.sid] = category

    def _on_op(self, func: torch._ops.OpOverload, out: Any) -> None:
        """Register the new storages among an op's outputs and notice storages that grew."""
        fresh = _fresh_outputs(func)
        if isinstance(out, torch.Tensor):
            self._see(out, fresh[0] if fresh else True)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                is_fresh = fresh[i] if i < len(fresh) else fresh[-1] if fresh else True
                if isinstance(o, torch.Tensor):
                    self._see(o, is_fresh)
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, torch.Tensor):
                            self._see(oo, is_fresh)

    def _see(self, t: torch.Tensor, fresh: bool) -> None:
        with self._lock:
            if not self._active:
                return
            for storage in _storages(t):
                ref = self._live.get(id(storage))
                if ref is not None:
                    nbytes = storage.nbytes()
                    if nbytes != ref.nbytes:  # resize_ or an out= op that grew its output
                        delta = nbytes - ref.nbytes
                        ref.nbytes = nbytes
                        self._append_event(ref.sid, delta)
                elif fresh:
                    self._register(storage, _ACTIVATIONS, initial=False)
                # An unknown storage behind an aliasing output is a view of a tensor that existed
                # before __enter__ and was not asked for: it is not counted.

    # ------------------------------------------------------------------ classification

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            with self._lock:
                if self._active:
                    self._claim(p.grad, _GRADS)

    def _attach(self, optimizer: torch.optim.Optimizer, initial: bool) -> None:
        if any(o is optimizer for o in self._optimizers):
            return
        self._optimizers.append(optimizer)
        self._scan_optimizer(optimizer, initial)
        # Grads may be written without the post-accumulate hook (p.grad = ...), and state appears
        # inside step(); look at both around every step, before set_to_none can free the grads.
        self._handles.append(optimizer.register_step_pre_hook(self._on_step))
        self._handles.append(optimizer.register_step_post_hook(self._on_step))

    def _on_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        with self._lock:
            if self._active:
                self._scan_optimizer(optimizer, initial=False)

    def _scan_optimizer(self, optimizer: torch.optim.Optimizer, initial: bool) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._claim(p.grad, _GRADS, initial)
        for state in optimizer.state.values():
            for t in _tensors_in(state):
                self._claim(t, _OPTIMIZER, initial)

    def _rescan(self) -> None:
        """Classify with what is known now: parameters created or replaced inside, last grads."""
        if self.model is not None:
            for p in self.model.parameters():
                self._claim(p, _PARAMS)
            for b in self.model.buffers():
                self._claim(b, _BUFFERS)
            for p in self.model.parameters():
                if p.grad is not None:
                    self._claim(p.grad, _GRADS)
        for opt in self._optimizers:
            self._scan_optimizer(opt, initial=False)
        self._scan_frontend_optimizer(initial=False)

    def _scan_frontend_optimizer(self, initial: bool) -> None:
        """A front end's optimizer state (Keras builds its variables inside the first step)."""
        if self._adapter is not None:
            for t in self._adapter.optimizer_tensors(self.model):
                self._claim(t, _OPTIMIZER, initial)

    def _named_modules(self) -> Iterable[tuple[str, nn.Module]]:
        assert self.model is not None
        if self._adapter is not None:
            return self._adapter.named_layers(self.model)
        return self.model.named_modules()

    def _replay(self, indices: Iterable[int]) -> dict[int, dict[str, int]]:
        """Bytes by category after each event in ``indices`` (sorted), with final categories."""
        cat = self._category
        sums = [0] * len(CATEGORIES)
        for sid, nbytes in self._initial:
            sums[cat[sid]] += nbytes
        out: dict[int, dict[str, int]] = {}
        ev_sid, ev_delta = self._ev_sid, self._ev_delta
        i = 0
        for target in indices:
            while i <= target:
                sid = ev_sid[i]
                if sid >= 0:
                    sums[cat[sid]] += ev_delta[i]
                i += 1
            out[target] = dict(zip(CATEGORIES, sums, strict=True))
        return out

    def _timeline_indices(self) -> list[int]:
        """Which events to keep: the highest point of each of max_points equal buckets.

        Taking each bucket's maximum (not its first event) keeps the shape of the curve and, by
        construction, the global peak; the recorded peak (which reset_peak may have moved below the
        global maximum) is put in explicitly.
        """
        n = len(self._ev_total)
        if n <= self._max_points:
            return list(range(n))
        totals = self._ev_total
        keep: list[int] = []
        for b in range(self._max_points):
            lo = b * n // self._max_points
            hi = (b + 1) * n // self._max_points
            if lo >= hi:
                continue
            if lo <= self._peak_index < hi:
                keep.append(self._peak_index)
            else:
                best = max(range(lo, hi), key=totals.__getitem__)
                keep.append(best)
        return keep

    # ------------------------------------------------------------------ modules

    def _start_module_tracking(self) -> None:
        # Imported here: torch.distributed and dynamo are slow to import.
        from torch.distributed._tools.mod_tracker import ModTracker

        # ModTracker warns "The module hierarchy tracking maybe be messed up" whenever a module is
        # entered again before it returned (a shared rotary embedding, a tied head): harmless for
        # our figures, and no warning of another library reaches the user's terminal. It also
        # replaces warnings.formatwarning for the whole process: put back on exit.
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe")
        self._formatwarning = warnings.formatwarning
        self._mod_tracker = ModTracker()
        self._mod_tracker.register_user_hooks(
            pre_fw_hook=self._pre_fw,
            post_fw_hook=self._post_fw,
            pre_bw_hook=self._pre_bw,
            post_bw_hook=self._post_bw,
        )
        self._mod_tracker.__enter__()

    def _name_of(self, mod: nn.Module | None) -> str | None:
        if mod is None:
            return None
        if self.model is not None:
            return self._module_names.get(id(mod))
        return self._mod_tracker.get_known_fqn(mod) if self._mod_tracker is not None else None

    def _stats(self, name: str) -> ModuleStats:
        stats = self._module_stats.get(name)
        if stats is None:
            stats = self._module_stats[name] = ModuleStats(name=name)
        return stats

    def _pre_fw(self, mod: nn.Module, _input: Any) -> None:
        with self._lock:
            if self._active:
                start = len(self._ev_total) - 1
                self._fw_stack.setdefault(id(mod), []).append((start, self._current))

    def _post_fw(self, mod: nn.Module, _input: Any, _output: Any) -> None:
        with self._lock:
            stack = self._fw_stack.get(id(mod))
            name = self._name_of(mod)
            if not self._active or not stack or name is None:
                return
            peak, delta = self._range_peak(*stack.pop())
            stats = self._stats(name)
            stats.forward_peak_bytes = max(stats.forward_peak_bytes, peak)
            stats.forward_delta_bytes = max(stats.forward_delta_bytes, delta)

    def _pre_bw(self, mod: nn.Module | None, _grads: Any) -> None:
        with self._lock:
            if self._active and mod is not None:
                start = len(self._ev_total) - 1
                self._bw_stack.setdefault(id(mod), []).append((start, self._current))

    def _post_bw(self, mod: nn.Module | None, _grads: Any) -> None:
        with self._lock:
            stack = self._bw_stack.get(id(mod)) if mod is not None else None
            name = self._name_of(mod)
            if not self._active or not stack or name is None:
                return
            peak, delta = self._range_peak(*stack.pop())
            stats = self._stats(name)
            stats.backward_peak_bytes = max(stats.backward_peak_bytes, peak)
            stats.backward_delta_bytes = max(stats.backward_delta_bytes, delta)

    def _range_peak(self, start: int, start_bytes: int) -> tuple[int, int]:
        peak = max(self._ev_total[start:]) if start < len(self._ev_total) else start_bytes
        peak = max(peak, start_bytes)
        return peak, peak - start_bytes

    def _modules_result(self) -> list[ModuleStats]:
        if self.model is None:
            return [ModuleStats(**asdict(s)) for s in self._module_stats.values()]
        out = []
        for name, mod in self._named_modules():
            stats = self._module_stats.get(name)
            if stats is None:
                continue  # never ran
            stats = ModuleStats(**asdict(stats))
            seen: set[int] = set()
            for p in mod.parameters():
                for storage in _storages(p):
                    if id(storage) not in seen:
                        seen.add(id(storage))
                        stats.param_bytes += storage.nbytes()
            out.append(stats)
        return out


# ---------------------------------------------------------------------- helpers


_FRESH_CACHE: dict[Any, tuple[bool, ...]] = {}


def _fresh_outputs(func: Any) -> tuple[bool, ...]:
    """For each return of ``func``: can its storage be new (no alias annotation in the schema)?"""
    fresh = _FRESH_CACHE.get(func)
    if fresh is None:
        schema = getattr(func, "_schema", None)
        if schema is None:
            fresh = ()
        elif getattr(func, "_opname", "") in _FRESH_ALIAS_OPS:
            fresh = tuple(True for _ in schema.returns)
        else:
            fresh = tuple(r.alias_info is None for r in schema.returns)
        _FRESH_CACHE[func] = fresh
    return fresh


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages holding ``t``'s data: its own, or its inner tensors' for a wrapper subclass."""
    if type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for attr in attrs:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
        return
    if t.layout is not torch.strided:
        return  # sparse and other layouts have no single storage; not counted
    yield t.untyped_storage()


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def _cuda_stats() -> dict[str, int]:
    return {
        "memory_allocated": int(torch.cuda.memory_allocated()),
        "max_memory_allocated": int(torch.cuda.max_memory_allocated()),
        "memory_reserved": int(torch.cuda.memory_reserved()),
        "max_memory_reserved": int(torch.cuda.max_memory_reserved()),
    }
