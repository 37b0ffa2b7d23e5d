"""The weight types the LM may be loaded in: the one list ``load_videollm(lm_dtype=...)``, ``vrex run
--lm-dtype`` and ``vrex bench stream --lm-dtype`` accept.

Importing this module does not import torch (only :func:`lm_torch_dtype` does): the command line
checks ``--lm-dtype`` against :data:`LM_DTYPES` before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: LM weight types by name, the ones tests/models/test_lm_dtype.py runs. bfloat16 halves the weight bytes each
#: step reads (attention and the KV store stay float32 on CPU).
LM_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DEFAULT_LM_DTYPE = "float32"
#: KV storage types the command line accepts (``--kv-dtype``); "auto": float32 on CPU, the LM's type elsewhere
KV_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32")


def lm_torch_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    """The torch dtype of an LM weight type given by name (``"bfloat16"``) or as a torch dtype;
    ``ValueError`` naming the allowed ones for anything else."""
    import torch

    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name not in LM_DTYPES:
        raise ValueError(f"lm_dtype must be one of {', '.join(LM_DTYPES)} (or torch.{', torch.'.join(LM_DTYPES)}), got {dtype!r}")
    return getattr(torch, name)
