"""Using a trained policy: generation, the local judge, export to plain transformers. Imports
``training`` and below."""
