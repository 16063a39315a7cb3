"""pidrt's kernels as TensorRT ahead-of-time plugins (``tensorrt.plugin``, TensorRT >= 10.9).

`register` defines ``pidrt::few_token`` and ``pidrt::dual_kv`` (the node contracts of
``pidrt.export.plugin_nodes``) with TensorRT's Python plugin API: an output description, the
dtypes they take (fp32 or fp16, all inputs alike) and an ``aot_impl`` that compiles the Triton
kernel for the GPU the engine is built on and returns its PTX, launch grid and int32 arguments.
The dtypes offered are those whose tiles fit the 48 KiB of shared memory a plain launch gets: fp16
everywhere, fp32 except dual-KV at head dims over 128 (TensorRT then runs that node in fp16).
TensorRT embeds the PTX in the engine, so a built engine runs without Python or Triton.

The launch plans (argument order, strides as shape expressions, grid) are the kernels' own
``plugin_launch`` functions, tested on CPU through Triton's interpreter; what is left here is
the translation to TensorRT's types. TensorRT cannot be installed where this was written, so
this module has never run: tests skip it with that reason (docs/engines.md).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` validates the decorated
functions' annotations with ``inspect.signature`` and ``issubclass``, so they must be real types.

The int attributes (n_tokens, heads) are declared as one-element int32 arrays, not ``int``:
TensorRT's ONNX parser hands an INT attribute over as a length-1 int32 PluginField, and
``tensorrt.plugin`` before TensorRT 11.4 rebuilds a scalar-annotated one with
``int(field.data)``, which NumPy >= 2.4 refuses for a 1-D array (TypeError; NumPy 1.25-2.3 warn).
11.4 takes the array's one element instead. Array-annotated fields are rebuilt with ``.astype``
on every version, so the array form works from 10.9 on.
"""

from pidrt.errors import PidrtError, require

_REGISTERED: list[bool] = []


def kernels_fingerprint() -> str:
    """Hash of the kernel sources an AOT engine embeds: part of its cache key, so edits rebuild."""
    from pidrt.kernels import sources_fingerprint

    return sources_fingerprint(("aot.py", "few_token.py", "dual_kv.py", "_common.py"))


def _int_attr(value, what: str) -> int:
    """An int attribute as the plugin receives it (a one-element int32 array)."""
    import numpy as np

    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise PidrtError(f"{what} must be one integer, got {flat.tolist()}")
    return int(flat[0])


def _constant(expr, what: str) -> int:
    if not expr.is_constant:
        raise PidrtError(f"{what} must be a build-time constant in the graph (it sets the compiled kernel)")
    return int(expr.constant_value())


def _current_arch() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _aot_result(trtp, launch):
    """(kernel name, PTX, launch params, extra args) as ``aot_impl`` returns them."""
    from pidrt.kernels.aot import driver_ptx_version

    # Triton emits the ISA of the ptxas it bundles, which can be newer than the driver that
    # JIT-compiles the engine's PTX; that fails only when the engine runs
    # (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), so hold the ISA to the driver's.
    compiled = launch.compile(_current_arch(), max_ptx_version=driver_ptx_version())
    params = trtp.KernelLaunchParams()
    grid = list(launch.grid) + [1] * (3 - len(launch.grid))
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = compiled.block_threads
    params.shared_mem = compiled.shared_bytes
    extra = trtp.SymIntExprs(len(launch.scalars))
    for i, value in enumerate(launch.scalars.values()):
        # SymIntExprs stores a bare int as an untyped SymIntExpr, which TensorRT then rejects.
        extra[i] = trtp.SymInt32(value)
    return compiled.name.encode(), compiled.ptx.encode(), params, extra


def register() -> None:
    """Define both plugins in TensorRT's registry (once per process; before parsing a plugin graph)."""
    if _REGISTERED:
        return
    trt = require("tensorrt", "trt")
    trtp = require("tensorrt.plugin", "trt")
    if not hasattr(trtp, "aot_impl"):
        raise PidrtError(f"plugin graphs need TensorRT >= 10.9 (ahead-of-time plugins); this is {trt.__version__}. "
                         "Export without --trt-plugins for this TensorRT.")
    require("triton", "kernels")
    import numpy as np
    import numpy.typing as npt
    import torch

    from pidrt.kernels import dual_kv, few_token

    def dtype_of(desc):
        if desc.dtype == trt.float16:
            return torch.float16
        if desc.dtype == trt.float32:
            return torch.float32
        raise PidrtError(f"pidrt plugins take float16 or float32 tensors, got {desc.dtype}")

    def same_types(n: int, dtypes=(torch.float32, torch.float16)):
        """All n tensors of one of `dtypes`: those whose kernel tiles fit an AOT launch (48 KiB of shared memory)."""
        names = "|".join(name for dt, name in ((torch.float32, "FP32"), (torch.float16, "FP16")) if dt in dtypes)
        return trtp.AutoTuneCombination(", ".join([names] * n))

    int_attr = npt.NDArray[np.int32]  # see the module docstring
    # TensorRT refuses an aot_impl without this return annotation.
    aot_result = tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    @trtp.register("pidrt::few_token")
    def _few_token_desc(base: trtp.TensorDesc, x: trtp.TensorDesc, a: trtp.TensorDesc, b: trtp.TensorDesc,
                        bias: trtp.TensorDesc, scale: trtp.TensorDesc, n_tokens: int_attr) -> trtp.TensorDesc:
        return base.like()

    @trtp.autotune("pidrt::few_token")
    def _few_token_types(base, x, a, b, bias, scale, n_tokens, outputs):
        return [same_types(7)]

    @trtp.aot_impl("pidrt::few_token")
    def _few_token_aot(base, x, a, b, bias, scale, n_tokens: int_attr, outputs, tactic) -> aot_result:
        n_tokens = _int_attr(n_tokens, "few_token: n_tokens")
        hn = _constant(a.shape_expr[2], "few_token: a's last dim (heads * n_tokens)")
        if hn % n_tokens:
            raise PidrtError(f"few_token: a's last dim {hn} is not heads * n_tokens (n_tokens={n_tokens})")
        launch = few_token.plugin_launch(
            base.shape_expr[0], base.shape_expr[1], _constant(x.shape_expr[2], "few_token: x channels"),
            _constant(base.shape_expr[2], "few_token: output channels"), hn // n_tokens, n_tokens,
            dtype_of(base), cdiv=trtp.cdiv)
        return _aot_result(trtp, launch)

    @trtp.register("pidrt::dual_kv")
    def _dual_kv_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k2: trtp.TensorDesc,
                      v2: trtp.TensorDesc, sigma: trtp.TensorDesc, heads: int_attr) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune("pidrt::dual_kv")
    def _dual_kv_types(q, k, v, k2, v2, sigma, heads, outputs):
        channels = q.shape[2]  # -1 where not a build-time constant (aot_impl refuses that graph)
        return [same_types(7, dual_kv.plugin_dtypes(channels // _int_attr(heads, "dual_kv: heads")) if channels > 0
                           else (torch.float16,))]

    @trtp.aot_impl("pidrt::dual_kv")
    def _dual_kv_aot(q, k, v, k2, v2, sigma, heads: int_attr, outputs, tactic) -> aot_result:
        heads = _int_attr(heads, "dual_kv: heads")
        channels = _constant(q.shape_expr[2], "dual_kv: channels")
        if channels % heads:
            raise PidrtError(f"dual_kv: {channels} channels do not split into {heads} heads")
        launch = dual_kv.plugin_launch(q.shape_expr[0], q.shape_expr[1], k.shape_expr[1], k2.shape_expr[1], heads,
                                       channels // heads, dtype_of(q), cdiv=trtp.cdiv)
        return _aot_result(trtp, launch)

    _REGISTERED.append(True)
