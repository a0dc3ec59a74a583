"""Model zoo. Importing this package registers every family."""

from toolchain.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

# Each import registers its family with the registry.
from toolchain.models import verifier  # noqa: F401,E402

for _family in ("mobilefacenet", "seesawfacenet", "vargfacenet"):
    try:
        __import__(f"toolchain.models.{_family}")
    except ModuleNotFoundError as _exc:  # family not written yet
        if _exc.name != f"toolchain.models.{_family}":
            raise

__all__ = ["ModelSpec", "build_model", "get_spec", "list_models", "register_model"]
