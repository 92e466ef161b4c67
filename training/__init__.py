"""The Accelerate trainer and its data pipeline, installed as `flair_hf_training`."""
