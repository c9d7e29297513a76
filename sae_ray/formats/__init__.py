"""Import and export of SAEs in other projects' formats."""

from sae_ray.formats.saelens import load_saelens, save_saelens

__all__ = ["load_saelens", "save_saelens"]
