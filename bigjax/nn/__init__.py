"""Pure Flax Linen modules, one family per file; no training code lives here."""
