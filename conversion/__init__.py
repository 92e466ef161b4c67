"""The converter and the original formulation, installed as `flair_hf_conversion`."""
