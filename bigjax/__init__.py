"""bigjax: a small, hackable JAX research framework. Importing it changes nothing process-wide."""

from bigjax.errors import UserError
from bigjax.host_memory import keep_freed_host_memory

__version__ = "0.1.0"
__all__ = ["UserError", "keep_freed_host_memory", "__version__"]
