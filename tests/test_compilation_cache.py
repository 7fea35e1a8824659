"""The persistent compilation cache the command line turns on (fastfcn_jax/compilation_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

# Compiles one small program with the cache enabled as main does, and prints where it went and what happened.
SCRIPT = """
import sys, warnings
import jax, jax.numpy as jnp
from fastfcn_jax.compilation_cache import enable
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    folder = enable(sys.argv[1])
print("folder", folder)
print("warnings", [str(w.message) for w in caught])
print("result", float(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.float32(3.0))))
print("hits", events.count("/jax/compilation_cache/cache_hits"))
"""


def run(setting: str, tmp_path: Path, **environment: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **environment)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def test_auto_keeps_programs_per_host_kind_under_xdg_cache_home_and_reads_them_back(tmp_path):
    from fastfcn_jax.compilation_cache import host_kind

    first = run("auto", tmp_path)
    folder = tmp_path / "xdg" / "fastfcn_jax" / "xla" / host_kind()
    assert first["folder"] == str(folder) and first["hits"] == "0" and first["warnings"] == "[]"
    programs = list(folder.glob("*-cache"))
    assert programs
    second = run("auto", tmp_path)
    assert int(second["hits"]) == len(programs) and second["result"] == first["result"]
    assert len(list(folder.glob("*-cache"))) == len(programs)


def test_a_folder_off_and_jaxs_own_setting(tmp_path):
    mine = tmp_path / "mine"
    assert run(str(mine), tmp_path)["folder"] == str(mine) and list(mine.glob("*-cache"))
    assert run("", tmp_path)["folder"] == "None"
    theirs = tmp_path / "theirs"
    assert run("auto", tmp_path, JAX_COMPILATION_CACHE_DIR=str(theirs))["folder"] == str(theirs)
    assert list(theirs.glob("*-cache")) and not (tmp_path / "xdg").exists()


def test_an_unwritable_folder_warns_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = run(str(blocker / "cache"), tmp_path)
    assert out["folder"] == "None" and "cannot create" in out["warnings"] and abs(float(out["result"]) - 1.28224) < 1e-5


def test_host_kind_is_stable_and_names_the_architecture(tmp_path):
    import platform

    from fastfcn_jax.compilation_cache import host_kind

    assert host_kind() == host_kind() and host_kind().startswith(platform.machine())
    # Machines that differ in instruction sets (AVX-512 or not) get folders of their own; the core count does not.
    block = "processor\t: {index}\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2{extra}\n\n"
    kinds = []
    for name, extra, cores in (("a", "", 2), ("b", "", 8), ("c", " avx512f", 2)):
        (tmp_path / name).write_text("".join(block.format(index=i, extra=extra) for i in range(cores)))
        kinds.append(host_kind(str(tmp_path / name)))
    assert kinds[0] == kinds[1] != kinds[2]
