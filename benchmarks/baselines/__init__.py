"""Third-party baselines compared against lit_prune (optional dependencies, imported lazily)."""
