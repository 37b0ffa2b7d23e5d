"""The fast path of selection + attention: a C++ extension (``kernels.cpp``) built once per machine.

Why C++: per layer, the PyTorch reference runs ~100 small tensor ops (selection, splicing the
always-kept ranges, a gather that copies every selected key and value, masks), and at 30 layers
that Python and copy overhead costs more than the attention it saves. The extension fuses
WiCSum, the cluster -> token -> slot mapping and attention computed straight from the tier
buffers (online softmax over the selected slots, no gathered copy), threaded over query heads.

The reference stays: ``SessionConfig(kernels="reference")`` / ``vrex run --kernels reference``, and
``tests/kv/test_fast_path.py`` holds the two equal (identical selections, outputs within float
tolerance) on real keys of the real model.

The extension is compiled with ``torch.utils.cpp_extension`` (g++, ninja) into
``$VREX_CACHE/ext`` (default ``~/.cache/vrex/ext``) by ``vrex setup``; later imports load the built
module in milliseconds. CPU tensors only: on CUDA the engine uses the reference path.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("kernels.cpp")
# -fopenmp: in a translation unit built without it, at::parallel_for is a plain loop (ATen defines
# INTRA_OP_PARALLEL only under _OPENMP). Linked with it, the extension needs libgomp.so.1, which the
# torch already loaded provides: one OpenMP runtime and one thread pool, sized by torch.set_num_threads.
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module: ModuleType | None = None


class FastPathUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded; the message says why and how to fall back."""


def _build_dir() -> Path:
    root = Path(os.environ.get("VREX_CACHE", Path.home() / ".cache" / "vrex"))
    import torch

    flags = " ".join(_CFLAGS + _LDFLAGS).encode()
    tag = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + flags).hexdigest()[:12]
    d = root / "ext" / f"kernels-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension (built on first use, about a minute; then cached)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            from torch.utils.cpp_extension import load as cpp_load

            try:
                _module = cpp_load(
                    name="vrex_kernels", sources=[str(_SOURCE)], build_directory=str(_build_dir()),
                    extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, verbose=verbose,
                )
            except Exception as e:  # compiler missing, headers missing, ...
                raise FastPathUnavailable(
                    f"the vrex C++ kernels could not be built ({type(e).__name__}: {str(e).strip()[:400]}); "
                    "install g++ and ninja (make setup does), or run with kernels='reference' "
                    "(vrex run --kernels reference)") from e
    return _module


def available() -> bool:
    try:
        load()
        return True
    except FastPathUnavailable:
        return False


__all__ = ["FastPathUnavailable", "load", "available"]
