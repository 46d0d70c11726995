"""Models: a Llama-style GPT (``gpt``) and a pixel-level Swin encoder-decoder (``swin``)."""
