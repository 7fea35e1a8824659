"""Parity with the official PyTorch FastFCN and mmsegmentation on every fixture, on whatever backend jax runs on.

    python experiments/parity_check.py            # prints max|out - ref| / std(ref) per array and fixture
    python experiments/parity_check.py --fixtures psp_jpu_r50_pcontext,fcn_jpu_r50_pcontext   # some of them

Needs only jax, flax and numpy (no torch, no TensorFlow): the original outputs are in tests/fixtures/parity
(official) and tests/fixtures/parity_mmseg, and the synthetic weights are rebuilt from each key list
(fastfcn_jax.convert.parity). Runs at float32 with
``jax.default_matmul_precision('highest')``. Exits non-zero if any array exceeds the 1e-4 threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from fastfcn_jax.convert.parity import FIXTURE_FOLDERS, PARITY_FIXTURES, TOLERANCE, parity_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fixtures", default=",".join(PARITY_FIXTURES), help=f"comma-separated, of {', '.join(PARITY_FIXTURES)}"
    )
    fixtures = [name for name in parser.parse_args(argv).fixtures.split(",") if name]
    unknown = sorted(set(fixtures) - set(PARITY_FIXTURES))
    if unknown or not fixtures:
        found = f"unknown fixtures {unknown}" if unknown else "no fixtures given"
        parser.error(f"{found}; choose among {', '.join(PARITY_FIXTURES)}")
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    worst = 0.0
    for fixture in fixtures:
        folder = FIXTURE_FOLDERS[PARITY_FIXTURES[fixture][2]]
        errors, _ = parity_errors(REPO / "tests" / "fixtures" / folder, fixture)
        worst = max(worst, *errors.values())
        details = "  ".join(f"{name} {error:.1e}" for name, error in errors.items())
        print(f"{fixture:30s} worst {max(errors.values()):.2e}  {details}")
    verdict = "PASS" if worst < TOLERANCE else "FAIL"
    checked = "all fixtures" if len(fixtures) == len(PARITY_FIXTURES) else ", ".join(fixtures)
    print(f"worst over {checked}: {worst:.2e} (threshold {TOLERANCE:.0e}): {verdict}")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
