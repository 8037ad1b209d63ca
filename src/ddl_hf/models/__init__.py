"""Model folders. Each one is self-contained: it imports only torch, transformers and its own files, so
`save_pretrained` can copy it next to the weights as remote code."""
