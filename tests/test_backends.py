"""Backend report and dispatch: the compiled extension is found, forcing works and fails loudly."""

import subprocess
import sys

import pytest
import torch

from due_ext import backends
from due_ext._backends import build_hint
from due_ext.ops._dispatch import select_backend


def test_extension_is_built_and_cpp_available():
    import due_ext._C  # noqa: F401

    status = backends()
    assert set(status) == {"cpp", "cuda", "triton", "reference"}
    assert status["cpp"].available, status["cpp"].reason
    assert "OpenMP on" in status["cpp"].reason
    assert not status["cuda"].available and status["cuda"].reason  # no GPU here: a reason is given


def test_dispatch_prefers_compiled_kernels_and_honours_forcing(monkeypatch):
    monkeypatch.delenv("DUE_EXT_BACKEND", raising=False)
    assert select_backend("explanation_loss", torch.device("cpu")) == "cpp"
    monkeypatch.setenv("DUE_EXT_BACKEND", "reference")
    assert select_backend("explanation_loss", torch.device("cpu")) == "reference"
    monkeypatch.setenv("DUE_EXT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="unavailable"):
        select_backend("explanation_loss", torch.device("cpu"))
    monkeypatch.setenv("DUE_EXT_BACKEND", "fortran")
    with pytest.raises(ValueError, match="not a backend"):
        select_backend("explanation_loss", torch.device("cpu"))


def test_cli_lists_commands_and_backends():
    run = subprocess.run([sys.executable, "-m", "due_ext", "backends"], capture_output=True, text=True)
    assert run.returncode == 0 and "cpp: available" in run.stdout
    helps = subprocess.run([sys.executable, "-m", "due_ext", "--help"], capture_output=True, text=True,
                           env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert helps.returncode == 0
    text = helps.stdout + helps.stderr  # fire writes help to stderr when not on a terminal
    for command in ("data", "backends", "demo", "report"):
        assert command in text


def test_build_hint_names_the_checkout_or_says_to_install(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "due_ext").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    assert build_hint(checkout / "due_ext") == f"build it with `pip install --no-build-isolation -e {checkout}`"
    exported = tmp_path / "bundle" / "scripts" / "due_ext"
    exported.mkdir(parents=True)
    hint = build_hint(exported)
    assert str(exported) in hint and "install the due-ext package" in hint and " -e " not in hint
