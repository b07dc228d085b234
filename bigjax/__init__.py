"""bigjax: a small, hackable JAX research framework."""

from bigjax.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
