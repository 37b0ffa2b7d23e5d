"""The LM weight types live in one list (vrex/models/dtypes.py) that load_videollm, vrex run --lm-dtype
and vrex bench stream --lm-dtype read (issue 16: it was written out in three places)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vrex.cli.options import run_option_errors
from vrex.models.dtypes import DEFAULT_LM_DTYPE, LM_DTYPES, lm_torch_dtype


def test_names_and_torch_dtypes():
    assert DEFAULT_LM_DTYPE in LM_DTYPES
    for name in LM_DTYPES:
        assert lm_torch_dtype(name) is getattr(torch, name) is lm_torch_dtype(getattr(torch, name))
    for bad in ("float16", torch.float16, "fp32"):
        with pytest.raises(ValueError, match="lm_dtype must be one of float32, bfloat16"):
            lm_torch_dtype(bad)


def test_cli_checks_against_the_list():
    base = {"fps": 2.0, "max_frames": None, "theta": 0.5, "min_gap": 0.0, "recent_tokens": None, "positions": "compress",
            "lm": "smollm2-135m", "encoder": "efficientnet-lite0", "base_lm": None, "connector": "auto", "trace": None,
            "disk_dir": None, "policy": "full", "device_budget": None, "host_budget": None}
    for name in LM_DTYPES:
        assert run_option_errors({**base, "lm_dtype": name}) == []
    assert run_option_errors({**base, "lm_dtype": "float16"}) == [
        f"--lm-dtype 'float16': not allowed; choose one of {', '.join(LM_DTYPES)}"]


def test_the_list_imports_without_torch():
    code = "import sys, vrex.models.dtypes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
