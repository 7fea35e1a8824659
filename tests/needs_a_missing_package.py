"""A module whose import fails on a dependency that is not installed: the custom-backbone import error
(tests/test_models.py) names the dependency, not PYTHONPATH."""

import timm_not_installed_anywhere  # noqa: F401
