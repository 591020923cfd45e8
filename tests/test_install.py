"""The installed package, not the source tree: a wheel in a fresh venv works on its own."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A temp venv with moi's wheel installed (not editable) and the project's dependencies
    visible (a path line to this venv's site-packages: its .pth files, the editable install
    among them, are not run). Returns the venv's python."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a clean copy: a build/ left in the tree would leak stale files into the wheel
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("local", "cloud", "shared"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("moi-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "local/cli.py" in names and "cloud/turn.py" in names and "modal_app.py" not in names
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    site = next((tmp / "venv" / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    (site / "moi-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return tmp / "venv" / "bin" / "python", tmp


def no_modal_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "PYTHONPATH", "MOI_"))}
    return env | {"HOME": str(home), "MODAL_CONFIG_PATH": str(home / "no-modal.toml"), "COLUMNS": "200"}


def test_the_wheel_runs_from_its_install(installed):
    python, tmp = installed
    code = "import local, cloud, shared; print(local.__file__)"
    r = subprocess.run([str(python), "-c", code], cwd=tmp, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "site-packages" in r.stdout and str(ROOT) not in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run([str(python), "-c", "import modal_app"], cwd=tmp, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr  # not shipped, and nothing needs it


@pytest.mark.parametrize("argv", [["--remote", "--url", "modal", "--input", "sample"],
                                  ["transcribe", "--remote", "."]])
def test_modal_without_credentials_is_one_clear_line(installed, argv):
    python, tmp = installed
    r = subprocess.run([str(python), "-m", "local.cli", *argv], cwd=tmp, env=no_modal_env(tmp),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moi: error:"), r.stderr
    assert "modal token new" in lines[0]
