"""Bundled demo data: animal silhouettes (MIT, see animal_silhouettes.LICENSE)."""
