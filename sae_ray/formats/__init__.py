"""Import and export of SAEs in other projects' formats."""

from sae_ray.formats.saelens import load_sae_dir, load_saelens, save_saelens

__all__ = ["load_sae_dir", "load_saelens", "save_saelens"]
