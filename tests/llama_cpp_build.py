"""llama.cpp for the export tests: its Python bindings (llama-cpp-python, which compiles llama.cpp from the
source package) built once into a cache folder and imported from there.

The build takes about 4 minutes on 2 cores and is reused by later runs (MINIMIND_CACHE, default
~/.cache/minimind). No C++ toolchain: the tests skip and say so; no network and no cached build: likewise.
"""
import importlib
import os
import shutil
import subprocess
import sys

import pytest

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Its runtime needs beyond numpy / jinja2 / typing-extensions (installed with the requirements).
EXTRA_PACKAGES = ("diskcache==5.6.3",)
# Only the library the bindings load; no server, tools, examples or multimodal (mtmd) library. GGML_NATIVE off:
# the build runs on any x86-64 CPU, so a cache copied to another machine cannot die of an illegal instruction.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF")


def cache_dir():
    root = os.environ.get("MINIMIND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minimind"))
    version = LLAMA_CPP_PYTHON.split("==")[1]
    return os.path.join(root, f"llama-cpp-python-{version}-py{sys.version_info.major}{sys.version_info.minor}")


def missing_toolchain():
    """What is missing to compile llama.cpp, or None."""
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    return ", ".join(missing) or None


def build(target):
    """pip-install the bindings, compiled from source, into a fresh folder, then move it to `target` in one
    rename, so an interrupted build never leaves a half-built cache behind."""
    source = target + ".src"
    shutil.rmtree(source, ignore_errors=True)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              "--dest", source, LLAMA_CPP_PYTHON], capture_output=True, text=True, timeout=600)
    if fetched.returncode != 0:
        pytest.skip(f"llama.cpp is not built ({target} is empty) and its source package could not be fetched "
                    f"(offline?): {fetched.stderr.strip()[-300:]}")
    staging = target + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", staging,
                            *[os.path.join(source, f) for f in os.listdir(source)], *EXTRA_PACKAGES],
                           capture_output=True, text=True, env=env, timeout=1800)  # 4 minutes on 2 cores
    shutil.rmtree(source, ignore_errors=True)
    if built.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"building {LLAMA_CPP_PYTHON} failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}")
    os.replace(staging, target)


def llama_cpp():
    """The llama_cpp module: the one installed, else the cached build, else built now (or a skip that says why)."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    target = cache_dir()
    if not os.path.isdir(target):
        if (missing := missing_toolchain()):
            pytest.skip(f"llama.cpp cannot be built here: no {missing} (Debian/Ubuntu: apt-get install g++ cmake)")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        build(target)
    sys.path.insert(0, target)
    return importlib.import_module("llama_cpp")
