"""The Gradio page (`app.py`, also a Space), installed as `flair_hf_demo`."""
