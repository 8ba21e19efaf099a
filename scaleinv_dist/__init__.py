"""scaleinv-dist: distributed long-context pretraining with scale-invariant attention."""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path


def _register_source_kernels() -> None:
    """Make `scaleinv_dist.kernels` importable from a source checkout (PYTHONPATH=., no install).

    The top-level folder kernels/ installs as scaleinv_dist.kernels (pyproject package-dir); an
    installed copy has it inside the package, a checkout has it beside it.
    """
    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels" / "__init__.py"
    if (here / "kernels").exists() or not source.is_file() or "scaleinv_dist.kernels" in _sys.modules:
        return
    spec = _ilu.spec_from_file_location("scaleinv_dist.kernels", source,
                                        submodule_search_locations=[str(source.parent)])
    module = _ilu.module_from_spec(spec)
    _sys.modules["scaleinv_dist.kernels"] = module
    spec.loader.exec_module(module)


_register_source_kernels()

from .attention import scale_invariant_attention  # noqa: E402

__all__ = ["scale_invariant_attention"]
__version__ = "0.1.0"
