"""The layering rule: the core (ddpm/) runs with PyTorch alone and loads no platform module."""

import subprocess
import sys


def test_core_imports_no_platform_modules():
    code = ("import sys, ddpm, ddpm.checkpoint, ddpm.sampling, ddpm.metrics, ddpm.training\n"
            "bad = [m for m in ('ray', 'mlflow', 'boto3', 'botocore', 'pyarrow', 'fastapi', 'starlette') "
            "if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"ddpm imported {out}"
