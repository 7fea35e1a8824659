"""JAX's persistent compilation cache for this package's runs: compiled programs kept on disk, so that a
resumed training run, a second evaluation or an export skips the compilations the first one paid for.

A training step of an R50 model compiles in 20-75 s on a GPU; the whole-image evaluation protocols compile the
network once per image size (docs/evaluation.md), hundreds of times on ADE20K. JAX keeps nothing between
processes unless told where (``jax_compilation_cache_dir``), so the command line turns it on by default
(``config.compilation_cache='auto'``): ``$XDG_CACHE_HOME/fastfcn_jax/xla`` (``~/.cache/...``), in a folder per
host CPU kind. XLA:CPU compiles for the host's instruction set and JAX's cache key names only the platform, so
a home folder shared by machines of different CPUs (this project's have AVX-512 or not) must not share
programs. Only programs that took at least a second to compile are written (JAX's own threshold), only by
process 0 of a multi-host job, and the oldest are evicted beyond ``MAX_BYTES`` where the ``filelock`` package
is importable (JAX needs it for eviction; without it the cache is unbounded).
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

MAX_BYTES = 8 << 30  # evicted beyond this, least recently used first (where filelock is importable)
ENVIRONMENT = "JAX_COMPILATION_CACHE_DIR"  # JAX's own setting; given, it wins over config.compilation_cache


def host_kind(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """A short name for this host's CPU: its architecture and a hash of its model and instruction-set flags."""
    described = platform.machine() + platform.processor()
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    described += line.strip()
                if not line.strip():  # the first processor's block is enough
                    break
    except OSError:  # not Linux: the architecture and processor name alone
        pass
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/fastfcn_jax/xla/<host kind>``, ``~/.cache/...`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "fastfcn_jax" / "xla" / host_kind()


def enable(setting: str = "auto") -> str | None:
    """Points JAX's persistent compilation cache at ``setting``: 'auto' (:func:`default_directory`), a folder,
    or '' (off). Returns the folder in use, or None. JAX's own ``JAX_COMPILATION_CACHE_DIR`` (or a directory
    already configured in this process) wins. A folder that cannot be created is a warning, not an error: the
    run goes on compiling as without a cache."""
    import jax

    configured = os.environ.get(ENVIRONMENT) or jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    if not setting:
        return None
    if "://" in setting:  # a bucket (gs://...): JAX writes there itself, through etils' epath
        jax.config.update("jax_compilation_cache_dir", setting)
        return setting
    directory = default_directory() if setting == "auto" else Path(setting).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        warnings.warn(
            f"compilation cache off: cannot create {directory} ({error.strerror or error}); set "
            "config.compilation_cache to a writable folder, or '' to silence this",
            stacklevel=2,
        )
        return None
    try:
        import filelock  # noqa: F401 (JAX evicts only with it)

        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    except ImportError:
        pass
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return str(directory)
