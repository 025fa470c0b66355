"""Keras layers whose weights are memopt weight kinds: int8, int4 or sparse, no float copy kept.

Each layer keeps its weight as the buffers of a memopt weight kind
(:mod:`memopt.weights`: :class:`~memopt.weights.Int8Weight`, :class:`~memopt.weights.Int4Weight`,
:class:`~memopt.weights.SparseWeight`), and those buffers *are* Keras variables (integer or
bfloat16, not trainable, not autocast): Keras saves and loads them in a ``.keras`` file, its
``_torch_params`` hold the same tensors, and nothing else holds the weight. The weight's entry
(``spec``: format, shape, group size, layout) is in ``get_config``. The float weight exists only
inside one call where a kernel needs it (a convolution's kernel; a recurrent kernel for the length
of one sequence), never at rest.

A weight is ``(N, K)``, output rows by input features, memopt's convention: a Keras ``Dense``
kernel ``(K, N)`` is stored transposed; a convolution kernel ``(kh, kw, cin, cout)`` as
``(cout, kh * kw * cin)``; an embedding ``(V, D)`` as int8 ``(D, V)`` (one scale per dimension:
per-row scales would cost 4 bytes for every 16 codes of a 16-wide embedding) or int4 ``(V, D)``
in groups along D.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.formats.safetensors import dtype_name
from memopt.keras.backend import keras_module
from memopt.weights import Int4Weight, Int8Weight, QuantizedWeight, int8_gemv, kernels
from memopt.weights.quantized import int4_relayout, kind_of

keras = keras_module()

__all__ = [
    "QConv",
    "QDense",
    "QEinsumDense",
    "QEmbedding",
    "QGRU",
    "QLSTM",
    "StoredWeightLayer",
]

_PACKAGE = "memopt"


class StoredWeightLayer(keras.Layer):
    """A Keras layer holding memopt weight kinds (``specs``: weight name -> its entry) as variables."""

    def __init__(self, specs: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.specs = {k: dict(v) for k, v in (specs or {}).items()}
        self._stored_vars: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, tuple[tuple[int, ...], QuantizedWeight]] = {}

    def _add_stored(self) -> None:
        """One non-trainable variable per buffer of each weight kind (in ``build``)."""
        for wname, spec in self.specs.items():
            empty = kind_of(spec["format"]).empty(spec, device="meta")
            self._stored_vars[wname] = {
                bname: self.add_weight(
                    name=f"{wname}_{bname}",
                    shape=tuple(buf.shape),
                    dtype=dtype_name(buf.dtype),
                    initializer="zeros",
                    trainable=False,
                    autocast=False,
                )
                for bname, buf in empty.named_buffers()
            }

    def set_stored(self, wname: str, qw: QuantizedWeight) -> None:
        """Copy a weight's buffers into this layer's variables (the layer is built)."""
        with torch.no_grad():
            for bname, buf in qw.named_buffers():
                var = self._stored_vars[wname][bname]
                if tuple(var.shape) != tuple(buf.shape):
                    raise MemoptError(f"{self.name}/{wname}_{bname}: shape mismatch")
                var.value.copy_(buf)
        self._cache.pop(wname, None)

    def stored(self, wname: str) -> QuantizedWeight:
        """The weight, its buffers the variables' tensors (cached while they stay the same)."""
        # the variables' own tensors (``_value``: Keras's ``value`` property checks scopes and
        # autocasting on every access, a measurable share of a batch-1 call)
        tensors = {b: _tensor(v) for b, v in self._stored_vars[wname].items()}
        key = tuple(t.data_ptr() for t in tensors.values())
        hit = self._cache.get(wname)
        if hit is not None and hit[0] == key:
            return hit[1]
        spec = self.specs[wname]
        if spec["format"] == "int4" and tensors["packed"].device.type == "cpu":
            self._relayout_int4(wname, spec, tensors)
            key = tuple(t.data_ptr() for t in tensors.values())
        qw = kind_of(spec["format"]).empty(spec, device="meta")
        for bname, t in tensors.items():
            qw._buffers[bname] = t.detach()  # shares the variable's storage
        self._cache[wname] = (key, qw)
        return qw

    def _relayout_int4(self, wname: str, spec: dict[str, Any], tensors: dict[str, Any]) -> None:
        """int4 codes saved in another CPU's kernel layout: converted once, in the variable."""
        n, k = spec["shape"]
        want = kernels.int4_block_n(int(n))
        if spec.get("block_n") != want:
            packed = int4_relayout(tensors["packed"].detach(), int(k), spec.get("block_n"), want)
            self._stored_vars[wname]["packed"].value.data = packed.contiguous()
            tensors["packed"] = self._stored_vars[wname]["packed"].value
            spec["block_n"] = want

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "specs": self.specs}


def _tensor(v: Any) -> torch.Tensor:
    value = getattr(v, "_value", None)
    return value if isinstance(value, torch.Tensor) else v.value


def _linear(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) @ W.T + bias`` on memopt's kernels.

    An int8 weight (one scale per output) times at most ``MAX_ROWS`` float32 input rows on the
    CPU (a batch-1 call): :func:`memopt.weights.int8_gemv.int8_gemv`, the codes read as stored,
    float32 activations, scale and bias applied in the same pass (faster than torch's float32
    matmul of the same shape, where torch's int8 kernel is slower: measured in its module).

    An int4 weight that the CPU's int4 kernel has no layout for (fewer than 16 outputs, or not a
    multiple of 16: a classifier's 10) runs the blocked dequantize in float32 directly, on the CPU
    and on the meta device alike (memopt's estimate), so the estimate counts its temporaries, the
    dequantized ``(N, K)`` row block and the unpacked codes, exactly: a timed choice among its
    candidates could not be repeated on meta (the bfloat16 one has other temporaries). Otherwise,
    on the meta device, the output alone: the kernel is chosen by timing, which a meta tensor
    cannot do, and its temporaries are a few rows of the output's size."""
    n, k = qw.shape
    if (
        isinstance(qw, Int8Weight)
        and qw.group_size is None
        and x.shape[0] <= int8_gemv.MAX_ROWS
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and int8_gemv.available()
    ):
        b = None if bias is None or bias.dtype != torch.float32 else bias
        y = int8_gemv.int8_gemv(qw.qdata, qw.scale[:, 0], x, b)
        return y if bias is None or b is not None else y + bias
    if isinstance(qw, Int4Weight) and kernels.int4_block_n(n) is None:
        y = kernels.dequant_linear(x, qw.dequantize_rows, n, k, torch.float32)
    elif x.is_meta:
        y = x.new_empty((x.shape[0], n))
    else:
        y = qw.linear(x)
    return y if bias is None else y + bias


def _torch_fn(fn: Any) -> Any:
    """Keras's tanh / sigmoid as torch's own (no Keras dispatch per time step); others as given."""
    name = getattr(fn, "__name__", "")
    return {"tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(name, fn)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    y = torch.softmax(x, -1)
    y._keras_logits = x  # as Keras's softmax does: its crossentropy loss reads the logits
    return y


_ACTIVATIONS = {
    keras.activations.relu: torch.relu,  # with its defaults: Keras's is torch's relu
    keras.activations.softmax: _softmax,  # axis -1, Keras's default
    keras.activations.tanh: torch.tanh,
    keras.activations.sigmoid: torch.sigmoid,
    keras.activations.linear: lambda x: x,
}


def _activate(fn: Any, y: torch.Tensor) -> torch.Tensor:
    """``fn(y)``; Keras's own relu, softmax, tanh, sigmoid and linear on a float32 tensor as the
    torch function they end in, without Keras's dispatch (a measurable share of a batch-1 call)."""
    fast = _ACTIVATIONS.get(fn) if y.dtype == torch.float32 else None
    return fast(y) if fast is not None else fn(y)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _float(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QDense(StoredWeightLayer):
    """``Dense`` with its kernel as a memopt weight, ``y = activation(x @ W.T + b)``."""

    def __init__(
        self, units: int, activation: Any = None, use_bias: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias

    def build(self, input_shape: Any) -> None:
        self._add_stored()
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    def call(self, inputs: Any) -> Any:
        x = _float(inputs)
        lead = x.shape[:-1]
        bias = _tensor(self.bias) if self.use_bias else None
        y = _linear(self.stored("kernel"), x.reshape(-1, x.shape[-1]), bias)  # (M, N)
        return _activate(self.activation, y.reshape(*lead, self.units))

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
        }


def einsum_split(equation: str) -> tuple[int, int] | None:
    """For an ``EinsumDense`` equation that is a matrix product in disguise, (input dims kept,
    kernel dims contracted): the input's last letters are the kernel's first ones, contracted,
    and the output is the input's other letters then the kernel's others, in order
    (``"abc,cd->abd"``, ``"abcd,cde->abe"``, ``"abc,cde->abde"``). None for any other."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return None
    if "." in equation:
        return None
    for c in range(1, min(len(inp), len(ker)) + 1):
        if inp[-c:] == ker[:c] and out == inp[:-c] + ker[c:]:
            if set(inp[:-c]) & set(ker[c:]):
                return None
            return len(inp) - c, c
    return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QEinsumDense(StoredWeightLayer):
    """``EinsumDense`` whose equation is a matrix product (:func:`einsum_split`): the kernel
    ``(*contracted, *out)`` stored as ``(prod(out), prod(contracted))``."""

    def __init__(
        self,
        equation: str,
        kernel_out: list[int],
        bias_shape: list[int] | None = None,
        activation: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        split = einsum_split(equation)
        if split is None:
            raise MemoptError(f"QEinsumDense: {equation!r} is not a matrix product")
        self.equation = equation
        self.kept, self.contracted = split
        self.kernel_out = [int(d) for d in kernel_out]
        self.bias_shape = None if bias_shape is None else [int(d) for d in bias_shape]
        self.activation = keras.activations.get(activation)

    def build(self, input_shape: Any) -> None:
        self._add_stored()
        if self.bias_shape is not None:
            self.bias = self.add_weight(
                name="bias", shape=tuple(self.bias_shape), initializer="zeros"
            )

    def call(self, inputs: Any) -> Any:
        x = _float(inputs)
        lead = x.shape[: self.kept]
        y = _linear(self.stored("kernel"), x.reshape(math.prod(lead), -1))  # (M, prod(out))
        y = y.reshape(*lead, *self.kernel_out)
        if self.bias_shape is not None:
            y = y + self.bias.value
        return _activate(self.activation, y)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*input_shape[: self.kept], *self.kernel_out)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "equation": self.equation,
            "kernel_out": self.kernel_out,
            "bias_shape": self.bias_shape,
            "activation": keras.activations.serialize(self.activation),
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QEmbedding(StoredWeightLayer):
    """``Embedding`` as int8 ``(D, V)`` with a scale per dimension, or int4 ``(V, D)``: a lookup
    dequantizes only the rows it gathers."""

    def __init__(self, input_dim: int, output_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)

    def build(self, input_shape: Any) -> None:
        self._add_stored()

    def call(self, inputs: Any) -> Any:
        ids = _float(inputs).long()
        qw = self.stored("embeddings")
        flat = ids.reshape(-1)
        if self.specs["embeddings"]["format"] == "int8":
            # columns of the (D, V) codes, scaled per dimension: (L, D)
            rows = qw.qdata.t()[flat].float() * qw.scale[:, 0]
        else:
            rows = qw.rows(flat, torch.float32)  # (L, D)
        return rows.reshape(*ids.shape, self.output_dim).to(getattr(torch, self.compute_dtype))

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs: Any) -> Any:
        shape = self.compute_output_shape(inputs.shape)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QConv(StoredWeightLayer):
    """``Conv1D`` / ``Conv2D``: the kernel dequantized for the call (one layer's float kernel,
    freed after it), then Keras's own convolution with the layer's settings."""

    def __init__(
        self,
        filters: int,
        kernel_size: Any,
        strides: Any = 1,
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate: Any = 1,
        activation: Any = None,
        use_bias: bool = True,
        inputs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = tuple(kernel_size)
        # the kernel's true inputs (kh * kw * cin) when the stored weight is zero-padded to a
        # multiple of int4's group (a 3x3x3 kernel's 27 inputs stored as 32); None: not padded
        self.inputs = None if inputs is None else int(inputs)
        self.strides = tuple(strides) if isinstance(strides, (list, tuple)) else strides
        self.padding = padding
        self.data_format = data_format or keras.config.image_data_format()
        self.dilation_rate = (
            tuple(dilation_rate) if isinstance(dilation_rate, (list, tuple)) else dilation_rate
        )
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias

    def build(self, input_shape: Any) -> None:
        self._add_stored()
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def _dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """``(cout, kh * kw * cin)`` float for this call (padding dropped), and cin."""
        qw = self.stored("kernel")
        if isinstance(qw, Int8Weight) and qw.group_size is None:
            # codes x their row's scale, in place in the one float32 copy: the values of
            # qw.dequantize (the same products), without its grouped reshapes (17 us -> 5 us
            # for the brief's 32 x 27 kernel)
            w = qw.qdata.to(torch.float32).mul_(qw.scale)
            w = w if dtype == torch.float32 else w.to(dtype)
        else:
            w = qw.dequantize(dtype)
        if self.inputs is not None:
            w = w[:, : self.inputs]
        return w, w.shape[1] // math.prod(self.kernel_size)

    def _kernel(self, dtype: torch.dtype) -> torch.Tensor:
        """The Keras-layout kernel ``(*kernel_size, cin, cout)``, dequantized for this call."""
        w, cin = self._dequantized(dtype)
        n = w.shape[0]
        w = w.reshape(n, *self.kernel_size, cin)  # (cout, *ks, cin)
        # contiguous in Keras's layout, as a float kernel is: torch then picks the same (oneDNN)
        # convolution for both (a strided kernel sends it to the slow reference kernel, 5x)
        return w.permute(*range(1, w.dim()), 0).contiguous()  # (*ks, cin, cout)

    def _torch_conv(self, x: torch.Tensor) -> torch.Tensor | None:
        """Channels-last input straight to torch's convolution, or None where Keras's rules are
        needed (channels-first, "same" padding with strides, "causal").

        Keras's own path copies the input to channels-first and back and permutes and copies the
        kernel at every call; here the input is a permuted view ((B, H, W, C) as channels-last
        (B, C, H, W)), the kernel is built in torch's layout from the codes, and the output is
        viewed back: the same oneDNN convolution, fewer copies."""
        nd = len(self.kernel_size)
        strides = _tuple(self.strides, nd)
        dilation = _tuple(self.dilation_rate, nd)
        if self.data_format != "channels_last" or nd not in (1, 2) or x.dim() != nd + 2:
            return None
        if self.padding == "same" and any(s != 1 for s in strides):
            return None
        if self.padding not in ("valid", "same"):
            return None
        w, cin = self._dequantized(x.dtype)
        n = w.shape[0]
        w = w.reshape(n, *self.kernel_size, cin)  # (cout, *ks, cin)
        w = w.permute(0, nd + 1, *range(1, nd + 1))  # (cout, cin, *ks), channels-last strides
        order = (0, nd + 1, *range(1, nd + 1))
        xt = x.permute(*order)  # (B, C, *spatial): a view
        conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
        groups = xt.shape[1] // cin
        bias = _tensor(self.bias) if self.use_bias else None
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        # the bias added by the convolution itself (no second pass over the output)
        y = conv(xt, w, bias, strides, self.padding, dilation, groups)  # (B, cout, *spatial')
        return y.permute(0, *range(2, nd + 2), 1)  # (B, *spatial', cout)

    def call(self, inputs: Any) -> Any:
        x = _float(inputs)
        y = self._torch_conv(x)
        if y is None:
            y = keras.ops.conv(
                x,
                self._kernel(x.dtype),
                strides=self.strides,
                padding=self.padding,
                data_format=self.data_format,
                dilation_rate=self.dilation_rate,
            )
            if self.use_bias:
                shape = (1,) * (y.dim() - 1) + (self.filters,)
                if self.data_format == "channels_first":
                    shape = (1, self.filters) + (1,) * (y.dim() - 2)
                y = y + _tensor(self.bias).reshape(shape)
        return _activate(self.activation, y)

    def compute_output_spec(self, inputs: Any) -> Any:
        # the shape rule of Keras's own convolution, on a kernel of the right shape (no data)
        qw_shape = self.specs["kernel"]["shape"]
        cin = (self.inputs or int(qw_shape[1])) // math.prod(self.kernel_size)
        kernel = keras.KerasTensor((*self.kernel_size, cin, self.filters), dtype=inputs.dtype)
        out = keras.ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        return keras.KerasTensor(out.shape, dtype=self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "inputs": self.inputs,
        }


class _QRecurrent(StoredWeightLayer):
    """LSTM / GRU with stored ``kernel`` (gates x inputs) and ``recurrent_kernel`` (gates x
    units). The input projection of every time step is one matrix product on memopt's kernel
    ``(B * T, K) -> (B * T, gates)``; the recurrent kernel is dequantized once per call (a
    ``(gates, units)`` float block, freed after the sequence) for the per-step products. Inference
    only (no dropout, no mask, not stateful)."""

    GATES = 4

    def __init__(
        self,
        units: int,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias = use_bias
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        if stateful:
            raise MemoptError(f"{type(self).__name__}: stateful recurrent layers are not supported")
        self.stateful = False
        self.zero_output_for_mask = return_sequences  # read by Bidirectional

    def _bias_shape(self) -> tuple[int, ...]:
        return (self.GATES * self.units,)

    def build(self, input_shape: Any) -> None:
        self._add_stored()
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=self._bias_shape(), initializer="zeros")

    def _n_states(self) -> int:
        return 2 if self.GATES == 4 else 1

    def compute_output_shape(self, sequences_shape: Any, initial_state_shape: Any = None) -> Any:
        b, t = sequences_shape[0], sequences_shape[1]
        out = (b, t, self.units) if self.return_sequences else (b, self.units)
        if self.return_state:
            return (out, *[(b, self.units)] * self._n_states())
        return out

    def compute_output_spec(self, sequences: Any, initial_state: Any = None, **kw: Any) -> Any:
        shape = self.compute_output_shape(sequences.shape)
        if self.return_state:
            return [keras.KerasTensor(s, dtype=self.compute_dtype) for s in shape]
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def call(
        self, sequences: Any, initial_state: Any = None, mask: Any = None, training: Any = None
    ) -> Any:
        if mask is not None:
            raise MemoptError(f"{self.name}: memopt's recurrent layers do not take a mask")
        x = _float(sequences)
        b, t, k = x.shape
        zx = _linear(self.stored("kernel"), x.reshape(b * t, k)).reshape(b, t, -1)  # (B, T, G*U)
        rec = self.stored("recurrent_kernel").dequantize(x.dtype).t()  # (U, G*U) for this call
        bias = _tensor(self.bias) if self.use_bias else None
        zx = self._input_bias(zx, bias)
        act, ract = _torch_fn(self.activation), _torch_fn(self.recurrent_activation)
        states = self._initial(x, initial_state)
        steps = range(t - 1, -1, -1) if self.go_backwards else range(t)
        outs = []
        for i in steps:
            h, states = self._step(zx[:, i], states, rec, bias, act, ract)
            if self.return_sequences:
                outs.append(h)
        out = torch.stack(outs, 1) if self.return_sequences else h
        return [out, *states] if self.return_state else out

    def _input_bias(self, zx: torch.Tensor, bias: Any) -> torch.Tensor:
        return zx if bias is None else zx + bias  # once for all steps

    def _initial(self, x: torch.Tensor, initial_state: Any) -> list[torch.Tensor]:
        if initial_state is not None:
            return [_float(s) for s in initial_state]
        zeros = x.new_zeros(x.shape[0], self.units)
        return [zeros] * self._n_states()

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
            "use_bias": self.use_bias,
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "stateful": False,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QLSTM(_QRecurrent):
    """Keras's LSTM (gates i, f, c, o; ``h = o * tanh(c)``) on stored kernels."""

    GATES = 4

    def _step(self, zx, states, rec, bias, act, ract):  # noqa: ANN001, ANN202
        h, c = states
        z = torch.addmm(zx, h, rec)  # (B, 4U): the input part (bias in it) + h @ R
        g = ract(z)  # every gate through the recurrent activation (c's quarter unused)
        u = self.units
        c = g[:, u : 2 * u] * c + g[:, :u] * act(z[:, 2 * u : 3 * u])
        h = g[:, 3 * u :] * act(c)
        return h, [h, c]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QGRU(_QRecurrent):
    """Keras's GRU with ``reset_after=True`` (its default): gates z, r, h, bias ``(2, 3U)``."""

    GATES = 3

    def _bias_shape(self) -> tuple[int, ...]:
        return (2, 3 * self.units)

    def _input_bias(self, zx: torch.Tensor, bias: Any) -> torch.Tensor:
        return zx if bias is None else zx + bias[0]

    def _step(self, zx, states, rec, bias, act, ract):  # noqa: ANN001, ANN202
        (h,) = states
        zr = h @ rec if bias is None else torch.addmm(bias[1], h, rec)  # (B, 3U)
        u = self.units
        zr_ = ract(zx[:, : 2 * u] + zr[:, : 2 * u])  # (B, 2U): z, r
        z, r = zr_[:, :u], zr_[:, u:]
        hh = act(zx[:, 2 * u :] + r * zr[:, 2 * u :])
        h = z * h + (1 - z) * hh
        return h, [h]
