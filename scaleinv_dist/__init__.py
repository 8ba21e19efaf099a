"""scaleinv-dist: distributed long-context pretraining with scale-invariant attention."""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path


def _register_source_kernels() -> None:
    """Make `scaleinv_dist.kernels` importable from a source checkout (PYTHONPATH=., no install).

    The top-level folder kernels/ installs as scaleinv_dist.kernels (pyproject package-dir); an
    installed copy has it inside the package, a checkout (or an editable install) has it beside it.
    kernels/ has no __init__.py on purpose: a plain folder is only a namespace-package portion, so
    from the repository root `import kernels` still finds PyPI's `kernels` (which transformers
    imports) instead of our folder.
    """
    name = __name__ + ".kernels"
    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if name in _sys.modules or (here / "kernels").is_dir() or not (source / "flash_si.py").is_file():
        return
    spec = _ilu.spec_from_loader(name, None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = _ilu.module_from_spec(spec)  # a namespace package whose __path__ is kernels/
    _sys.modules[name] = module
    globals()["kernels"] = module


_register_source_kernels()

from .attention import scale_invariant_attention  # noqa: E402

__all__ = ["scale_invariant_attention"]
__version__ = "0.1.0"
