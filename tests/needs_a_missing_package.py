import timm_not_installed_anywhere  # noqa: F401
