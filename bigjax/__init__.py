"""bigjax: a small, hackable JAX research framework."""

from bigjax import host_memory
from bigjax.errors import UserError

# Before XLA's CPU backend starts, or its threads never see the settings (bigjax/host_memory.py).
host_memory.keep_freed_host_memory()

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
